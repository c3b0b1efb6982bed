"""A damped Newton-Krylov solver for ``F(y) = target``, for any differentiable ``F`` (e.g. a UNet step
or a whole sampling trajectory).

Each iteration solves ``J d = -r`` with GMRES on Jacobian-vector products (``jax.jvp``; the Jacobian
is never formed), then backtracks along ``d`` until the residual norm falls by the Armijo factor
(Knoll & Keyes 2004, "Jacobian-free Newton-Krylov methods", J. Comput. Phys. 193).

With ``rows = B`` (the batch size) the rows of the batch are independent problems, as they are for
any model that treats batch rows independently: each row gets its own Krylov space
(:mod:`dpmjax.numerics.krylov`), step length and stopping test, all from one batched ``F``/``jvp`` call.
With ``rows = 1`` it is one problem over the whole array.

A row stops at ``max|r| <= tolerance * max(1, max|target|)`` (its own maximum), or when its line
search finds no decrease (the float32 floor); the solve stops when all rows have stopped or after
``max_iterations``. A stopped row is frozen (``jnp.where`` on the per-row mask, in GMRES and the line
search too): its iterate and residual never change again, so a NaN row or a row that needs many more
iterations leaves every other row of the batch bitwise as it is without it. Runs inside
``jit``/``scan`` (``lax.while_loop``).
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax import lax

from .krylov import gmres
from .rows import per_row, row_max_abs, row_norm

Array = jax.Array


class _Iterate(NamedTuple):
    """The Newton loop's carry: the iterate and its residual, rows still solving, iterations made,
    each row's best iterate so far and its max residual, consecutive non-monotone steps per row."""

    y: Array
    r: Array
    active: Array
    count: Array
    best_y: Array
    best_max: Array
    leaps: Array
    evaluations: Array
    last: Array


class _LineSearch(NamedTuple):
    """Carry of the backtracking line search: per row the step length, its residual and norm, the
    full step's residual; the evaluations made (the full step's first)."""

    step: Array
    r: Array
    r_norm: Array
    r_full: Array
    evaluations: Array


class NewtonResult(NamedTuple):
    solution: Array
    residual: Array  # [rows]: max|F(y) - target| / max(1, max|target|) per row at the solution
    iterations: Array
    evaluations: Array  # batched evaluations of F, its Jacobian-vector products and preconditionings


# Rows within this factor of their tolerance halve their step at most _NEAR_BACKTRACKS times and stop
# when a step gains less than 10%: there the residual is mostly float rounding, and a long line
# search (a whole batched evaluation of F per halving) would chase noise.
_NEAR = 100.0
_NEAR_BACKTRACKS = 3
# consecutive full steps a row takes without a decrease before it stops
_MAX_LEAPS = 3


def newton_krylov(
    F: Callable[[Array], Array],
    target: Array,
    y0: Array,
    max_iterations: int = 30,
    tolerance: float = 1e-6,
    gmres_restart: int = 20,
    gmres_maxiter: int = 3,
    max_backtracks: int = 30,
    rows: int = 1,
    preconditioner: Optional[Callable[[Array, Array, Array], Array]] = None,
    solve_rows: Optional[Array] = None,
    max_evaluations: Optional[Array] = None,
) -> NewtonResult:
    """Solve ``F(y) = target`` from ``y0``; see the module docstring.

    ``preconditioner(y, F(y), v)``, if given, approximates ``J(y)^{-1} v`` (a linear map of ``v``);
    GMRES then solves the right-preconditioned system ``J P u = -r`` and steps along ``d = P u``,
    which takes few Krylov iterations where ``P`` is close to the inverse Jacobian. ``solve_rows``
    (``[rows]`` bool), if given, limits the solve to those rows; the others keep ``y0``.
    ``max_evaluations`` (an integer, may be traced), if given, is a budget on the batched evaluations
    of ``F`` (``F`` itself, its Jacobian-vector products and the preconditioner's applications, each
    counted once; ``NewtonResult.evaluations``): an iteration starts only where the previous one's
    cost (the first: a full GMRES solve and one step) still fits, so an iteration passes it only by
    what it costs more than the one before."""
    scale = jnp.maximum(1.0, row_max_abs(target, rows))
    threshold = tolerance * scale

    def residual(y):
        return F(y) - target

    def unconverged(carry: _Iterate):
        within = True if max_evaluations is None else carry.evaluations + carry.last <= max_evaluations
        return (carry.count < max_iterations) & jnp.any(carry.active) & within

    def iterate(carry: _Iterate) -> _Iterate:
        y, r, active = carry.y, carry.r, carry.active
        if preconditioner is None:
            matvec = lambda v: jax.jvp(residual, (y,), (v,))[1]  # noqa: E731
            krylov = gmres(matvec, -r, rows=rows, restart=gmres_restart, cycles=gmres_maxiter, rtol=1e-6)
            d, evaluations = krylov.solution, krylov.products
        else:
            value = r + target
            precondition = lambda v: preconditioner(y, value, v)  # noqa: E731
            matvec = lambda v: jax.jvp(residual, (y,), (precondition(v),))[1]  # noqa: E731
            krylov = gmres(matvec, -r, rows=rows, restart=gmres_restart, cycles=gmres_maxiter, rtol=1e-6)
            d, evaluations = precondition(krylov.solution), 2 * krylov.products + 1
        d = jnp.where(per_row(active, d), d, jnp.zeros_like(d))
        r_norm = row_norm(r, rows)
        r_max = row_max_abs(r, rows)
        near = r_max <= _NEAR * threshold  # rounding, not the model's curvature, limits these rows
        backtracks = jnp.where(near, _NEAR_BACKTRACKS, max_backtracks)

        def searching(ls: _LineSearch):
            # the first evaluation is the full step's, for every row (its residual decides a leap below)
            first = ls.evaluations == 0
            return first | (active & (ls.evaluations <= backtracks) & (ls.r_norm > (1.0 - 1e-4 * ls.step) * r_norm))

        def insufficient(ls: _LineSearch):
            return jnp.any(searching(ls))

        def halve(ls: _LineSearch) -> _LineSearch:
            halving = searching(ls)  # a row that has found its step keeps it and its residual
            step = jnp.where(halving, 0.5 * ls.step, ls.step)
            # the full step is the loop's first evaluation (step 2 halved), not one of its own: each
            # evaluation traced is a copy of F (a whole sampler of model calls) in the compiled program
            r_new = residual(y + per_row(step, d).astype(d.dtype) * d)
            return _LineSearch(step=step, r=jnp.where(per_row(halving, r_new), r_new, ls.r),
                               r_norm=jnp.where(halving, row_norm(r_new, rows), ls.r_norm),
                               r_full=jnp.where(ls.evaluations == 0, r_new, ls.r_full), evaluations=ls.evaluations + 1)

        twos = jnp.full(r_norm.shape, 2.0, r_norm.dtype)
        step, r_new, r_norm_new, r_full, searched = lax.while_loop(
            insufficient, halve, _LineSearch(step=twos, r=r, r_norm=jnp.full_like(r_norm, jnp.inf), r_full=r,
                                             evaluations=jnp.asarray(0)))
        cost = (evaluations + searched).astype(jnp.int32)  # GMRES's, the full step's, the halvings'
        better = active & (r_norm_new < r_norm)
        # a row far from its solution whose line search found no decrease takes the full step anyway
        # (non-monotone, Grippo et al. 1986, SIAM J. Numer. Anal. 23): a nonlinear map can raise the
        # residual on the way to its solution; the best iterate is kept
        leap = active & ~better & ~near & jnp.all(jnp.isfinite(r_full.reshape(rows, -1)), axis=1)
        step = jnp.where(leap, 1.0, step)
        moved = better | leap
        y = jnp.where(per_row(moved, y), y + per_row(step, d).astype(d.dtype) * d, y)
        r = jnp.where(per_row(better, r), r_new, jnp.where(per_row(leap, r), r_full, r))
        r_max_new = row_max_abs(r, rows)
        improved = r_max_new < carry.best_max
        stalled = near & (r_max_new > 0.9 * r_max)  # a Newton step near the solution gains far more
        leaps = jnp.where(leap, carry.leaps + 1, 0)
        return _Iterate(
            y=y, r=r,
            active=moved & ~stalled & (r_max_new > threshold) & (leaps <= _MAX_LEAPS),
            count=carry.count + 1,
            best_y=jnp.where(per_row(improved, y), y, carry.best_y),
            best_max=jnp.where(improved, r_max_new, carry.best_max),
            leaps=leaps,
            evaluations=carry.evaluations + cost,
            last=cost,
        )

    # an iteration's cost before the first is measured: a full GMRES solve (each product with the
    # preconditioner's, and its final application) and the full step
    products = (gmres_restart + 1) * gmres_maxiter - 1  # the first cycle's residual is free (x = 0)
    first_cost = (products + 1 if preconditioner is None else 2 * products + 2)
    r0 = residual(y0)
    r0_max = row_max_abs(r0, rows)
    active0 = r0_max > threshold
    if solve_rows is not None:
        active0 = active0 & solve_rows
    start = _Iterate(y=y0, r=r0, active=active0, count=jnp.asarray(0), best_y=y0,
                     best_max=jnp.where(jnp.isfinite(r0_max), r0_max, jnp.inf), leaps=jnp.zeros(r0_max.shape, jnp.int32),
                     evaluations=jnp.asarray(1, jnp.int32), last=jnp.asarray(first_cost, jnp.int32))
    done = lax.while_loop(unconverged, iterate, start)
    return NewtonResult(solution=done.best_y, residual=jnp.minimum(done.best_max, r0_max) / scale, iterations=done.count,
                        evaluations=done.evaluations)

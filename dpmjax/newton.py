"""A damped Newton-Krylov solver for ``F(y) = target``, for any differentiable ``F`` (e.g. a UNet step
or a whole sampling trajectory).

Each iteration solves ``J d = -r`` with GMRES on Jacobian-vector products (``jax.jvp``; the Jacobian
is never formed), then backtracks along ``d`` until the residual norm falls by the Armijo factor
(Knoll & Keyes 2004, "Jacobian-free Newton-Krylov methods", J. Comput. Phys. 193).

With ``rows = B`` (the batch size) the rows of the batch are independent problems, as they are for
any model that treats batch rows independently: each row gets its own Krylov space
(:mod:`dpmjax.krylov`), step length and stopping test, all from one batched ``F``/``jvp`` call.
With ``rows = 1`` it is one problem over the whole array.

A row stops at ``max|r| <= tolerance * max(1, max|target|)`` (its own maximum), or when its line
search finds no decrease (the float32 floor); the solve stops when all rows have stopped or after
``max_iterations``. Runs inside ``jit``/``scan`` (``lax.while_loop``).
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax import lax

from .krylov import gmres, row_norm

Array = jax.Array


class NewtonResult(NamedTuple):
    solution: Array
    residual: Array  # [rows]: max|F(y) - target| / max(1, max|target|) per row at the solution
    iterations: Array


# Rows within this factor of their tolerance halve their step at most _NEAR_BACKTRACKS times and stop
# when a step gains less than 10%: there the residual is mostly float rounding, and a long line
# search (a whole batched evaluation of F per halving) would chase noise.
_NEAR = 100.0
_NEAR_BACKTRACKS = 3


def row_max_abs(x: Array, rows: int) -> Array:
    return jnp.max(jnp.abs(x.astype(jnp.float32)).reshape(rows, -1), axis=1)


def _broadcast(per_row: Array, like: Array) -> Array:
    return per_row.reshape(per_row.shape + (1,) * (like.ndim - 1))


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
) -> NewtonResult:
    """Solve ``F(y) = target`` from ``y0``; see the module docstring.

    ``preconditioner(y, F(y), v)``, if given, approximates ``J(y)^{-1} v`` (a linear map of ``v``);
    GMRES then solves the right-preconditioned system ``J P u = -r`` and steps along ``d = P u``,
    which takes few Krylov iterations where ``P`` is close to the inverse Jacobian. ``solve_rows``
    (``[rows]`` bool), if given, limits the solve to those rows; the others keep ``y0``."""
    scale = jnp.maximum(1.0, row_max_abs(target, rows))
    threshold = tolerance * scale

    def residual(y):
        return F(y) - target

    def unconverged(carry):
        _, _, active, it = carry
        return (it < max_iterations) & jnp.any(active)

    def iterate(carry):
        y, r, active, it = carry
        if preconditioner is None:
            matvec = lambda v: jax.jvp(residual, (y,), (v,))[1]  # noqa: E731
            d = gmres(matvec, -r, rows=rows, restart=gmres_restart, cycles=gmres_maxiter, rtol=1e-6).solution
        else:
            value = r + target
            precondition = lambda v: preconditioner(y, value, v)  # noqa: E731
            matvec = lambda v: jax.jvp(residual, (y,), (precondition(v),))[1]  # noqa: E731
            d = precondition(gmres(matvec, -r, rows=rows, restart=gmres_restart, cycles=gmres_maxiter, rtol=1e-6).solution)
        d = jnp.where(_broadcast(active, d), d, jnp.zeros_like(d))
        r_norm = row_norm(r, rows)
        r_max = row_max_abs(r, rows)
        near = r_max <= _NEAR * threshold  # rounding, not the model's curvature, limits these rows
        backtracks = jnp.where(near, _NEAR_BACKTRACKS, max_backtracks)

        def searching(ls):
            step, _, r_norm_new, k = ls
            return active & (k < backtracks) & (r_norm_new > (1.0 - 1e-4 * step) * r_norm)

        def insufficient(ls):
            return jnp.any(searching(ls))

        def halve(ls):
            step, r_new, r_norm_new, k = ls
            step = jnp.where(searching(ls), 0.5 * step, step)
            r_new = residual(y + _broadcast(step, d).astype(d.dtype) * d)
            return step, r_new, row_norm(r_new, rows), k + 1

        ones = jnp.ones(r_norm.shape, jnp.float32)
        r_full = residual(y + d)
        step, r_new, r_norm_new, _ = lax.while_loop(insufficient, halve, (ones, r_full, row_norm(r_full, rows), 0))
        better = active & (r_norm_new < r_norm)
        y = jnp.where(_broadcast(better, y), y + _broadcast(step, d).astype(d.dtype) * d, y)
        r = jnp.where(_broadcast(better, r), r_new, r)
        r_max_new = row_max_abs(r, rows)
        stalled = near & (r_max_new > 0.9 * r_max)  # a Newton step near the solution gains far more
        active = better & ~stalled & (r_max_new > threshold)
        return y, r, active, it + 1

    r0 = residual(y0)
    active0 = row_max_abs(r0, rows) > threshold
    if solve_rows is not None:
        active0 = active0 & solve_rows
    y, r, _, iterations = lax.while_loop(unconverged, iterate, (y0, r0, active0, jnp.asarray(0)))
    return NewtonResult(y, row_max_abs(r, rows) / scale, iterations)

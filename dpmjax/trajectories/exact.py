"""Exact inversion of a sampler: find the start ``z`` of the sampler ``S`` with ``S(z) = x`` to the
working precision.

Hong et al. 2024 ("On Exact Inversion of DPM-Solvers", CVPR) solve the implicit steps one by one;
a multistep sampler is a function of its start alone, so here the whole sampler is the equation.

* Fast path (orders >= 2): plain inversion ``I``, defect-correction sweeps
  ``z <- z + I(x) - I(S(z))`` (Stetter 1978), then Newton-Krylov on ``S(z) = x`` with GMRES
  right-preconditioned by ``I``'s Jacobian.
* Robust path (order 1, and rows the fast path leaves): each step of the first-order sampler solved
  alone (Anderson-accelerated fixed point, then Newton-Krylov; exact for order 1), history sweeps
  that feed each step the older model outputs of the previous sweep (Anderson-accelerated per row),
  then the unpreconditioned whole-sampler solve.
* A first-order ``sde-dpmsolver++`` sampler given its per-step noises: the per-step solves with the
  noise held fixed are exact.

Each row keeps the best of plain inversion and the two paths, and reports its measured round trip.
Rows are independent bit for bit: every solver freezes a row once it meets its stop rule, and the
robust path changes only rows not yet within the tolerance.

Differentiable (``jax.jvp``, ``jax.grad``) by implicit differentiation of ``S(z) = x``, never through
the solver's iterations: ``dz`` solves ``J dz = dx - (dS/dtheta) dtheta`` with ``J = dS/dz`` at the
``z`` found and ``theta`` the condition, the values the model closes over and an SDE sampler's noises
(:func:`_solved_jvp`).
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.custom_derivatives import SymbolicZero

from .. import solver
from ..numerics import rows as rows_of
from ..numerics.anderson import anderson_fixed_point, mix
from ..numerics.krylov import gmres
from ..numerics.newton import newton_krylov
from ..numerics.rows import row_max_abs
from . import progress as progress_line
from .scan import ScanOptions, call_model, scan_steps

Array = jax.Array


# Newton iterations of each per-step solve inside a history sweep
_SWEEP_ITERATIONS = 5
# Anderson-accelerated fixed-point iterations (model calls) of a per-step solve before Newton
_FIXED_POINT_ITERATIONS = 10
# Newton iterations of an unpreconditioned whole-sampler solve
_SHOOTING_ITERATIONS = 10
# GMRES of a tangent's linear solve J dz = rhs (preconditioned by plain inversion: a few steps where it is
# accurate; 100 products at most per tangent otherwise)
_TANGENT_RESTART = 20
_TANGENT_CYCLES = 5


class ExactOptions(NamedTuple):
    """Static settings of exact inversion (hashable: one compiled program per distinct value).

    Attributes:
        max_sweeps: Defect-correction sweeps at most.
        max_iterations: Newton iterations of every Newton solve at most.
        tolerance: Bounds every Newton solve, relative to ``max(1, max|row|)``.
        gmres_restart: The Krylov space size of the Newton solves' GMRES.
        gmres_maxiter: GMRES restart cycles per linear solve.
        rows: Independent problems along axis 0 (the batch size, or 1 for a model that couples
            rows).
        return_outputs: Also return the raw model outputs along the path.
        progress: Print progress lines on stderr.
    """

    max_sweeps: int
    max_iterations: int
    tolerance: float
    gmres_restart: int
    gmres_maxiter: int
    rows: int
    return_outputs: bool = False
    progress: bool = False


class _Result(NamedTuple):
    """Per row: the start found, its round trip; defect-correction sweeps and Newton iterations made."""

    noise: Array
    error: Array
    sweeps: Array
    iterations: Array


class _HistorySweeps(NamedTuple):
    """Carry of the history sweeps: the path and history of the last sweep, the Anderson windows,
    per row the best start and its round trip, the rows still iterating, the sweeps made."""

    X: Array
    M: Array
    G_window: Array
    F_window: Array
    best_noise: Array
    best_error: Array
    active: Array
    count: Array


class _Sweeps(NamedTuple):
    """Carry of the defect-correction loop: per row the best start so far, its sample and error."""

    noise: Array
    sampled: Array
    error: Array
    active: Array
    count: Array


def exact_inversion(scheduler, inverse, model_fn, *, options: ExactOptions, state, mirror, data, cond, noises):
    """Exact inversion of the sampler ``scheduler`` on ``state``; see the module docstring.

    ``exact_inversion_jit`` is this function jitted with ``scheduler``, ``inverse``, ``model_fn`` and
    ``options`` static; the arguments after ``model_fn`` are keyword-only.

    Differentiable in forward and reverse mode by implicit differentiation of ``S(z) = x`` (not
    through the solver's iterations): see :func:`_solved`.

    Args:
        scheduler: The sampler (a forward scheduler).
        inverse: The inverse scheduler of plain inversion ``I``
            (:func:`dpmjax.trajectories.inversion.mirrored_state`).
        model_fn: The model, called as in :func:`dpmjax.sample`.
        options: :class:`ExactOptions` (static).
        state: The sampler's state: its grid.
        mirror: The inverse scheduler's state: the sampler's grid mirrored
            (:func:`dpmjax.grids.mirrored_grid`).
        data: ``x``, the sampler's end point to invert.
        cond: The condition passed to ``model_fn``, or ``None``.
        noises: An SDE sampler's per-step noises (``[N, *shape]``), or ``None``.

    Returns:
        ``(X, outputs, round_trip, sweeps, iterations)``: the path ``[N, *shape]`` (sampler order,
        noise first), the raw model outputs (``options.return_outputs``, else ``None``), the
        per-row round trip, the defect-correction sweeps made and the Newton iterations of the
        whole-sampler solve.
    """
    # the values the model closes over (e.g. parameters a caller differentiates) become explicit inputs of
    # the implicitly differentiated solve: a custom derivative only sees its explicit inputs
    example = jnp.zeros(data.shape, solver.compute_dtype(data))
    checked_model = lambda x, t, c: call_model(model_fn, x, t, cond=c, config=scheduler.config)  # noqa: E731
    hoisted, params = jax.closure_convert(checked_model, example, state.timesteps[0], cond)
    result = _solved(scheduler, inverse, _Model(hoisted, conditional=cond is not None), options=options,
                     inputs=_Inputs(state=state, mirror=mirror, data=data, cond=cond, noises=noises, params=params))
    n = state.timesteps.shape[0]
    _, later, _ = scan_steps(scheduler, model_fn, ScanOptions(return_samples=True), state=state, x=result.noise, cond=cond,
                             keys=None, noises=noises)
    X = jnp.concatenate([result.noise[None], later[:-1]])

    def raw_output(k):
        return call_model(model_fn, X[k], state.timesteps[k], cond=cond, config=scheduler.config)

    outputs = lax.map(raw_output, jnp.arange(n)) if options.return_outputs else None
    return X, outputs, result.error, result.sweeps, result.iterations


class _Inputs(NamedTuple):
    """The differentiable inputs of the solve: as in :func:`exact_inversion`, and ``params`` the values
    the model closes over (hoisted by ``jax.closure_convert``)."""

    state: object
    mirror: object
    data: Array
    cond: object
    noises: object
    params: list


class _Model(NamedTuple):
    """The model with its closed-over values hoisted: ``hoisted(x, t, cond, *params)``; called as
    ``model_fn(x, t[, cond])`` once bound to its params (:meth:`bound`)."""

    hoisted: object
    conditional: bool

    def bound(self, params):
        """The model as :func:`dpmjax.sample` calls it, evaluated at ``params``."""
        if self.conditional:
            return lambda x, t, c: self.hoisted(x, t, c, *params)
        return lambda x, t: self.hoisted(x, t, None, *params)


@partial(jax.custom_jvp, nondiff_argnums=(0, 1, 2, 3))
def _solved(scheduler, inverse, model: _Model, options: ExactOptions, inputs: _Inputs) -> _Result:
    """Per row the start ``z`` found, its round trip and the work made (the arguments as in
    :func:`exact_inversion`); see the module docstring.

    Its derivative is implicit (a ``custom_jvp``, :func:`_solved_jvp`): ``S(z) = x`` gives
    ``J dz = dx - dS/dtheta dtheta`` with ``J = dS/dz`` at the ``z`` found, for the tangents of the
    data ``x`` and of ``theta`` = the sampler's state, ``cond``, ``noises`` and the model's
    closed-over values (the mirrored grid only steers the solve and has no effect on its answer)."""
    state, mirror, data, cond, noises = inputs.state, inputs.mirror, inputs.data, inputs.cond, inputs.noises
    model_fn = model.bound(inputs.params)
    progress = options.progress
    config = scheduler.config
    n = state.timesteps.shape[0]
    K = config.solver_order
    rows = options.rows
    steps = jnp.arange(n)
    cdt = solver.compute_dtype(data)
    target = data.astype(cdt)
    scale = jnp.maximum(1.0, row_max_abs(target, rows))
    per_row = lambda v: rows_of.per_row(v, data)  # noqa: E731
    z = jnp.zeros((n,) + data.shape, cdt) if noises is None else noises.astype(cdt)
    # a row far from its solution halves its step at most 8 times (1/256) before the Newton solver's
    # non-monotone full step: longer line searches cost a whole batched evaluation each and, measured
    # on the digits at guidance 3, bought no row
    newton = dict(max_iterations=options.max_iterations, tolerance=options.tolerance / 10, max_backtracks=8,
                  gmres_restart=options.gmres_restart, gmres_maxiter=options.gmres_maxiter, rows=rows)

    def converted(k, y):
        out = call_model(model_fn, y, state.timesteps[k], cond=cond)
        return solver.converted_output(config, state, k, model_output=out, sample=y), out

    def sampled(x_noise, return_samples=False):
        return scan_steps(scheduler, model_fn, ScanOptions(return_samples=return_samples), state=state, x=x_noise, cond=cond,
                          keys=None, noises=noises)

    def error_of(x_sampled):
        """Per row: max|x_sampled - data| / max(1, max|data|) (the scale of the Newton residuals)."""
        return row_max_abs(x_sampled - target, rows) / scale

    def plain(x):  # plain inversion (``inverse`` on ``mirror``): the sampler's noise levels mirrored
        return scan_steps(inverse, model_fn, ScanOptions(), state=mirror, x=x, cond=cond, keys=None, noises=None)[0]

    def step_solves(X, M, update_rows, from_predictor, iterations=options.max_iterations):
        """Each sampler step ``x_{k+1} = F_k(x_k)`` solved for ``x_k`` by Newton-Krylov, from the data end,
        with the older model outputs (history) taken from ``M`` (sampler order, noise first); started
        from the explicit (DDIM-like) predictor or from ``X``. With first-order update rows there is no
        history and one pass is the exact inversion of the first-order sampler. Returns ``(X, M)``."""

        def solve(x_next, inputs):
            k, y_previous, z_k, *history = inputs
            row = update_rows[k].astype(cdt)
            noise = z_k if config.is_sde else None
            equation = solver.step_equation(row, history, noise=noise, like=x_next)
            F = lambda y: equation.forward(y, converted(k, y)[0])  # noqa: E731
            c_x, invertible = row[0], equation.invertible
            # F(y) = x_next as a fixed point y = g(y); g(x_next) is the explicit (DDIM-like) predictor
            g = lambda y: equation.fixed_point_map(x_next, converted(k, y)[0])  # noqa: E731
            y0 = jnp.where(from_predictor & invertible, g(x_next), jnp.where(from_predictor, x_next, y_previous))
            # each step a hundredth of the tolerance: the round trip adds up every step's residual
            tolerance = options.tolerance / 100
            step_scale = jnp.maximum(1.0, row_max_abs(x_next, rows))
            # Anderson-accelerated fixed point first (one model call per iteration; F(y) - x_next =
            # c_x (y - g(y))), then Newton-Krylov for the rows it leaves
            accelerated = anderson_fixed_point(
                g, y0, residual_of=lambda f: jnp.where(invertible, jnp.abs(c_x), 0.0) * row_max_abs(f, rows) / step_scale,
                threshold=tolerance, rows=rows, iterations=_FIXED_POINT_ITERATIONS)
            y0 = jnp.where(invertible, accelerated.solution, y0)
            # rows the fixed point brought within 10x of the tolerance are at float32's floor already
            unsolved = ~invertible | (accelerated.residual > 10 * tolerance)
            result = newton_krylov(F, x_next, y0, solve_rows=unsolved,
                                   **dict(newton, tolerance=tolerance, max_iterations=iterations))
            return result.solution, (result.solution, converted(k, result.solution)[0])

        zero = jnp.zeros_like(M[:1])
        history = [jnp.concatenate([zero, M[:-1]]), jnp.concatenate([zero, zero, M[:-2]])][: K - 1]
        return lax.scan(solve, target, (steps, X, z, *history), reverse=True)[1]

    def first_order_path():
        X = jnp.broadcast_to(target, (n,) + target.shape)
        return step_solves(X=X, M=jnp.zeros_like(X), update_rows=state.update_coefficients[steps, 0], from_predictor=True)

    def history_sweeps(X, M):
        """Orders >= 2: the per-step solves with the history from the previous sweep, a fixed-point
        iteration ``M = G(M)`` that converges where the defect correction cannot (plain inversion
        crossing between modes of the data), Anderson-accelerated per row over the last 3 sweeps
        (Walker & Ni 2011, SIAM J. Numer. Anal. 49); each row keeps its best sweep."""
        window = 3
        trajectory_rows = solver.trajectory_rows(state)
        by_row = lambda A: jnp.moveaxis(A, 1, 0).reshape(rows, -1).astype(jnp.promote_types(cdt, jnp.float32))  # noqa: E731
        from_rows = lambda v, like: jnp.moveaxis(v.reshape((like.shape[1],) + like.shape[:1] + like.shape[2:]), 0, 1)  # noqa: E731

        def unfinished(carry: _HistorySweeps):
            return (carry.count < options.max_sweeps) & jnp.any(carry.active)

        def sweep(carry: _HistorySweeps) -> _HistorySweeps:
            X_last, M_last, G_hist, F_hist, best_noise, best, active, count = carry
            # a few Newton iterations per step and sweep: the sweeps, not one step's solve, carry the
            # iteration (measured on the digits at guidance 3: a quarter of the cost, no row lost)
            X, G = step_solves(X=X_last, M=M_last, update_rows=trajectory_rows, from_predictor=count == 0,
                               iterations=min(_SWEEP_ITERATIONS, options.max_iterations))
            g, f = by_row(G), by_row(G) - by_row(M_last)
            # a row that has stopped is frozen: its path, history, windows and best never change again
            # (an active row has been active at every sweep, so its window holds ``count`` real entries)
            G_hist = jnp.where(active[None, :, None], jnp.roll(G_hist, -1, axis=0).at[-1].set(g), G_hist)
            F_hist = jnp.where(active[None, :, None], jnp.roll(F_hist, -1, axis=0).at[-1].set(f), F_hist)
            valid = jnp.arange(window + 1) >= window - count  # entries of sweeps actually made
            M_next = from_rows(mix(G_hist, F_hist, valid).astype(G.dtype), G)
            error = error_of(sampled(X[0])[0])
            better = active & (error < best)
            on_path = per_row(active)[None]
            X, M_next = jnp.where(on_path, X, X_last), jnp.where(on_path, M_next, M_last)
            return _HistorySweeps(X=X, M=M_next, G_window=G_hist, F_window=F_hist,
                                  best_noise=jnp.where(per_row(better), X[0], best_noise),
                                  best_error=jnp.where(better, error, best),
                                  active=active & (jnp.minimum(error, best) > options.tolerance), count=count + 1)

        error = error_of(sampled(X[0])[0])
        window_zeros = jnp.zeros((window + 1,) + by_row(M).shape, by_row(M).dtype)
        done = lax.while_loop(unfinished, sweep, _HistorySweeps(
            X=X, M=M, G_window=window_zeros, F_window=window_zeros, best_noise=X[0], best_error=error,
            active=error > options.tolerance, count=jnp.asarray(0)))
        return done.best_noise, done.best_error, done.count

    def sweeps(start, start_sampled, start_error):
        """Defect correction: z <- z + I(x) - I(S(z)) with I the plain inversion, an approximate inverse
        of the sampler S (Stetter 1978, "The defect correction principle"); it converges fast where I is
        accurate. A row takes a sweep only where it lowers its round trip, and stops when a sweep gains
        less than a factor of 2 (stalled at float32 cancellation, or diverging)."""

        def unfinished(carry: _Sweeps):
            return (carry.count < options.max_sweeps) & jnp.any(carry.active)

        def correct(carry: _Sweeps) -> _Sweeps:
            trial = carry.noise + plain_noise - plain(carry.sampled)
            trial_sampled = sampled(trial)[0]
            trial_error = error_of(trial_sampled)
            better = carry.active & (trial_error < carry.error)
            return _Sweeps(
                noise=jnp.where(per_row(better), trial, carry.noise),
                sampled=jnp.where(per_row(better), trial_sampled, carry.sampled),
                error=jnp.where(better, trial_error, carry.error),
                active=better & (trial_error < 0.5 * carry.error) & (trial_error > options.tolerance / 10),
                count=carry.count + 1,
            )

        done = lax.while_loop(unfinished, correct, _Sweeps(noise=start, sampled=start_sampled, error=start_error,
                                                           active=start_error > options.tolerance / 10,
                                                           count=jnp.asarray(0)))
        return done.noise, done.error, done.count

    def shooting(start, start_error, preconditioned=True):
        """Newton-Krylov on the whole sampler, S(z) = x (a multistep sampler is a function of its start
        alone), for the rows not yet within the tolerance; right-preconditioned by the plain inversion's
        Jacobian at S(z), close to S's inverse Jacobian where plain inversion is accurate, so GMRES needs
        a few products where it needs dozens unpreconditioned (without it: GMRES(20), 2 cycles). A row
        keeps its start where the solve did not improve it."""
        if preconditioned:
            settings = dict(newton, preconditioner=lambda y, value, v: jax.jvp(plain, (value,), (v,))[1])
        else:
            settings = dict(newton, gmres_restart=max(20, options.gmres_restart), gmres_maxiter=max(2, options.gmres_maxiter))
            # each iteration evaluates the whole sampler dozens of times: a cap bounds the cost where
            # the sampler is not invertible (measured at N = 10, guidance 3: half the cost, no row lost)
            settings["max_iterations"] = min(options.max_iterations, _SHOOTING_ITERATIONS)
        result = newton_krylov(lambda x_noise: sampled(x_noise)[0], target, start, solve_rows=start_error > options.tolerance,
                               **settings)
        improved = result.residual < start_error
        return (jnp.where(per_row(improved), result.solution, start), jnp.where(improved, result.residual, start_error),
                result.iterations)

    def fast(start, start_sampled, start_error) -> _Result:
        """Orders >= 2 from plain inversion: defect-correction sweeps, then the preconditioned solve."""
        start, start_error, count = sweeps(start, start_sampled, start_error)
        noise, error, iterations = shooting(start, start_error)
        return _Result(noise=noise, error=error, sweeps=count, iterations=iterations)

    def status(stage: str, result: _Result) -> None:
        """One progress line per stage: the rows within the tolerance after it."""
        message = f"{stage}: {{}}/{data.shape[0] if rows > 1 else 1} rows within {options.tolerance:g}"
        progress_line.status(progress, "invert (exact)", message, values=(jnp.sum(result.error <= options.tolerance),))

    def better_of(a: _Result, b: _Result, rows_open=True) -> _Result:
        """Per row, the result with the smaller round trip among the rows ``rows_open`` (``[rows]`` or
        True: all); the other rows keep ``a``. Counts add up."""
        take_b = rows_open & (b.error < a.error)
        return _Result(noise=jnp.where(per_row(take_b), b.noise, a.noise), error=jnp.where(take_b, b.error, a.error),
                       sweeps=a.sweeps + b.sweeps, iterations=a.iterations + b.iterations)

    if noises is not None:  # a first-order SDE sampler given its noises: the per-step solves are exact
        noise = first_order_path()[0][0]
        errors, sweep_count, iterations = error_of(sampled(noise)[0]), jnp.asarray(0), jnp.asarray(0)
    else:
        plain_noise = plain(target)
        plain_sampled = sampled(plain_noise)[0]
        plain_error = error_of(plain_sampled)
        plain_result = _Result(noise=plain_noise, error=plain_error, sweeps=jnp.asarray(0), iterations=jnp.asarray(0))
        status("plain inversion", plain_result)

        def robust(result: _Result) -> _Result:
            """The exact first-order path (exact for order 1), history sweeps (orders >= 2) and the
            whole-sampler solve, for rows the fast path left unconverged (order 1: all rows)."""
            X, M = first_order_path()
            if K == 1:
                start, start_error, count = X[0], error_of(sampled(X[0])[0]), jnp.asarray(0)
            else:
                start, start_error, count = history_sweeps(X, M)
            noise, error, iterations = shooting(start, start_error, preconditioned=K == 1)
            # orders >= 2 run this path for every row when any row needs it: the rows that were within the
            # tolerance already keep their result, so that a row's answer never depends on its neighbours
            result = better_of(result, _Result(noise=noise, error=error, sweeps=count, iterations=iterations),
                               rows_open=True if K == 1 else result.error > options.tolerance)
            status("per-step solves and the whole-sampler solve", result)
            return result

        if K == 1:
            result = robust(plain_result)
        else:
            result = better_of(plain_result, fast(plain_noise, plain_sampled, plain_error))
            status("defect-correction sweeps and the preconditioned solve", result)
            result = lax.cond(jnp.any(result.error > options.tolerance), robust, lambda r: r, result)
        # never worse than plain inversion on any row: better_of keeps it where nothing beat it
        noise, errors, sweep_count, iterations = result
    return _Result(noise=noise, error=errors, sweeps=sweep_count, iterations=iterations)


def _zeros_for(tangent):
    """A concrete zero for a symbolic-zero tangent (``float0`` for integer primals); others unchanged."""
    if not isinstance(tangent, SymbolicZero):
        return tangent
    if tangent.aval.dtype == jax.dtypes.float0:
        return np.zeros(tangent.aval.shape, jax.dtypes.float0)
    return jnp.zeros(tangent.aval.shape, tangent.aval.dtype)


@partial(_solved.defjvp, symbolic_zeros=True)
def _solved_jvp(scheduler, inverse, model: _Model, options: ExactOptions, primals, tangents):
    """Implicit differentiation of ``S(z) = x``: the tangent of the start is the solution ``dz`` of

        J dz = dx - (dS/dtheta) dtheta,    J = dS/dz at the z found,

    with ``theta`` the sampler's state, ``cond`` and ``noises`` (their term is skipped where their
    tangents are symbolic zeros, e.g. when only ``x`` is differentiated). ``J`` is block diagonal over
    the rows (``options.rows``), so each row is solved alone with row-wise GMRES on Jacobian-vector
    products of the sampler, right-preconditioned by the plain inversion's Jacobian at ``x``:
    ``J P u = rhs``, ``dz = P u``, ``P = dI/dx`` (close to ``J^{-1}`` where plain inversion is
    accurate). The solve is a ``lax.custom_linear_solve`` whose transpose solves ``J^T w = g`` the
    same way (GMRES on vector-Jacobian products, preconditioned by ``P^T``), so reverse mode
    (``jax.grad``) works and never differentiates the solver's iterations. The round trip's tangent
    is zero (it measures the solve, not a function of the data); the counts have none. A row that
    did not converge gets the same formula at the start it reports (``Trajectory.converged`` flags
    it); a row with a non-finite start or data gets a non-finite tangent, and no other row changes."""
    (inputs,), (tangents,) = primals, tangents
    state, mirror, data, cond, noises = inputs.state, inputs.mirror, inputs.data, inputs.cond, inputs.noises
    result = _solved(scheduler, inverse, model, options=options, inputs=inputs)
    z = result.noise
    target = data.astype(z.dtype)
    model_fn = model.bound(inputs.params)

    def sampler(noise, theta):
        """``S(z)`` with ``theta = (state, cond, noises, params)``."""
        return scan_steps(scheduler, model.bound(theta[3]), ScanOptions(), state=theta[0], x=noise, cond=theta[1],
                          keys=None, noises=theta[2])[0]

    def plain(x):
        return scan_steps(inverse, model_fn, ScanOptions(), state=mirror, x=x, cond=cond, keys=None, noises=None)[0]

    rhs = _zeros_for(tangents.data).astype(z.dtype)
    theta = (state, cond, noises, inputs.params)
    others = (tangents.state, tangents.cond, tangents.noises, tangents.params)
    symbolic = lambda t: isinstance(t, SymbolicZero)  # noqa: E731
    if not all(symbolic(t) for t in jax.tree.leaves(others, is_leaf=symbolic)):
        others = jax.tree.map(_zeros_for, others, is_leaf=symbolic)
        moved = jax.jvp(lambda th: sampler(z, th), (theta,), (others,))[1]
        rhs = rhs - moved.astype(z.dtype)

    def jacobian(v):
        return jax.jvp(lambda noise: sampler(noise, theta), (z,), (v,))[1]

    settings = dict(rows=options.rows, restart=_TANGENT_RESTART, cycles=_TANGENT_CYCLES, rtol=options.tolerance / 10)

    def non_finite_rows_stay(b, solution):
        """A row whose right-hand side is not finite (a NaN or infinite tangent) gets NaN, never
        GMRES's answer for it (a zero, which would pass for a tangent)."""
        finite = jnp.isfinite(row_max_abs(b, options.rows))
        return jnp.where(rows_of.per_row(finite, b), solution, jnp.nan)

    def solve(matvec, b):
        precondition = lambda u: jax.jvp(plain, (target,), (u,))[1]  # noqa: E731
        return non_finite_rows_stay(b, precondition(gmres(lambda u: matvec(precondition(u)), b, **settings).solution))

    def transpose_solve(vecmat, b):
        plain_vjp = jax.vjp(plain, target)[1]
        precondition = lambda u: plain_vjp(u)[0]  # noqa: E731
        return non_finite_rows_stay(b, precondition(gmres(lambda u: vecmat(precondition(u)), b, **settings).solution))

    d_noise = lax.custom_linear_solve(jacobian, rhs, solve, transpose_solve=transpose_solve)
    counts = lambda c: np.zeros(np.shape(c), jax.dtypes.float0)  # noqa: E731
    return result, _Result(noise=d_noise, error=jnp.zeros_like(result.error), sweeps=counts(result.sweeps),
                           iterations=counts(result.iterations))


exact_inversion_jit = jax.jit(exact_inversion, static_argnums=(0, 1, 2), static_argnames=("options",))

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

The solve is built from module-level stages, as blackjax builds a kernel: each is a function of one
problem record (:class:`_Problem`: the sampler, the bound model, the grid and its mirror, the data and
its per-row scale, the settings) and of its own arguments, returning a named result (:class:`_Result`)
or loop carry. :func:`_plain`, :func:`_sampled` and :func:`_round_trip` are ``I``, ``S`` and the
error; :func:`_step_solves`, :func:`_first_order_path` and :func:`_history_sweeps` the per-step
solves; :func:`_defect_correction` and :func:`_shooting` the whole-sampler stages; :func:`_fast`,
:func:`_robust` and :func:`_better_of` the paths; :func:`_solved` only assembles them.

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
# Past sweeps the history sweeps' Anderson acceleration mixes (its window holds one more, the newest)
_HISTORY_WINDOW = 3
# ``budget=None``: no budget (the largest int32; a count of model calls never reaches it)
_UNLIMITED = np.iinfo(np.int32).max


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
        robust: Run the robust path where the fast path leaves rows (orders >= 2); False stops
            after the fast path (the caller finishes those rows apart).
    """

    max_sweeps: int
    max_iterations: int
    tolerance: float
    gmres_restart: int
    gmres_maxiter: int
    rows: int
    return_outputs: bool = False
    progress: bool = False
    robust: bool = True


class _Result(NamedTuple):
    """Per row: the start found, its round trip; defect-correction sweeps and Newton iterations made,
    and the batched model calls made (all steps: ``N`` per run of the sampler)."""

    noise: Array
    error: Array
    sweeps: Array
    iterations: Array
    calls: Array


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
    calls: Array
    last: Array


class _Sweeps(NamedTuple):
    """Carry of the defect-correction loop: per row the best start so far, its sample and error."""

    noise: Array
    sampled: Array
    error: Array
    active: Array
    count: Array
    calls: Array


def exact_inversion(scheduler, inverse, model_fn, *, options: ExactOptions, state, mirror, data, cond, noises,
                    budget=None, start=None):
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
        budget: The most batched model calls the solve may make (all steps; an integer, may be
            traced), or ``None``: no stage and no iteration starts once the calls made reach it,
            and each row keeps the best it has met (plain inversion at least).
        start: A start to go on from (orders >= 2; e.g. an earlier pass's best), or ``None``: each
            row's fast path begins at the better of it and plain inversion (one more run of the
            sampler). A hint only: it steers the solve, not its answer, and has no derivative.

    Returns:
        ``(X, outputs, round_trip, sweeps, iterations, calls)``: the path ``[N, *shape]`` (sampler
        order, noise first), the raw model outputs (``options.return_outputs``, else ``None``), the
        per-row round trip, the defect-correction sweeps made, the Newton iterations of the
        whole-sampler solve and the batched model calls the solve made (a Jacobian-vector product
        counts as one; the final run that returns the path is not counted).
    """
    # the values the model closes over (e.g. parameters a caller differentiates) become explicit inputs of
    # the implicitly differentiated solve: a custom derivative only sees its explicit inputs
    example = jnp.zeros(data.shape, solver.compute_dtype(data))
    checked_model = lambda x, t, c: call_model(model_fn, x, t, cond=c, config=scheduler.config)  # noqa: E731
    hoisted, params = jax.closure_convert(checked_model, example, state.timesteps[0], cond)
    result = _solved(scheduler, inverse, _Model(hoisted, conditional=cond is not None), options=options,
                     inputs=_Inputs(state=state, mirror=mirror, data=data, cond=cond, noises=noises, params=params,
                                    budget=jnp.asarray(_UNLIMITED if budget is None else budget, jnp.int32),
                                    start=start))
    n = state.timesteps.shape[0]
    _, later, _ = scan_steps(scheduler, model_fn, ScanOptions(return_samples=True), state=state, x=result.noise, cond=cond,
                             keys=None, noises=noises)
    X = jnp.concatenate([result.noise[None], later[:-1]])

    def raw_output(k):
        return call_model(model_fn, X[k], state.timesteps[k], cond=cond, config=scheduler.config)

    outputs = lax.map(raw_output, jnp.arange(n)) if options.return_outputs else None
    return X, outputs, result.error, result.sweeps, result.iterations, result.calls


class _Inputs(NamedTuple):
    """The differentiable inputs of the solve: as in :func:`exact_inversion`, and ``params`` the values
    the model closes over (hoisted by ``jax.closure_convert``); ``budget`` the most batched model calls
    and ``start`` a start to go on from, or ``None`` (neither differentiated)."""

    state: object
    mirror: object
    data: Array
    cond: object
    noises: object
    params: list
    budget: Array
    start: object = None


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


class _Problem(NamedTuple):
    """One exact inversion as every stage reads it: the stages below are functions of this record
    and of their own arguments, nothing else (built by :func:`_problem_of`).

    Attributes:
        scheduler: The sampler ``S`` (static).
        inverse: The inverse scheduler of plain inversion ``I`` (static).
        model_fn: The model bound to its closed-over values, called as in :func:`dpmjax.sample`.
        options: :class:`ExactOptions`.
        state: The sampler's state: its grid.
        mirror: The inverse scheduler's state: the sampler's grid mirrored.
        cond: The condition passed to the model, or ``None``.
        noises: An SDE sampler's per-step noises (``[N, *shape]``), or ``None``.
        target: ``x``, the data to invert, in the compute dtype.
        scale: Per row ``max(1, max|x|)``: round trips and Newton residuals are relative to it.
        steps: ``arange(N)``, the sampler's step indices.
        step_noises: The per-step noises in the compute dtype (zeros for an ODE sampler).
        budget: The most batched model calls the solve may make.
        start: A start to go on from, or ``None`` (plain inversion's).
    """

    scheduler: object
    inverse: object
    model_fn: object
    options: ExactOptions
    state: object
    mirror: object
    cond: object
    noises: object
    target: Array
    scale: Array
    steps: Array
    step_noises: Array
    budget: Array
    start: object = None

    @property
    def order(self) -> int:
        return self.scheduler.config.solver_order

    @property
    def n(self) -> int:
        return self.state.timesteps.shape[0]

    @property
    def newton(self) -> dict:
        """The settings of every Newton-Krylov solve (a stage overrides some)."""
        # a row far from its solution halves its step at most 8 times (1/256) before the Newton solver's
        # non-monotone full step: longer line searches cost a whole batched evaluation each and, measured
        # on the digits at guidance 3, bought no row
        options = self.options
        return dict(max_iterations=options.max_iterations, tolerance=options.tolerance / 10, max_backtracks=8,
                    gmres_restart=options.gmres_restart, gmres_maxiter=options.gmres_maxiter, rows=options.rows)

    def per_row(self, values: Array) -> Array:
        """``values`` (``[rows]``) shaped to broadcast over the rows of the data."""
        return rows_of.per_row(values, self.target)


def _problem_of(scheduler, inverse, model: _Model, *, options: ExactOptions, inputs: _Inputs) -> _Problem:
    """The :class:`_Problem` of :func:`_solved`'s arguments, its derived constants computed once."""
    state, data, noises = inputs.state, inputs.data, inputs.noises
    n = state.timesteps.shape[0]
    steps = jnp.arange(n)
    cdt = solver.compute_dtype(data)
    target = data.astype(cdt)
    scale = jnp.maximum(1.0, row_max_abs(target, options.rows))
    step_noises = jnp.zeros((n,) + data.shape, cdt) if noises is None else noises.astype(cdt)
    return _Problem(scheduler=scheduler, inverse=inverse, model_fn=model.bound(inputs.params), options=options,
                    state=state, mirror=inputs.mirror, cond=inputs.cond, noises=noises, target=target, scale=scale,
                    steps=steps, step_noises=step_noises, budget=inputs.budget,
                    start=None if inputs.start is None else inputs.start.astype(cdt))


# ----------------------------------------------------------------------------- the sampler, its inverse, the error


def _sampled(problem: _Problem, noise: Array) -> Array:
    """``S(z)``: the sampler run from ``noise`` (as :func:`dpmjax.sample`)."""
    return scan_steps(problem.scheduler, problem.model_fn, ScanOptions(return_samples=False), state=problem.state,
                      x=noise, cond=problem.cond, keys=None, noises=problem.noises)[0]


def _plain(problem: _Problem, x: Array) -> Array:
    """``I(x)``, plain inversion (``inverse`` on ``mirror``): the sampler's noise levels mirrored."""
    return scan_steps(problem.inverse, problem.model_fn, ScanOptions(), state=problem.mirror, x=x, cond=problem.cond,
                      keys=None, noises=None)[0]


def _round_trip(problem: _Problem, x_sampled: Array) -> Array:
    """Per row: ``max|x_sampled - x| / max(1, max|x|)`` (the scale of the Newton residuals)."""
    return row_max_abs(x_sampled - problem.target, problem.options.rows) / problem.scale


def _converted(problem: _Problem, k, y: Array) -> Array:
    """The model's output at step ``k`` and sample ``y``, in the sampler's parametrisation."""
    out = call_model(problem.model_fn, y, problem.state.timesteps[k], cond=problem.cond)
    return solver.converted_output(problem.scheduler.config, problem.state, k, model_output=out, sample=y)


def _within_budget(problem: _Problem, calls: Array, cost) -> Array:
    """Whether a stage or iteration of ``cost`` batched model calls, started after ``calls``, stays
    within the budget."""
    return calls + cost <= problem.budget


def _unfinished(problem: _Problem, carry, *, cost, max_sweeps=None) -> Array:
    """A sweep loop's condition (:class:`_Sweeps`, :class:`_HistorySweeps`): sweeps left (of
    ``max_sweeps``, default the settings'), a row active and the budget not spent (a sweep of
    ``cost`` calls must fit)."""
    most = problem.options.max_sweeps if max_sweeps is None else max_sweeps
    return (carry.count < most) & jnp.any(carry.active) & _within_budget(problem, carry.calls, cost)


# ----------------------------------------------------------------------------- per-step solves (robust path)


def _step_solve(problem: _Problem, x_next: Array, inputs, *, update_rows: Array, from_predictor, iterations,
                share: Array):
    """One sampler step ``x_{k+1} = F_k(x_k)`` solved for ``x_k`` (a reverse ``lax.scan`` body over
    ``inputs = (k, y_previous, z_k, *history)``): Anderson-accelerated fixed point, then Newton-Krylov for
    the rows it leaves; Newton's iterations stop once the step has made ``share`` model calls (the
    step's share of the budget left). Returns ``(x_k, (x_k, converted model output at x_k, the
    model calls made))``. The predictor, Newton's first residual and the output at the solution (3
    calls) are made whatever the share; a fixed-point or Newton iteration starts only where it fits
    (a Newton iteration: where the previous one's cost does)."""
    k, y_previous, z_k, *history = inputs
    options = problem.options
    row = update_rows[k].astype(problem.target.dtype)
    noise = z_k if problem.scheduler.config.is_sde else None
    equation = solver.step_equation(row, history, noise=noise, like=x_next)
    F = lambda y: equation.forward(y, _converted(problem, k, y))  # noqa: E731
    c_x, invertible = row[0], equation.invertible
    # F(y) = x_next as a fixed point y = g(y); g(x_next) is the explicit (DDIM-like) predictor
    g = lambda y: equation.fixed_point_map(x_next, _converted(problem, k, y))  # noqa: E731
    y0 = jnp.where(from_predictor & invertible, g(x_next), jnp.where(from_predictor, x_next, y_previous))
    # each step a hundredth of the tolerance: the round trip adds up every step's residual
    tolerance = options.tolerance / 100
    step_scale = jnp.maximum(1.0, row_max_abs(x_next, options.rows))
    # Anderson-accelerated fixed point first (one model call per iteration; F(y) - x_next =
    # c_x (y - g(y))), then Newton-Krylov for the rows it leaves
    accelerated = anderson_fixed_point(
        g, y0, residual_of=lambda f: jnp.where(invertible, jnp.abs(c_x), 0.0) * row_max_abs(f, options.rows) / step_scale,
        threshold=tolerance, rows=options.rows, iterations=_FIXED_POINT_ITERATIONS,
        max_evaluations=share - 3)  # the predictor, Newton's first residual and the output at the solution
    y0 = jnp.where(invertible, accelerated.solution, y0)
    # rows the fixed point brought within 10x of the tolerance are at float32's floor already
    unsolved = ~invertible | (accelerated.residual > 10 * tolerance)
    result = newton_krylov(F, x_next, y0, solve_rows=unsolved, max_evaluations=share - 2 - accelerated.evaluations,
                           **dict(problem.newton, tolerance=tolerance, max_iterations=iterations))
    # the predictor g(x_next), the fixed point's and Newton's evaluations, the output at the solution
    calls = (2 + accelerated.evaluations + result.evaluations).astype(jnp.int32)
    return result.solution, (result.solution, _converted(problem, k, result.solution), calls)


def _step_solves(problem: _Problem, X: Array, M: Array, *, update_rows: Array, from_predictor, iterations,
                 calls: Array):
    """Each sampler step ``x_{k+1} = F_k(x_k)`` solved for ``x_k`` by Newton-Krylov, from the data end,
    with the older model outputs (history) taken from ``M`` (sampler order, noise first); started
    from the explicit (DDIM-like) predictor or from ``X``. With first-order update rows there is no
    history and one pass is the exact inversion of the first-order sampler. Each step may spend its
    share of the budget left after ``calls``. Returns ``(X, M, calls)``, ``calls`` the batched model
    calls of all steps' solves."""
    zero = jnp.zeros_like(M[:1])
    history = [jnp.concatenate([zero, M[:-1]]), jnp.concatenate([zero, zero, M[:-2]])][: problem.order - 1]
    share = jnp.maximum(problem.budget - calls, 0) // problem.n
    solve = partial(_step_solve, problem, update_rows=update_rows, from_predictor=from_predictor, iterations=iterations,
                    share=share)
    X, M, step_calls = lax.scan(solve, problem.target, (problem.steps, X, problem.step_noises, *history), reverse=True)[1]
    return X, M, jnp.sum(step_calls, dtype=jnp.int32)


def _first_order_rows(problem: _Problem) -> Array:
    """``[N, K + 2]``: each step's first-order update row (no history)."""
    return problem.state.update_coefficients[problem.steps, 0]


def _first_order_path(problem: _Problem, *, calls: Array):
    """``(X, M, calls)``: the exact inversion of the first-order sampler on the same grid, path and
    converted model outputs (exact for order 1, and for a first-order SDE sampler given its noises),
    and the model calls made."""
    X = jnp.broadcast_to(problem.target, (problem.n,) + problem.target.shape)
    return _step_solves(problem, X, jnp.zeros_like(X), update_rows=_first_order_rows(problem),
                        from_predictor=True, iterations=problem.options.max_iterations, calls=calls)


def _by_row(problem: _Problem, A: Array) -> Array:
    """``[N, rows, ...]`` -> ``[rows, N * ...]`` in the working dtype (a history sweep's Anderson vectors)."""
    working = jnp.promote_types(problem.target.dtype, jnp.float32)
    return jnp.moveaxis(A, 1, 0).reshape(problem.options.rows, -1).astype(working)


def _from_rows(v: Array, like: Array) -> Array:
    """The inverse of :func:`_by_row`, shaped like ``like`` (``[N, rows, ...]``)."""
    return jnp.moveaxis(v.reshape((like.shape[1],) + like.shape[:1] + like.shape[2:]), 0, 1)


def _history_sweep(problem: _Problem, carry: _HistorySweeps, *, first_order_rows: Array,
                   trajectory_rows: Array) -> _HistorySweeps:
    """One sweep of per-step solves (a ``lax.while_loop`` body of :func:`_history_sweeps`): the
    first (``count == -1``) is the first-order path (first-order update rows, no history, Newton's
    full iterations; a row's best is its result), the others history sweeps."""
    X_last, M_last, G_hist, F_hist, best_noise, best, active, count, calls, _ = carry
    options = problem.options
    first = count < 0
    # a few Newton iterations per step and history sweep: the sweeps, not one step's solve, carry the
    # iteration (measured on the digits at guidance 3: a quarter of the cost, no row lost)
    X, G, sweep_calls = _step_solves(problem, X_last, M_last, update_rows=jnp.where(first, first_order_rows, trajectory_rows),
                                     from_predictor=count <= 0, calls=calls,
                                     iterations=jnp.where(first, options.max_iterations,
                                                          min(_SWEEP_ITERATIONS, options.max_iterations)))
    g, f = _by_row(problem, G), _by_row(problem, G) - _by_row(problem, M_last)
    # a row that has stopped is frozen: its path, history, windows and best never change again
    # (an active row has been active at every sweep, so its window holds ``count`` real entries)
    windowed = (active & ~first)[None, :, None]
    G_hist = jnp.where(windowed, jnp.roll(G_hist, -1, axis=0).at[-1].set(g), G_hist)
    F_hist = jnp.where(windowed, jnp.roll(F_hist, -1, axis=0).at[-1].set(f), F_hist)
    valid = jnp.arange(_HISTORY_WINDOW + 1) >= _HISTORY_WINDOW - count  # entries of sweeps actually made
    M_next = jnp.where(first, G, _from_rows(mix(G_hist, F_hist, valid).astype(G.dtype), G))
    error = _round_trip(problem, _sampled(problem, X[0]))
    better = active & (first | (error < best))
    on_path = problem.per_row(active)[None]
    X, M_next = jnp.where(on_path, X, X_last), jnp.where(on_path, M_next, M_last)
    return _HistorySweeps(X=X, M=M_next, G_window=G_hist, F_window=F_hist,
                          best_noise=jnp.where(problem.per_row(better), X[0], best_noise),
                          best_error=jnp.where(better, error, best),
                          active=active & (jnp.where(first, error, jnp.minimum(error, best)) > options.tolerance),
                          count=count + 1, calls=calls + sweep_calls + problem.n,
                          last=sweep_calls + problem.n)


def _history_sweeps(problem: _Problem, *, calls: Array, max_sweeps: int):
    """The robust path's per-step solves: the first-order path (exact for order 1), then for orders
    >= 2 up to ``max_sweeps`` history sweeps, the per-step solves with the history from the previous
    sweep, a fixed-point iteration ``M = G(M)`` that converges where the defect correction cannot
    (plain inversion crossing between modes of the data), Anderson-accelerated per row over the last
    3 sweeps (Walker & Ni 2011, SIAM J. Numer. Anal. 49); each row keeps its best sweep. One loop
    runs both, so the per-step solves appear once in the compiled program (each traced model call
    is a copy of the model there). Returns per row the best start, its round trip, the history
    sweeps made and the model calls made in all (``calls`` before). The first-order path always
    runs; a history sweep starts only where the previous sweep's cost still fits in the budget."""
    shape = (problem.n,) + problem.target.shape
    X = jnp.broadcast_to(problem.target, shape)
    M = jnp.zeros(shape, problem.target.dtype)
    window_zeros = jnp.zeros((_HISTORY_WINDOW + 1,) + _by_row(problem, M).shape, _by_row(problem, M).dtype)
    start = _HistorySweeps(X=X, M=M, G_window=window_zeros, F_window=window_zeros, best_noise=problem.target,
                           best_error=jnp.full((problem.options.rows,), jnp.inf, problem.scale.dtype),
                           active=jnp.ones((problem.options.rows,), bool), count=jnp.asarray(-1), calls=calls,
                           last=jnp.asarray(0, jnp.int32))

    done = lax.while_loop(lambda carry: _unfinished(problem, carry, cost=carry.last, max_sweeps=max_sweeps),
                          partial(_history_sweep, problem, first_order_rows=_first_order_rows(problem),
                                  trajectory_rows=solver.trajectory_rows(problem.state)), start)
    return done.best_noise, done.best_error, done.count, done.calls


# ----------------------------------------------------------------------------- whole-sampler stages


def _correction(problem: _Problem, carry: _Sweeps, *, plain_noise: Array) -> _Sweeps:
    """One defect-correction sweep ``z <- z + I(x) - I(S(z))`` (``plain_noise = I(x)``), taken by the
    rows it improves (a ``lax.while_loop`` body of :func:`_defect_correction`)."""
    options = problem.options
    trial = carry.noise + plain_noise - _plain(problem, carry.sampled)
    trial_sampled = _sampled(problem, trial)
    trial_error = _round_trip(problem, trial_sampled)
    better = carry.active & (trial_error < carry.error)
    return _Sweeps(
        noise=jnp.where(problem.per_row(better), trial, carry.noise),
        sampled=jnp.where(problem.per_row(better), trial_sampled, carry.sampled),
        error=jnp.where(better, trial_error, carry.error),
        active=better & (trial_error < 0.5 * carry.error) & (trial_error > options.tolerance / 10),
        count=carry.count + 1,
        calls=carry.calls + 2 * problem.n,
    )


def _defect_correction(problem: _Problem, start: Array, *, start_sampled: Array, start_error: Array, plain_noise: Array,
                       calls: Array):
    """Defect correction: z <- z + I(x) - I(S(z)) with I the plain inversion, an approximate inverse
    of the sampler S (Stetter 1978, "The defect correction principle"); it converges fast where I is
    accurate. ``start`` is the first ``z``, ``start_sampled`` its sample and ``start_error`` its round
    trip; ``plain_noise`` is ``I(x)``. A row takes a sweep only where it lowers its round trip, and
    stops when a sweep gains less than a factor of 2 (stalled at float32 cancellation, or diverging).
    A sweep (``2 N`` model calls) starts only where it fits in the budget after ``calls``. Returns per
    row the start found, its round trip, the sweeps made and the model calls made in all."""
    done = lax.while_loop(partial(_unfinished, problem, cost=2 * problem.n),
                          partial(_correction, problem, plain_noise=plain_noise),
                          _Sweeps(noise=start, sampled=start_sampled, error=start_error,
                                  active=start_error > problem.options.tolerance / 10, count=jnp.asarray(0), calls=calls))
    return done.noise, done.error, done.count, done.calls


def _shooting(problem: _Problem, start: Array, start_error: Array, *, preconditioned: bool, calls: Array):
    """Newton-Krylov on the whole sampler, S(z) = x (a multistep sampler is a function of its start
    alone), for the rows not yet within the tolerance; right-preconditioned by the plain inversion's
    Jacobian at S(z), close to S's inverse Jacobian where plain inversion is accurate, so GMRES needs
    a few products where it needs dozens unpreconditioned (without it: GMRES(20), 2 cycles). A row
    keeps its start where the solve did not improve it. An iteration starts only while calls are left
    in the budget after ``calls`` (each evaluation of ``S``, of its or ``I``'s Jacobian-vector
    product costs ``N``). Returns per row the start, its round trip, the Newton iterations made and
    the model calls made in all."""
    options = problem.options
    if preconditioned:
        settings = dict(problem.newton,
                        preconditioner=lambda y, value, v: jax.jvp(partial(_plain, problem), (value,), (v,))[1])
    else:
        settings = dict(problem.newton, gmres_restart=max(20, options.gmres_restart),
                        gmres_maxiter=max(2, options.gmres_maxiter))
        # each iteration evaluates the whole sampler dozens of times: a cap bounds the cost where
        # the sampler is not invertible (measured at N = 10, guidance 3: half the cost, no row lost)
        settings["max_iterations"] = min(options.max_iterations, _SHOOTING_ITERATIONS)
    left = jnp.maximum(problem.budget - calls, 0) // problem.n  # evaluations of S (or a product) left
    result = newton_krylov(partial(_sampled, problem), problem.target, start, solve_rows=start_error > options.tolerance,
                           max_evaluations=left, **settings)
    improved = result.residual < start_error
    return (jnp.where(problem.per_row(improved), result.solution, start),
            jnp.where(improved, result.residual, start_error), result.iterations,
            calls + result.evaluations * problem.n)


# ----------------------------------------------------------------------------- the paths and their assembly


def _plain_inversion(problem: _Problem):
    """``(result, sampled)``: plain inversion ``I(x)`` as a :class:`_Result` (no sweeps, no
    iterations) and its sample ``S(I(x))``."""
    plain_noise = _plain(problem, problem.target)
    plain_sampled = _sampled(problem, plain_noise)
    plain_error = _round_trip(problem, plain_sampled)
    return _Result(noise=plain_noise, error=plain_error, sweeps=jnp.asarray(0), iterations=jnp.asarray(0),
                   calls=jnp.asarray(2 * problem.n, jnp.int32)), plain_sampled


def _fast(problem: _Problem, plain: _Result, *, plain_sampled: Array) -> _Result:
    """Orders >= 2 from plain inversion (``plain``, its sample ``plain_sampled``), or per row from
    ``problem.start`` where that is better: defect-correction sweeps, then the preconditioned
    whole-sampler solve."""
    begin, begin_sampled, begin_error, calls = plain.noise, plain_sampled, plain.error, plain.calls
    if problem.start is not None:  # going on from an earlier pass: its start where it beats plain's
        given_sampled = _sampled(problem, problem.start)
        given_error = _round_trip(problem, given_sampled)
        take = given_error < plain.error
        begin = jnp.where(problem.per_row(take), problem.start, begin)
        begin_sampled = jnp.where(problem.per_row(take), given_sampled, begin_sampled)
        begin_error = jnp.where(take, given_error, begin_error)
        calls = calls + problem.n
    start, start_error, count, calls = _defect_correction(problem, begin, start_sampled=begin_sampled,
                                                          start_error=begin_error, plain_noise=plain.noise,
                                                          calls=calls)
    noise, error, iterations, calls = _shooting(problem, start, start_error, preconditioned=True, calls=calls)
    # the calls counted from plain inversion's: ``_better_of`` adds them to plain's own
    return _Result(noise=noise, error=error, sweeps=count, iterations=iterations, calls=calls - plain.calls)


def _robust(problem: _Problem, result: _Result) -> _Result:
    """The exact first-order path (exact for order 1), history sweeps (orders >= 2) and the
    whole-sampler solve, for rows ``result`` leaves unconverged (order 1: all rows)."""
    K = problem.order
    start, start_error, count, calls = _history_sweeps(problem, calls=result.calls,
                                                       max_sweeps=0 if K == 1 else problem.options.max_sweeps)
    noise, error, iterations, calls = _shooting(problem, start, start_error, preconditioned=K == 1, calls=calls)
    # orders >= 2 run this path for every row when any row needs it: the rows that were within the
    # tolerance already keep their result, so that a row's answer never depends on its neighbours
    result = _better_of(result, _Result(noise=noise, error=error, sweeps=count, iterations=iterations,
                                        calls=calls - result.calls),
                        rows_open=True if K == 1 else result.error > problem.options.tolerance)
    _status(problem, "per-step solves and the whole-sampler solve", result)
    return result


def _robust_fits(problem: _Problem, calls: Array) -> Array:
    """Whether the robust path may start after ``calls``: the calls it makes whatever the budget
    left (per step the predictor, Newton's first residual and the output at its solution, then the
    round trip of the path found: ``4 N``) must fit, so that a budget is passed by no more than a
    stage's iteration under way."""
    return _within_budget(problem, calls, 4 * problem.n)


def _better_of(a: _Result, b: _Result, *, rows_open=True) -> _Result:
    """Per row, the result with the smaller round trip among the rows ``rows_open`` (``[rows]`` or
    True: all); the other rows keep ``a``. Counts and calls add up."""
    take_b = rows_open & (b.error < a.error)
    take_b_rows = rows_of.per_row(take_b, a.noise)
    return _Result(noise=jnp.where(take_b_rows, b.noise, a.noise), error=jnp.where(take_b, b.error, a.error),
                   sweeps=a.sweeps + b.sweeps, iterations=a.iterations + b.iterations, calls=a.calls + b.calls)


def _status(problem: _Problem, stage: str, result: _Result) -> None:
    """One progress line per stage (``options.progress``): the rows within the tolerance after it."""
    options = problem.options
    message = f"{stage}: {{}}/{problem.target.shape[0] if options.rows > 1 else 1} rows within {options.tolerance:g}"
    progress_line.status(options.progress, "invert (exact)", message, values=(jnp.sum(result.error <= options.tolerance),))


@partial(jax.custom_jvp, nondiff_argnums=(0, 1, 2, 3))
def _solved(scheduler, inverse, model: _Model, options: ExactOptions, inputs: _Inputs) -> _Result:
    """Per row the start ``z`` found, its round trip and the work made (the arguments as in
    :func:`exact_inversion`); see the module docstring. Assembles the stages over one
    :class:`_Problem`: a first-order SDE sampler given its noises takes the exact per-step solves;
    otherwise plain inversion, then order 1 the robust path, orders >= 2 the fast path and the robust
    path where a row is left. Each row keeps the best it met: never worse than plain inversion.

    Its derivative is implicit (a ``custom_jvp``, :func:`_solved_jvp`): ``S(z) = x`` gives
    ``J dz = dx - dS/dtheta dtheta`` with ``J = dS/dz`` at the ``z`` found, for the tangents of the
    data ``x`` and of ``theta`` = the sampler's state, ``cond``, ``noises`` and the model's
    closed-over values (the mirrored grid only steers the solve and has no effect on its answer)."""
    problem = _problem_of(scheduler, inverse, model, options=options, inputs=inputs)
    if problem.noises is not None:  # a first-order SDE sampler given its noises: the per-step solves are exact
        X, _, calls = _first_order_path(problem, calls=jnp.asarray(0, jnp.int32))
        return _Result(noise=X[0], error=_round_trip(problem, _sampled(problem, X[0])), sweeps=jnp.asarray(0),
                       iterations=jnp.asarray(0), calls=calls + problem.n)
    plain, plain_sampled = _plain_inversion(problem)
    _status(problem, "plain inversion", plain)
    if problem.order == 1:
        return lax.cond(_robust_fits(problem, plain.calls), partial(_robust, problem), lambda r: r, plain)
    result = _better_of(plain, _fast(problem, plain, plain_sampled=plain_sampled))
    _status(problem, "defect-correction sweeps and the preconditioned solve", result)
    if not options.robust:
        return result
    # the robust path where a row is left and the budget has room for it
    needed = jnp.any(result.error > options.tolerance) & _robust_fits(problem, result.calls)
    return lax.cond(needed, partial(_robust, problem), lambda r: r, result)


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
                           iterations=counts(result.iterations), calls=counts(result.calls))


exact_inversion_jit = jax.jit(exact_inversion, static_argnums=(0, 1, 2), static_argnames=("options",))

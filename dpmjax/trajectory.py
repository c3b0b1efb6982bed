"""Whole trajectories in one ``jax.lax.scan``: sampling, inversion (plain and exact), guidance.

``sample`` runs a forward (sampling) scheduler from noise to data; ``invert`` runs data to noise.
The model is called inside the compiled loop: ``model_fn(sample, timestep)`` or, with ``cond``,
``model_fn(sample, timestep, cond)`` (``cond`` is any pytree, passed through unchanged).

Inversion semantics:

* with a ``DPMSolverMultistepInverseScheduler``: its own grid, as diffusers does;
* with a ``DPMSolverMultistepScheduler`` (a sampler): *that sampler* is inverted, on its noise levels
  mirrored. Plain inversion evaluates the model at the known end of each step (DDIM inversion
  generalised to multistep DPM-Solver). A final zero-noise level is entered at the smallest
  training noise level (timestep 0), where the model can be evaluated.
* ``exact=True`` (sampler only): find the start ``z`` of the sampler ``S`` with ``S(z) = x`` to
  float32 precision (Hong et al. 2024, "On Exact Inversion of DPM-Solvers", CVPR, solve the
  implicit steps one by one; a multistep sampler is a function of its start alone, so here the
  whole sampler is the equation). Fast path (orders >= 2): plain inversion ``I``, defect-correction
  sweeps ``z <- z + I(x) - I(S(z))`` (Stetter 1978), then Newton-Krylov on ``S(z) = x`` with GMRES
  right-preconditioned by ``I``'s Jacobian. Robust path (order 1, and rows the fast path leaves):
  each step of the first-order sampler solved with Newton-Krylov (:mod:`dpmjax.newton`; exact for
  order 1), history sweeps that feed each step the older model outputs of the previous sweep
  (Anderson-accelerated per row), then the unpreconditioned whole-sampler solve. Each row keeps the
  best of plain inversion and the two paths and reports its measured round trip.
* A first-order ``sde-dpmsolver++`` sampler is inverted exactly given the per-step noises it used
  (``noises``), by the first-order per-step solves with the noise held fixed. Other stochastic
  samplers are refused: an SDE step shrinks its input (``c_x = sigma_t / sigma_s e^{-h}``), so its
  inverse amplifies every error, and with a multistep history neither the sweeps nor the
  whole-sampler solve reach float32 precision (see ``invert``).
"""

from __future__ import annotations

import sys
import time
from typing import Any, Callable, NamedTuple, Optional

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from . import solver
from .anderson import anderson_fixed_point, mix
from .newton import newton_krylov, row_max_abs
from .noise_schedule import training_schedule
from .scheduler import DPMSolverMultistepInverseScheduler, DPMSolverMultistepScheduler, _DPMSolverMultistepBase
from .state import SchedulerState

Array = jax.Array
ModelFn = Callable[..., Array]


@flax.struct.dataclass
class Trajectory:
    """Result of :func:`sample` or :func:`invert`.

    sample: the end point. samples: ``[N, *shape]``, the sample after each step (on request).
    model_outputs: ``[N, ...]``, the raw model output of each step (on request).
    timesteps: ``[N]``, where the model was evaluated, in the order of the steps taken.
    sigmas: ``[N + 1]``, the noise levels visited (diffusers' sigma), in order.
    Exact inversion only: round_trip: ``[rows]``, the measured ``max|sample(noise) - x| / max(1, max|x|)``
    per row of the input ``x`` (one value for ``independent_rows=False``); converged: ``[rows]``,
    whether that is within the ``tolerance`` asked for; iterations: Newton iterations of the whole-sampler
    solve; sweeps: defect-correction sweeps made.
    """

    sample: Array
    samples: Optional[Array] = None
    model_outputs: Optional[Array] = None
    timesteps: Optional[Array] = None
    sigmas: Optional[Array] = None
    round_trip: Optional[Array] = None
    iterations: Optional[Array] = None
    sweeps: Optional[Array] = None
    converged: Optional[Array] = None


# ----------------------------------------------------------------------------- guidance
def classifier_free_guidance(model: ModelFn, cond: Any, uncond: Any, guidance_scale: float) -> ModelFn:
    """A ``model_fn(x, t)`` applying classifier-free guidance (Ho & Salimans 2022, arXiv:2207.12598):

        out = u + s (c - u),   u = model(x, t, uncond),  c = model(x, t, cond),

    with one batched model call per step: the batch is doubled along axis 0 and ``uncond``/``cond``
    (pytrees batched on axis 0, e.g. text embeddings) are concatenated. A scale of exactly 1 calls
    the model on ``cond`` alone. Build one per direction for separate inversion/sampling scales.
    """
    if isinstance(guidance_scale, (int, float)) and guidance_scale == 1.0:
        return lambda x, t: model(x, t, cond)

    def guided(x, t):
        both = jax.tree_util.tree_map(lambda u, c: jnp.concatenate([u, c], axis=0), uncond, cond)
        out_u, out_c = jnp.split(model(jnp.concatenate([x, x], axis=0), t, both), 2, axis=0)
        return out_u + guidance_scale * (out_c - out_u)

    return guided


# ----------------------------------------------------------------------------- progress
_PROGRESS_STARTED: dict = {}


def _progress_tick(i, total: int, label: str) -> None:
    i = int(np.max(np.asarray(i)))
    now = time.perf_counter()
    if i == 0 or label not in _PROGRESS_STARTED:
        _PROGRESS_STARTED[label] = now
    elapsed = now - _PROGRESS_STARTED[label]
    rate = (i + 1) / elapsed if elapsed > 0 else float("inf")
    filled = int(30 * (i + 1) / total)
    sys.stderr.write(f"\r{label} [{'#' * filled}{'.' * (30 - filled)}] {i + 1}/{total} ({rate:.1f} steps/s)")
    if i + 1 == total:
        sys.stderr.write("\n")
    sys.stderr.flush()


def _report_progress(progress: bool, i: Array, total: int, label: str) -> None:
    if progress:
        jax.debug.callback(_progress_tick, i, total, label, ordered=False)


# ----------------------------------------------------------------------------- the scan
def _call(model_fn: ModelFn, x: Array, t: Array, cond: Any) -> Array:
    return model_fn(x, t) if cond is None else model_fn(x, t, cond)


def _scan_steps(scheduler, model_fn, return_samples, return_outputs, checkpoint, unroll, progress, label,
                state, x, cond, keys, noises):
    """The whole trajectory from step 0, one scan iteration per step.

    Everything that depends on the step number alone is gathered before the loop (each step's
    update row, with the warm-up orders already applied), so an iteration is the model call, the
    conversion and one fused linear update. The model-output history is a ``[K, ...]`` ring buffer:
    step ``i`` writes slot ``i % K`` in place and then reads the older slots. (Blocks of K steps
    with a tuple of K buffers avoid the dynamic slices but were no faster on the CPU, since XLA
    then recomputes the cheap outputs in each consumer, and put K copies of the model in the program.)
    """
    config = scheduler.config
    n = state.timesteps.shape[0]
    K = config.solver_order
    cdt = solver.compute_dtype(x)

    def body(carry, inputs):
        x, history = carry
        i, t, row, key, noise = inputs
        out = _call(model_fn, x, t, cond)
        m0 = solver.convert_model_output(config, state, i, solver.mean_of_model_output(config, out, x), x)
        history, previous = solver.push_history(history, m0, i)
        x_new = solver.update(config, row, x, m0, previous, key, noise)
        _report_progress(progress, i, n, label)
        return (x_new, history), (x_new if return_samples else None, out if return_outputs else None)

    if checkpoint:
        body = jax.checkpoint(body)
    per_step = (jnp.arange(n), state.timesteps, solver.trajectory_rows(state), keys, noises)
    history = jnp.zeros((solver.history_length(K),) + x.shape, cdt)  # none at order 1
    (x, _), (samples, outputs) = lax.scan(body, (x, history), per_step, unroll=unroll)
    return x, samples, outputs


_STATIC = ("scheduler", "model_fn", "return_samples", "return_outputs", "checkpoint", "unroll", "progress", "label")
_scan_steps_jit = jax.jit(_scan_steps, static_argnums=tuple(range(len(_STATIC))))
# the same program, reusing the input sample's buffer for the output (donate=True)
_scan_steps_donating = jax.jit(_scan_steps, static_argnums=tuple(range(len(_STATIC))), donate_argnums=(len(_STATIC) + 1,))


def _stochastic_inputs(scheduler, n: int, shape, key, noises):
    if not scheduler.config.is_sde:
        return None, None
    if noises is not None:
        noises = jnp.asarray(noises)
        if noises.shape != (n,) + tuple(shape):
            raise ValueError(f"noises must have shape {(n,) + tuple(shape)} (one per step), got {noises.shape}.")
        return None, noises
    if key is None:
        raise ValueError(f"algorithm_type={scheduler.config.algorithm_type!r} is stochastic: pass key or noises.")
    return jax.random.split(key, n), None


def _visited_sigmas(state: SchedulerState, n: int) -> Array:
    """The ``N + 1`` noise levels of a state's grid (sliced only if the state holds more: a
    dispatched slice costs ~100 us, more than a small trajectory)."""
    return state.sigmas if state.sigmas.shape[0] == n + 1 else state.sigmas[: n + 1]


def _as_array(x) -> Array:
    return x if isinstance(x, jax.Array) else jnp.asarray(x)


def _check_scheduler(scheduler) -> None:
    if not isinstance(scheduler, _DPMSolverMultistepBase):
        raise ValueError(f"scheduler must be a dpmjax scheduler, got {type(scheduler).__name__}.")


def _check_unroll(unroll) -> None:
    if isinstance(unroll, bool) or not isinstance(unroll, int) or unroll < 1:
        raise ValueError(f"unroll must be a positive integer, got {unroll!r}.")


# ----------------------------------------------------------------------------- sampling
def sample(
    model_fn: ModelFn,
    noise: Array,
    scheduler: DPMSolverMultistepScheduler,
    num_inference_steps: int,
    *,
    cond: Any = None,
    key: Optional[Array] = None,
    noises: Optional[Array] = None,
    return_samples: bool = False,
    return_model_outputs: bool = False,
    checkpoint: bool = False,
    unroll: int = 1,
    progress: bool = False,
    donate: bool = False,
) -> Trajectory:
    """Sample from ``noise`` with a forward scheduler, the whole trajectory in one jitted scan.

    SDE types draw their per-step noise from ``key`` (split per step) or take ``noises``
    (``[N, *shape]``); deterministic (ODE) samplers refuse both. ``checkpoint=True``
    rematerialises each step in the backward pass, so ``jax.grad`` keeps one sample (and the
    model-output history) per step instead of every activation of the model. ``unroll`` unrolls
    the scan by that factor. ``donate=True`` lets the result reuse ``noise``'s device buffer
    (``noise`` is then deleted): one sample less in memory.
    """
    _check_scheduler(scheduler)
    _check_unroll(unroll)
    if not scheduler.forward:
        raise ValueError("sample needs a forward scheduler (DPMSolverMultistepScheduler); use invert for inversion.")
    if not scheduler.config.is_sde and (key is not None or noises is not None):
        raise ValueError(
            f"key/noises apply to stochastic samplers (algorithm_type sde-dpmsolver or sde-dpmsolver++); this one is "
            f"deterministic (algorithm_type={scheduler.config.algorithm_type!r}): pass neither."
        )
    noise = _as_array(noise)
    state = scheduler.set_timesteps(scheduler.create_state(), num_inference_steps, noise.shape, solver.compute_dtype(noise))
    n = state.num_inference_steps
    keys, noises = _stochastic_inputs(scheduler, n, noise.shape, key, noises)
    run = _scan_steps_donating if donate else _scan_steps_jit
    x, samples, outputs = run(scheduler, model_fn, return_samples, return_model_outputs, checkpoint,
                              unroll, progress, "sample", state, noise, cond, keys, noises)
    return Trajectory(x, samples, outputs, state.timesteps, _visited_sigmas(state, n))


# ----------------------------------------------------------------------------- inversion
def mirrored_state(scheduler: _DPMSolverMultistepBase, forward_state: SchedulerState, shape, dtype=jnp.float32):
    """``(inverse_scheduler, state)`` stepping a sampler's grid backwards: its noise levels from the
    last to the first, with the sampler's config (its ODE counterpart for SDE types).

    Step j evaluates the model at the sampler's point N - j. A final zero noise level becomes the
    smallest training noise level (timestep 0), the nearest point where a model can be evaluated.
    """
    n = forward_state.num_inference_steps
    sigmas = np.asarray(forward_state.sigmas[: n + 1])[::-1].copy()
    if sigmas[0] == 0.0:
        sigmas[0] = training_schedule(scheduler.config).sigmas[0]
    forward_timesteps = np.asarray(forward_state.timesteps)
    timesteps = np.concatenate([[0], forward_timesteps[::-1][: n - 1]]).astype(np.int64)
    ode = {"sde-dpmsolver++": "dpmsolver++", "sde-dpmsolver": "dpmsolver"}.get(scheduler.config.algorithm_type)
    inverse = DPMSolverMultistepInverseScheduler(scheduler.config.replace(algorithm_type=ode) if ode else scheduler.config)
    return inverse, inverse.state_on_grid(inverse.create_state(), timesteps, sigmas, shape, dtype)


# Newton iterations of each per-step solve inside a history sweep
_SWEEP_ITERATIONS = 5
# Anderson-accelerated fixed-point iterations (model calls) of a per-step solve before Newton
_FIXED_POINT_ITERATIONS = 10
# Newton iterations of an unpreconditioned whole-sampler solve
_SHOOTING_ITERATIONS = 10


class ExactOptions(NamedTuple):
    """Static settings of exact inversion (hashable: one compiled program per distinct value).

    max_sweeps: defect-correction sweeps at most; max_iterations / tolerance: every Newton solve
    (tolerance relative to max(1, max|row|)); gmres_restart / gmres_maxiter: its Krylov solves;
    rows: independent problems along axis 0 (the batch size, or 1 for a model that couples rows).
    """

    max_sweeps: int
    max_iterations: int
    tolerance: float
    gmres_restart: int
    gmres_maxiter: int
    rows: int


class _Sweeps(NamedTuple):
    """Carry of the defect-correction loop: per row the best start so far, its sample and error."""

    noise: Array
    sampled: Array
    error: Array
    active: Array
    count: Array


def _exact_inversion(scheduler, inverse, model_fn, options: ExactOptions, return_outputs, progress, state, mirror, data, cond,
                     noises):
    """Exact inversion of a sampler; see :func:`invert` and the module docstring. Returns the path
    ``[N, *shape]`` (sampler order, noise first), the model outputs, the per-row round trip, the
    defect-correction sweeps made and the Newton iterations of the whole-sampler solve."""
    config = scheduler.config
    n = state.timesteps.shape[0]
    K = config.solver_order
    rows = options.rows
    steps = jnp.arange(n)
    cdt = solver.compute_dtype(data)
    target = data.astype(cdt)
    scale = jnp.maximum(1.0, row_max_abs(target, rows))
    per_row = lambda v: v.reshape((rows,) + (1,) * (data.ndim - 1)) if rows > 1 else v.reshape(())  # noqa: E731
    z = jnp.zeros((n,) + data.shape, cdt) if noises is None else noises.astype(cdt)
    # a row far from its solution halves its step at most 8 times (1/256) before the Newton solver's
    # non-monotone full step: longer line searches cost a whole batched evaluation each and, measured
    # on the digits at guidance 3, bought no row
    newton = dict(max_iterations=options.max_iterations, tolerance=options.tolerance / 10, max_backtracks=8,
                  gmres_restart=options.gmres_restart, gmres_maxiter=options.gmres_maxiter, rows=rows)

    def converted(k, y):
        out = _call(model_fn, y, state.timesteps[k], cond)
        mean = solver.mean_of_model_output(config, out, y)
        return solver.convert_model_output(config, state, k, mean, y), out

    def sampled(x_noise, return_samples=False):
        return _scan_steps(scheduler, model_fn, return_samples, False, False, 1, False, "", state, x_noise, cond, None, noises)

    def error_of(x_sampled):
        """Per row: max|x_sampled - data| / max(1, max|data|) (the scale of the Newton residuals)."""
        return row_max_abs(x_sampled - target, rows) / scale

    def plain(x):  # plain inversion (``inverse`` on ``mirror``): the sampler's noise levels mirrored
        return _scan_steps(inverse, model_fn, False, False, False, 1, False, "", mirror, x, cond, None, None)[0]

    def step_solves(X, M, update_rows, from_predictor, iterations=options.max_iterations):
        """Each sampler step ``x_{k+1} = F_k(x_k)`` solved for ``x_k`` by Newton-Krylov, from the data end,
        with the older model outputs (history) taken from ``M`` (sampler order, noise first); started
        from the explicit (DDIM-like) predictor or from ``X``. With first-order update rows there is no
        history and one pass is the exact inversion of the first-order sampler. Returns ``(X, M)``."""

        def solve(x_next, inputs):
            k, y_previous, z_k, *history = inputs
            row = update_rows[k].astype(cdt)
            noise = z_k if config.is_sde else None
            F = lambda y: solver.linear_update(row, y, [converted(k, y)[0]] + history, noise)  # noqa: E731
            zero = jnp.zeros_like(x_next)
            rest = solver.linear_update(row.at[:2].set(0.0), zero, [zero] + history, noise)
            c_x = row[0]
            invertible = jnp.abs(c_x) > 1e-6  # c_x = 0: a step to zero noise, the output is the model's alone
            # F(y) = x_next as a fixed point y = g(y); g(x_next) is the explicit (DDIM-like) predictor
            g = lambda y: (x_next - rest - row[1] * converted(k, y)[0]) / jnp.where(invertible, c_x, 1.0)  # noqa: E731
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
            _report_progress(progress, n - 1 - k, n, "invert (exact, per step)")
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

        def unfinished(carry):
            *_, active, count = carry
            return (count < options.max_sweeps) & jnp.any(active)

        def sweep(carry):
            X, M, G_hist, F_hist, best_noise, best, active, count = carry
            # a few Newton iterations per step and sweep: the sweeps, not one step's solve, carry the
            # iteration (measured on the digits at guidance 3: a quarter of the cost, no row lost)
            X, G = step_solves(X=X, M=M, update_rows=trajectory_rows, from_predictor=count == 0,
                               iterations=min(_SWEEP_ITERATIONS, options.max_iterations))
            g, f = by_row(G), by_row(G) - by_row(M)
            G_hist = jnp.roll(G_hist, -1, axis=0).at[-1].set(g)
            F_hist = jnp.roll(F_hist, -1, axis=0).at[-1].set(f)
            valid = jnp.arange(window + 1) >= window - count  # entries of sweeps actually made
            M_next = from_rows(mix(G_hist, F_hist, valid).astype(G.dtype), G)
            error = error_of(sampled(X[0])[0])
            better = error < best
            return (X, M_next, G_hist, F_hist, jnp.where(per_row(better), X[0], best_noise), jnp.where(better, error, best),
                    active & (jnp.minimum(error, best) > options.tolerance), count + 1)

        error = error_of(sampled(X[0])[0])
        hist = jnp.zeros((window + 1,) + by_row(M).shape, by_row(M).dtype)
        *_, best_noise, best, _, count = lax.while_loop(
            unfinished, sweep, (X, M, hist, hist, X[0], error, error > options.tolerance, jnp.asarray(0)))
        return best_noise, best, count

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
            _report_progress(progress, carry.count, options.max_sweeps, "invert (exact, sweeps)")
            return _Sweeps(
                noise=jnp.where(per_row(better), trial, carry.noise),
                sampled=jnp.where(per_row(better), trial_sampled, carry.sampled),
                error=jnp.where(better, trial_error, carry.error),
                active=better & (trial_error < 0.5 * carry.error) & (trial_error > options.tolerance / 10),
                count=carry.count + 1,
            )

        done = lax.while_loop(unfinished, correct, _Sweeps(start, start_sampled, start_error,
                                                             start_error > options.tolerance / 10, jnp.asarray(0)))
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
        _report_progress(progress, n - 1, n, "invert (exact, whole sampler)")
        result = newton_krylov(lambda x_noise: sampled(x_noise)[0], target, start, solve_rows=start_error > options.tolerance,
                               **settings)
        improved = result.residual < start_error
        return (jnp.where(per_row(improved), result.solution, start), jnp.where(improved, result.residual, start_error),
                result.iterations)

    def fast(start, start_sampled, start_error):
        """Orders >= 2 from plain inversion: defect-correction sweeps, then the preconditioned solve."""
        start, start_error, count = sweeps(start, start_sampled, start_error)
        noise, error, iterations = shooting(start, start_error)
        return noise, error, count, iterations

    def better_of(a, b):
        """Per row, the result with the smaller round trip (noise, error); counts add up."""
        take_b = b[1] < a[1]
        return (jnp.where(per_row(take_b), b[0], a[0]), jnp.where(take_b, b[1], a[1]), a[2] + b[2], a[3] + b[3])

    if noises is not None:  # a first-order SDE sampler given its noises: the per-step solves are exact
        noise = first_order_path()[0][0]
        errors, sweep_count, iterations = error_of(sampled(noise)[0]), jnp.asarray(0), jnp.asarray(0)
    else:
        plain_noise = plain(target)
        plain_sampled = sampled(plain_noise)[0]
        plain_error = error_of(plain_sampled)
        plain_result = (plain_noise, plain_error, jnp.asarray(0), jnp.asarray(0))

        def robust(result):
            """The exact first-order path (exact for order 1), history sweeps (orders >= 2) and the
            whole-sampler solve, for rows the fast path left unconverged (order 1: all rows)."""
            X, M = first_order_path()
            if K == 1:
                start, start_error, count = X[0], error_of(sampled(X[0])[0]), jnp.asarray(0)
            else:
                start, start_error, count = history_sweeps(X, M)
            noise, error, iterations = shooting(start, start_error, preconditioned=K == 1)
            return better_of(result, (noise, error, count, iterations))

        if K == 1:
            result = robust(plain_result)
        else:
            result = better_of(plain_result, fast(plain_noise, plain_sampled, plain_error))
            result = lax.cond(jnp.any(result[1] > options.tolerance), robust, lambda r: r, result)
        # never worse than plain inversion on any row: better_of keeps it where nothing beat it
        noise, errors, sweep_count, iterations = result
    _, later, _ = sampled(noise, True)
    X = jnp.concatenate([noise[None], later[:-1]])
    outputs = lax.map(lambda k: converted(k, X[k])[1], steps) if return_outputs else None
    return X, outputs, errors, sweep_count, iterations


_exact_inversion_jit = jax.jit(_exact_inversion, static_argnums=(0, 1, 2, 3, 4, 5))


def invert(
    model_fn: ModelFn,
    sample: Array,
    scheduler: _DPMSolverMultistepBase,
    num_inference_steps: int,
    *,
    cond: Any = None,
    exact: bool = False,
    noises: Optional[Array] = None,
    max_sweeps: int = 10,
    max_iterations: int = 30,
    tolerance: float = 1e-5,
    gmres_restart: int = 5,
    gmres_maxiter: int = 1,
    independent_rows: bool = True,
    return_samples: bool = False,
    return_model_outputs: bool = False,
    checkpoint: bool = False,
    unroll: int = 1,
    progress: bool = False,
) -> Trajectory:
    """Invert ``sample`` (data) to noise; see the module docstring for the semantics.

    ``exact=True`` needs a sampler (``DPMSolverMultistepScheduler``); stochastic samplers also need
    the ``noises`` (``[N, *shape]``) they used. It starts from the first-order per-step solves
    (order 1) or plain inversion (orders >= 2), makes up to ``max_sweeps`` defect-correction sweeps
    and then solves the whole sampler for its start with preconditioned Newton-Krylov.
    ``max_iterations``/``tolerance`` bound every Newton solve (relative to max(1, max|row|)),
    ``gmres_restart``/``gmres_maxiter`` its linear solves.
    ``independent_rows=True`` treats the rows (axis 0) of ``sample`` as independent problems, as
    they are for any model that does not mix the batch (each row gets its own Krylov space, step
    length and stopping test); pass False for a model that couples rows. The result's
    ``round_trip`` is the measured per-row ``max|sample(noise) - sample| / max(1, max|sample|)``
    and ``converged`` says which rows are within ``tolerance``.
    """
    _check_scheduler(scheduler)
    _check_unroll(unroll)
    x = _as_array(sample)
    if not scheduler.forward:
        if exact:
            raise ValueError(
                "exact=True inverts a sampler: pass the DPMSolverMultistepScheduler whose sampling should reconstruct "
                "the input (e.g. DPMSolverMultistepScheduler.from_config(inverse_scheduler.config))."
            )
        if noises is not None:
            raise ValueError("noises belong to a stochastic sampler; the inverse scheduler is deterministic.")
        state = scheduler.set_timesteps(scheduler.create_state(), num_inference_steps, x.shape, solver.compute_dtype(x))
        n = state.num_inference_steps
        y, samples, outputs = _scan_steps_jit(scheduler, model_fn, return_samples, return_model_outputs, checkpoint,
                                              unroll, progress, "invert", state, x, cond, None, None)
        return Trajectory(y, samples, outputs, state.timesteps, _visited_sigmas(state, n))

    forward_state = scheduler.set_timesteps(scheduler.create_state(), num_inference_steps, x.shape, solver.compute_dtype(x))
    n = forward_state.num_inference_steps
    if scheduler.config.is_sde:
        if not exact:
            raise ValueError(
                "a stochastic sampler is inverted exactly or not at all: pass exact=True and the noises it used "
                "(plain inversion of an SDE step divides by its contraction and amplifies every error)."
            )
        if scheduler.config.algorithm_type != "sde-dpmsolver++" or scheduler.config.solver_order != 1:
            raise ValueError(
                "exact inversion of a stochastic sampler is offered for algorithm_type='sde-dpmsolver++' with "
                f"solver_order=1 only (got {scheduler.config.algorithm_type!r}, order {scheduler.config.solver_order}): "
                "an SDE step shrinks its input (c_x = sigma_t/sigma_s e^-h), so its inverse amplifies every error; "
                "with a multistep history neither the sweeps nor the whole-sampler Newton solve reach float32 "
                "precision (measured: round trips of 1e-3..1e-2 with noises hundreds of times too large), and the "
                "noise-prediction SDE step is not monotone. Invert its ODE counterpart (algorithm_type="
                "'dpmsolver++') or the first-order SDE sampler instead."
            )
        _, noises = _stochastic_inputs(scheduler, n, x.shape, None, noises)
        if noises is None:
            raise ValueError("inverting a stochastic sampler needs the noises it used: pass noises ([N, *shape]).")
    elif noises is not None:
        raise ValueError(f"noises are only used with stochastic samplers, not algorithm_type={scheduler.config.algorithm_type!r}.")
    if not exact:
        inverse, mirror = mirrored_state(scheduler, forward_state, x.shape, solver.compute_dtype(x))
        y, path, outputs = _scan_steps_jit(inverse, model_fn, return_samples, return_model_outputs, checkpoint,
                                           unroll, progress, "invert", mirror, x, cond, None, None)
        return Trajectory(y, path, outputs, mirror.timesteps, _visited_sigmas(mirror, n))

    for name, value, least in (("max_iterations", max_iterations, 1), ("gmres_restart", gmres_restart, 1),
                               ("gmres_maxiter", gmres_maxiter, 1), ("max_sweeps", max_sweeps, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{name} must be an integer >= {least}, got {value!r}.")
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not 0 < tolerance < 1:
        raise ValueError(f"tolerance must be a number in (0, 1), got {tolerance!r}.")
    if checkpoint or unroll != 1:
        raise ValueError("checkpoint and unroll apply to plain inversion's scan; exact=True runs its own solves "
                         "and takes neither.")
    if x.ndim == 0 or x.shape[0] == 0:
        raise ValueError(f"exact inversion needs a batch axis with at least one row, got shape {tuple(x.shape)}.")
    options = ExactOptions(max_sweeps=max_sweeps, max_iterations=max_iterations, tolerance=float(tolerance),
                           gmres_restart=gmres_restart, gmres_maxiter=gmres_maxiter,
                           rows=x.shape[0] if independent_rows else 1)
    inverse, mirror = mirrored_state(scheduler, forward_state, x.shape, solver.compute_dtype(x))
    X, outputs, round_trip, sweeps, iterations = _exact_inversion_jit(
        scheduler, inverse, model_fn, options, return_model_outputs, progress, forward_state, mirror, x, cond, noises)
    return Trajectory(
        X[0].astype(x.dtype),
        X[::-1].astype(x.dtype) if return_samples else None,
        outputs[::-1] if return_model_outputs else None,
        forward_state.timesteps[::-1],
        _visited_sigmas(forward_state, n)[::-1],
        round_trip,
        iterations,
        sweeps,
        round_trip <= options.tolerance,
    )

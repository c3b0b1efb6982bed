"""Inversion: data to noise, plain or exact.

* With a ``DPMSolverMultistepInverseScheduler``: its own grid, as diffusers does.
* With a ``DPMSolverMultistepScheduler`` (a sampler): *that sampler* is inverted, on its noise levels
  mirrored (:func:`dpmjax.grids.mirrored_grid`). Plain inversion evaluates the model at the known end
  of each step (DDIM inversion generalised to multistep DPM-Solver).
* ``exact=True`` (sampler only): the start ``z`` with ``sample(z) = x`` to the working precision
  (:mod:`dpmjax.trajectories.exact`); ``exact=ExactInversion(...)`` with other settings
  (:class:`~dpmjax.ExactInversion`).
* A first-order ``sde-dpmsolver++`` sampler is inverted exactly given the per-step noises it used
  (``noises``). Other stochastic samplers are refused: an SDE step shrinks its input
  (``c_x = sigma_t / sigma_s e^{-h}``), so its inverse amplifies every error, and with a multistep
  history no solve reaches float32 precision.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp

from .. import checks, solver
from ..grids import Grid, mirrored_grid
from ..noise_schedule import training_schedule
from ..numerics.rows import row_max_abs
from ..scheduler import DPMSolverMultistepBase, DPMSolverMultistepInverseScheduler
from ..state import SchedulerState
from .exact import ExactOptions, exact_inversion_jit
from .exact_options import ExactInversion, rejects_moved_keywords, resolved
from .finish_apart import CORRECTION_RUNS, FIRST_PASS_ITERATIONS, FIRST_PASS_SWEEPS, finish_apart, finishes_apart
from .grid_entry import grid_state, on_traced_grid
from .model_fn import ConditionalModelFn, ModelFn
from .scan import (
    ScanOptions,
    Trajectory,
    as_array,
    check_scheduler,
    check_unroll,
    scan_steps_jit,
    stochastic_inputs,
    visited_sigmas,
)

Array = jax.Array


def mirrored_state(scheduler: DPMSolverMultistepBase, forward_state: SchedulerState, shape, *, dtype=jnp.float32):
    """``(inverse_scheduler, state)`` stepping a sampler's grid backwards
    (:func:`dpmjax.grids.mirrored_grid`), with the sampler's config (its ODE counterpart for SDE types).

    Args:
        scheduler: The sampler (a forward scheduler) whose grid is mirrored.
        forward_state: The sampler's state after ``set_timesteps``: its timesteps and sigmas are
            the grid.
        shape: The sample shape the returned state's model-output history is allocated for.
        dtype: The dtype of that history (default float32).

    Returns:
        ``(inverse_scheduler, state)``: a :class:`~dpmjax.DPMSolverMultistepInverseScheduler` with
        the sampler's config (``"sde-dpmsolver++"`` / ``"sde-dpmsolver"`` replaced by
        ``"dpmsolver++"`` / ``"dpmsolver"``), and its state on the mirrored grid, ready to step.

    Raises:
        ValueError: The config's ``channel_axis`` lies outside samples of ``shape`` (learned
            ``variance_type`` only).
    """
    n = forward_state.num_inference_steps
    ode = {"sde-dpmsolver++": "dpmsolver++", "sde-dpmsolver": "dpmsolver"}.get(scheduler.config.algorithm_type)
    inverse = DPMSolverMultistepInverseScheduler(scheduler.config.replace(algorithm_type=ode) if ode else scheduler.config)
    if on_traced_grid(forward_state):  # a grid of noise levels: mirrored on the device, differentiably
        return inverse, inverse.set_timesteps(inverse.create_state(), shape=shape, dtype=dtype,
                                              sigmas=forward_state.sigmas[: n + 1])
    forward = Grid(timesteps=forward_state.timesteps, sigmas=forward_state.sigmas)
    grid = mirrored_grid(forward, n, training_schedule(scheduler.config))
    return inverse, inverse.state_on_grid(inverse.create_state(), grid.timesteps, grid.sigmas, shape=shape, dtype=dtype)


def _exact_record(options: ExactInversion, *, rows: int, return_outputs: bool, progress: bool) -> ExactOptions:
    """The public settings as exact inversion's static record, for a batch of ``rows`` rows (one
    problem when ``options.independent_rows`` is False)."""
    return ExactOptions(max_sweeps=options.max_sweeps, max_iterations=options.max_iterations,
                        tolerance=options.tolerance, gmres_restart=options.gmres_restart,
                        gmres_maxiter=options.gmres_maxiter, rows=rows if options.independent_rows else 1,
                        return_outputs=return_outputs, progress=progress)


def _checked_noises(scheduler, settings, *, n: int, shape, noises):
    """The per-step noises of a stochastic sampler to invert exactly (``[N, *shape]``), checked; ``None``
    for an ODE sampler (which takes none)."""
    if scheduler.config.is_sde:
        if settings is None:
            raise ValueError(
                "a stochastic sampler is inverted exactly or not at all: pass exact=True and the noises it used "
                "(plain inversion of an SDE step divides by its contraction and amplifies every error)."
            )
        if scheduler.config.algorithm_type != "sde-dpmsolver++" or scheduler.config.solver_order != 1:
            raise ValueError(
                "exact inversion of a stochastic sampler needs algorithm_type='sde-dpmsolver++' with solver_order=1 "
                f"(got {scheduler.config.algorithm_type!r}, order {scheduler.config.solver_order}): an SDE step's inverse "
                "amplifies every error, and only the first-order step is solved exactly. Invert its ODE counterpart "
                "(algorithm_type='dpmsolver++') instead."
            )
        _, noises = stochastic_inputs(scheduler, n, shape, key=None, noises=noises)
        if noises is None:
            raise ValueError("inverting a stochastic sampler needs the noises it used: pass noises ([N, *shape]).")
    elif noises is not None:
        raise ValueError(f"noises are only used with stochastic samplers, not algorithm_type={scheduler.config.algorithm_type!r}.")
    return noises


def _whole_batch_runs(scheduler, model_fn, *, state, x, cond, return_outputs: bool):
    """``(measure, correct)`` for :func:`~dpmjax.trajectories.finish_apart.finish_apart`, in the whole
    batch's own programs: ``measure(noise)`` -> ``(round trip per row, S(noise))``;
    ``correct(noise, sampled)`` -> one defect-correction sweep ``z + I(x) - I(S(z))`` as
    ``(path, model outputs or None, round trip per row, model calls)``."""
    n = state.num_inference_steps

    def round_trip_of(sampled):
        scale = jnp.maximum(1.0, row_max_abs(x.astype(sampled.dtype), x.shape[0]))
        return row_max_abs(sampled - x.astype(sampled.dtype), x.shape[0]) / scale

    def measure(noise):
        sampled = scan_steps_jit(scheduler, model_fn, ScanOptions(), state=state, x=noise, cond=cond, keys=None,
                                 noises=None)[0]
        return round_trip_of(sampled), sampled

    def correct(noise, sampled):
        inverse, mirror = mirrored_state(scheduler, state, x.shape, dtype=solver.compute_dtype(x))

        def plain(y):
            return scan_steps_jit(inverse, model_fn, ScanOptions(), state=mirror, x=y, cond=cond, keys=None,
                                  noises=None)[0]

        trial = noise + plain(x.astype(noise.dtype)) - plain(sampled.astype(noise.dtype))
        path = ScanOptions(return_samples=True, return_outputs=return_outputs)
        y, later, outputs = scan_steps_jit(scheduler, model_fn, path, state=state, x=trial, cond=cond, keys=None,
                                           noises=None)
        X = jnp.concatenate([trial[None], later[:-1].astype(trial.dtype)])
        return X, outputs, round_trip_of(y), CORRECTION_RUNS * n

    return measure, correct


@rejects_moved_keywords
def invert(
    model_fn: ModelFn | ConditionalModelFn,
    sample: Array,
    scheduler: DPMSolverMultistepBase,
    num_inference_steps: Optional[int] = None,
    *,
    sigmas: Optional[Array] = None,
    cond: Any = None,
    exact: bool | ExactInversion = False,
    noises: Optional[Array] = None,
    return_samples: bool = False,
    return_model_outputs: bool = False,
    checkpoint: bool = False,
    unroll: int = 1,
    progress: bool = False,
) -> Trajectory:
    """Invert ``sample`` (data) to noise; see the module docstring for the semantics.

    With a ``DPMSolverMultistepInverseScheduler`` the inversion runs on its own grid, as diffusers
    does; with a ``DPMSolverMultistepScheduler`` (a sampler) *that sampler* is inverted, on its
    noise levels mirrored. Plain inversion evaluates the model at the known end of each step (DDIM
    inversion generalised to multistep DPM-Solver).

    ``exact=True`` needs a sampler (``DPMSolverMultistepScheduler``); stochastic samplers also need
    the ``noises`` (``[N, *shape]``) they used. It starts from the first-order per-step solves
    (order 1) or plain inversion (orders >= 2), makes up to ``max_sweeps`` defect-correction sweeps
    and then solves the whole sampler for its start with preconditioned Newton-Krylov
    (:mod:`dpmjax.trajectories.exact`). Its settings are one object,
    :class:`~dpmjax.ExactInversion`: ``exact=dpmjax.ExactInversion(tolerance=1e-4)``;
    ``exact=True`` is ``exact=dpmjax.ExactInversion()``.

    Args:
        model_fn: The model: ``model_fn(sample, timestep[, cond]) -> model_output``, called as in
            :func:`dpmjax.sample` (see :class:`~dpmjax.ModelFn`).
        sample: The data to invert, a non-empty floating-point array (leading axis: batch; exact
            inversion needs that axis).
        scheduler: A ``DPMSolverMultistepInverseScheduler`` (its own grid) or a
            ``DPMSolverMultistepScheduler`` (that sampler is inverted on its grid mirrored).
        num_inference_steps: ``N``, the number of steps (an integer in
            ``[1, num_train_timesteps]``) on the scheduler's grid; or pass ``sigmas``.
        sigmas: The grid itself instead: ``[N + 1]`` noise levels in the *sampler's* order
            (decreasing; the inversion walks them backwards), possibly traced, so ``jax.grad``
            reaches them; the model then receives fractional timesteps (see ``set_timesteps``).
        cond: Any pytree passed unchanged as ``model_fn``'s third argument; ``None`` (default)
            calls ``model_fn(sample, timestep)``.
        exact: Find the start ``z`` with ``sample(z) = x`` to the working precision instead of
            plain inversion (sampler only): ``True`` (the default settings), or an
            :class:`~dpmjax.ExactInversion` with the tolerance, sweeps, iterations, GMRES sizes and
            row coupling to use; ``False`` (default) is plain inversion. Exact inversion is
            differentiable (``jax.jvp``, ``jax.grad``) by implicit differentiation of
            ``sample(z) = x``, with respect to ``sample``, ``cond`` and values the model closes
            over, never through the solver's iterations (the exact-inversion guide, "Differentiating
            exact inversion").
        noises: ``[N, *shape]``, the per-step noises a stochastic sampler used. Only a first-order
            ``sde-dpmsolver++`` sampler is accepted, with ``exact=True``.
        return_samples: Also return the sample after each inversion step
            (``Trajectory.samples``, ``[N, *shape]``, the last one the noise).
        return_model_outputs: Also return the raw model output of each step
            (``Trajectory.model_outputs``).
        checkpoint: Plain inversion only: rematerialise each step in the backward pass.
        unroll: Plain inversion only: the scan's unroll factor, an integer >= 1 (default 1).
        progress: Print progress lines on stderr.

    Returns:
        A :class:`~dpmjax.Trajectory`: ``sample`` is the noise; ``timesteps`` and ``sigmas`` are
        those visited, in the order of the inversion steps. With ``exact=True`` also
        ``round_trip``, the measured per-row ``max|sample(noise) - sample| / max(1, max|sample|)``,
        ``converged``, which rows are within the settings' ``tolerance``, and the ``sweeps`` and Newton
        ``iterations`` made. Exact inversion returns the noise in the working precision (float32
        for bfloat16/float16 input, the input's dtype otherwise): a cast back would undo the
        exactness that ``round_trip`` reports.

    Raises:
        ValueError: ``scheduler`` is not a dpmjax scheduler; ``model_fn`` is not callable;
            ``sample`` is not a floating-point array or has size zero; ``exact`` is not True, False
            or an :class:`~dpmjax.ExactInversion`; a flag (``return_samples``, ...) is not a bool;
            ``unroll`` is not an integer >= 1;
            ``num_inference_steps`` is not an integer in ``[1, num_train_timesteps]`` (or too many
            for ``"leading"`` spacing); ``exact=True`` or ``noises`` is given with an inverse
            scheduler; ``noises`` is given to a deterministic sampler; a stochastic sampler is
            inverted without ``exact=True``, is not a first-order ``sde-dpmsolver++`` sampler, or
            comes without ``noises`` of shape ``[N, *shape]``; with ``exact=True``: ``checkpoint``
            or ``unroll != 1`` is given, or ``sample`` has no batch axis; ``model_fn`` returns
            something other than one floating-point array of the sample's shape (a tuple, a Python
            number, another shape).
        TypeError: A keyword that moved into :class:`~dpmjax.ExactInversion` (``tolerance``,
            ``max_sweeps``, ``max_iterations``, ``gmres_restart``, ``gmres_maxiter``,
            ``independent_rows``) is passed to ``invert``; the message gives the call to write.
    """
    check_scheduler(scheduler)
    check_unroll(unroll)
    checks.function("model_fn", model_fn)
    settings = resolved("exact", exact)  # None: plain inversion; ExactInversion checked its fields when built
    for name, value in (("return_samples", return_samples), ("return_model_outputs", return_model_outputs),
                        ("checkpoint", checkpoint), ("progress", progress)):
        checks.boolean(name, value)
    x = as_array(sample)
    checks.floating_array("sample", x)
    checks.non_empty("sample", x)
    scan_options = ScanOptions(return_samples=return_samples, return_outputs=return_model_outputs, checkpoint=checkpoint,
                               unroll=unroll, progress=progress, label="invert")
    if not scheduler.forward:
        if settings is not None:
            raise ValueError(
                "exact=True inverts a sampler: pass the DPMSolverMultistepScheduler whose sampling should reconstruct "
                "the input (e.g. DPMSolverMultistepScheduler.from_config(inverse_scheduler.config))."
            )
        if noises is not None:
            raise ValueError("noises belong to a stochastic sampler; the inverse scheduler is deterministic.")
        state = grid_state(scheduler, x.shape, num_inference_steps=num_inference_steps, sigmas=sigmas,
                           dtype=solver.compute_dtype(x), caller="invert")
        n = state.num_inference_steps
        y, samples, outputs = scan_steps_jit(scheduler, model_fn, scan_options, state=state, x=x, cond=cond, keys=None,
                                             noises=None)
        return Trajectory(sample=y, samples=samples, model_outputs=outputs, timesteps=state.timesteps,
                          sigmas=visited_sigmas(state, n))

    forward_state = grid_state(scheduler, x.shape, num_inference_steps=num_inference_steps, sigmas=sigmas,
                               dtype=solver.compute_dtype(x), caller="invert")
    n = forward_state.num_inference_steps
    noises = _checked_noises(scheduler, settings, n=n, shape=x.shape, noises=noises)
    if settings is None:
        inverse, mirror = mirrored_state(scheduler, forward_state, x.shape, dtype=solver.compute_dtype(x))
        y, path, outputs = scan_steps_jit(inverse, model_fn, scan_options, state=mirror, x=x, cond=cond, keys=None,
                                          noises=None)
        return Trajectory(sample=y, samples=path, model_outputs=outputs, timesteps=mirror.timesteps,
                          sigmas=visited_sigmas(mirror, n))

    for name, given in (("checkpoint", checkpoint), ("unroll", unroll != 1)):
        if given:
            raise ValueError(f"{name} applies to plain inversion's scan; exact=True runs its own solves and takes none.")
    if x.ndim == 0:
        raise ValueError(f"exact inversion needs a batch axis (rows on axis 0), got a sample of shape {tuple(x.shape)}.")
    options = _exact_record(settings, rows=x.shape[0], return_outputs=return_model_outputs, progress=progress)
    apart = finishes_apart(settings, order=scheduler.config.solver_order, rows=x.shape[0], cond=cond, noises=noises,
                           arrays=(x, sigmas))

    budget = None if settings.max_calls_per_step is None else settings.max_calls_per_step * n

    def solve(data, condition, budget, *, start=None, robust=True, iterations=options.max_iterations,
              sweeps=options.max_sweeps):
        state = forward_state if data.shape == x.shape else grid_state(
            scheduler, data.shape, num_inference_steps=num_inference_steps, sigmas=sigmas, dtype=solver.compute_dtype(x),
            caller="invert")
        inverse, mirror = mirrored_state(scheduler, state, data.shape, dtype=solver.compute_dtype(x))
        record = options._replace(rows=data.shape[0] if settings.independent_rows else 1, robust=robust,
                                  max_iterations=iterations, max_sweeps=sweeps)
        return exact_inversion_jit(scheduler, inverse, model_fn, options=record, state=state, mirror=mirror, data=data,
                                   cond=condition, noises=noises, budget=budget, start=start)

    # finishing apart, the whole batch takes a short fast path: the rows it leaves go on in a sub-batch
    first_pass = dict(iterations=min(options.max_iterations, FIRST_PASS_ITERATIONS),
                      sweeps=min(options.max_sweeps, FIRST_PASS_SWEEPS)) if apart else {}
    result = solve(x, cond, budget, robust=not apart, **first_pass)
    if apart:  # the rows the fast path left, finished in a sub-batch of their own
        measure, correct = _whole_batch_runs(scheduler, model_fn, state=forward_state, x=x, cond=cond,
                                             return_outputs=return_model_outputs)
        result = finish_apart(solve, first=result, data=x, cond=cond, tolerance=options.tolerance, measure=measure,
                              correct=correct, budget=budget)
    X, outputs, round_trip, sweeps, iterations, calls = result
    # the noise keeps the working precision (float32 for bf16/fp16 input): a cast would undo the exactness
    return Trajectory(
        sample=X[0],
        samples=X[::-1] if return_samples else None,
        model_outputs=outputs[::-1] if return_model_outputs else None,
        timesteps=forward_state.timesteps[::-1],
        sigmas=visited_sigmas(forward_state, n)[::-1],
        round_trip=round_trip,
        iterations=iterations,
        sweeps=sweeps,
        converged=round_trip <= options.tolerance,
        model_calls=calls / n,
    )

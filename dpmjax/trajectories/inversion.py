"""Inversion: data to noise, plain or exact.

* With a ``DPMSolverMultistepInverseScheduler``: its own grid, as diffusers does.
* With a ``DPMSolverMultistepScheduler`` (a sampler): *that sampler* is inverted, on its noise levels
  mirrored (:func:`dpmjax.grids.mirrored_grid`). Plain inversion evaluates the model at the known end
  of each step (DDIM inversion generalised to multistep DPM-Solver).
* ``exact=True`` (sampler only): the start ``z`` with ``sample(z) = x`` to the working precision
  (:mod:`dpmjax.trajectories.exact`).
* A first-order ``sde-dpmsolver++`` sampler is inverted exactly given the per-step noises it used
  (``noises``). Other stochastic samplers are refused: an SDE step shrinks its input
  (``c_x = sigma_t / sigma_s e^{-h}``), so its inverse amplifies every error, and with a multistep
  history no solve reaches float32 precision.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp

from .. import solver
from .. import checks
from ..grids import Grid, mirrored_grid
from ..noise_schedule import training_schedule
from ..scheduler import DPMSolverMultistepBase, DPMSolverMultistepInverseScheduler
from ..state import SchedulerState
from .exact import ExactOptions, exact_inversion_jit
from .scan import (ModelFn, ScanOptions, Trajectory, as_array, check_scheduler, check_unroll, scan_steps_jit,
                   stochastic_inputs, visited_sigmas)

Array = jax.Array


def mirrored_state(scheduler: DPMSolverMultistepBase, forward_state: SchedulerState, shape, dtype=jnp.float32):
    """``(inverse_scheduler, state)`` stepping a sampler's grid backwards
    (:func:`dpmjax.grids.mirrored_grid`), with the sampler's config (its ODE counterpart for SDE types)."""
    n = forward_state.num_inference_steps
    forward = Grid(timesteps=forward_state.timesteps, sigmas=forward_state.sigmas)
    grid = mirrored_grid(forward, n, training_schedule(scheduler.config))
    ode = {"sde-dpmsolver++": "dpmsolver++", "sde-dpmsolver": "dpmsolver"}.get(scheduler.config.algorithm_type)
    inverse = DPMSolverMultistepInverseScheduler(scheduler.config.replace(algorithm_type=ode) if ode else scheduler.config)
    return inverse, inverse.state_on_grid(inverse.create_state(), grid.timesteps, grid.sigmas, shape, dtype)


def invert(
    model_fn: ModelFn,
    sample: Array,
    scheduler: DPMSolverMultistepBase,
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
    check_scheduler(scheduler)
    check_unroll(unroll)
    x = as_array(sample)
    scan_options = ScanOptions(return_samples=return_samples, return_outputs=return_model_outputs, checkpoint=checkpoint,
                               unroll=unroll, progress=progress, label="invert")
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
        y, samples, outputs = scan_steps_jit(scheduler, model_fn, scan_options, state, x, cond, None, None)
        return Trajectory(y, samples, outputs, state.timesteps, visited_sigmas(state, n))

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
                "exact inversion of a stochastic sampler needs algorithm_type='sde-dpmsolver++' with solver_order=1 "
                f"(got {scheduler.config.algorithm_type!r}, order {scheduler.config.solver_order}); invert its ODE "
                "counterpart (algorithm_type='dpmsolver++') instead."
            )
        _, noises = stochastic_inputs(scheduler, n, x.shape, None, noises)
        if noises is None:
            raise ValueError("inverting a stochastic sampler needs the noises it used: pass noises ([N, *shape]).")
    elif noises is not None:
        raise ValueError(f"noises are only used with stochastic samplers, not algorithm_type={scheduler.config.algorithm_type!r}.")
    if not exact:
        inverse, mirror = mirrored_state(scheduler, forward_state, x.shape, solver.compute_dtype(x))
        y, path, outputs = scan_steps_jit(inverse, model_fn, scan_options, mirror, x, cond, None, None)
        return Trajectory(y, path, outputs, mirror.timesteps, visited_sigmas(mirror, n))

    max_iterations, gmres_restart, gmres_maxiter, max_sweeps = (
        checks.integer(name, value, least) for name, value, least in (
            ("max_iterations", max_iterations, 1), ("gmres_restart", gmres_restart, 1),
            ("gmres_maxiter", gmres_maxiter, 1), ("max_sweeps", max_sweeps, 0)))
    tolerance = checks.real("tolerance", tolerance, low=0.0, high=1.0, open_low=True, open_high=True)
    if checkpoint or unroll != 1:
        raise ValueError("checkpoint and unroll apply to plain inversion's scan; exact=True runs its own solves "
                         "and takes neither.")
    if x.ndim == 0 or x.shape[0] == 0:
        raise ValueError(f"exact inversion needs a batch axis with at least one row, got shape {tuple(x.shape)}.")
    options = ExactOptions(max_sweeps=max_sweeps, max_iterations=max_iterations, tolerance=tolerance,
                           gmres_restart=gmres_restart, gmres_maxiter=gmres_maxiter,
                           rows=x.shape[0] if independent_rows else 1, return_outputs=return_model_outputs,
                           progress=progress)
    inverse, mirror = mirrored_state(scheduler, forward_state, x.shape, solver.compute_dtype(x))
    X, outputs, round_trip, sweeps, iterations = exact_inversion_jit(scheduler, inverse, model_fn, options, forward_state,
                                                                     mirror, x, cond, noises)
    return Trajectory(
        sample=X[0].astype(x.dtype),
        samples=X[::-1].astype(x.dtype) if return_samples else None,
        model_outputs=outputs[::-1] if return_model_outputs else None,
        timesteps=forward_state.timesteps[::-1],
        sigmas=visited_sigmas(forward_state, n)[::-1],
        round_trip=round_trip,
        iterations=iterations,
        sweeps=sweeps,
        converged=round_trip <= options.tolerance,
    )

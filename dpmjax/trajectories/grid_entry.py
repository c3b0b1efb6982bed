"""Where every trajectory starts: the state on its grid, and what each step of the loop reads.

Every whole-trajectory call (:func:`dpmjax.sample`, :func:`dpmjax.invert`, null-text inversion,
:func:`dpmjax.check_step_inversion`) builds its state here, from a number of steps (diffusers'
grid, tables on the host) or from noise levels that may be traced (``sigmas``: tables built with
``jax.numpy``, differentiable), and every loop over a grid scans the same per-step inputs
(:class:`GridSteps`) from the same empty history, so a new kind of grid or step is added once.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from .. import solver
from ..state import SchedulerState

Array = jax.Array


def grid_state(scheduler, shape, *, num_inference_steps: Optional[int], sigmas: Optional[Array], dtype,
               caller: str) -> SchedulerState:
    """``scheduler``'s state on its grid for samples of ``shape``: diffusers' grid of
    ``num_inference_steps`` steps, or the grid of noise levels ``sigmas`` (``[N + 1]``, the
    sampler's order; see ``set_timesteps``), or, given neither, the config's own grid
    (``config.sigmas``).

    Raises:
        ValueError: Both or neither of ``num_inference_steps`` and ``sigmas`` (the message names
            ``caller``); or ``set_timesteps`` refuses them.
    """
    configured = num_inference_steps is None and sigmas is None and scheduler.config.sigmas is not None
    if (num_inference_steps is None) == (sigmas is None) and not configured:
        raise ValueError(f"{caller} takes num_inference_steps or sigmas (the grid's N + 1 noise levels), exactly one "
                         "(or neither, with a scheduler whose config holds its own grid: config.sigmas).")
    if sigmas is None:  # a step count, or the config's own grid
        return scheduler.set_timesteps(scheduler.create_state(), num_inference_steps, shape, dtype=dtype)
    return scheduler.set_timesteps(scheduler.create_state(), shape=shape, dtype=dtype, sigmas=sigmas)


def on_traced_grid(state: SchedulerState) -> bool:
    """Whether the state's grid came from noise levels (fractional timesteps, device-built tables)."""
    return bool(jnp.issubdtype(state.timesteps.dtype, jnp.floating))


class GridSteps(NamedTuple):
    """What step ``i`` of a loop over a grid reads, stacked over the ``N`` steps (a ``lax.scan``
    input): its index, the model's timestep, and its update row with the warm-up and final orders
    applied (:func:`dpmjax.solver.trajectory_rows`)."""

    index: Array
    timestep: Array
    row: Array


def grid_steps(state: SchedulerState, start: int = 0, stop: Optional[int] = None) -> GridSteps:
    """The per-step inputs of steps ``start .. stop - 1`` of ``state``'s grid (all of them by
    default), run from an empty history: the warm-up counts from ``start``, as a scheduler whose
    loop begins at ``timesteps[start]`` takes lower orders first (diffusers' img2img and DiffEdit
    pipelines), while the lower-order final steps stay where the whole grid puts them."""
    n = state.timesteps.shape[0]
    stop = n if stop is None else stop
    if start == 0 and stop == n:
        return GridSteps(index=jnp.arange(n), timestep=state.timesteps, row=solver.trajectory_rows(state))
    steps = jnp.arange(start, stop)
    K = state.update_coefficients.shape[1]
    rows = state.update_coefficients[steps, solver.step_order(steps - start, K, state.order_cap[start:stop]) - 1]
    return GridSteps(index=steps, timestep=state.timesteps[start:stop], row=rows)


def empty_history(config, x: Array) -> Array:
    """The model-output ring buffer a trajectory starts with (``[K, *x.shape]``, none at order 1)."""
    return jnp.zeros((solver.history_length(config.solver_order),) + x.shape, solver.compute_dtype(x))

"""The arrays a scheduler state is made of, built once per config and grid.

A scheduler's state is a pure function of hashable host values (its config, its direction, the
grid's timesteps and sigmas, the sample shape), so each is computed once and shared:
:func:`initial_state` (the training tables), :func:`cached_grid` (diffusers' timesteps and sigmas)
and :func:`host_grid_fields` (the per-step tables, float64 on the host). A grid given as an array
(that may be traced, e.g. a learned one) is built on the device instead
(:func:`traced_grid_fields`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from . import solver
from .coefficients import step_tables
from .config import SchedulerConfig
from .grids import forward_grid, inverse_grid
from .noise_schedule import training_schedule
from .state import SchedulerState
from .static_cache import StaticCache, memoized
from .traced_tables import grid_fields, mirrored_sigmas

_GRIDS = StaticCache("inference grids")


def cached_grid(config, forward, num_inference_steps, *, timesteps, shift):
    """Grids depend only on hashable host values: compute each once (set_timesteps is then cheap)."""
    return _GRIDS.get((config, forward, num_inference_steps, timesteps, shift),
                      lambda: compute_grid(config, forward, num_inference_steps, timesteps=timesteps, shift=shift))


def compute_grid(config, forward, num_inference_steps, *, timesteps, shift):
    train = training_schedule(config)
    if forward:
        return forward_grid(config, train, num_inference_steps, timesteps=timesteps, flow_shift=shift)
    return inverse_grid(config, train, num_inference_steps)


@memoized
def host_grid_fields(config, timestep_bytes: bytes, sigma_bytes: bytes, *, num_steps: int, forward: bool, shape, dtype: str):
    """The arrays ``state_on_grid`` sets, built once per grid and shape. They are immutable device
    arrays, made concrete even when called under a trace, so sharing them between states is safe."""
    sigmas = np.frombuffer(sigma_bytes, dtype=np.float32)
    tables = step_tables(config, sigmas.astype(np.float64), num_steps, forward=forward)
    with jax.ensure_compile_time_eval():
        return dict(
            timesteps=jnp.asarray(np.frombuffer(timestep_bytes, dtype=np.int64), jnp.int32),
            sigmas=jnp.asarray(sigmas),
            step_alpha=jnp.asarray(tables.alpha),
            step_sigma=jnp.asarray(tables.sigma),
            convert_coefficients=jnp.asarray(tables.convert),
            update_coefficients=jnp.asarray(tables.update),
            order_cap=jnp.asarray(tables.order_cap, jnp.int32),
            **progress_fields(config, shape, dtype),
        )


@memoized
def initial_state(config: SchedulerConfig, forward: bool) -> SchedulerState:
    train = training_schedule(config)
    T = config.num_train_timesteps
    timesteps = np.arange(T)[::-1] if forward else np.arange(T)
    with jax.ensure_compile_time_eval():
        return SchedulerState(
            alphas_cumprod=jnp.asarray(train.alphas_cumprod),
            alpha_t=jnp.asarray(train.alpha_t),
            sigma_t=jnp.asarray(train.sigma_t),
            lambda_t=jnp.asarray(train.lambda_t),
            init_noise_sigma=jnp.asarray(1.0, jnp.float32),
            timesteps=jnp.asarray(timesteps.copy(), jnp.int32),
            sigmas=jnp.asarray(train.sigmas),
        )


def traced_grid_fields(config: SchedulerConfig, sigmas, *, forward: bool, shape, dtype) -> dict:
    """The fields ``set_timesteps(sigmas=...)`` sets: the grid's tables built with ``jax.numpy``
    from ``N + 1`` noise levels in the sampler's order (walked backwards for the inverse direction,
    :func:`dpmjax.traced_tables.mirrored_sigmas`), and a fresh history and counters."""
    levels = sigmas if forward else mirrored_sigmas(config, sigmas)
    fields = grid_fields(config, levels, forward=forward)
    fields.update(progress_fields(config, shape, dtype))
    return fields


def progress_fields(config: SchedulerConfig, shape, dtype) -> dict:
    """A fresh model-output history for samples of ``shape`` and zeroed step counters."""
    return dict(
        model_outputs=jnp.zeros((solver.history_length(config.solver_order),) + tuple(shape), dtype),
        lower_order_nums=jnp.asarray(0, jnp.int32),
        step_index=jnp.asarray(-1, jnp.int32),
        steps_past_end=jnp.asarray(0, jnp.int32),
    )

"""Drop-in for diffusers <= 0.39's ``FlaxDPMSolverMultistepScheduler`` call pattern.

Flax Stable Diffusion code written against the old class runs after changing its import line::

    from dpmjax import FlaxDPMSolverMultistepScheduler

    scheduler, state = FlaxDPMSolverMultistepScheduler.from_pretrained(model_dir, subfolder="scheduler")
    state = scheduler.set_timesteps(state, num_inference_steps=50, shape=latents.shape)
    latents = latents * state.init_noise_sigma

    def loop_body(i, args):
        latents, state = args
        t = jnp.array(state.timesteps, dtype=jnp.int32)[i]
        noise_pred = unet(latents, t)
        latents, state = scheduler.step(state, noise_pred, t, latents).to_tuple()
        return latents, state

    latents, state = jax.lax.fori_loop(0, 50, loop_body, (latents, state))

It is a thin layer over :class:`~dpmjax.DPMSolverMultistepScheduler` with the old class's
semantics: the schedule ends at the smallest training noise level (``final_sigmas_type="sigma_min"``),
``add_noise`` takes any training timestep, and ``dtype`` sets the model-output history's dtype.
The old class's dynamic thresholding was broken (a percentile of 0.995 %, and a maximum where a
clip belongs); this one thresholds as diffusers' PyTorch schedulers do (see the README).
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Optional, Union

import jax
import jax.numpy as jnp

from .config import SchedulerConfig, read_config_file
from .scheduler import DPMSolverMultistepScheduler, SchedulerOutput
from .state import SchedulerState

FlaxDPMSolverMultistepSchedulerOutput = SchedulerOutput


class FlaxDPMSolverMultistepScheduler(DPMSolverMultistepScheduler):
    """diffusers <= 0.39's Flax DPM-Solver multistep scheduler, re-implemented over dpmjax."""

    has_state = True

    def __init__(self, config: Optional[SchedulerConfig] = None, dtype=jnp.float32, **kwargs: Any):
        if config is not None and kwargs:
            raise ValueError("pass either a SchedulerConfig or keyword parameters, not both.")
        values = config.to_dict() if config is not None else {}
        old_semantics = dict(final_sigmas_type="sigma_min", euler_at_final=False)
        super().__init__(SchedulerConfig.from_dict(values, **dict(kwargs, **old_semantics)))
        self.dtype = jnp.dtype(dtype)

    def __eq__(self, other):
        return super().__eq__(other) and self.dtype == other.dtype

    def __hash__(self):
        return hash((super().__hash__(), str(self.dtype)))

    @classmethod
    def from_config(cls, config: Union[SchedulerConfig, Mapping[str, Any], None] = None, dtype=jnp.float32, **overrides: Any):
        values = config.to_dict() if isinstance(config, SchedulerConfig) else dict(config or {})
        return cls(SchedulerConfig.from_dict(values, **overrides), dtype=dtype)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Union[str, os.PathLike], subfolder: Optional[str] = None, dtype=jnp.float32, **overrides: Any):
        """Returns ``(scheduler, state)``, as the old Flax schedulers did."""
        scheduler = cls.from_config(read_config_file(pretrained_model_name_or_path, subfolder), dtype=dtype, **overrides)
        return scheduler, scheduler.create_state()

    def create_state(self, common: Any = None) -> SchedulerState:
        """``common`` (the old ``CommonSchedulerState``) is accepted and ignored: the state holds its tables."""
        return super().create_state()

    def set_timesteps(self, state: SchedulerState, num_inference_steps: int, shape, dtype=None, **kwargs) -> SchedulerState:
        return super().set_timesteps(state, num_inference_steps, shape, self.dtype if dtype is None else dtype, **kwargs)

    def step(self, state, model_output, timestep, sample, return_dict: bool = True, key=None, variance_noise=None):
        return super().step(state, model_output, timestep, sample, key=key, variance_noise=variance_noise, return_dict=return_dict)

    def add_noise(self, state: SchedulerState, original_samples: jax.Array, noise: jax.Array, timesteps) -> jax.Array:
        """``sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps`` at any training timestep (old semantics)."""
        alphas_cumprod = state.alphas_cumprod[jnp.atleast_1d(jnp.asarray(timesteps))]
        expand = (-1,) + (1,) * (original_samples.ndim - 1)
        a = jnp.sqrt(alphas_cumprod).reshape(expand)
        s = jnp.sqrt(1.0 - alphas_cumprod).reshape(expand)
        return (a * original_samples + s * noise).astype(original_samples.dtype)

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
clip belongs); this one thresholds as diffusers' PyTorch schedulers do (see "Numerics and differences from diffusers" in the docs).

A loop that runs past the schedule's last step (``fori_loop(0, n)`` with ``n`` larger than the
``num_inference_steps`` given to ``set_timesteps``) made the old class repeat its last step on the
finished sample, silently (``state.timesteps[i]`` clamps to the last timestep, which it looked up
again). Here such a step returns the sample unchanged and counts itself in
``state.steps_past_end``; an eager call raises a ``ValueError``.
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
    """diffusers <= 0.39's Flax DPM-Solver multistep scheduler, re-implemented over dpmjax.

    A thin layer over :class:`~dpmjax.DPMSolverMultistepScheduler` with the old class's semantics:
    the schedule always ends at the smallest training noise level (``final_sigmas_type`` is set to
    ``"sigma_min"`` and ``euler_at_final`` to False, whatever is passed), ``add_noise`` takes any
    training timestep, and ``dtype`` sets the model-output history's dtype.

    Args:
        config: A :class:`~dpmjax.config.SchedulerConfig`; ``None`` (default) builds one from
            ``kwargs``.
        dtype: The dtype of the model-output history (default float32), used by
            ``set_timesteps`` when it is given none.
        **kwargs: :class:`~dpmjax.config.SchedulerConfig` fields, when no ``config`` is given.

    Attributes:
        dtype: The model-output history's dtype.
        has_state: True, as in the old Flax schedulers.

    Raises:
        ValueError: Both ``config`` and keyword parameters are given; a keyword parameter is
            unknown, or a value is invalid (see :class:`~dpmjax.config.SchedulerConfig`).
    """

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
        """Build from a config dict (diffusers' ``scheduler.config`` or a JSON's contents) or a
        :class:`~dpmjax.config.SchedulerConfig`; unknown keys are ignored, ``overrides`` win.

        Args:
            config: A mapping of config values, a :class:`~dpmjax.config.SchedulerConfig`, or
                ``None`` (default: diffusers' defaults).
            dtype: The dtype of the model-output history (default float32).
            **overrides: :class:`~dpmjax.config.SchedulerConfig` fields that replace the values
                from ``config``.

        Returns:
            The scheduler (without a state; :meth:`from_pretrained` returns both).

        Raises:
            ValueError: An override names no config field, or a value is invalid.
        """
        values = config.to_dict() if isinstance(config, SchedulerConfig) else dict(config or {})
        return cls(SchedulerConfig.from_dict(values, **overrides), dtype=dtype)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Union[str, os.PathLike], subfolder: Optional[str] = None, dtype=jnp.float32, **overrides: Any):
        """Load ``scheduler_config.json`` from a local folder; returns ``(scheduler, state)``, as the old
        Flax schedulers did. Nothing is downloaded.

        Args:
            pretrained_model_name_or_path: A local folder holding ``scheduler_config.json`` (or
                holding ``subfolder`` that does), or the JSON file itself.
            subfolder: The folder inside it with the config, e.g. ``"scheduler"``.
            dtype: The dtype of the model-output history (default float32).
            **overrides: :class:`~dpmjax.config.SchedulerConfig` fields that replace the file's
                values.

        Returns:
            ``(scheduler, state)``: the scheduler and its state from :meth:`create_state`.

        Raises:
            FileNotFoundError: There is no config file at that path.
            ValueError: The file does not hold a JSON object; an override is unknown; a value is
                invalid.
        """
        scheduler = cls.from_config(read_config_file(pretrained_model_name_or_path, subfolder), dtype=dtype, **overrides)
        return scheduler, scheduler.create_state()

    def create_state(self, common: Any = None) -> SchedulerState:
        """``common`` (the old ``CommonSchedulerState``) is accepted and ignored: the state holds its tables.

        Args:
            common: Ignored.

        Returns:
            The state before ``set_timesteps``: training tables and the full training grid.
        """
        return super().create_state()

    def set_timesteps(self, state: SchedulerState, num_inference_steps: Optional[int] = None, shape=None, dtype=None,
                      **kwargs) -> SchedulerState:
        """A state ready to step ``num_inference_steps`` steps over samples of ``shape``.

        As :meth:`dpmjax.DPMSolverMultistepScheduler.set_timesteps`, with the scheduler's
        ``dtype`` as the default history dtype.

        Args:
            state: The state to extend, e.g. from :meth:`create_state`.
            num_inference_steps: ``N``, the number of steps (or pass ``timesteps`` or ``sigmas``).
            shape: The sample's shape (required); the model-output history is allocated for it.
            dtype: The model-output history's dtype; ``None`` (default) uses the scheduler's.
            **kwargs: ``timesteps``, ``mu`` or ``sigmas`` (a grid of noise levels, e.g. from
                :func:`dpmjax.learn_grid`), as for the dpmjax scheduler.

        Returns:
            A new state on the grid, at step 0.

        Raises:
            ValueError: As :meth:`dpmjax.DPMSolverMultistepScheduler.set_timesteps`.
        """
        return super().set_timesteps(state, num_inference_steps, shape, dtype=self.dtype if dtype is None else dtype,
                                     **kwargs)

    def step(self, state, model_output, timestep, sample, return_dict: bool = True, key=None, variance_noise=None):
        """One step, with the old Flax signature (``return_dict`` before ``key``).

        Args:
            state: The state after ``set_timesteps`` (or the previous ``step``).
            model_output: The raw model output at ``(sample, timestep)``.
            timestep: The current timestep (an entry of ``state.timesteps``).
            sample: The current sample.
            return_dict: Return a ``FlaxDPMSolverMultistepSchedulerOutput`` (default) rather than
                a tuple.
            key: SDE types: a ``jax.random`` key for the step's noise.
            variance_noise: SDE types: the step's noise, instead of ``key``.

        Past the end (a ``fori_loop`` longer than the schedule): as
        :meth:`dpmjax.DPMSolverMultistepScheduler.step`, the sample comes back unchanged and
        ``state.steps_past_end`` counts the call (the old class repeated its last step); an eager
        call raises a ``ValueError``.

        Returns:
            ``FlaxDPMSolverMultistepSchedulerOutput(prev_sample, state)`` (``.to_tuple()`` gives the
            pair), or the tuple ``(prev_sample, state)`` with ``return_dict=False``.

        Raises:
            ValueError: As :meth:`dpmjax.DPMSolverMultistepScheduler.step`.
        """
        return super().step(state, model_output, timestep, sample=sample, key=key, variance_noise=variance_noise,
                            return_dict=return_dict)

    def add_noise(self, state: SchedulerState, original_samples: jax.Array, noise: jax.Array, timesteps) -> jax.Array:
        """``sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps`` at any training timestep (old semantics).

        Args:
            state: A state of this scheduler (its training tables are used).
            original_samples: ``x0``, the clean samples, batched on axis 0.
            noise: ``eps``, Gaussian noise of the same shape.
            timesteps: A training timestep, or one per row (``[B]``).

        Returns:
            The noisy samples, with ``original_samples``' shape and dtype.
        """
        alphas_cumprod = state.alphas_cumprod[jnp.atleast_1d(jnp.asarray(timesteps))]
        expand = (-1,) + (1,) * (original_samples.ndim - 1)
        a = jnp.sqrt(alphas_cumprod).reshape(expand)
        s = jnp.sqrt(1.0 - alphas_cumprod).reshape(expand)
        return (a * original_samples + s * noise).astype(original_samples.dtype)

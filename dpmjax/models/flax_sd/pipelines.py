"""dpmjax's Flax DPM-Solver scheduler inside diffusers 0.39's own Flax pipelines.

diffusers' Flax pipelines (``FlaxStableDiffusionPipeline``, its img2img and inpaint variants,
``FlaxStableDiffusionXLPipeline``) accept a scheduler only if it subclasses diffusers'
``FlaxSchedulerMixin``, name it in ``model_index.json`` by its module and class, and save it with
diffusers' config machinery. :class:`FlaxDPMSolverMultistepScheduler` here is
:class:`dpmjax.FlaxDPMSolverMultistepScheduler` made to fit: it subclasses ``FlaxSchedulerMixin``,
a pipeline registers it as ``["diffusers", "FlaxDPMSolverMultistepScheduler"]``, and it saves the
``scheduler_config.json`` that diffusers writes for its own class, so a saved folder loads with plain
diffusers 0.39 and with this class swapped in again::

    from diffusers import FlaxStableDiffusionPipeline
    from dpmjax.models.flax_sd import for_diffusers_pipelines

    Scheduler = for_diffusers_pipelines()      # this class; ImportError without diffusers < 0.40
    scheduler, state = Scheduler.from_pretrained(model_dir, subfolder="scheduler")
    pipeline, params = FlaxStableDiffusionPipeline.from_pretrained(model_dir, scheduler=scheduler)
    params["scheduler"] = state                # as with diffusers' own DPM-Solver class
    images = pipeline(prompt_ids, params, prng_seed, num_inference_steps=25).images
    pipeline.save_pretrained("out", params=params)   # reloads with plain diffusers 0.39

This module imports diffusers (< 0.40, with transformers < 5 for the pipelines' text encoders), after
the version check of :mod:`dpmjax.models.flax_sd.requirements`; reach it through
:func:`dpmjax.models.flax_sd.for_diffusers_pipelines`, so that importing dpmjax never imports diffusers.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Optional, Union

import jax.numpy as jnp

from ... import flax_compat
from ...config import SchedulerConfig
from ...scheduler import DPMSolverMultistepScheduler
from .requirements import old_diffusers

diffusers = old_diffusers()

from diffusers.schedulers.scheduling_utils_flax import FlaxSchedulerMixin  # noqa: E402

_DIFFUSERS_CLASS = diffusers.FlaxDPMSolverMultistepScheduler
# The parameters of diffusers' Flax class (0.39): the keys its scheduler_config.json always holds.
_DIFFUSERS_FIELDS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "solver_order",
                     "prediction_type", "thresholding", "dynamic_thresholding_ratio", "sample_max_value",
                     "algorithm_type", "solver_type", "lower_order_final", "timestep_spacing")
# Fields the Flax class fixes (the old class's semantics): a file's value for them is kept as read.
_FIXED = ("final_sigmas_type", "euler_at_final")
_DEFAULTS = SchedulerConfig().to_dict()


class FlaxDPMSolverMultistepScheduler(flax_compat.FlaxDPMSolverMultistepScheduler, FlaxSchedulerMixin):
    """:class:`dpmjax.FlaxDPMSolverMultistepScheduler` as a component of diffusers' Flax pipelines.

    Same numbers, state and call pattern as dpmjax's Flax class; in addition it is a
    ``FlaxSchedulerMixin``, a pipeline names it ``["diffusers", "FlaxDPMSolverMultistepScheduler"]``
    in ``model_index.json``, and ``save_pretrained`` writes what diffusers writes for its own class.
    """

    _compatibles = list(_DIFFUSERS_CLASS._compatibles)

    def __init__(self, config: Optional[SchedulerConfig] = None, dtype=jnp.float32, **kwargs: Any):
        super().__init__(config, dtype=dtype, **kwargs)
        # diffusers names a pipeline component by its object's __module__ (register_modules); this
        # instance answers with the module of diffusers' own class, so model_index.json names the class
        # that plain diffusers loads. The class itself stays in this module (pickle, repr, inspect).
        self.__module__ = _DIFFUSERS_CLASS.__module__
        self._file_values: dict = {}

    @classmethod
    def from_config(cls, config: Union[SchedulerConfig, Mapping[str, Any], None] = None, dtype=jnp.float32,
                    **overrides: Any):
        """Build from a config dict (a ``scheduler_config.json``'s contents, diffusers'
        ``scheduler.config``), a :class:`~dpmjax.SchedulerConfig` or another dpmjax scheduler; the
        dict's keys are remembered, so that ``save_pretrained`` writes them back as diffusers would.
        ``from_pretrained(folder, subfolder=...)`` (inherited) returns ``(scheduler, state)`` through it."""
        if isinstance(config, DPMSolverMultistepScheduler):
            values = config.config.to_dict()
            dtype = getattr(config, "dtype", dtype)
        elif isinstance(config, SchedulerConfig):
            values = config.to_dict()
        else:
            values = dict(config or {})
        scheduler = cls(SchedulerConfig.from_dict(values, **overrides), dtype=dtype)
        if isinstance(config, Mapping):
            scheduler._file_values = {k: v for k, v in values.items() if not k.startswith("_") and k != "dtype"}
        return scheduler

    def diffusers_config(self) -> dict:
        """The config diffusers' ``FlaxDPMSolverMultistepScheduler`` holds for these settings: its own
        parameters, the other keys of the file this scheduler was read from (with this scheduler's
        values for those dpmjax knows), and dpmjax settings that differ from their defaults (which
        diffusers' class keeps in its config without using them)."""
        ours = self.config.to_dict()
        values = {k: ours[k] for k in _DIFFUSERS_FIELDS}
        for key, value in self._file_values.items():
            if key not in values:
                values[key] = ours[key] if key in ours and key not in _FIXED else value
        for key, value in ours.items():
            if key not in values and key not in _FIXED and value != _DEFAULTS[key]:
                values[key] = value
        return values

    def to_diffusers(self):
        """diffusers' own ``FlaxDPMSolverMultistepScheduler`` with this scheduler's config and dtype."""
        return _DIFFUSERS_CLASS.from_config(self.diffusers_config(), dtype=self.dtype)

    def save_pretrained(self, save_directory: Union[str, os.PathLike], push_to_hub: bool = False, **kwargs: Any):
        """Write the ``scheduler_config.json`` diffusers writes for its own class with this config
        (``_class_name: "FlaxDPMSolverMultistepScheduler"``), through diffusers' own ``save_config``."""
        return self.to_diffusers().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)

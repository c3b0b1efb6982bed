"""The two schedulers: static config + pure functions over a :class:`SchedulerState`.

``DPMSolverMultistepScheduler`` samples (noise -> data); ``DPMSolverMultistepInverseScheduler``
inverts (data -> noise) on the mirrored grid. Both are call-compatible with diffusers <= 0.39's
``FlaxDPMSolverMultistepScheduler``::

    sched = DPMSolverMultistepInverseScheduler.from_pretrained("model_dir", subfolder="scheduler")
    state = sched.set_timesteps(sched.create_state(), num_inference_steps=50, shape=latents.shape)

    def body(carry, t):
        x, state = carry
        x, state = sched.step(state, model(x, t), t, x, return_dict=False)
        return (x, state), x

    (noise, state), path = jax.lax.scan(body, (latents, state), state.timesteps)

A scheduler object holds only its frozen config; it is hashable and compares by config, so it can
be closed over or passed as a static argument. All arrays live in the state.
"""

from __future__ import annotations

import math
import os
from typing import Any, Mapping, Optional, Sequence, Union

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from . import solver
from .building_blocks import SolverBuildingBlocks
from .config import (
    SchedulerConfig,
    check_num_inference_steps,
    read_config_file,
    write_config_file,
)
from .grid_sigmas import check_grid_sigmas
from .grid_state import cached_grid, host_grid_fields, initial_state, traced_grid_fields
from .noise_schedule import alpha_sigma_from_sigma
from .numerics.rows import per_row
from .state import SchedulerState
from .version import __version__

Array = jax.Array


@flax.struct.dataclass
class SchedulerOutput:
    """Result of ``step``: the new sample and the new state (also iterable as a pair).

    Attributes:
        prev_sample: The sample after the step (diffusers' name: the sample at the *previous*,
            less noisy timestep for a sampler), with the input sample's shape and dtype.
        state: The scheduler state after the step.
    """

    prev_sample: Array
    state: SchedulerState

    def to_tuple(self):
        """The pair ``(prev_sample, state)``."""
        return (self.prev_sample, self.state)

    def __iter__(self):
        return iter(self.to_tuple())


class DPMSolverMultistepBase(SolverBuildingBlocks):
    """Shared implementation; subclasses fix the direction of the grid.

    A scheduler object holds only its frozen config; it is hashable and compares by config, so it
    can be closed over or passed as a static argument. All arrays live in the
    :class:`~dpmjax.state.SchedulerState`.

    Args:
        config: A :class:`~dpmjax.config.SchedulerConfig`; ``None`` (default) builds one from
            ``kwargs``. Dicts (diffusers' ``scheduler.config``, a JSON's contents) go through
            :meth:`from_config`.
        **kwargs: :class:`~dpmjax.config.SchedulerConfig` fields (diffusers' names), when no
            ``config`` is given; unset fields keep diffusers' defaults.

    Raises:
        ValueError: Both ``config`` and keyword parameters are given; ``config`` is not a
            :class:`~dpmjax.config.SchedulerConfig`; a keyword parameter is unknown or a value is
            invalid (see :class:`~dpmjax.config.SchedulerConfig`); the config does not suit the
            direction (see the subclasses).
    """

    forward: bool = True
    order = 1  # diffusers' attribute: model evaluations per step

    # ------------------------------------------------------------------ construction and configs
    def __init__(self, config: Optional[SchedulerConfig] = None, **kwargs: Any):
        if config is not None and kwargs:
            raise ValueError("pass either a SchedulerConfig or keyword parameters, not both.")
        if config is None:
            config = SchedulerConfig.from_dict({}, **kwargs)  # unknown names are a ValueError
        elif not isinstance(config, SchedulerConfig):
            raise ValueError(f"config must be a SchedulerConfig, got {type(config).__name__}; use from_config for dicts.")
        self._validate(config)
        self._config = config

    def _validate(self, config: SchedulerConfig) -> None:
        if self.forward:
            if config.final_sigmas_type == "zero" and not config.predicts_data:
                raise ValueError(
                    f"final_sigmas_type='zero' is not supported for algorithm_type={config.algorithm_type!r} "
                    "(the noise-prediction update is undefined at zero noise); use final_sigmas_type='sigma_min'."
                )
        elif config.is_sde:
            raise ValueError(
                f"algorithm_type={config.algorithm_type!r} cannot run in the inverse scheduler (its noise term "
                "sqrt(1 - e^{-2h}) has no real value when the noise rises); use 'dpmsolver++' or 'dpmsolver', or "
                "dpmjax.invert(..., exact=True, noises=...) on the stochastic sampler."
            )

    @property
    def config(self) -> SchedulerConfig:
        """The scheduler's frozen, hashable :class:`~dpmjax.config.SchedulerConfig`."""
        return self._config

    def __eq__(self, other):
        return type(self) is type(other) and self._config == other._config

    def __hash__(self):
        return hash((type(self), self._config))

    def __repr__(self):
        changed = {k: v for k, v in self._config.to_dict().items() if v != SchedulerConfig.__dataclass_fields__[k].default}
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in changed.items())})"

    @classmethod
    def from_config(cls, config: Union[SchedulerConfig, Mapping[str, Any], None] = None, **overrides: Any):
        """Build from a config dict (diffusers' ``scheduler.config`` or a JSON's contents), another
        scheduler's config, or a :class:`SchedulerConfig`; unknown keys are ignored, ``overrides`` win.

        Args:
            config: A mapping of config values, a scheduler (dpmjax's or diffusers'; its
                ``config`` is read), a :class:`SchedulerConfig`, or ``None`` (default: diffusers'
                defaults). Keys this config does not know, and ``_``-keys, are ignored.
            **overrides: :class:`SchedulerConfig` fields that replace the values from ``config``.

        Returns:
            A scheduler of this class.

        Raises:
            ValueError: An override names no :class:`SchedulerConfig` field; a value is invalid;
                the config does not suit this scheduler's direction.
        """
        if config is None:
            values = {}
        elif isinstance(config, SchedulerConfig):
            values = config.to_dict()
        elif hasattr(config, "config") and not isinstance(config, Mapping):  # a scheduler object
            inner = config.config
            values = inner.to_dict() if isinstance(inner, SchedulerConfig) else dict(inner)
        else:
            values = dict(config)
        return cls(SchedulerConfig.from_dict(values, **overrides))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Union[str, os.PathLike], subfolder: Optional[str] = None, **overrides: Any):
        """Load ``scheduler_config.json`` from a local folder (or the file itself); nothing is downloaded.

        Args:
            pretrained_model_name_or_path: A local folder holding ``scheduler_config.json`` (or
                holding ``subfolder`` that does), or the JSON file itself.
            subfolder: The folder inside ``pretrained_model_name_or_path`` with the config, e.g.
                ``"scheduler"`` for a diffusers pipeline folder.
            **overrides: :class:`SchedulerConfig` fields that replace the file's values.

        Returns:
            A scheduler of this class.

        Raises:
            FileNotFoundError: There is no config file at that path.
            ValueError: The file does not hold a JSON object; an override is unknown; a value is
                invalid; the config does not suit this scheduler's direction.
        """
        return cls.from_config(read_config_file(pretrained_model_name_or_path, subfolder), **overrides)

    def save_pretrained(self, save_directory: Union[str, os.PathLike]) -> str:
        """Write diffusers' ``scheduler_config.json`` (with ``_class_name``) into ``save_directory``.

        Args:
            save_directory: The folder to write into; created if missing.

        Returns:
            The path of the written file.
        """
        values = {"_class_name": type(self).__name__, "_dpmjax_version": __version__}
        values.update(self._config.to_dict())
        return write_config_file(os.fspath(save_directory), values)

    # ------------------------------------------------------------------ state
    def create_state(self) -> SchedulerState:
        """The state before ``set_timesteps``: training tables and the full training grid.

        Returns:
            A :class:`~dpmjax.state.SchedulerState` whose inference fields are ``None``.
        """
        return initial_state(self._config, self.forward)

    def _check_channel_axis(self, ndim: int) -> None:
        """Refuse a ``channel_axis`` outside samples of ``ndim`` axes (negative indices count from the
        end). Only the learned-variance split reads it, so only ``variance_type`` configs check it."""
        axis = self._config.channel_axis
        if self._config.variance_type is not None and ndim > 0 and not -ndim <= axis < ndim:
            raise ValueError(
                f"channel_axis={axis} must lie in [{-ndim}, {ndim - 1}] for samples with {ndim} axes "
                f"(variance_type={self._config.variance_type!r} splits the model output on it)."
            )

    def _grid(self, num_inference_steps, timesteps, mu):
        if num_inference_steps is not None:  # before the grid cache, where 10.0 would find the grid of 10
            num_inference_steps = check_num_inference_steps(num_inference_steps)
        if self.forward:
            shift = None
            if mu is not None:
                if not self._config.use_dynamic_shifting:
                    raise ValueError("mu is only used with use_dynamic_shifting=True.")
                shift = float(math.exp(mu))
            if timesteps is not None:
                timesteps = tuple(np.asarray(timesteps).tolist()) if np.ndim(timesteps) == 1 else timesteps
            return cached_grid(self._config, True, num_inference_steps, timesteps=timesteps, shift=shift)
        if timesteps is not None or mu is not None:
            raise ValueError("the inverse scheduler takes neither custom timesteps nor mu; pass num_inference_steps.")
        if num_inference_steps is None:
            raise ValueError("num_inference_steps is required.")
        return cached_grid(self._config, False, num_inference_steps, timesteps=None, shift=None)

    def set_timesteps(
        self,
        state: SchedulerState,
        num_inference_steps: Optional[int] = None,
        shape: Sequence[int] = None,
        dtype=jnp.float32,
        *,
        timesteps: Optional[Sequence[int]] = None,
        mu: Optional[float] = None,
        sigmas: Optional[Array] = None,
    ) -> SchedulerState:
        """A state ready to step ``num_inference_steps`` steps over samples of ``shape``.

        Computes the grid (diffusers' timesteps and sigmas) and, in float64 on the host, every
        coefficient of every step; ``dtype`` is that of the model-output history.
        ``timesteps`` (custom descending timesteps) and ``mu`` (dynamic flow shift, ``flow_shift =
        e^mu``) are for the forward scheduler, as in diffusers.

        ``sigmas`` gives the grid itself as an array of ``N + 1`` noise levels, which may be traced:
        the tables are then built with ``jax.numpy`` on the device (:mod:`dpmjax.traced_tables`;
        the same equations, stable for tiny steps), so ``jax.grad`` and ``jax.vmap`` reach them,
        and the model is evaluated at fractional timesteps (the training schedule's inverse,
        interpolated in log-sigma as diffusers' ``_sigma_to_t``). They are in the sampler's order,
        for both schedulers: the inverse scheduler walks them backwards (a final zero becomes the
        smallest training noise level).

        Args:
            state: The state to extend, e.g. from :meth:`create_state`.
            num_inference_steps: ``N``, the number of steps: an integer in
                ``[1, num_train_timesteps]`` (NumPy integers accepted). Required by the inverse
                scheduler; the forward scheduler takes it or ``timesteps``. With a config that
                holds its own grid (``config.sigmas``), ``None`` or that grid's ``N`` runs it.
            shape: The sample's shape (required): the model-output history is allocated for it.
            dtype: A floating-point dtype, that of the model-output history (default float32).
            timesteps: Forward scheduler only: custom timesteps, strictly decreasing integers in
                ``[0, num_train_timesteps - 1]``, instead of ``num_inference_steps``.
            mu: Forward scheduler only, with ``use_dynamic_shifting=True``: the dynamic flow
                shift, ``flow_shift = e^mu``.
            sigmas: ``[N + 1]`` noise levels (diffusers' sigma), the sampler's order: not
                increasing (equal neighbours make a zero-length step), positive, within the
                training schedule's range, the last one possibly zero (data-prediction algorithms
                only; a zero level is held fixed under ``jax.grad``); a JAX array (also a tracer) or array-like,
                instead of ``num_inference_steps`` and ``timesteps``. Checked when concrete; a
                traced grid is the caller's to keep ordered (e.g. :func:`dpmjax.learn_grid`'s
                parameterisation).

        Returns:
            A new :class:`~dpmjax.state.SchedulerState` on the grid, at step 0.

        Raises:
            ValueError: ``state`` is not a :class:`~dpmjax.state.SchedulerState` (it comes first);
                ``shape`` is missing, not a sequence of integers or has negative sizes; ``dtype``
                is not floating point; ``num_inference_steps`` is not an integer, is outside
                ``[1, num_train_timesteps]`` or too large for ``"leading"`` spacing; the forward
                scheduler gets both or neither of ``num_inference_steps`` and ``timesteps``,
                ``timesteps`` with an alternative sigma grid (Karras, exponential, Beta, Lu,
                flow) or not strictly decreasing integers in range, or ``mu`` without
                ``use_dynamic_shifting=True``; the inverse scheduler gets ``timesteps`` or ``mu``,
                or no ``num_inference_steps``; ``channel_axis`` lies outside samples of ``shape``
                (learned ``variance_type`` only); ``sigmas`` comes with ``num_inference_steps``,
                ``timesteps`` or ``mu``, or is not a sampler's grid
                (:func:`dpmjax.grid_sigmas.check_grid_sigmas` lists what is refused).
        """
        if not isinstance(state, SchedulerState):
            raise ValueError(
                "set_timesteps takes the state first: state = scheduler.set_timesteps(state, num_inference_steps, shape)."
            )
        if shape is None:
            raise ValueError("shape (the sample's shape) is required: the model-output history is allocated for it.")
        try:
            shape = tuple(int(d) for d in shape)
        except TypeError:
            raise ValueError(f"shape must be a sequence of integers, got {shape!r}.") from None
        if any(d < 0 for d in shape):
            raise ValueError(f"shape must not have negative sizes, got {shape}.")
        if not jnp.issubdtype(jnp.dtype(dtype), jnp.floating):
            raise ValueError(f"dtype must be a floating-point dtype, got {dtype!r}.")
        if sigmas is None and timesteps is None and mu is None and self._uses_configured_grid(num_inference_steps):
            sigmas, num_inference_steps = np.asarray(self._config.sigmas, np.float32), None
        if sigmas is not None:
            if num_inference_steps is not None or timesteps is not None or mu is not None:
                raise ValueError("pass sigmas alone: they replace num_inference_steps, timesteps and mu.")
            self._check_channel_axis(len(shape))
            levels = check_grid_sigmas(self._config, sigmas)
            return state.replace(**traced_grid_fields(self._config, levels, forward=self.forward, shape=shape,
                                                      dtype=dtype))
        grid = self._grid(num_inference_steps, timesteps, mu)
        return self.state_on_grid(state, grid.timesteps, grid.sigmas, shape=shape, dtype=dtype)

    def _uses_configured_grid(self, num_inference_steps) -> bool:
        """Whether ``set_timesteps`` runs the config's own grid (``config.sigmas``): called without a
        step count, or with the grid's own ``N``."""
        own = self._config.sigmas
        if own is None:
            return False
        if num_inference_steps is None:
            return True
        return check_num_inference_steps(num_inference_steps) == len(own) - 1

    def state_on_grid(self, state: SchedulerState, timesteps, sigmas, shape: Sequence[int], dtype=jnp.float32,
                      forward: Optional[bool] = None) -> SchedulerState:
        """A state that steps over an explicit grid.

        ``timesteps[i]`` is the model's timestep at noise level ``sigmas[i]``, and step ``i`` moves
        to ``sigmas[i + 1]``. ``set_timesteps`` is this with diffusers' grid; trajectories use it
        for mirrored grids.

        Args:
            state: The state to extend, e.g. from :meth:`create_state`.
            timesteps: ``[N]``, the model's timestep at each step (integers).
            sigmas: ``[>= N + 1]``, the noise levels (diffusers' sigma): before each step, then
                the end point.
            shape: The sample's shape; the model-output history is allocated for it.
            dtype: The dtype of the model-output history (default float32).
            forward: Default: this scheduler's direction. Only decides whether a final zero sigma
                forces a first-order step.

        Returns:
            A new :class:`~dpmjax.state.SchedulerState` on the grid, at step 0.

        Raises:
            ValueError: There are no timesteps, or ``sigmas`` is not 1-D with at least ``N + 1``
                entries; ``channel_axis`` lies outside samples of ``shape`` (learned
                ``variance_type`` only).
        """
        timesteps = np.asarray(timesteps)
        sigmas = np.asarray(sigmas, dtype=np.float32)
        n = len(timesteps)
        if n < 1 or sigmas.ndim != 1 or len(sigmas) < n + 1:
            raise ValueError(f"a grid needs N >= 1 timesteps and at least N + 1 sigmas, got {n} and {sigmas.shape}.")
        self._check_channel_axis(len(tuple(shape)))
        direction = self.forward if forward is None else forward
        fields = host_grid_fields(self._config, timesteps.astype(np.int64).tobytes(), sigmas.tobytes(), num_steps=n,
                               forward=direction, shape=tuple(shape), dtype=jnp.dtype(dtype).name)
        return state.replace(**fields)

    def set_begin_index(self, state: SchedulerState, begin_index: int = 0) -> SchedulerState:
        """Start at step ``begin_index`` without looking the first timestep up (diffusers' ``set_begin_index``).

        Args:
            state: A state after ``set_timesteps``.
            begin_index: The step to take next, in ``[0, N - 1]`` (default 0); may be traced.

        Returns:
            The state with its step index set.

        Raises:
            ValueError: The state has no inference grid (``set_timesteps`` was not called);
                a concrete ``begin_index`` lies outside ``[0, N - 1]``.
        """
        solver.require_timesteps(state)
        n = state.timesteps.shape[0]
        known = solver.concrete_int(begin_index)
        if known is not None and not 0 <= known < n:
            raise ValueError(f"begin_index must lie in [0, {n - 1}], got {known}.")
        return state.replace(step_index=jnp.asarray(begin_index, jnp.int32))

    # ------------------------------------------------------------------ stepping
    def step(
        self,
        state: SchedulerState,
        model_output: Array,
        timestep,
        sample: Array,
        key: Optional[Array] = None,
        variance_noise: Optional[Array] = None,
        return_dict: bool = True,
    ):
        """One step; returns ``SchedulerOutput(prev_sample, state)`` or, with ``return_dict=False``,
        the pair ``(prev_sample, state)``. SDE types need ``key`` or ``variance_noise``.

        Pure and traceable: ``state`` and ``timestep`` may be traced (inside ``jit``/``scan``). The
        order used is ``min(solver_order, steps taken + 1, order_cap[i])`` (warm-up and lower-order
        final steps, as in diffusers). The sample keeps its dtype; the arithmetic runs in float32
        or wider.

        Past the end: a step after the state's last one is a ``ValueError`` when the state is
        concrete (eager calls). A traced value cannot raise, so inside ``jit``, ``lax.scan`` or
        ``lax.fori_loop`` such a step computes nothing: it returns ``sample`` unchanged (whatever
        the model output, NaN included), keeps ``state.step_index`` at ``N`` and adds one to
        ``state.steps_past_end``. A loop of exactly ``N`` iterations never meets it; after a
        compiled loop whose length may differ, check ``int(state.steps_past_end) == 0``. (The
        model-output history of such a state is not meaningful; ``set_timesteps`` starts afresh.)

        Args:
            state: The state after ``set_timesteps`` (or the previous ``step``).
            model_output: The raw model output at ``(sample, timestep)``, of the kind
                ``prediction_type`` names, with the sample's shape (twice its channels on
                ``channel_axis`` with a learned ``variance_type``; the first half is used).
            timestep: The current timestep (an entry of ``state.timesteps``); on the first step it
                locates the step (diffusers' ``index_for_timestep``), afterwards the state's
                counter is used.
            sample: The current sample, a floating-point array of the shape given to
                ``set_timesteps``.
            key: SDE types: a ``jax.random`` key for the step's noise.
            variance_noise: SDE types: the step's noise (the sample's shape), instead of ``key``.
            return_dict: Return a :class:`SchedulerOutput` (default) rather than a tuple.

        Returns:
            ``SchedulerOutput(prev_sample, state)``, or the tuple ``(prev_sample, state)`` with
            ``return_dict=False``.

        Raises:
            ValueError: The state has no inference grid; ``sample``'s shape differs from the one
                given to ``set_timesteps``; all steps of a concrete state were taken (traced: see
                "Past the end" above); ``model_output`` or
                ``sample`` is not floating point, or ``model_output``'s shape does not match;
                an SDE type gets neither ``key`` nor ``variance_noise``, or ``variance_noise`` of
                another shape; ``channel_axis`` lies outside the sample's axes (learned
                ``variance_type`` only).
        """
        self._check_channel_axis(jnp.ndim(sample))
        prev_sample, new_state = solver.step(self._config, state, model_output, timestep=timestep, sample=sample, key=key,
                                             variance_noise=variance_noise)
        if not return_dict:
            return prev_sample, new_state
        return SchedulerOutput(prev_sample=prev_sample, state=new_state)

    def scale_model_input(self, state: SchedulerState, sample: Array, timestep=None) -> Array:
        """Identity: DPM-Solver needs no input scaling (kept for interchangeability).

        Args:
            state: The scheduler state (unused).
            sample: The sample.
            timestep: The timestep (unused).

        Returns:
            ``sample``, unchanged.
        """
        return sample

    def add_noise(self, state: SchedulerState, original_samples: Array, noise: Array, timesteps) -> Array:
        """``alpha_t x0 + sigma_t eps`` at the grid noise level of each timestep (leading axis = batch).

        Args:
            state: A state whose grid holds the timesteps (after ``set_timesteps``).
            original_samples: ``x0``, the clean samples, batched on axis 0.
            noise: ``eps``, Gaussian noise of the same shape.
            timesteps: A timestep, or one per row (``[B]``); each is located on the state's grid
                as in ``step``.

        Returns:
            The noisy samples, with ``original_samples``' shape and dtype.
        """
        timesteps = jnp.atleast_1d(jnp.asarray(timesteps))
        index = jax.vmap(lambda t: solver.locate_step(state.timesteps, t))(timesteps)
        cdt = solver.compute_dtype(original_samples)
        alpha, sigma_t = alpha_sigma_from_sigma(state.sigmas[index].astype(cdt), self._config.use_flow_sigmas, xp=jnp)
        noisy = per_row(alpha, original_samples) * original_samples.astype(cdt) + per_row(sigma_t, noise) * noise.astype(cdt)
        return noisy.astype(original_samples.dtype)

    def __len__(self):
        return self._config.num_train_timesteps


class DPMSolverMultistepScheduler(DPMSolverMultistepBase):
    """DPM-Solver / DPM-Solver++ multistep sampler (Lu et al. 2022, arXiv:2206.00927, 2211.01095).

    Integrates the diffusion ODE (or SDE) from high to low noise with the exponential integrator
    ``x_t = (sigma_t / sigma_s) x_s + sigma_t int_{lambda_s}^{lambda_t} e^{lambda} x0(x_lambda) d lambda``
    (DPM-Solver++ form), approximating ``x0`` by a polynomial through the last ``solver_order``
    model outputs. Numerically diffusers' ``DPMSolverMultistepScheduler``.

    Args:
        config: A :class:`~dpmjax.config.SchedulerConfig`; ``None`` (default) builds one from
            ``kwargs``. Dicts go through :meth:`from_config`, folders through
            :meth:`from_pretrained`.
        **kwargs: :class:`~dpmjax.config.SchedulerConfig` fields (diffusers' names), when no
            ``config`` is given.

    Raises:
        ValueError: Both ``config`` and keyword parameters are given; ``config`` is not a
            :class:`~dpmjax.config.SchedulerConfig`; a keyword parameter is unknown or a value is
            invalid; ``final_sigmas_type="zero"`` with a noise-prediction ``algorithm_type``
            (``"dpmsolver"``, ``"sde-dpmsolver"``), whose update is undefined at zero noise.
    """

    forward = True


class DPMSolverMultistepInverseScheduler(DPMSolverMultistepBase):
    """The inverse of :class:`DPMSolverMultistepScheduler`: the same updates from low to high noise.

    DDIM-style inversion (Mokady et al. 2023, Null-text Inversion; Couairon et al. 2023, DiffEdit)
    generalised to multistep DPM-Solver. Numerically diffusers' ``DPMSolverMultistepInverseScheduler``,
    except where diffusers fails (see "Numerics and differences from diffusers" in the docs, docs/numerics.md).

    Args:
        config: A :class:`~dpmjax.config.SchedulerConfig`; ``None`` (default) builds one from
            ``kwargs``. Dicts go through :meth:`from_config`, folders through
            :meth:`from_pretrained`.
        **kwargs: :class:`~dpmjax.config.SchedulerConfig` fields (diffusers' names), when no
            ``config`` is given.

    Raises:
        ValueError: Both ``config`` and keyword parameters are given; ``config`` is not a
            :class:`~dpmjax.config.SchedulerConfig`; a keyword parameter is unknown or a value is
            invalid; an SDE ``algorithm_type`` (its noise term ``sqrt(1 - e^{-2h})`` has no real
            value when the noise rises: invert a stochastic sampler with
            ``dpmjax.invert(..., exact=True, noises=...)``).
    """

    forward = False


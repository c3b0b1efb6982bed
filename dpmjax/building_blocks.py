"""The seed's building blocks: diffusers' public per-step methods, for code that assembles its own
step (``convert_model_output`` and the first-, second- and third-order updates).

A mixin of :class:`~dpmjax.DPMSolverMultistepBase`: each method reads the state's grid at its
current step (``state.step_index``) and the scheduler's frozen config (``self.config``). The whole
step in one call is :meth:`~dpmjax.DPMSolverMultistepBase.step`; these exist so that diffusers code
calling them ports unchanged.
"""

from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp

from . import solver
from .state import SchedulerState

Array = jax.Array


class SolverBuildingBlocks:
    """diffusers' ``convert_model_output`` and ``*_update`` methods over a
    :class:`~dpmjax.state.SchedulerState` (a mixin: the scheduler supplies ``_config`` and
    ``_check_channel_axis``)."""

    def _index_of(self, state: SchedulerState) -> Array:
        solver.require_timesteps(state)
        known = solver.concrete_int(state.step_index)
        if known is not None and known < 0:
            raise ValueError("the state has no step index yet: take a step, or call set_begin_index(state, index) first.")
        return jnp.minimum(state.step_index, state.timesteps.shape[0] - 1)

    def convert_model_output(self, state: SchedulerState, model_output: Array, sample: Array) -> Array:
        """Model output -> data prediction x0 (DPM-Solver++) or noise prediction (DPM-Solver) at the
        state's current step, thresholded if configured.

        Args:
            state: A state with a step index (after a ``step`` or ``set_begin_index``).
            model_output: The raw model output (twice the sample's channels with a learned
                ``variance_type``).
            sample: The current sample.

        Returns:
            The converted output, with ``sample``'s shape and dtype.

        Raises:
            ValueError: The state has no inference grid or no step index yet; ``model_output``
                or ``sample`` is not floating point, or their shapes do not match;
                ``channel_axis`` lies outside the sample's axes (learned ``variance_type`` only).
        """
        self._check_channel_axis(jnp.ndim(sample))
        model_output = solver.mean_of_model_output(self._config, model_output, sample)
        return solver.convert_model_output(self._config, state, self._index_of(state), model_output=model_output,
                                           sample=sample).astype(sample.dtype)

    def _noise_for(self, noise):
        if self._config.is_sde and noise is None:
            raise ValueError(f"algorithm_type={self._config.algorithm_type!r} is stochastic: pass noise.")
        return noise if self._config.is_sde else None

    def dpm_solver_first_order_update(self, state: SchedulerState, model_output: Array, sample: Array, noise: Optional[Array] = None) -> Array:
        """First-order step (DDIM) from a converted model output, at the state's current step.

        Args:
            state: A state with a step index (after a ``step`` or ``set_begin_index``).
            model_output: The converted model output (:meth:`convert_model_output`).
            sample: The current sample.
            noise: SDE types: the step's Gaussian noise (required); ignored otherwise.

        Returns:
            The sample after the step, with ``sample``'s dtype.

        Raises:
            ValueError: The state has no inference grid or no step index yet; an SDE type gets
                no ``noise``.
        """
        self._index_of(state)
        return solver.order_k_update(state, 1, [model_output], sample=sample, noise=self._noise_for(noise))

    def multistep_dpm_solver_second_order_update(self, state: SchedulerState, model_output_list: Sequence[Array], sample: Array, noise: Optional[Array] = None) -> Array:
        """Second-order multistep step; ``model_output_list`` is oldest first (diffusers' order).

        Args:
            state: A state with a step index (after a ``step`` or ``set_begin_index``).
            model_output_list: Converted model outputs (:meth:`convert_model_output`), oldest first;
                the last 2 are used.
            sample: The current sample.
            noise: SDE types: the step's Gaussian noise (required); ignored otherwise.

        Returns:
            The sample after the step, with ``sample``'s dtype.

        Raises:
            ValueError: The state has no inference grid or no step index yet; an SDE type gets
                no ``noise``; the scheduler's ``solver_order`` is below 2; fewer than 2
                outputs are given.
        """
        self._index_of(state)
        return solver.order_k_update(state, 2, list(model_output_list)[::-1], sample=sample, noise=self._noise_for(noise))

    def multistep_dpm_solver_third_order_update(self, state: SchedulerState, model_output_list: Sequence[Array], sample: Array, noise: Optional[Array] = None) -> Array:
        """Third-order multistep step; ``model_output_list`` is oldest first (diffusers' order).

        Args:
            state: A state with a step index (after a ``step`` or ``set_begin_index``).
            model_output_list: Converted model outputs (:meth:`convert_model_output`), oldest first;
                the last 3 are used.
            sample: The current sample.
            noise: SDE types: the step's Gaussian noise (required); ignored otherwise.

        Returns:
            The sample after the step, with ``sample``'s dtype.

        Raises:
            ValueError: The state has no inference grid or no step index yet; an SDE type gets
                no ``noise``; the scheduler's ``solver_order`` is below 3; fewer than 3
                outputs are given.
        """
        self._index_of(state)
        return solver.order_k_update(state, 3, list(model_output_list)[::-1], sample=sample, noise=self._noise_for(noise))

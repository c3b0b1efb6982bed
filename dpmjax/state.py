"""The scheduler state: an immutable pytree of arrays (the traced half of a scheduler).

Every field is an array, so a state passes through ``jit``, ``scan``, ``vmap`` and ``grad`` like any
other pytree; ``state.replace(...)`` returns a changed copy. Fields set by ``set_timesteps`` are
``None`` in a state fresh from ``create_state``.
"""

from __future__ import annotations

from typing import Optional

import flax.struct
import jax
import jax.numpy as jnp

Array = jax.Array


@flax.struct.dataclass
class SchedulerState:
    """State of a DPM-Solver multistep scheduler.

    The training tables have length ``num_train_timesteps``, as diffusers holds them. The inference
    grid is set by ``set_timesteps`` (before it, ``timesteps`` and ``sigmas`` are the full training
    grid and the other grid and progress fields are ``None``). ``K`` is the solver order.

    Attributes:
        alphas_cumprod: Training table: diffusers' ``alphas_cumprod``.
        alpha_t: Training table: ``alpha_t`` of every training timestep.
        sigma_t: Training table: ``sigma_t`` of every training timestep.
        lambda_t: Training table: ``lambda = log(alpha_t / sigma_t)`` of every training timestep.
        init_noise_sigma: The standard deviation of the initial noise (1.0), as in diffusers.
        timesteps: Inference grid: int32 ``[N]``, the model's timestep at each step (diffusers'
            ``scheduler.timesteps``).
        sigmas: Inference grid: float32 ``[>= N+1]``, noise level before each step (diffusers'
            ``scheduler.sigmas``).
        step_alpha: Inference grid: ``alpha_t`` of the VP pair ``(alpha_t, sigma_t)`` of every grid
            point.
        step_sigma: Inference grid: ``sigma_t`` of that pair.
        convert_coefficients: Inference grid: ``[N, 2]``, model output -> solver quantity (x0 or
            eps), linear.
        update_coefficients: Inference grid: ``[N+1, K, K+2]``, the order-k update of step i
            (row N: identity).
        order_cap: Inference grid: int32 ``[N]``, the highest order each step may use.
        model_outputs: Progress: ``[K, *shape]``, ring buffer of converted model outputs (step i in
            slot i % K); ``[0, *shape]`` (no history) for a first-order solver, whose steps read
            no older output.
        lower_order_nums: Progress: int32, steps taken since ``set_timesteps`` (saturating at K):
            the warm-up.
        step_index: Progress: int32, the next step; -1 until the first ``step`` locates it from its
            timestep; ``N`` once every step was taken (it stays there).
        steps_past_end: Progress: int32, how many ``step`` calls came after the last step (0 after
            ``set_timesteps``). Only a traced call (inside ``jit``/``scan``/``fori_loop``) can make
            one: it returns its sample unchanged and counts itself here, where an eager call raises
            a ``ValueError``. Check it after a compiled loop (``int(state.steps_past_end) == 0``):
            a non-zero count means the loop ran more iterations than the schedule has steps.
    """

    alphas_cumprod: Array
    alpha_t: Array
    sigma_t: Array
    lambda_t: Array
    init_noise_sigma: Array
    timesteps: Array
    sigmas: Array
    step_alpha: Optional[Array] = None
    step_sigma: Optional[Array] = None
    convert_coefficients: Optional[Array] = None
    update_coefficients: Optional[Array] = None
    order_cap: Optional[Array] = None
    model_outputs: Optional[Array] = None
    lower_order_nums: Optional[Array] = None
    step_index: Optional[Array] = None
    steps_past_end: Optional[Array] = None

    @property
    def num_inference_steps(self) -> Optional[int]:
        """Number of steps of the grid (static), or None before ``set_timesteps``."""
        return None if self.update_coefficients is None else self.timesteps.shape[0]

    @property
    def solver_order(self) -> Optional[int]:
        """The solver order ``K`` of the grid's coefficients (static), or None before ``set_timesteps``."""
        return None if self.update_coefficients is None else self.update_coefficients.shape[1]

    def ordered_model_outputs(self) -> Array:
        """The model-output history oldest first, newest last (diffusers' ``model_outputs`` order);
        empty for a first-order solver, which keeps none.

        Returns:
            ``[K, *shape]``, the converted model outputs, oldest first (``[0, *shape]`` at
            order 1).
        """
        K = self.model_outputs.shape[0]
        if K == 0:
            return self.model_outputs
        newest = jnp.maximum(self.step_index - 1, 0)
        slots = (newest - jnp.arange(K - 1, -1, -1)) % K
        return self.model_outputs[slots]

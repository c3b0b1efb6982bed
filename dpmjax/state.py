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

    Training tables (length ``num_train_timesteps``, as diffusers holds them):
        alphas_cumprod, alpha_t, sigma_t, lambda_t (``lambda = log(alpha_t / sigma_t)``).
    Inference grid (after ``set_timesteps``; before it, the full training grid):
        timesteps: int32 ``[N]``, the model's timestep at each step (diffusers' ``scheduler.timesteps``).
        sigmas: float32 ``[>= N+1]``, noise level before each step (diffusers' ``scheduler.sigmas``).
        step_alpha, step_sigma: the VP pair ``(alpha_t, sigma_t)`` of every grid point.
        convert_coefficients: ``[N, 2]``, model output -> solver quantity (x0 or eps), linear.
        update_coefficients: ``[N+1, K, K+2]``, the order-k update of step i (row N: identity).
        order_cap: int32 ``[N]``, the highest order each step may use.
    Progress:
        model_outputs: ``[K, *shape]``, ring buffer of converted model outputs (step i in slot i % K);
            ``[0, *shape]`` (no history) for a first-order solver, whose steps read no older output.
        lower_order_nums: int32, steps taken since ``set_timesteps`` (saturating at K): the warm-up.
        step_index: int32, the next step; -1 until the first ``step`` locates it from its timestep.
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

    @property
    def num_inference_steps(self) -> Optional[int]:
        """Number of steps of the grid (static), or None before ``set_timesteps``."""
        return None if self.update_coefficients is None else self.timesteps.shape[0]

    @property
    def solver_order(self) -> Optional[int]:
        return None if self.update_coefficients is None else self.update_coefficients.shape[1]

    def ordered_model_outputs(self) -> Array:
        """The model-output history oldest first, newest last (diffusers' ``model_outputs`` order);
        empty for a first-order solver, which keeps none."""
        K = self.model_outputs.shape[0]
        if K == 0:
            return self.model_outputs
        newest = jnp.maximum(self.step_index - 1, 0)
        slots = (newest - jnp.arange(K - 1, -1, -1)) % K
        return self.model_outputs[slots]

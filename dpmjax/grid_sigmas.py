"""Checks of a grid given as noise levels (``set_timesteps(sigmas=...)``), before anything is built.

A concrete grid is checked value by value; a traced one (inside ``jit`` or ``grad``) only for its
shape and dtype, the values being unknown until it runs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from .config import SchedulerConfig, check_grid_values

Array = jax.Array


def check_grid_sigmas(config: SchedulerConfig, sigmas) -> Array:
    """``sigmas`` as a floating-point JAX array, refused unless it is a sampler's grid.

    Args:
        config: The scheduler's config (the training schedule bounds the noise levels).
        sigmas: ``[N + 1]`` noise levels in the sampler's order.

    Returns:
        The levels as a JAX array (float32 unless given in another floating dtype).

    Raises:
        ValueError: Not 1-D with at least 2 levels, or of a non-floating dtype (integers are
            converted, booleans refused); when concrete: a level is not finite, not positive (a
            zero is allowed last), the levels increase somewhere or are all equal, a level lies
            outside the training schedule's range (flow grids: outside ``(0, 1)``), or a final
            zero comes with a noise-prediction ``algorithm_type`` (its update has no value at
            zero noise).
    """
    if isinstance(sigmas, jax.core.Tracer):
        levels = sigmas
    else:
        levels = jnp.asarray(sigmas)
    if levels.dtype == jnp.bool_:
        raise ValueError("sigmas must be real noise levels, got booleans.")
    if jnp.issubdtype(levels.dtype, jnp.integer):
        levels = levels.astype(jnp.float32)
    if not jnp.issubdtype(levels.dtype, jnp.floating):
        raise ValueError(f"sigmas must be real noise levels, got dtype {levels.dtype}.")
    if levels.ndim != 1 or levels.shape[0] < 2:
        raise ValueError(f"sigmas must be 1-D with N + 1 >= 2 noise levels (N steps), got shape {tuple(levels.shape)}.")
    if not isinstance(levels, jax.core.Tracer):
        check_grid_values(config, np.asarray(levels, np.float64))
    return levels

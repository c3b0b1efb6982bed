"""Analytic diffusion models: data distributions whose exact model outputs are known in closed form.

For data ``x0`` and ``x_t = alpha_t x0 + sigma_t eps`` the optimal denoiser is the posterior mean
``E[x0 | x_t]`` and the optimal noise prediction ``eps_hat = (x_t - alpha_t E[x0 | x_t]) / sigma_t``.
Both are closed-form for Gaussian data and Gaussian mixtures (element-wise, independent
coordinates), so a sampler can be run with the *exact* model and its error is the solver's alone.

For Gaussian data ``N(mu, s^2)`` the probability-flow ODE has the closed-form solution
``x_t = alpha_t mu + sqrt(alpha_t^2 s^2 + sigma_t^2) z`` with ``z`` constant along each trajectory
(Song et al. 2021, "Score-Based Generative Modeling through SDEs", Sec. 4.3): the standardised
coordinate is invariant. :meth:`Gaussian.transport` evaluates it.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def model_output_from_denoised(prediction_type: str, x: Array, x0: Array, alpha, sigma) -> Array:
    """Express a denoised estimate ``x0`` as the given model parameterisation.

    epsilon: ``(x - alpha x0) / sigma``; sample: ``x0``; v_prediction: ``alpha eps - sigma x0``;
    flow_prediction (``alpha = 1 - sigma``): the velocity ``eps - x0``.

    Args:
        prediction_type: ``"epsilon"``, ``"sample"``, ``"v_prediction"`` or
            ``"flow_prediction"``.
        x: The noisy sample ``x_t``.
        x0: The denoised estimate of ``x0``.
        alpha: ``alpha_t`` of the noise level (scalar or broadcastable).
        sigma: ``sigma_t`` of the noise level (scalar or broadcastable).

    Returns:
        The model output of that parameterisation, with ``x``'s shape.

    Raises:
        ValueError: ``prediction_type`` is none of the four.
    """
    if prediction_type == "sample":
        return x0
    eps = (x - alpha * x0) / sigma
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "v_prediction":
        return alpha * eps - sigma * x0
    if prediction_type == "flow_prediction":
        return eps - x0
    raise ValueError(f"prediction_type={prediction_type!r} is not one of epsilon, sample, v_prediction, flow_prediction.")


class Gaussian(NamedTuple):
    """Element-wise Gaussian data ``x0 ~ N(mean, std^2)``.

    Attributes:
        mean: The mean ``mu`` of every coordinate (default 0.5).
        std: The standard deviation ``s`` of every coordinate (default 0.8).
    """

    mean: float = 0.5
    std: float = 0.8

    def denoise(self, x: Array, alpha, sigma) -> Array:
        """``E[x0 | x_t] = mu + alpha s^2 (x_t - alpha mu) / (alpha^2 s^2 + sigma^2)``.

        Args:
            x: The noisy sample ``x_t``.
            alpha: ``alpha_t`` of its noise level.
            sigma: ``sigma_t`` of its noise level.

        Returns:
            The posterior mean, element-wise, with ``x``'s shape.
        """
        var = (alpha * self.std) ** 2 + sigma**2
        return self.mean + alpha * self.std**2 * (x - alpha * self.mean) / var

    def transport(self, x: Array, alpha_from, sigma_from, alpha_to, sigma_to) -> Array:
        """Exact probability-flow ODE map from noise level ``(alpha_from, sigma_from)`` to ``(alpha_to, sigma_to)``.

        The standardised coordinate ``(x_t - alpha_t mu) / sqrt(alpha_t^2 s^2 + sigma_t^2)`` is
        constant along each trajectory (see the module docstring).

        Args:
            x: The sample at the first noise level.
            alpha_from: ``alpha_t`` of the first noise level.
            sigma_from: ``sigma_t`` of the first noise level.
            alpha_to: ``alpha_t`` of the target noise level.
            sigma_to: ``sigma_t`` of the target noise level.

        Returns:
            The sample at the target noise level, with ``x``'s shape.
        """
        scale_from = jnp.sqrt((alpha_from * self.std) ** 2 + sigma_from**2)
        scale_to = jnp.sqrt((alpha_to * self.std) ** 2 + sigma_to**2)
        return alpha_to * self.mean + scale_to * (x - alpha_from * self.mean) / scale_from

    def sample(self, key: Array, shape, alpha=1.0, sigma=0.0, dtype=jnp.float32) -> Array:
        """Draws from the marginal at noise level ``(alpha, sigma)``: ``N(alpha mu, alpha^2 s^2 + sigma^2)``.

        Args:
            key: A ``jax.random`` key.
            shape: The shape of the draw.
            alpha: ``alpha_t`` of the noise level (default 1.0: the data).
            sigma: ``sigma_t`` of the noise level (default 0.0: the data).
            dtype: The dtype of the result (default float32).

        Returns:
            An array of ``shape`` and ``dtype``.
        """
        scale = jnp.sqrt((alpha * self.std) ** 2 + sigma**2)
        return (alpha * self.mean + scale * jax.random.normal(key, shape, dtype)).astype(dtype)


class GaussianMixture(NamedTuple):
    """Element-wise Gaussian-mixture data ``x0 ~ sum_k w_k N(mu_k, s_k^2)``: strongly non-linear
    denoiser near the data (two well-separated modes by default).

    Attributes:
        means: The component means ``mu_k`` (default ``(-1.0, 1.0)``).
        stds: The component standard deviations ``s_k`` (default ``(0.15, 0.15)``).
        weights: The component weights ``w_k`` (default ``(0.5, 0.5)``).
    """

    means: tuple = (-1.0, 1.0)
    stds: tuple = (0.15, 0.15)
    weights: tuple = (0.5, 0.5)

    def denoise(self, x: Array, alpha, sigma) -> Array:
        """Posterior mean: responsibilities ``p(k | x_t) ~ w_k N(x_t; alpha mu_k, alpha^2 s_k^2 + sigma^2)``
        times the per-component Gaussian posterior means.

        Args:
            x: The noisy sample ``x_t``.
            alpha: ``alpha_t`` of its noise level.
            sigma: ``sigma_t`` of its noise level.

        Returns:
            ``E[x0 | x_t]``, element-wise, with ``x``'s shape and dtype.
        """
        mu = jnp.asarray(self.means, x.dtype)
        s = jnp.asarray(self.stds, x.dtype)
        w = jnp.asarray(self.weights, x.dtype)
        xe = x[..., None]
        var = (alpha * s) ** 2 + sigma**2
        inv_var = 1.0 / var  # once, and multiplied: the compiler has no division left to rewrite
        log_p = jnp.log(w) - 0.5 * jnp.log(var) - 0.5 * (xe - alpha * mu) ** 2 * inv_var
        resp = jax.nn.softmax(log_p, axis=-1)
        component_mean = mu + alpha * s**2 * (xe - alpha * mu) * inv_var
        return jnp.sum(resp * component_mean, axis=-1)

    def sample(self, key: Array, shape, alpha=1.0, sigma=0.0, dtype=jnp.float32) -> Array:
        """Draws from the marginal at noise level ``(alpha, sigma)``: ``alpha x0 + sigma eps``, ``x0``
        from the mixture.

        Args:
            key: A ``jax.random`` key.
            shape: The shape of the draw.
            alpha: ``alpha_t`` of the noise level (default 1.0: the data).
            sigma: ``sigma_t`` of the noise level (default 0.0: the data).
            dtype: The dtype of the result (default float32).

        Returns:
            An array of ``shape`` and ``dtype``.
        """
        k_component, k_noise = jax.random.split(key)
        component = jax.random.categorical(k_component, jnp.log(jnp.asarray(self.weights)), shape=tuple(shape))
        mu = jnp.asarray(self.means)[component]
        s = jnp.asarray(self.stds)[component]
        x0 = mu + s * jax.random.normal(k_noise, shape)
        return (alpha * x0 + sigma * jax.random.normal(jax.random.fold_in(k_noise, 1), shape)).astype(dtype)


def timestep_model(data, config, prediction_type: Optional[str] = None):
    """``model_fn(x, t)``: the exact model of ``data`` conditioned on a training timestep, as a
    trained network is (noise level from the training table ``alphas_cumprod[t]``).

    An integer ``t`` reads the table; a fractional one (a grid given as noise levels,
    ``set_timesteps(sigmas=...)``) the noise level the scheduler meant, log-sigma interpolated
    between the neighbouring training timesteps (the inverse of diffusers' ``_sigma_to_t``).

    Args:
        data: The data distribution, e.g. :class:`Gaussian` or :class:`GaussianMixture` (anything
            with ``denoise(x, alpha, sigma)``).
        config: The :class:`~dpmjax.config.SchedulerConfig` whose training schedule gives the
            noise level of each timestep.
        prediction_type: The model's parameterisation; ``None`` (default) uses
            ``config.prediction_type``.

    Returns:
        ``model_fn(x, t)``, the exact model output at timestep ``t``.
    """
    from ..noise_schedule import training_schedule

    table = training_schedule(config)
    alphas_cumprod = jnp.asarray(table.alphas_cumprod)
    log_sigmas = np.log(table.sigmas.astype(np.float64))
    prediction_type = prediction_type or config.prediction_type

    def model_fn(x, t):
        t = jnp.asarray(t)
        if jnp.issubdtype(t.dtype, jnp.floating):
            ratio = jnp.exp(jnp.interp(t.astype(x.dtype), jnp.arange(len(log_sigmas), dtype=x.dtype),
                                       jnp.asarray(log_sigmas, x.dtype)))
            alpha = 1.0 / jnp.sqrt(1.0 + ratio**2)
            sigma = ratio * alpha
        else:
            abar = alphas_cumprod[t.astype(jnp.int32)].astype(x.dtype)
            alpha, sigma = jnp.sqrt(abar), jnp.sqrt(1.0 - abar)
        return model_output_from_denoised(prediction_type, x, data.denoise(x, alpha, sigma), alpha=alpha, sigma=sigma)

    return model_fn

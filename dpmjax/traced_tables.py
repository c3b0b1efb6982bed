"""The per-step tables of a grid given as noise levels that may be traced: built with ``jax.numpy``.

:mod:`dpmjax.coefficients` builds the same tables on the host, in float64, with Python control flow
(one order tried after another until the update is finite). Here every step is computed at once
and every choice is a ``jnp.where`` over values that are finite on both sides, so the tables are a
smooth function of the grid: ``jax.grad``, ``jax.jvp`` and ``jax.vmap`` reach the noise levels
(learned time discretisations: Tong et al. 2025, "Learning to Discretize Denoising Diffusion
ODEs" (LD3); Sabour et al. 2024, "Align Your Steps").

Equations (notation of :mod:`dpmjax.coefficients`; ``h = lambda_t - lambda_s``), rewritten with

    phi_2(x) = (e^x - 1 - x) / x^2,     phi_3(x) = (e^x - 1 - x - x^2 / 2) / x^3,

which are evaluated from their Taylor series for ``|x| < 2`` and directly beyond, so that no
coefficient loses digits to cancellation for small steps (the host formula ``(e^{-h} - 1 + h) /
h^2 - 1/2`` loses about ``log10(6 / h)`` digits in float32)::

    DPM-Solver++:  D1 term  alpha_t h phi_2(-h)        D2 term  alpha_t h phi_3(-h)
    DPM-Solver:    D1 term -sigma_t h phi_2(h)         D2 term -sigma_t h phi_3(h)
    SDE-DPM++:     D1 term  alpha_t 2h phi_2(-2h)      D2 term -alpha_t (phi_2(-2h) + 1/2)

The step length itself is ``h = log1p((s_i - s_{i+1}) / s_{i+1})`` (plus
``log1p((s_i - s_{i+1}) / (1 - s_i))`` on flow grids) from diffusers' sigmas ``s``, exact to a few
rounding errors even for neighbouring noise levels, where a difference of two logarithms is not.

Degenerate steps get the host's meaning: a zero-length step is the identity; an order whose
multistep difference spans a zero-length earlier step falls back to the next lower order; a step to
zero noise is ``x_t = alpha_t x0`` (first order, no sample term).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from .coefficients import order_caps
from .config import SchedulerConfig
from .noise_schedule import alpha_sigma_from_sigma, training_schedule

Array = jax.Array

_SERIES_RADIUS = 2.0  # |x| below it: the Taylor series (24 terms: error < 2^24 / 26! ~ 4e-20)
_TERMS = 24


def _series(x: Array, first: int) -> Array:
    """``sum_{k >= 0} x^k / (k + first)!`` by Horner's rule."""
    total = jnp.zeros_like(x) + 1.0 / math.factorial(_TERMS - 1 + first)
    for k in range(_TERMS - 2, -1, -1):
        total = total * x + 1.0 / math.factorial(k + first)
    return total


def phi_2(x: Array) -> Array:
    """``(e^x - 1 - x) / x^2`` (1/2 at 0), accurate for every ``x``, smooth for ``jax.grad``."""
    small = jnp.abs(x) < _SERIES_RADIUS
    far = jnp.where(small, _SERIES_RADIUS, x)  # never zero: the unused side stays finite
    return jnp.where(small, _series(jnp.where(small, x, 0.0), 2), (jnp.expm1(far) - far) / far**2)


def phi_3(x: Array) -> Array:
    """``(e^x - 1 - x - x^2 / 2) / x^3`` (1/6 at 0), accurate for every ``x``, smooth for ``jax.grad``."""
    small = jnp.abs(x) < _SERIES_RADIUS
    far = jnp.where(small, _SERIES_RADIUS, x)
    return jnp.where(small, _series(jnp.where(small, x, 0.0), 3), (jnp.expm1(far) - far - 0.5 * far**2) / far**3)


def log_snr_steps(sigmas: Array, *, flow: bool) -> Array:
    """``h_i = lambda(s_{i+1}) - lambda(s_i)`` for consecutive noise levels (``+inf`` into zero noise)."""
    now, nxt = sigmas[:-1], sigmas[1:]
    gap = now - nxt
    to_zero = nxt == 0
    h = jnp.log1p(gap / jnp.where(to_zero, 1.0, nxt))
    if flow:
        h = h + jnp.log1p(gap / (1.0 - now))
    return jnp.where(to_zero, jnp.inf, h)


def _d_terms(config: SchedulerConfig, order: int, h: Array, *, alpha_t, sigma_t, alpha_s, sigma_s):
    """``(c_x, [D0, D1, D2][:order] coefficients, c_z)`` of one update for every step at once."""
    first_form = config.solver_type == "heun" or order == 3
    algorithm = config.algorithm_type
    if algorithm == "dpmsolver++":
        em = jnp.expm1(-h)
        d = [-alpha_t * em, alpha_t * h * phi_2(-h) if first_form else -0.5 * alpha_t * em, alpha_t * h * phi_3(-h)]
        return sigma_t / sigma_s, d[:order], jnp.zeros_like(h)
    if algorithm == "dpmsolver":
        ep = jnp.expm1(h)
        d = [-sigma_t * ep, -sigma_t * h * phi_2(h) if first_form else -0.5 * sigma_t * ep, -sigma_t * h * phi_3(h)]
        return alpha_t / alpha_s, d[:order], jnp.zeros_like(h)
    if algorithm == "sde-dpmsolver++":
        g = -jnp.expm1(-2.0 * h)
        d = [alpha_t * g, alpha_t * 2.0 * h * phi_2(-2.0 * h) if first_form else 0.5 * alpha_t * g,
             -alpha_t * (phi_2(-2.0 * h) + 0.5)]
        return sigma_t / sigma_s * jnp.exp(-h), d[:order], sigma_t * jnp.sqrt(g)
    ep = jnp.expm1(h)  # "sde-dpmsolver" (orders 1 and 2)
    d = [-2.0 * sigma_t * ep, -2.0 * sigma_t * h * phi_2(h) if config.solver_type == "heun" else -sigma_t * ep]
    return alpha_t / alpha_s, d[:order], sigma_t * jnp.sqrt(jnp.expm1(2.0 * h))


def _multistep_weights(d, order: int, *, h, h0, h1):
    """``d @ M``: the coefficients of ``m_0 .. m_{order-1}`` from those of ``D0 .. D{order-1}``
    (the differences matrix of :func:`dpmjax.coefficients._differences_matrix`, with
    ``1 / r_0 = h / h_0`` and ``1 / r_1 = h / h_1``)."""
    if order == 1:
        return [d[0]]
    u = h / h0
    if order == 2:
        return [d[0] + u * d[1], -u * d[1]]
    v = h / h1
    w, q = h0 / (h0 + h1), h / (h0 + h1)
    return [d[0] + (u + w * u) * d[1] + q * u * d[2],
            -(u + w * (u + v)) * d[1] - q * (u + v) * d[2],
            w * v * d[1] + q * v * d[2]]


def update_table(config: SchedulerConfig, sigmas: Array, num_steps: int, *, alpha: Array, sigma: Array) -> Array:
    """``[N + 1, K, K + 2]``: row ``(i, k - 1)`` holds ``(c_x, c_0 .. c_{K-1}, c_z)`` of the
    order-``k`` update of step ``i`` (warm-up: at most order ``i + 1``); row ``N`` is the identity."""
    K = config.solver_order
    h = log_snr_steps(sigmas[: num_steps + 1], flow=config.use_flow_sigmas)
    if config.is_sde:  # two float32 sigmas one rounding apart: a zero-length step in truth (as on the host)
        h = jnp.where((h < 0) & (h > -1e-5), 0.0, h)
    to_zero = sigma[1: num_steps + 1] == 0
    still = h == 0
    safe = jnp.where(still | to_zero, 1.0, h)
    pad = jnp.ones((2,), h.dtype)
    earlier = jnp.concatenate([pad, jnp.where(to_zero, 1.0, h)])  # earlier[i + 2 - j] = h_{i-j}
    h0, h1 = earlier[1:-1], earlier[:-2]
    steps = np.arange(num_steps)
    ends = dict(alpha_t=alpha[1: num_steps + 1], sigma_t=sigma[1: num_steps + 1], alpha_s=alpha[:num_steps],
                sigma_s=sigma[:num_steps])
    candidates = []
    for order in range(1, K + 1):
        usable = jnp.asarray(steps + 1 >= order)
        if order >= 2:
            usable = usable & (h0 != 0)
        if order >= 3:
            usable = usable & (h1 != 0)
        h0_safe, h1_safe = jnp.where(usable, h0, 1.0), jnp.where(usable, h1, 1.0)
        c_x, d, c_z = _d_terms(config, order, safe, **ends)
        c_m = _multistep_weights(d, order, h=safe, h0=h0_safe, h1=h1_safe)
        zeros = [jnp.zeros_like(safe)] * (K - order)
        row = jnp.stack([c_x, *c_m, *zeros, c_z], axis=-1)
        usable = usable & jnp.all(jnp.isfinite(jax.lax.stop_gradient(row)), axis=-1)
        candidates.append((usable, row))
    identity = jnp.zeros((num_steps, K + 2), h.dtype).at[:, 0].set(1.0)
    into_zero = jnp.zeros((num_steps, K + 2), h.dtype).at[:, 1].set(ends["alpha_t"])
    if not config.predicts_data:  # the noise-prediction update has no value at zero noise
        into_zero = into_zero * jnp.nan
    per_order = []
    for k in range(1, K + 1):
        row = candidates[0][1]
        for usable, candidate in candidates[1:k]:
            row = jnp.where(usable[:, None], candidate, row)
        row = jnp.where(to_zero[:, None], into_zero, row)
        per_order.append(jnp.where(still[:, None], identity, row))
    table = jnp.stack(per_order, axis=1)
    past_end = jnp.zeros((1, K, K + 2), h.dtype).at[:, :, 0].set(1.0)
    return jnp.concatenate([table, past_end])


def conversion_table(config: SchedulerConfig, sigmas: Array, *, alpha: Array, sigma: Array) -> Array:
    """``[N, 2]``: the solver's quantity is ``a * x + b * model_output`` (as
    :func:`dpmjax.coefficients.conversion_coefficients`)."""
    one, zero = jnp.ones_like(alpha), jnp.zeros_like(alpha)
    if config.predicts_data:
        pair = {"epsilon": (1.0 / alpha, -sigma / alpha), "sample": (zero, one), "v_prediction": (alpha, -sigma),
                "flow_prediction": (one, -sigmas)}[config.prediction_type]
    else:
        pair = {"epsilon": (zero, one), "sample": (1.0 / sigma, -alpha / sigma),
                "v_prediction": (sigma, alpha)}[config.prediction_type]
    return jnp.stack(pair, axis=-1)


def continuous_timesteps(config: SchedulerConfig, sigmas: Array) -> Array:
    """The model's (fractional) timestep at each noise level: the training schedule's inverse,
    linear in log-sigma between training timesteps (diffusers' ``_sigma_to_t``, clamped to
    ``[0, num_train_timesteps - 1]``); ``sigma * num_train_timesteps`` on flow grids. (With
    ``rescale_betas_zero_snr`` the training sigmas stop increasing at the last timesteps; a level
    there gets the first timestep that reaches it.)"""
    if config.use_flow_sigmas:
        return sigmas * config.num_train_timesteps
    # monotone: with rescale_betas_zero_snr the last training sigma is clamped (alphas_cumprod = 2^-24)
    # below its neighbours; a level is then given the first timestep that reaches it
    log_sigmas = np.maximum.accumulate(np.log(training_schedule(config).sigmas.astype(np.float64)))
    positive = jnp.where(sigmas > 1e-10, sigmas, 1e-10)
    return jnp.interp(jnp.log(positive), jnp.asarray(log_sigmas, sigmas.dtype),
                      jnp.arange(len(log_sigmas), dtype=sigmas.dtype))


def mirrored_sigmas(config: SchedulerConfig, sigmas: Array) -> Array:
    """A sampler's noise levels walked backwards, for inverting it: a final zero becomes the smallest
    training noise level (as :func:`dpmjax.grids.mirrored_grid`)."""
    backwards = sigmas[::-1]
    smallest = float(training_schedule(config).sigmas[0])
    return backwards.at[0].set(jnp.where(backwards[0] == 0, jnp.asarray(smallest, sigmas.dtype), backwards[0]))


def grid_fields(config: SchedulerConfig, sigmas: Array, *, forward: bool) -> dict:
    """The grid fields of a :class:`~dpmjax.state.SchedulerState` for ``N + 1`` noise levels
    ``sigmas`` in the direction of travel (traced or not): timesteps (fractional), sigmas, the VP
    pairs, the conversion and update tables, the order caps. A level of exactly zero (a final
    zero) is held fixed: its derivative is zero (only its one-sided derivative upwards exists)."""
    n = sigmas.shape[0] - 1
    # a level of zero noise is an end that cannot move down: it is held fixed (zero derivative)
    sigmas = jnp.where(sigmas == 0, jax.lax.stop_gradient(sigmas), sigmas)
    alpha, sigma = alpha_sigma_from_sigma(sigmas, config.use_flow_sigmas, xp=jnp)
    return dict(
        timesteps=continuous_timesteps(config, sigmas[:n]),
        sigmas=sigmas,
        step_alpha=alpha,
        step_sigma=sigma,
        convert_coefficients=conversion_table(config, sigmas[:n], alpha=alpha[:n], sigma=sigma[:n]),
        update_coefficients=update_table(config, sigmas, n, alpha=alpha, sigma=sigma),
        order_cap=jnp.asarray(order_caps(config, n, forward), jnp.int32),
    )

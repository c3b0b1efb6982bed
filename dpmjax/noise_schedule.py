"""The training noise schedule: betas, cumulative alphas and the VP tables, on the host.

A variance-preserving diffusion has ``x_t = alpha_t x_0 + sigma_t eps`` with
``alpha_t^2 = prod_{s<=t} (1 - beta_s)`` and ``alpha_t^2 + sigma_t^2 = 1``; its log-SNR is
``lambda_t = log(alpha_t / sigma_t)`` (Lu et al. 2022, "DPM-Solver", Sec. 2) and diffusers' "sigma" is
the noise-to-signal ratio ``sigma_t / alpha_t = exp(-lambda_t)``.

The arithmetic reproduces PyTorch's float32 computation bit for bit (its ``linspace`` uses a
fused multiply-add from both ends, its ``cumprod`` accumulates in float64), so that the schedule
tables, and every sigma derived from them, are the very values diffusers holds.

The tables depend on six fields of a config (:class:`TrainingConfig`), read by name: this module sits
below :mod:`dpmjax.config`, which builds the tables to check ``lambda_min_clipped``.
"""

from __future__ import annotations

import functools
import math
from typing import Hashable, NamedTuple, Optional, Protocol, Tuple

import numpy as np


class TrainingConfig(Hashable, Protocol):
    """The fields of a config that fix the training schedule (a
    :class:`~dpmjax.config.SchedulerConfig` has them, validated); hashable, the tables are cached
    per config."""

    num_train_timesteps: int
    beta_start: float
    beta_end: float
    beta_schedule: str  # "linear", "scaled_linear" or "squaredcos_cap_v2"
    trained_betas: Optional[Tuple[float, ...]]  # overrides the three above
    rescale_betas_zero_snr: bool


class TrainingSchedule(NamedTuple):
    """Per-training-timestep tables, float32 numpy arrays of length ``num_train_timesteps``."""

    betas: np.ndarray
    alphas_cumprod: np.ndarray
    alpha_t: np.ndarray
    sigma_t: np.ndarray
    lambda_t: np.ndarray
    sigmas: np.ndarray  # sigma_t / alpha_t


def linspace_float32(start: float, end: float, steps: int) -> np.ndarray:
    """``torch.linspace(start, end, steps, dtype=float32)``, value for value.

    PyTorch computes ``step = (end - start) / (steps - 1)`` in float32 and then, with one rounding
    (a fused multiply-add), ``start + i * step`` for the first half and ``end - (steps-1-i) * step``
    for the second. The float64 products and sums below are exact, so one cast rounds once.
    """
    start32, end32 = np.float32(start), np.float32(end)
    if steps == 1:
        return np.array([start32], dtype=np.float32)
    step = np.float64(np.float32((end32 - start32) / np.float32(steps - 1)))
    i = np.arange(steps, dtype=np.float64)
    low = np.float64(start32) + step * i
    high = np.float64(end32) - step * (steps - 1 - i)
    return np.where(i < steps // 2, low, high).astype(np.float32)


def cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    """Betas of the cosine schedule ``alpha_bar(t) = cos^2((t + 0.008) / 1.008 * pi / 2)``.

    Nichol & Dhariwal 2021, "Improved DDPM", Eq. 17; each beta is capped at ``max_beta``.
    """

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    n = num_train_timesteps
    betas = [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)]
    return np.asarray(betas, dtype=np.float32)


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Shift and scale ``sqrt(alpha_bar)`` so that the last timestep has exactly zero SNR.

    Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed", Algorithm 1.
    """
    alphas_bar_sqrt = np.sqrt(_cumprod_float32(np.float32(1.0) - betas))
    first, last = alphas_bar_sqrt[0].copy(), alphas_bar_sqrt[-1].copy()
    alphas_bar_sqrt = (alphas_bar_sqrt - last) * (first / (first - last))
    alphas_bar = alphas_bar_sqrt**2
    alphas = np.concatenate([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return (np.float32(1.0) - alphas).astype(np.float32)


def _cumprod_float32(values: np.ndarray) -> np.ndarray:
    # torch.cumprod on float32 accumulates in float64 and rounds each partial product once.
    return np.cumprod(values.astype(np.float64)).astype(np.float32)


def betas_for(config: TrainingConfig) -> np.ndarray:
    n = config.num_train_timesteps
    if config.trained_betas is not None:
        betas = np.asarray(config.trained_betas, dtype=np.float32)
    elif config.beta_schedule == "linear":
        betas = linspace_float32(config.beta_start, config.beta_end, n)
    elif config.beta_schedule == "scaled_linear":
        betas = linspace_float32(config.beta_start**0.5, config.beta_end**0.5, n) ** 2
    else:  # "squaredcos_cap_v2" (the config validated the name)
        betas = cosine_betas(n)
    if config.rescale_betas_zero_snr:
        betas = rescale_zero_terminal_snr(betas)
    return betas


@functools.lru_cache(maxsize=64)
def training_schedule(config: TrainingConfig) -> TrainingSchedule:
    """Build the float32 training tables of ``config`` (cached per config; the arrays are read-only)."""
    betas = betas_for(config)
    alphas_cumprod = _cumprod_float32(np.float32(1.0) - betas)
    if config.rescale_betas_zero_snr:
        # diffusers: close to zero without being zero, so that the first sigma is finite.
        alphas_cumprod[-1] = np.float32(2.0**-24)
    with np.errstate(divide="ignore"):
        alpha_t = np.sqrt(alphas_cumprod)
        sigma_t = np.sqrt(np.float32(1.0) - alphas_cumprod)
        lambda_t = np.log(alpha_t) - np.log(sigma_t)
        sigmas = np.sqrt((np.float32(1.0) - alphas_cumprod) / alphas_cumprod)
    tables = TrainingSchedule(betas=betas, alphas_cumprod=alphas_cumprod, alpha_t=alpha_t, sigma_t=sigma_t, lambda_t=lambda_t,
                              sigmas=sigmas.astype(np.float32))
    for table in tables:
        table.flags.writeable = False
    return tables


def alpha_sigma_from_sigma(sigma, flow: bool, xp=np) -> tuple:
    """The VP (or flow) pair ``(alpha_t, sigma_t)`` of a noise level given as diffusers' sigma.

    VP: ``alpha = 1 / sqrt(1 + sigma^2)``, ``sigma_t = sigma * alpha``.
    Flow matching (rectified flow, ``x_t = (1 - t) x_0 + t eps``): ``alpha = 1 - sigma``, ``sigma_t = sigma``.
    ``xp``: NumPy (float64, on the host; the default) or ``jax.numpy`` (in the array's own dtype).
    """
    sigma = np.asarray(sigma, dtype=np.float64) if xp is np else sigma
    if flow:
        return 1.0 - sigma, sigma
    alpha = 1.0 / xp.sqrt(sigma**2 + 1.0)
    return alpha, sigma * alpha

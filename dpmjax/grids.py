"""Inference grids: the discrete timesteps and noise levels a schedule visits, on the host.

A grid is a pair ``(timesteps, sigmas)``: ``timesteps[i]`` is the model's conditioning at step ``i``
and the step moves the sample from noise level ``sigmas[i]`` to ``sigmas[i + 1]`` (diffusers'
convention, sigma = noise-to-signal ratio; for flow grids, sigma = t of ``x_t = (1-t) x_0 + t eps``).
The forward (sampling) grid runs from high to low noise, the inverse grid from low to high.

Both reproduce diffusers' ``set_timesteps`` value for value, including its quirks, except where
diffusers is wrong (flow sigmas under inversion run in the forward order there: upstream PR #12262).
Steps of zero length that some grids end with (Karras, exponential and beta grids under inversion)
are kept, so that the sigmas are diffusers' own; the solver treats such a step exactly (identity).

Every timestep is a training timestep, in ``[0, num_train_timesteps - 1]``: the model is never
evaluated outside the range it was trained on. ``"leading"`` spacing with a ``steps_offset`` that
would pass the end is refused (:func:`check_leading_range`); ``"trailing"`` spacing with a clipped
log-SNR (``lambda_min_clipped``) can round its least noisy point to timestep -1, where diffusers
evaluates the model; dpmjax evaluates it at timestep 0 instead (:func:`clip_trailing_timesteps`), the
timestep whose noise level that point already has.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional, Sequence

import numpy as np

from . import checks
from .config import SchedulerConfig
from .noise_schedule import TrainingSchedule


class Grid(NamedTuple):
    timesteps: np.ndarray  # int64, length N
    sigmas: np.ndarray  # float32, length >= N + 1 (diffusers keeps extra ones when it dedupes timesteps)


# ----------------------------------------------------------------------------- sigma <-> timestep
def sigma_to_timestep(sigma: float, log_sigmas: np.ndarray) -> float:
    """Fractional training timestep whose sigma is ``sigma``: linear interpolation in log-sigma."""
    log_sigma = np.log(np.maximum(np.float64(sigma), 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low_idx = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low, high = log_sigmas[low_idx], log_sigmas[high_idx]
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    return float(((1 - w) * low_idx + w * high_idx).reshape(()))


def _timesteps_of(sigmas: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    return np.array([sigma_to_timestep(s, log_sigmas) for s in sigmas])


# ----------------------------------------------------------------------------- sigma sequences
def karras_sigmas(sigma_first: float, sigma_last: float, n: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022 (EDM), Eq. 5: uniform in ``sigma^(1/rho)`` from ``sigma_first`` to ``sigma_last``."""
    ramp = np.linspace(0, 1, n)
    a, b = sigma_first ** (1 / rho), sigma_last ** (1 / rho)
    return (a + ramp * (b - a)) ** rho


def exponential_sigmas(sigma_first: float, sigma_last: float, n: int) -> np.ndarray:
    """Uniform in ``log sigma`` (geometric sequence)."""
    return np.exp(np.linspace(math.log(sigma_first), math.log(sigma_last), n))


def beta_sigmas(sigma_first: float, sigma_last: float, n: int, alpha: float = 0.6, beta: float = 0.6) -> np.ndarray:
    """Lee et al. 2024, "Beta Sampling is All You Need": sigmas at Beta(0.6, 0.6) quantiles."""
    import scipy.stats  # only this grid needs scipy

    ppf = [scipy.stats.beta.ppf(u, alpha, beta) for u in 1 - np.linspace(0, 1, n)]
    return np.array([sigma_last + p * (sigma_first - sigma_last) for p in ppf])


def lu_lambdas(lambda_first: float, lambda_last: float, n: int) -> np.ndarray:
    """Lu et al. 2022 (DPM-Solver), Sec. 3.3: ``n`` points uniform in log-SNR (here in ``log sigma``)."""
    return lambda_first + np.linspace(0, 1, n) * (lambda_last - lambda_first)


def flow_sigmas_descending(num_train_timesteps: int, n: int, shift: float) -> np.ndarray:
    """The ``n`` non-zero noise levels of a shifted flow-matching grid, noisiest first.

    ``t -> shift * t / (1 + (shift - 1) t)`` (Esser et al. 2024, SD3, Eq. 23) applied to
    ``n + 1`` points uniform in ``[0, 1 - 1/T]``; the zero is dropped.
    """
    raw = 1.0 - np.linspace(1, 1 / num_train_timesteps, n + 1)
    return np.flip(shift * raw / (1 + (shift - 1) * raw))[:-1].copy()


# ----------------------------------------------------------------------------- helpers
def _clipped_index(train: TrainingSchedule, lambda_min_clipped: float) -> int:
    """How many of the noisiest training steps have log-SNR below ``lambda_min_clipped``."""
    return int(np.searchsorted(np.flip(train.lambda_t), np.float32(lambda_min_clipped), side="left"))


def _check_steps(num_inference_steps: int, config: SchedulerConfig) -> None:
    checks.integer("num_inference_steps", num_inference_steps)
    if not 1 <= num_inference_steps <= config.num_train_timesteps:
        raise ValueError(
            f"num_inference_steps must lie in [1, num_train_timesteps={config.num_train_timesteps}], "
            f"got {num_inference_steps}."
        )


def check_leading_range(config: SchedulerConfig, n: int, largest_timestep: Callable[[np.ndarray], np.ndarray]) -> None:
    """Refuse ``"leading"`` timesteps that ``steps_offset`` pushes past the last training timestep.

    Args:
        config: The config (``timestep_spacing="leading"``).
        n: The number of steps asked for.
        largest_timestep: The largest timestep of the grid for each step count of an array, offset
            included.

    Raises:
        ValueError: The largest timestep of ``n`` steps passes ``num_train_timesteps - 1``; the
            message says which step counts (or offsets) stay in range.
    """
    T, offset = config.num_train_timesteps, config.steps_offset
    largest = int(largest_timestep(np.asarray([n]))[0])
    if largest <= T - 1:
        return
    counts = np.arange(1, n)
    fitting = counts[largest_timestep(counts) <= T - 1]
    fewer = (f"the largest step count below {n} that fits steps_offset={offset} is {int(fitting.max())}" if fitting.size
             else f"no smaller step count fits steps_offset={offset}")
    raise ValueError(
        f"steps_offset={offset} with timestep_spacing='leading' and num_inference_steps={n} gives timesteps up to "
        f"{largest}, outside the training timesteps [0, {T - 1}]: use steps_offset <= {T - 1 - (largest - offset)} "
        f"with {n} step{'s' if n != 1 else ''} ({fewer})."
    )


def clip_trailing_timesteps(timesteps: np.ndarray) -> np.ndarray:
    """``"trailing"`` timesteps with -1 raised to 0.

    With ``lambda_min_clipped`` set, diffusers' trailing grid (``arange(last, 0, -T/N)`` rounded,
    minus one) can round its least noisy point to timestep -1, and evaluates the model there. That
    point's noise level is already timestep 0's (diffusers interpolates the sigmas with clamping),
    so timestep 0 is the training timestep matching it; the sigmas are unchanged.
    """
    return np.maximum(timesteps, 0)


def _leading_ratio(span: int, n: int, config: SchedulerConfig) -> int:
    ratio = span // (n + 1)
    if ratio < 1:
        raise ValueError(
            f"num_inference_steps={n} is too large for timestep_spacing='leading' over {span} training "
            f"timesteps: at most {span - 1} steps (more would repeat timestep 0)."
        )
    return ratio


def _uses_other_grid(config: SchedulerConfig) -> bool:
    """Whether an alternative noise-level grid (Karras, exponential, Beta, Lu, flow) sets the timesteps."""
    return any(getattr(config, option) for option in config.SIGMA_GRID_OPTIONS)


def _sigma_family(config: SchedulerConfig, *, sigma_first: float, sigma_last: float, n: int) -> Optional[np.ndarray]:
    """The ``n`` noise levels of the configured sigma family (Karras, exponential or Beta) from
    ``sigma_first`` to ``sigma_last``, in either direction; ``None`` for the other grids."""
    if config.use_karras_sigmas:
        return karras_sigmas(sigma_first, sigma_last, n)
    if config.use_exponential_sigmas:
        return exponential_sigmas(sigma_first, sigma_last, n)
    if config.use_beta_sigmas:
        return beta_sigmas(sigma_first, sigma_last, n)
    return None


# ----------------------------------------------------------------------------- forward grid
def forward_grid(
    config: SchedulerConfig,
    train: TrainingSchedule,
    num_inference_steps: Optional[int] = None,
    *,
    timesteps: Optional[Sequence[int]] = None,
    flow_shift: Optional[float] = None,
) -> Grid:
    """diffusers' ``DPMSolverMultistepScheduler.set_timesteps``: noisiest first, ending at
    ``final_sigmas_type`` (zero, or the smallest training sigma)."""
    T = config.num_train_timesteps
    shift = config.flow_shift if flow_shift is None else flow_shift
    if (num_inference_steps is None) == (timesteps is None):
        raise ValueError("pass exactly one of num_inference_steps, timesteps and sigmas.")
    if timesteps is not None:
        for option in config.SIGMA_GRID_OPTIONS:
            if getattr(config, option):
                raise ValueError(f"custom timesteps cannot be combined with {option}=True.")
        ts = np.asarray(timesteps)
        if ts.ndim != 1 or ts.size < 1 or not np.all(ts == np.round(ts)):
            raise ValueError("timesteps must be a non-empty 1-D sequence of integers.")
        ts = ts.astype(np.int64)
        if ts.min() < 0 or ts.max() > T - 1 or np.any(np.diff(ts) >= 0):
            raise ValueError(f"timesteps must be strictly decreasing integers in [0, {T - 1}], got {ts.tolist()}.")
        n = len(ts)
    else:
        _check_steps(num_inference_steps, config)
        n = int(num_inference_steps)
        last = T - _clipped_index(train, config.lambda_min_clipped)
        if config.timestep_spacing == "linspace":
            ts = np.linspace(0, last - 1, n + 1).round()[::-1][:-1].copy().astype(np.int64)
        elif config.timestep_spacing == "leading":
            ratio = _leading_ratio(last, n, config)
            if not _uses_other_grid(config):  # the other grids replace these timesteps: the offset is unused
                check_leading_range(config, n, lambda k: k * (last // (k + 1)) + config.steps_offset)
            ts = (np.arange(0, n + 1) * ratio).round()[::-1][:-1].copy().astype(np.int64)
            ts += config.steps_offset
        else:  # trailing
            ts = clip_trailing_timesteps(np.arange(last, 0, -T / n).round().copy().astype(np.int64) - 1)

    sigmas = train.sigmas
    log_sigmas = np.log(sigmas)
    round_ts = config.beta_schedule != "squaredcos_cap_v2"
    family = _sigma_family(config, sigma_first=sigmas[-1].item(), sigma_last=sigmas[0].item(), n=n)
    if family is not None:
        s = family
        ts = _timesteps_of(s, log_sigmas)
        ts = ts.round() if round_ts and config.use_karras_sigmas else ts
    elif config.use_lu_lambdas:
        s = np.exp(lu_lambdas(log_sigmas[-1].item(), log_sigmas[0].item(), n))
        ts = _timesteps_of(s, log_sigmas)
        ts = ts.round() if round_ts else ts
    elif config.use_flow_sigmas:
        s = flow_sigmas_descending(T, n, shift)
        ts = s * T
    else:
        s = np.interp(ts, np.arange(0, len(sigmas)), sigmas)
    final = sigmas[0] if config.final_sigmas_type == "sigma_min" else 0.0
    sig = np.concatenate([s, [final]]).astype(np.float32)
    return Grid(np.asarray(ts).astype(np.int64), sig)


# ----------------------------------------------------------------------------- inverse grid
def inverse_grid(config: SchedulerConfig, train: TrainingSchedule, num_inference_steps: int) -> Grid:
    """diffusers' ``DPMSolverMultistepInverseScheduler.set_timesteps``: least noisy first.

    Differences from diffusers: flow sigmas ascend (diffusers uses the forward order, PR #12262),
    and ``use_lu_lambdas`` (not offered by diffusers' inverse) gives N steps uniform in log-SNR from
    the least noisy training step to the noisiest one ``lambda_min_clipped`` allows.
    """
    _check_steps(num_inference_steps, config)
    T, n = config.num_train_timesteps, int(num_inference_steps)
    noisiest = T - 1 - _clipped_index(train, config.lambda_min_clipped)
    if config.timestep_spacing == "linspace":
        ts = np.linspace(0, noisiest, n + 1).round()[:-1].copy().astype(np.int64)
    elif config.timestep_spacing == "leading":
        ratio = _leading_ratio(noisiest + 1, n, config)
        if not _uses_other_grid(config):  # the other grids replace these timesteps: the offset is unused
            check_leading_range(config, n, lambda k: (k - 1) * ((noisiest + 1) // (k + 1)) + config.steps_offset)
        ts = (np.arange(0, n + 1) * ratio).round()[:-1].copy().astype(np.int64)
        ts += config.steps_offset
    else:  # trailing (a -1 is raised to 0 after the de-duplication below, which must see diffusers' values)
        ts = np.arange(noisiest + 1, 0, -T / n).round()[::-1].copy().astype(np.int64) - 1

    sigmas = train.sigmas
    log_sigmas = np.log(sigmas)
    duplicate_last = True
    family = _sigma_family(config, sigma_first=sigmas[0].item(), sigma_last=sigmas[-1].item(), n=n)
    if family is not None:
        s = family
        ts = _timesteps_of(s, log_sigmas)
        ts = ts.round() if config.use_karras_sigmas else ts
    elif config.use_flow_sigmas:
        s = np.flip(flow_sigmas_descending(T, n, config.flow_shift)).copy()
        ts = s * T
    elif config.use_lu_lambdas:
        s = np.exp(lu_lambdas(log_sigmas[0].item(), log_sigmas[noisiest].item(), n + 1))
        ts = _timesteps_of(s[:-1], log_sigmas)
        ts = ts.round() if config.beta_schedule != "squaredcos_cap_v2" else ts
        duplicate_last = False
    else:
        s = np.interp(ts, np.arange(0, len(sigmas)), sigmas)
        s = np.concatenate([s, [sigmas[noisiest]]])
        duplicate_last = False
    if duplicate_last:
        s = np.concatenate([s, s[-1:]])
    sig = s.astype(np.float32)
    ts = np.asarray(ts)
    if config.use_lu_lambdas:  # our own grid: every noise level is a step, even where timesteps repeat
        return Grid(ts.astype(np.int64), sig)
    # Several noise levels can give one timestep (e.g. num_inference_steps == num_train_timesteps);
    # diffusers keeps the first of each and leaves the sigmas as they are. It de-duplicates the
    # timesteps *before* its final integer cast: integer grids (spacings, Karras) lose their repeats,
    # but the fractional timesteps of exponential, beta and flow grids are all distinct, so those
    # keep every step even where several of them truncate to one integer (the cosine schedule's
    # noisiest sigmas all give 998).
    _, first = np.unique(ts, return_index=True)
    return Grid(clip_trailing_timesteps(ts[np.sort(first)].astype(np.int64)), sig)


# ----------------------------------------------------------------------------- a sampler's grid mirrored
def mirrored_grid(forward: Grid, num_inference_steps: int, train: TrainingSchedule) -> Grid:
    """A sampler's grid walked backwards, for inverting that sampler: its noise levels from the last
    to the first, step ``j`` evaluating the model at the sampler's point ``N - j``.

    A final zero noise level becomes the smallest training noise level (timestep 0), the nearest
    point where a model can be evaluated.
    """
    n = int(num_inference_steps)
    sigmas = np.asarray(forward.sigmas[: n + 1])[::-1].copy()
    if sigmas[0] == 0.0:
        sigmas[0] = train.sigmas[0]
    timesteps = np.concatenate([[0], np.asarray(forward.timesteps)[::-1][: n - 1]]).astype(np.int64)
    return Grid(timesteps, sigmas)

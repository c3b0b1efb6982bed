"""DPM-Solver multistep updates as precomputed linear combinations (host side, float64).

Every multistep DPM-Solver update is linear in the current sample, the converted model outputs of
the last ``k`` steps and (for SDE variants) a Gaussian noise:

    x_{t} = c_x x_{s0} + c_0 m_{s0} + c_1 m_{s1} + c_2 m_{s2} + c_z z,

with coefficients that depend only on the noise grid, the step index and the order used. They are
computed here once per ``set_timesteps``, in float64 from the grid's float32 sigmas, so that a
device-side step is one gather and a few fused multiply-adds (the same idea as blackjax's integrators,
which are lists of coefficients).

Notation (Lu et al. 2022, "DPM-Solver", arXiv:2206.00927; Lu et al. 2022, "DPM-Solver++",
arXiv:2211.01095): ``alpha_t, sigma_t`` the VP pair, ``lambda_t = log(alpha_t / sigma_t)`` the
log-SNR, ``h = lambda_t - lambda_s0`` the step, ``h_0 = lambda_s0 - lambda_s1``,
``h_1 = lambda_s1 - lambda_s2``, ``r_0 = h_0 / h``, ``r_1 = h_1 / h``.

First order, data prediction (DPM-Solver++(1) = DDIM):
    x_t = (sigma_t / sigma_s) x_s - alpha_t (e^{-h} - 1) x0_s.
Second order, multistep: D0 = m_0, D1 = (m_0 - m_1) / r_0, and
    midpoint: x_t = (sigma_t / sigma_s0) x - alpha_t (e^{-h} - 1) (D0 + D1 / 2)
    heun:     x_t = (sigma_t / sigma_s0) x - alpha_t (e^{-h} - 1) D0 + alpha_t ((e^{-h} - 1)/h + 1) D1.
Third order: D1 = D1_0 + r_0 / (r_0 + r_1) (D1_0 - D1_1), D2 = (D1_0 - D1_1) / (r_0 + r_1) with
D1_0 = (m_0 - m_1) / r_0, D1_1 = (m_1 - m_2) / r_1, and
    x_t = (sigma_t / sigma_s0) x - alpha_t (e^{-h} - 1) D0 + alpha_t ((e^{-h} - 1)/h + 1) D1
          - alpha_t ((e^{-h} - 1 + h)/h^2 - 1/2) D2.
The noise-prediction (DPM-Solver) and SDE variants (DPM-Solver++ paper, Sec. 5 / App. B) follow
the same pattern with ``e^{h}`` and ``e^{-2h}``; see :func:`_d_coefficients`.

Degenerate steps, where diffusers returns NaN, are given their exact meaning instead:
a step of zero length (``h = 0``) is the identity, and a multistep difference over a zero-length
previous step (``h_0 = 0`` or ``h_1 = 0``), or any order whose coefficients are not finite (e.g. a
step to zero noise), falls back to the next lower order.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .config import SchedulerConfig
from .noise_schedule import alpha_sigma_from_sigma


class StepTables(NamedTuple):
    """Per-step coefficient tables of one grid (float64 numpy)."""

    convert: np.ndarray  # [N, 2]: converted output = convert[i, 0] * sample + convert[i, 1] * model_output
    update: np.ndarray  # [N + 1, K, K + 2]: row (i, k-1) = (c_x, c_0 .. c_{K-1}, c_z) of the order-k update
    order_cap: np.ndarray  # [N] int32: highest order step i may use (lower_order_final, euler_at_final)
    alpha: np.ndarray  # [len(sigmas)] VP alpha_t of each grid point
    sigma: np.ndarray  # [len(sigmas)] VP sigma_t of each grid point


def log_snr(alpha: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """``lambda = log(alpha) - log(sigma)``; +inf at zero noise, -inf at zero signal."""
    with np.errstate(divide="ignore"):
        return np.log(alpha) - np.log(sigma)


def conversion_coefficients(config: SchedulerConfig, sigmas: np.ndarray, *, alpha: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """``(a, b)`` per grid point such that the solver's model output is ``a * x + b * model_output``.

    DPM-Solver++ integrates the data prediction ``x0 = (x - sigma_t eps) / alpha_t``; DPM-Solver the
    noise prediction ``eps = (x - alpha_t x0) / sigma_t``. v-prediction: ``v = alpha_t eps - sigma_t x0``
    (Salimans & Ho 2022). Flow prediction: ``x0 = x - sigma * v`` with the grid's raw sigma.
    """
    p = config.prediction_type
    with np.errstate(divide="ignore", invalid="ignore"):
        if config.predicts_data:
            table = {
                "epsilon": (1.0 / alpha, -sigma / alpha),
                "sample": (np.zeros_like(alpha), np.ones_like(alpha)),
                "v_prediction": (alpha, -sigma),
                "flow_prediction": (np.ones_like(alpha), -np.asarray(sigmas, np.float64)),
            }[p]
        else:
            table = {
                "epsilon": (np.zeros_like(alpha), np.ones_like(alpha)),
                "sample": (1.0 / sigma, -alpha / sigma),
                "v_prediction": (sigma, alpha),
            }[p]
    return np.stack(table, axis=-1)


def _d_coefficients(config: SchedulerConfig, order: int, h: float, *, alpha_t: float, sigma_t: float, alpha_s: float, sigma_s: float):
    """``(c_x, [coefficients of D0, D1, D2][:order], c_z)`` of one update, as in the module docstring."""
    algorithm, heun = config.algorithm_type, config.solver_type == "heun"
    em, ep = np.expm1(-h), np.expm1(h)
    if algorithm == "dpmsolver++":
        c_x = sigma_t / sigma_s
        d = [-alpha_t * em, alpha_t * (em / h + 1.0) if (heun or order == 3) else -0.5 * alpha_t * em,
             -alpha_t * ((em + h) / h**2 - 0.5)]
        c_z = 0.0
    elif algorithm == "dpmsolver":
        c_x = alpha_t / alpha_s
        d = [-sigma_t * ep, -sigma_t * (ep / h - 1.0) if (heun or order == 3) else -0.5 * sigma_t * ep,
             -sigma_t * ((ep - h) / h**2 - 0.5)]
        c_z = 0.0
    elif algorithm == "sde-dpmsolver++":
        g = -np.expm1(-2.0 * h)  # 1 - e^{-2h}
        c_x = sigma_t / sigma_s * np.exp(-h)
        d = [alpha_t * g, alpha_t * (g / (-2.0 * h) + 1.0) if (heun or order == 3) else 0.5 * alpha_t * g,
             alpha_t * ((g - 2.0 * h) / (2.0 * h) ** 2 - 0.5)]
        c_z = sigma_t * np.sqrt(g)
    else:  # "sde-dpmsolver" (orders 1 and 2; the config refuses order 3)
        c_x = alpha_t / alpha_s
        d = [-2.0 * sigma_t * ep, -2.0 * sigma_t * (ep / h - 1.0) if heun else -sigma_t * ep, np.nan]
        c_z = sigma_t * np.sqrt(np.expm1(2.0 * h))
    return c_x, np.asarray(d[:order], dtype=np.float64), c_z


def _differences_matrix(order: int, h: float, *, h0: float, h1: float) -> np.ndarray:
    """Matrix ``M`` with ``(D0, D1, D2) = M @ (m_0, m_1, m_2)`` for the multistep differences."""
    if order == 1:
        return np.ones((1, 1))
    r0 = h0 / h
    u = 1.0 / r0
    if order == 2:
        return np.array([[1.0, 0.0], [u, -u]])
    r1 = h1 / h
    v = 1.0 / r1
    w, q = r0 / (r0 + r1), 1.0 / (r0 + r1)
    return np.array(
        [
            [1.0, 0.0, 0.0],
            [u + w * u, -u - w * (u + v), w * v],
            [q * u, -q * (u + v), q * v],
        ]
    )


def update_row(config: SchedulerConfig, lam: np.ndarray, *, alpha: np.ndarray, sigma: np.ndarray, i: int, order: int) -> np.ndarray:
    """Coefficients ``(c_x, c_0, ..., c_{K-1}, c_z)`` of the order-``order`` update at step ``i``."""
    K = config.solver_order
    row = np.zeros(K + 2)
    h = lam[i + 1] - lam[i]
    if config.is_sde and -1e-5 < h < 0.0:
        # Two float32 sigmas one rounding apart (e.g. a Lu grid's last sigma and sigma_min): the SDE
        # noise term sqrt(1 - e^{-2h}) has no real value for h < 0; the step has zero length in truth.
        h = 0.0
    if h == 0.0:  # zero-length step: exactly the identity
        row[0] = 1.0
        return row
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        for k in range(min(order, i + 1), 0, -1):
            h0 = lam[i] - lam[i - 1] if k >= 2 else np.nan
            h1 = lam[i - 1] - lam[i - 2] if k >= 3 else np.nan
            c_x, d, c_z = _d_coefficients(config, k, h, alpha_t=alpha[i + 1], sigma_t=sigma[i + 1], alpha_s=alpha[i], sigma_s=sigma[i])
            c_m = d @ _differences_matrix(k, h, h0=h0, h1=h1)
            if sigma[i + 1] == 0.0:  # a step to zero noise: no sample or noise term remains
                c_x, c_z = 0.0, 0.0
            candidate = np.concatenate([[c_x], c_m, np.zeros(K - k), [c_z]])
            if np.all(np.isfinite(candidate)):
                return candidate
    raise ValueError(
        f"the noise grid has no finite DPM-Solver update at step {i} (sigmas {sigma[i]} -> {sigma[i + 1]}); "
        "this grid cannot be sampled."
    )


def order_caps(config: SchedulerConfig, num_steps: int, forward: bool) -> np.ndarray:
    """diffusers' order lowering: ``lower_order_final`` (fewer than 15 steps: order <= 2 for the
    second-to-last step, 1 for the last), ``euler_at_final``, and a forward schedule ending at zero noise."""
    caps = np.full(num_steps, config.solver_order, dtype=np.int32)
    few = config.lower_order_final and num_steps < 15
    if config.euler_at_final or few or (forward and config.final_sigmas_type == "zero"):
        caps[-1] = 1
    if few and num_steps >= 2:
        caps[-2] = min(caps[-2], 2)
    return caps


def step_tables(config: SchedulerConfig, sigmas: np.ndarray, num_steps: int, *, forward: bool) -> StepTables:
    """All per-step tables of a grid with ``num_steps`` steps over ``sigmas`` (diffusers' sigmas)."""
    alpha, sigma = alpha_sigma_from_sigma(sigmas, flow=config.use_flow_sigmas)
    lam = log_snr(alpha, sigma)
    K = config.solver_order
    update = np.zeros((num_steps + 1, K, K + 2))
    for i in range(num_steps):
        for k in range(1, K + 1):
            update[i, k - 1] = update_row(config, lam, alpha=alpha, sigma=sigma, i=i, order=k)
    update[num_steps, :, 0] = 1.0  # a step past the end is the identity
    convert = conversion_coefficients(config, sigmas[:num_steps], alpha=alpha[:num_steps], sigma=sigma[:num_steps])
    if not np.all(np.isfinite(convert)):
        bad = int(np.argmin(np.all(np.isfinite(convert), axis=-1)))
        raise ValueError(
            f"prediction_type={config.prediction_type!r} cannot be converted at step {bad} (sigma={sigmas[bad]}) "
            f"for algorithm_type={config.algorithm_type!r}: the conversion divides by zero there."
        )
    return StepTables(convert=convert, update=update, order_cap=order_caps(config, num_steps, forward), alpha=alpha,
                      sigma=sigma)

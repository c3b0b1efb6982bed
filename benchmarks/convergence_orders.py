"""Measured global error and convergence order of every solver order, against the closed-form
probability-flow solution for Gaussian data (float64). Prints a markdown table for the README.

    python benchmarks/convergence_orders.py
"""

from __future__ import annotations

import jax
import numpy as np

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402

import dpmjax  # noqa: E402
from dpmjax.models.analytic import Gaussian  # noqa: E402
from dpmjax.apps.demo import analytic_model, run_grid  # noqa: E402

DATA = Gaussian()


def global_error(kind: str, n: int, **config) -> float:
    cls = dpmjax.DPMSolverMultistepScheduler if kind == "forward" else dpmjax.DPMSolverMultistepInverseScheduler
    s = cls(final_sigmas_type="sigma_min", **config)
    state = s.set_timesteps(s.create_state(), n, (256,), dtype=jnp.float64)
    a0, s0 = state.step_alpha[0], state.step_sigma[0]
    x = DATA.sample(jax.random.PRNGKey(1), (256,), a0, s0, dtype=jnp.float64)
    y, _ = run_grid(s, state, analytic_model(DATA, "epsilon"), x)
    return float(jnp.max(jnp.abs(y - DATA.transport(x, a0, s0, state.step_alpha[n], state.step_sigma[n]))))


def main() -> None:
    print("| direction | grid | order | error N=40 | error N=160 | observed order |")
    print("|---|---|---|---|---|---|")
    for kind in ("forward", "inverse"):
        for grid, extra in (("Lu (uniform log-SNR)", dict(use_lu_lambdas=True)), ("diffusers default (uniform t)", {})):
            for order in (1, 2, 3):
                e40, e160 = (global_error(kind, n, solver_order=order, **extra) for n in (40, 160))
                print(f"| {kind} | {grid} | {order} | {e40:.2e} | {e160:.2e} | {np.log(e40 / e160) / np.log(4):.2f} |")


if __name__ == "__main__":
    main()

"""The built-in main job: invert analytic data to noise and sample it back, per solver order.

Data come from an analytic model (a two-mode Gaussian mixture by default, or a Gaussian), whose
exact noise prediction is known, so the round-trip error measures the schedulers alone. Each
trajectory is one ``jax.lax.scan`` over ``scheduler.step``.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Callable, Dict, Optional, Sequence

import jax
import jax.numpy as jnp

from ..config import SchedulerConfig
from ..models.analytic import Gaussian, GaussianMixture, model_output_from_denoised
from ..scheduler import (
    DPMSolverMultistepBase,
    DPMSolverMultistepInverseScheduler,
    DPMSolverMultistepScheduler,
)
from ..state import SchedulerState
from .messages import fail

DATA = {"gmm": GaussianMixture(), "gaussian": Gaussian()}
GRIDS = {"default": {}, "lu": {"use_lu_lambdas": True}, "karras": {"use_karras_sigmas": True}}


def analytic_model(data, prediction_type: str) -> Callable:
    """``model(x, alpha, sigma)`` returning the exact model output of ``data`` in the given parameterisation."""

    def model(x, alpha, sigma):
        return model_output_from_denoised(prediction_type, x, data.denoise(x, alpha, sigma), alpha=alpha, sigma=sigma)

    return model


def run_grid(
    scheduler: DPMSolverMultistepBase,
    state: SchedulerState,
    model: Callable,
    sample: jax.Array,
    key: Optional[jax.Array] = None,
    num_steps: Optional[int] = None,
):
    """Take the first ``num_steps`` (default: all) steps of the grid of ``state`` in one ``lax.scan``;
    the model sees each grid point's exact noise level. Returns ``(final_sample, final_state)``."""
    n = state.num_inference_steps if num_steps is None else num_steps
    keys = jax.random.split(jax.random.PRNGKey(0) if key is None else key, n)

    def body(carry, inputs):
        x, st = carry
        i, k = inputs
        out = model(x, st.step_alpha[i].astype(x.dtype), st.step_sigma[i].astype(x.dtype))
        x, st = scheduler.step(st, out, st.timesteps[i], sample=x, key=k if scheduler.config.is_sde else None,
                               return_dict=False)
        return (x, st), None

    # Start at step 0 explicitly: on grids whose timesteps repeat, a lookup by timestep would not.
    state = scheduler.set_begin_index(state, 0)
    (x, state), _ = jax.lax.scan(body, (sample, state), (jnp.arange(n), keys))
    return x, state


def roundtrip_errors(
    data_name: str = "gmm",
    orders: Sequence[int] = (1, 2, 3),
    steps: Sequence[int] = (10, 25, 50),
    batch: int = 4096,
    base_config: Optional[SchedulerConfig] = None,
    seed: int = 0,
) -> Dict[tuple, float]:
    """Round-trip errors ``|x - sample(invert(x))| / max|x|`` for each (order, steps): ``(median, max)``."""
    data = DATA[data_name]
    base = base_config or SchedulerConfig()
    results = {}
    for order in orders:
        config = base.replace(solver_order=order, final_sigmas_type="sigma_min", lower_order_final=True)
        inverse = DPMSolverMultistepInverseScheduler(config)
        forward = DPMSolverMultistepScheduler(config)
        model = analytic_model(data, config.prediction_type)
        for n in steps:
            s_inv = inverse.set_timesteps(inverse.create_state(), n, (batch,))
            s_fwd = forward.set_timesteps(forward.create_state(), n, (batch,))
            alpha0, sigma0 = float(s_inv.step_alpha[0]), float(s_inv.step_sigma[0])
            x = data.sample(jax.random.PRNGKey(seed), (batch,), alpha=alpha0, sigma=sigma0)
            noise, _ = jax.jit(run_grid, static_argnums=(0, 2))(inverse, s_inv, model, sample=x)
            recon, _ = jax.jit(run_grid, static_argnums=(0, 2))(forward, s_fwd, model, sample=noise)
            error = jnp.abs(recon - x) / jnp.max(jnp.abs(x))
            results[(order, n)] = (float(jnp.median(error)), float(jnp.max(error)))
    return results


def plot(results: Dict[tuple, float], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for order in sorted({o for o, _ in results}):
        ns = sorted(n for o, n in results if o == order)
        line, = ax.loglog(ns, [max(results[(order, n)][0], 1e-12) for n in ns], "o-", label=f"order {order}: median")
        ax.loglog(ns, [max(results[(order, n)][1], 1e-12) for n in ns], "s--", color=line.get_color(), alpha=0.6,
                  label=f"order {order}: max")
    steps = sorted({n for _, n in results})
    ax.set_xticks(steps, [str(n) for n in steps])
    ax.minorticks_off()
    ax.set_xlabel("inference steps N")
    ax.set_ylabel("round-trip error |x - sample(invert(x))| / max|x|")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="dpmjax demo",
        description="Invert analytic data to noise with DPMSolverMultistepInverseScheduler, sample it back with "
        "DPMSolverMultistepScheduler, and report the round-trip error per solver order.",
    )
    parser.add_argument("--data", choices=sorted(DATA), default="gmm", help="analytic data model (default: gmm)")
    parser.add_argument("--orders", type=int, nargs="+", default=[1, 2, 3], help="solver orders (default: 1 2 3)")
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 25, 50], help="inference steps (default: 10 25 50)")
    parser.add_argument("--batch", type=int, default=4096, help="number of scalar samples (default: 4096)")
    parser.add_argument("--grid", choices=sorted(GRIDS), default="default",
                        help="noise grid: diffusers' default (uniform in t), lu (uniform log-SNR) or karras")
    parser.add_argument("--config", default=None, help="a scheduler_config.json (or a folder with one) to start from")
    parser.add_argument("--out", default="dpmjax-demo.png", help="PNG plot path (default: dpmjax-demo.png)")
    args = parser.parse_args(argv)
    problems = [f"--orders: {o} is not a solver order (1, 2 or 3)" for o in args.orders if o not in (1, 2, 3)]
    if any(n < 1 for n in args.steps):
        problems.append(f"--steps must be >= 1 (got {' '.join(map(str, args.steps))})")
    if args.batch < 1:
        problems.append(f"--batch must be >= 1 (got {args.batch})")
    if problems:  # one line, like argparse's own errors but without the usage
        return fail("dpmjax demo", "; ".join(problems))
    base = SchedulerConfig()
    if args.config:
        base = DPMSolverMultistepScheduler.from_pretrained(args.config).config
    base = base.replace(**GRIDS[args.grid])

    start = time.perf_counter()
    results = roundtrip_errors(args.data, args.orders, args.steps, batch=args.batch, base_config=base)
    elapsed = time.perf_counter() - start
    print(f"dpmjax on {jax.default_backend()} (jax {jax.__version__}): {args.data} data, batch {args.batch}, {args.grid} grid")
    print("round trip: invert (DPMSolverMultistepInverseScheduler) then sample (DPMSolverMultistepScheduler), float32")
    print("error |x - sample(invert(x))| / max|x|, median / max over the batch")
    header = "| order | " + " | ".join(f"N={n}" for n in args.steps) + " |"
    print(header)
    print("|" + "---|" * (len(args.steps) + 1))
    for o in args.orders:
        print(f"| {o} | " + " | ".join("{:.1e} / {:.1e}".format(*results[(o, n)]) for n in args.steps) + " |")
    plot(results, args.out, f"dpmjax round trip on {args.data} data, {args.grid} grid (float32)")
    print(f"wrote {args.out} ({elapsed:.1f} s)")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""dpmjax benchmarks: per-step cost of a whole inversion trajectory against diffusers' PyTorch loop
and against the hardware floor, in one process, on the same shapes.

    python -m benchmarks            # the full CPU suite (minutes)
    python -m benchmarks --quick    # under a minute; CI runs it so the suite cannot rot

Prints a markdown table, writes ``benchmarks/results/<device>.json`` and a PNG plot. Ratios are the
headline (absolute times on a shared machine are noise); each figure is the best and the median of
several repeats. Nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import dpmjax


def trivial_model(x, t):
    return 0.1 * x


def timed(fn, repeats):
    fn()  # compile / warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times), statistics.median(times)


def dpmjax_invert(shape, steps, order, unroll):
    inv = dpmjax.DPMSolverMultistepInverseScheduler(solver_order=order)
    x = jnp.asarray(np.random.default_rng(0).standard_normal(shape), jnp.float32)
    return lambda: dpmjax.invert(trivial_model, x, inv, steps, unroll=unroll).sample.block_until_ready()


def dpmjax_step_loop(shape, steps, order):
    inv = dpmjax.DPMSolverMultistepInverseScheduler(solver_order=order)
    state0 = inv.set_timesteps(inv.create_state(), steps, shape)
    step = jax.jit(lambda st, out, t, x: inv.step(st, out, t, x, return_dict=False))
    x0 = jnp.asarray(np.random.default_rng(0).standard_normal(shape), jnp.float32)
    timesteps = list(np.asarray(state0.timesteps))

    def run():
        x, st = x0, state0
        for t in timesteps:
            x, st = step(st, 0.1 * x, t, x)
        x.block_until_ready()

    return run


def floor_scan(shape, steps):
    """What any scan over the sample must cost: read and write it once per step."""
    x0 = jnp.asarray(np.random.default_rng(0).standard_normal(shape), jnp.float32)
    coefficients = jnp.linspace(0.9, 1.1, steps)

    @jax.jit
    def run(x):
        return jax.lax.scan(lambda x, c: (c * x, None), x, coefficients)[0]

    return lambda: run(x0).block_until_ready()


def diffusers_loop(shape, steps, order):
    import torch
    from diffusers import DPMSolverMultistepInverseScheduler

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    scheduler = DPMSolverMultistepInverseScheduler(solver_order=order)
    x0 = torch.from_numpy(np.random.default_rng(0).standard_normal(shape).astype(np.float32))

    def run():
        scheduler.set_timesteps(steps)
        x = x0
        for t in scheduler.timesteps:
            x = scheduler.step(0.1 * x, t, x).prev_sample
        return x

    return run


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes and few repeats (under a minute)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"), help="folder for JSON and PNG")
    args = parser.parse_args(argv)
    device = jax.devices()[0]
    kind = device.device_kind.replace(" ", "_").lower()
    label = device.platform if kind == device.platform else f"{device.platform}-{kind}"
    steps, repeats = (10, 3) if args.quick else (50, 7)
    shapes = [(1, 4, 32, 32)] if args.quick else [(1, 4, 64, 64), (16, 4, 64, 64)]
    orders = (2,) if args.quick else (1, 2, 3)
    rows = []
    print(f"dpmjax benchmarks on {device.device_kind} ({device.platform}), jax {jax.__version__}, {steps} steps")
    print("per-step microseconds, best / median of", repeats)
    print("| shape | order | diffusers loop | dpmjax step loop | dpmjax invert (scan) | invert unroll=10 | floor scan | diffusers / invert | invert / floor |")
    print("|---|---|---|---|---|---|---|---|---|")
    for shape in shapes:
        floor = timed(floor_scan(shape, steps), repeats)
        for order in orders:
            d = timed(diffusers_loop(shape, steps, order), repeats)
            loop = timed(dpmjax_step_loop(shape, steps, order), repeats)
            scan = timed(dpmjax_invert(shape, steps, order, 1), repeats)
            unrolled = timed(dpmjax_invert(shape, steps, order, 10), repeats)
            per = lambda pair: (1e6 * pair[0] / steps, 1e6 * pair[1] / steps)  # noqa: E731
            row = dict(shape=shape, order=order, diffusers=per(d), step_loop=per(loop), invert=per(scan),
                       invert_unroll10=per(unrolled), floor=per(floor))
            rows.append(row)
            fmt = lambda pair: f"{pair[0]:.1f} / {pair[1]:.1f}"  # noqa: E731
            print(f"| {'x'.join(map(str, shape))} | {order} | {fmt(row['diffusers'])} | {fmt(row['step_loop'])} | "
                  f"{fmt(row['invert'])} | {fmt(row['invert_unroll10'])} | {fmt(row['floor'])} | "
                  f"{row['diffusers'][0] / row['invert'][0]:.0f}x | {row['invert'][0] / row['floor'][0]:.1f}x |")
    os.makedirs(args.out, exist_ok=True)
    name = f"{label}{'-quick' if args.quick else ''}"
    with open(os.path.join(args.out, f"{name}.json"), "w") as f:
        json.dump(dict(device=device.device_kind, platform=device.platform, jax=jax.__version__, steps=steps, rows=rows), f, indent=1)
    plot(rows, os.path.join(args.out, f"{name}.png"), f"{device.device_kind}: per-step cost, {steps}-step inversion")
    print(f"wrote {args.out}/{name}.json and .png")
    return 0


def plot(rows, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.8))
    labels = [f"{'x'.join(map(str, r['shape']))}\norder {r['order']}" for r in rows]
    series = [("diffusers", "diffusers loop"), ("step_loop", "dpmjax step loop"), ("invert", "dpmjax invert"),
              ("invert_unroll10", "invert, unroll 10"), ("floor", "floor scan")]
    width = 0.16
    for i, (key, name) in enumerate(series):
        ax.bar(np.arange(len(rows)) + (i - 2) * width, [r[key][0] for r in rows], width, label=name)
    ax.set_yscale("log")
    ax.set_xticks(np.arange(len(rows)), labels, fontsize=7)
    ax.set_ylabel("microseconds per step (best)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())

"""dpmjax benchmarks: per-step cost of a whole inversion trajectory against diffusers' PyTorch loop
and against the hardware floor, in one process, on the same shapes.

    python -m benchmarks            # the full CPU suite (minutes)
    python -m benchmarks --quick    # under a minute; CI runs it so the suite cannot rot

Prints markdown tables, writes ``benchmarks/results/<device>.json`` and a PNG plot, and
``<device>-flax_loop.json``: dpmjax's Flax class against diffusers 0.39's in the same ``fori_loop``
(see ``benchmarks/flax_loop.py``; skipped without diffusers 0.39). Ratios are the
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

from . import flax_loop


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


def dpmjax_step_in_user_scan(shape, steps, order):
    """A user's own ``lax.scan`` over ``scheduler.step`` (the Flax call pattern), model inside."""
    inv = dpmjax.DPMSolverMultistepInverseScheduler(solver_order=order)
    state0 = inv.set_timesteps(inv.create_state(), steps, shape)
    x0 = jnp.asarray(np.random.default_rng(0).standard_normal(shape), jnp.float32)

    @jax.jit
    def run(x, state):
        def body(carry, t):
            x, st = carry
            x, st = inv.step(st, trivial_model(x, t), t, x, return_dict=False)
            return (x, st), None

        return jax.lax.scan(body, (x, state), state.timesteps)[0][0]

    return lambda: run(x0, state0).block_until_ready()


def compile_seconds(steps, order=2, shape=(1, 4, 64, 64)):
    """Wall time of lowering + compiling ``invert`` (fresh trace, no cache)."""
    from dpmjax.trajectories.scan import ScanOptions, scan_steps_jit

    inv = dpmjax.DPMSolverMultistepInverseScheduler(solver_order=order)
    state = inv.set_timesteps(inv.create_state(), steps, shape)
    x = jnp.zeros(shape)
    model = lambda x, t: 0.1 * x  # noqa: E731  (a new function: nothing cached)
    start = time.perf_counter()
    scan_steps_jit.lower(inv, model, ScanOptions(label="invert"), state=state, x=x, cond=None, keys=None, noises=None).compile()
    return time.perf_counter() - start


def gradient_cost(steps, checkpoint, shape=(1, 4, 64, 64), repeats=3):
    """Time and compiled temporary memory of ``jax.grad`` of a loss on ``sample`` w.r.t. the noise,
    with a small conv model whose activations are 8x the sample."""
    model, params = conv_model(shape, width=32)
    fwd = dpmjax.DPMSolverMultistepScheduler()
    noise = jnp.asarray(np.random.default_rng(0).standard_normal(shape), jnp.float32)
    loss = lambda z: jnp.mean(dpmjax.sample(model, z, fwd, steps, cond=params, checkpoint=checkpoint).sample ** 2)  # noqa: E731
    grad = jax.jit(jax.grad(loss))
    memory = grad.lower(noise).compile().memory_analysis().temp_size_in_bytes
    best, median = timed(lambda: grad(noise).block_until_ready(), repeats)
    return best, median, memory


def conv_model(shape, width=32):
    """A small Flax conv net (NCHW latents in, 3x3 convs, SiLU, timestep embedding added): the
    scheduler's share of a realistic step."""
    import flax.linen as nn

    class ConvNet(nn.Module):
        @nn.compact
        def __call__(self, x, t):
            h = jnp.transpose(x, (0, 2, 3, 1))
            h = nn.silu(nn.Conv(width, (3, 3))(h) + nn.Dense(width)(jnp.sin(t / 1000.0 * jnp.arange(1, 9.0)))[None, None, None])
            h = nn.silu(nn.Conv(width, (3, 3))(h))
            return jnp.transpose(nn.Conv(shape[1], (3, 3))(h), (0, 3, 1, 2))

    net = ConvNet()
    params = net.init(jax.random.PRNGKey(0), jnp.zeros(shape), jnp.asarray(0.0))
    return (lambda x, t, p: net.apply(p, x, jnp.asarray(t, jnp.float32))), params


def dpmjax_invert_with(model, params, shape, steps, order, dtype=jnp.float32):
    inv = dpmjax.DPMSolverMultistepInverseScheduler(solver_order=order)
    x = jnp.asarray(np.random.default_rng(0).standard_normal(shape), dtype)
    return lambda: dpmjax.invert(model, x, inv, steps, cond=params).sample.block_until_ready()


def model_only(model, params, shape, steps):
    """The model alone, called once per step in a scan (no scheduler)."""
    x0 = jnp.asarray(np.random.default_rng(0).standard_normal(shape), jnp.float32)
    timesteps = jnp.arange(steps)

    @jax.jit
    def run(x):
        return jax.lax.scan(lambda x, t: (x + 1e-3 * model(x, t, params), None), x, timesteps)[0]

    return lambda: run(x0).block_until_ready()


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes and few repeats (under a minute)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"), help="folder for JSON and PNG")
    args = parser.parse_args(argv)
    device = jax.devices()[0]
    kind = device.device_kind.replace(" ", "_").lower()
    label = device.platform if kind == device.platform else f"{device.platform}-{kind}"
    steps, repeats = (10, 3) if args.quick else (50, 7)
    shapes = [(1, 4, 32, 32)] if args.quick else [(1, 4, 64, 64), (16, 4, 64, 64), (64, 4, 64, 64), (16, 4, 128, 128)]
    orders = (2,) if args.quick else (1, 2, 3)
    per = lambda pair: (1e6 * pair[0] / steps, 1e6 * pair[1] / steps)  # noqa: E731
    fmt = lambda pair: f"{pair[0]:.1f} / {pair[1]:.1f}"  # noqa: E731
    rows = []
    print(f"dpmjax benchmarks on {device.device_kind} ({device.platform}), jax {jax.__version__}, {steps} steps")
    print(f"\n1. per-step microseconds of a whole inversion, trivial model, best / median of {repeats}")
    print("| shape | order | diffusers loop | dpmjax step loop (Python) | step in a user's scan | dpmjax invert (scan) | "
          "invert unroll=10 | floor scan | diffusers / invert | diffusers / user scan | invert / floor |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for shape in shapes:
        floor = timed(floor_scan(shape, steps), repeats)
        for order in orders:
            d = timed(diffusers_loop(shape, steps, order), repeats)
            loop = timed(dpmjax_step_loop(shape, steps, order), repeats)
            user = timed(dpmjax_step_in_user_scan(shape, steps, order), repeats)
            scan = timed(dpmjax_invert(shape, steps, order, 1), repeats)
            unrolled = timed(dpmjax_invert(shape, steps, order, 10), repeats)
            row = dict(shape=shape, order=order, diffusers=per(d), step_loop=per(loop), user_scan=per(user),
                       invert=per(scan), invert_unroll10=per(unrolled), floor=per(floor))
            rows.append(row)
            print(f"| {'x'.join(map(str, shape))} | {order} | {fmt(row['diffusers'])} | {fmt(row['step_loop'])} | "
                  f"{fmt(row['user_scan'])} | {fmt(row['invert'])} | {fmt(row['invert_unroll10'])} | {fmt(row['floor'])} | "
                  f"{row['diffusers'][0] / row['invert'][0]:.0f}x | {row['diffusers'][0] / row['user_scan'][0]:.0f}x | "
                  f"{row['invert'][0] / row['floor'][0]:.1f}x |")

    print("\n2. compile time of invert (order 2, 1x4x64x64) vs number of steps")
    print("| steps | compile seconds |")
    print("|---|---|")
    compile_rows = []
    for n in ((10, 50) if args.quick else (10, 50, 200, 1000)):
        seconds = compile_seconds(n)
        compile_rows.append(dict(steps=n, seconds=seconds))
        print(f"| {n} | {seconds:.2f} |")

    grad_shape = (1, 4, 16, 16) if args.quick else (1, 4, 64, 64)
    print(f"\n3. jax.grad through sample (order 2, {'x'.join(map(str, grad_shape))}, conv model, activations 8x the sample)")
    print("| steps | checkpoint | seconds per grad (best / median) | compiled temp memory |")
    print("|---|---|---|---|")
    grad_rows = []
    for n in ((5,) if args.quick else (5, 50)):
        for checkpoint in (False, True):
            best, median, memory = gradient_cost(n, checkpoint, grad_shape, repeats=2 if args.quick else 3)
            grad_rows.append(dict(steps=n, checkpoint=checkpoint, seconds=(best, median), temp_bytes=memory))
            print(f"| {n} | {checkpoint} | {best:.3f} / {median:.3f} | {memory / 2**20:.1f} MiB |")

    dtype_shape = (1, 4, 32, 32) if args.quick else (16, 4, 64, 64)
    print(f"\n4. invert per step, order 2, {'x'.join(map(str, dtype_shape))}: float32 vs bfloat16 samples")
    print("| dtype | us per step (best / median) |")
    print("|---|---|")
    dtype_rows = []
    for dtype in (jnp.float32, jnp.bfloat16):
        t = per(timed(dpmjax_invert_with(lambda x, t, p: (p * x).astype(x.dtype), 0.1, dtype_shape, steps, 2, dtype), repeats))
        dtype_rows.append(dict(dtype=jnp.dtype(dtype).name, invert=t))
        print(f"| {jnp.dtype(dtype).name} | {fmt(t)} |")

    conv_shape = (1, 4, 32, 32) if args.quick else (1, 4, 64, 64)
    model, params = conv_model(conv_shape)
    print(f"\n5. a small Flax conv model ({'x'.join(map(str, conv_shape))}, three 3x3 convs of width 32): scheduler share")
    print("| order | model alone (scan) | invert with the model | scheduler share |")
    print("|---|---|---|---|")
    alone = per(timed(model_only(model, params, conv_shape, steps), repeats))
    conv_rows = []
    for order in orders:
        with_model = per(timed(dpmjax_invert_with(model, params, conv_shape, steps, order), repeats))
        share = max(0.0, with_model[0] - alone[0]) / with_model[0]
        conv_rows.append(dict(order=order, model_alone=alone, invert=with_model, scheduler_share=share))
        print(f"| {order} | {fmt(alone)} | {fmt(with_model)} | {100 * share:.0f}% |")

    print("\n6. the Flax call pattern: dpmjax's Flax class vs diffusers 0.39's in the same fori_loop (identity model)", end="")
    os.makedirs(args.out, exist_ok=True)
    name = f"{label}{'-quick' if args.quick else ''}"
    flax_rows = flax_loop.compare(quick=args.quick, out=os.path.join(args.out, f"{name}-flax_loop.json"))
    with open(os.path.join(args.out, f"{name}.json"), "w") as f:
        json.dump(dict(device=device.device_kind, platform=device.platform, jax=jax.__version__, steps=steps, rows=rows,
                       compile=compile_rows, gradient=grad_rows, dtypes=dtype_rows, conv_model=conv_rows,
                       flax_loop=flax_rows), f, indent=1)
    plot(rows, os.path.join(args.out, f"{name}.png"), f"{device.device_kind}: per-step cost, {steps}-step inversion")
    print(f"wrote {args.out}/{name}.json and .png")
    return 0


def plot(rows, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4))
    labels = [f"{'x'.join(map(str, r['shape']))}\norder {r['order']}" for r in rows]
    series = [("diffusers", "diffusers loop"), ("step_loop", "dpmjax step loop"), ("user_scan", "step in a user's scan"),
              ("invert", "dpmjax invert"), ("invert_unroll10", "invert, unroll 10"), ("floor", "floor scan")]
    width = 0.14
    for i, (key, name) in enumerate(series):
        ax.bar(np.arange(len(rows)) + (i - 2.5) * width, [r[key][0] for r in rows], width, label=name)
    ax.set_yscale("log")
    ax.set_xticks(np.arange(len(rows)), labels, fontsize=6, rotation=30)
    ax.set_ylabel("microseconds per step (best)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())

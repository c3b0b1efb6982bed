"""Measurements of the trajectory layer, printed as markdown tables for the README:

1. round trip ``sample(invert(x))`` on Gaussian-mixture data (float32), plain vs exact inversion;
2. peak temporary memory of ``jax.grad`` through a sampling trajectory, with and without
   checkpointing, read from the compiled program (``memory_analysis()``).

    python benchmarks/trajectory_report.py
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

import dpmjax
from dpmjax.models.analytic import GaussianMixture, timestep_model

DATA = GaussianMixture()


def round_trips(orders=(1, 2, 3), steps=(5, 10, 25, 50)):
    print("| order | N | plain | exact | exact / plain | sweeps | Newton its | seconds (exact) |")
    print("|---|---|---|---|---|---|---|---|")
    x0 = DATA.sample(jax.random.PRNGKey(0), (256, 16))
    scale = float(jnp.max(jnp.abs(x0)))
    for order in orders:
        fwd = dpmjax.DPMSolverMultistepScheduler(solver_order=order)
        model = timestep_model(DATA, fwd.config)
        for n in steps:
            plain = dpmjax.sample(model, dpmjax.invert(model, x0, fwd, n).sample, fwd, n).sample
            start = time.perf_counter()
            exact = dpmjax.invert(model, x0, fwd, n, exact=True)
            exact.sample.block_until_ready()
            seconds = time.perf_counter() - start
            recon = dpmjax.sample(model, exact.sample, fwd, n).sample
            e_plain = float(jnp.max(jnp.abs(plain - x0))) / scale
            e_exact = float(jnp.max(jnp.abs(recon - x0))) / scale
            print(f"| {order} | {n} | {e_plain:.1e} | {e_exact:.1e} | {e_exact / e_plain:.0e} | {int(exact.sweeps)} | {int(exact.iterations)} | {seconds:.1f} |")


def gradient_memory(width=64, steps=(5, 50)):
    w1 = jax.random.normal(jax.random.PRNGKey(0), (16, 16 * width)) / 4.0
    w2 = jax.random.normal(jax.random.PRNGKey(1), (16 * width, 16)) / (4.0 * np.sqrt(width))

    def model(x, t, params):
        a, b = params
        return jnp.tanh(jnp.tanh(x @ a) @ b) * (t / 1000.0)

    fwd = dpmjax.DPMSolverMultistepScheduler()
    noise = jnp.zeros((32, 16))
    print(f"model: 2-layer MLP, activations {width}x the sample (32x16 float32 = 2 KiB)")
    print("| steps | checkpoint | temp memory of grad (compiled) |")
    print("|---|---|---|")
    for checkpoint in (False, True):
        for n in steps:
            loss = lambda p, x: jnp.sum(dpmjax.sample(model, x, fwd, n, cond=p, checkpoint=checkpoint).sample ** 2)  # noqa: E731
            compiled = jax.jit(jax.grad(loss)).lower((w1, w2), noise).compile()
            print(f"| {n} | {checkpoint} | {compiled.memory_analysis().temp_size_in_bytes / 1024:.0f} KiB |")


if __name__ == "__main__":
    print(f"jax {jax.__version__} on {jax.default_backend()}\n")
    round_trips()
    print()
    gradient_memory()

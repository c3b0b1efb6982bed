"""The cost of a gradient through a whole trajectory, over the forward pass, on the shipped digits
MLP (unguided, w = 1; 16 rows): ``sample``, plain ``invert`` (with and without ``checkpoint=True``) and
exact ``invert`` (implicit differentiation), N = 10, 25, 50.

    python -m benchmarks.gradients [--steps 10 25 50] [--quick]

Per call: the steady time of the forward pass and of ``jax.value_and_grad`` of a scalar of its
output (w.r.t. the data, or the noise for ``sample``), their ratio, the compiled programs' temporary
memory (XLA's ``memory_analysis``), and for exact inversion the model calls of the forward solve and
of the gradient. A vector-Jacobian product of the model runs no callback, so the reverse pass of
exact inversion (GMRES on vector-Jacobian products of the sampler) shows in its time, not its count. Writes ``benchmarks/results/gradients.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp

import dpmjax
from dpmjax.apps.digits_job import guided_model
from dpmjax.models import digits

ROWS = 16


def steady(fn, repeats: int) -> float:
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def temp_bytes(fn, *args) -> int:
    analysis = jax.jit(fn).lower(*args).compile().memory_analysis()
    return int(getattr(analysis, "temp_size_in_bytes", 0)) if analysis is not None else 0


def measure(kind: str, n: int, repeats: int) -> dict:
    model = digits.load("mlp")
    labels = jnp.arange(ROWS) % 10
    base = guided_model(model, labels, 1.0)
    calls = [0]

    def counted(x, t):
        out = base(x, t)
        # data-dependent, so that no transformation hoists it out of the loop
        jax.debug.callback(lambda _: calls.__setitem__(0, calls[0] + 1), out.reshape(-1)[0])
        return out

    sched = dpmjax.DPMSolverMultistepScheduler(solver_order=2, use_lu_lambdas=True, final_sigmas_type="sigma_min")
    images = jnp.asarray(digits.heldout()[0][:ROWS])
    weights = jax.random.normal(jax.random.PRNGKey(1), images.shape)
    if kind == "sample":
        forward = lambda x: dpmjax.sample(counted, x, sched, n).sample  # noqa: E731
        start = jax.random.normal(jax.random.PRNGKey(0), images.shape)
    elif kind in ("invert", "invert, checkpoint"):
        checkpoint = kind.endswith("checkpoint")
        forward = lambda x: dpmjax.invert(counted, x, sched, n, checkpoint=checkpoint).sample  # noqa: E731
        start = images
    else:
        forward = lambda x: dpmjax.invert(counted, x, sched, n, exact=True).sample  # noqa: E731
        start = images
    loss = lambda x: jnp.sum(weights * forward(x))  # noqa: E731
    grad = jax.value_and_grad(loss)
    row = dict(call=kind, steps=n)
    jitted_forward, jitted_grad = jax.jit(forward), jax.jit(grad)
    calls[0] = 0
    jax.block_until_ready(jitted_forward(start))
    row["forward_calls"] = calls[0]
    calls[0] = 0
    jax.block_until_ready(jitted_grad(start))
    row["gradient_calls"] = calls[0]
    row["forward_s"] = steady(lambda: jitted_forward(start), repeats)
    row["gradient_s"] = steady(lambda: jitted_grad(start), repeats)
    row["ratio"] = row["gradient_s"] / row["forward_s"]
    row["forward_temp_mib"] = temp_bytes(forward, start) / 2**20
    row["gradient_temp_mib"] = temp_bytes(grad, start) / 2**20
    return row


def table(rows) -> str:
    lines = ["| call | N | forward s | gradient s | gradient / forward | model calls forward / gradient "
             "| temp MiB forward / gradient |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['call']} | {r['steps']} | {r['forward_s']:.4f} | {r['gradient_s']:.4f} | {r['ratio']:.2f} "
                     f"| {r['forward_calls']} / {r['gradient_calls']} "
                     f"| {r['forward_temp_mib']:.2f} / {r['gradient_temp_mib']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 25, 50])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="N = 10, one repeat, no exact inversion (CI)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "gradients.json"))
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.repeats = [10], 1
    rows = []
    for n in args.steps:
        for kind in ("sample", "invert", "invert, checkpoint") + (() if args.quick else ("invert, exact",)):
            rows.append(measure(kind, n, args.repeats))
            print(table(rows[-1:]).splitlines()[-1], flush=True)
    print(table(rows))
    if not args.quick:
        with open(args.out, "w") as f:
            json.dump(dict(rows=rows, device=jax.devices()[0].device_kind, rows_per_call=ROWS), f, indent=1)
        with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
            f.write("# Gradients through whole trajectories (digits MLP, w = 1, 16 rows, Lu grid, order 2)\n\n"
                    + table(rows) + "\n")


if __name__ == "__main__":
    main()

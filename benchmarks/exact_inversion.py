"""Exact inversion on the shipped digits model: rows exact, PSNR, noise NMSE, model calls and seconds
per step beside plain inversion (one model call per step), per order, steps, guidance and grid.

    python -m benchmarks.exact_inversion [--model mlp unet] [--rows 32] [--max-calls-per-step B] [--quick] [--out benchmarks/results/exact_inversion.json]

Real data: held-out digits (never seen in training). Generated data: the sampler's own outputs from
known noise, so the noise-space error (NMSE = |z - z_true|^2 / |z_true|^2, as Hong et al. report) is
measurable. Model calls are counted with a host callback inside the model (a Jacobian-vector product
counts once); times are the steady (second) call, first call includes compilation.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

import dpmjax
from dpmjax.apps.digits_job import guided_model, psnr
from dpmjax.models import digits

GRIDS = {"lu": dict(use_lu_lambdas=True), "default": {}}


def measure(model, images, labels, order, n, w, grid, data, name="mlp", budget=None, per_row=False):
    fwd = dpmjax.DPMSolverMultistepScheduler(solver_order=order, final_sigmas_type="sigma_min", **GRIDS[grid])

    def base(x, t, row_labels):  # the labels go in as cond: exact inversion can then finish hard rows apart
        return guided_model(model, row_labels, w)(x, t)

    settings = dpmjax.ExactInversion(max_calls_per_step=budget)
    calls, evaluations = [0], [0]

    def count(rows_evaluated):
        calls[0] += 1
        evaluations[0] += rows_evaluated.shape[0]

    def counted(x, t, row_labels):
        out = base(x, t, row_labels)
        jax.debug.callback(count, out.reshape(out.shape[0], -1)[:, 0])
        return out

    noise_true = None
    if data == "generated":
        noise_true = jax.random.normal(jax.random.PRNGKey(1), images.shape)
        images = dpmjax.sample(base, noise_true, fwd, n, cond=labels).sample
    dpmjax.invert(base, images, fwd, n, cond=labels).sample.block_until_ready()
    start = time.perf_counter()
    plain = dpmjax.invert(base, images, fwd, n, cond=labels).sample.block_until_ready()
    plain_seconds = time.perf_counter() - start
    start = time.perf_counter()
    dpmjax.invert(base, images, fwd, n, exact=settings, cond=labels).sample.block_until_ready()
    first = time.perf_counter() - start
    start = time.perf_counter()
    exact = dpmjax.invert(base, images, fwd, n, exact=settings, cond=labels)
    exact.sample.block_until_ready()
    steady = time.perf_counter() - start
    dpmjax.invert(counted, images, fwd, n, exact=settings, cond=labels).sample.block_until_ready()
    sample_of = lambda z: dpmjax.sample(base, z, fwd, n, cond=labels).sample  # noqa: E731
    row = {
        "model": name, "order": order, "steps": n, "guidance": w, "grid": grid, "data": data, "rows": int(images.shape[0]),
        "rows_exact": int(jnp.sum(exact.converged)), "round_trip_max": float(jnp.max(exact.round_trip)),
        "psnr_plain": psnr(sample_of(plain), images),
        "psnr_exact": psnr(sample_of(exact.sample), images),
        "calls_per_step": calls[0] / n, "row_evaluations_per_step": evaluations[0] / n / int(images.shape[0]),
        "seconds_first": first, "seconds_steady": steady,
        "plain_seconds": plain_seconds, "ratio": steady / plain_seconds,
        "sweeps": int(exact.sweeps), "newton_iterations": int(exact.iterations),
        "budget": budget, "solve_calls_per_step": float(exact.model_calls),
        "round_trip_median": float(jnp.median(exact.round_trip)),
    }
    if noise_true is not None:
        for name, z in (("nmse_plain", plain), ("nmse_exact", exact.sample)):
            row[name] = float(jnp.sum((z - noise_true) ** 2) / jnp.sum(noise_true ** 2))
    if per_row:  # each row inverted alone (a batch of one, as Hong et al. invert one image at a time)
        alone, exact_alone = [], 0
        for i in range(int(images.shape[0])):
            calls[0] = 0
            one = dpmjax.invert(counted, images[i:i + 1], fwd, n, exact=settings, cond=labels[i:i + 1])
            one.sample.block_until_ready()
            alone.append(calls[0] / n)
            exact_alone += int(one.converged[0])
        row.update(per_row_calls=alone, per_row_exact=exact_alone,
                   per_row_calls_median=float(np.median(alone)), per_row_calls_worst=float(np.max(alone)))
    return row


def table(rows) -> str:
    lines = ["| model | data | grid | order | N | w | rows exact | PSNR plain / exact (dB) | noise NMSE plain / exact | "
             "budget | model calls per step | row evaluations per row and step | s first / steady | steady / plain | "
             "alone: rows exact, calls per step median / worst |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        nmse = f"{r['nmse_plain']:.1e} / {r['nmse_exact']:.1e}" if "nmse_exact" in r else "-"
        lines.append(f"| {r['model']} | {r['data']} | {r['grid']} | {r['order']} | {r['steps']} | {r['guidance']:g} | {r['rows_exact']}/{r['rows']} | "
                     f"{r['psnr_plain']:.1f} / {r['psnr_exact']:.1f} | {nmse} | {r.get('budget') or '-'} | {r['calls_per_step']:.0f} | "
                     f"{r.get('row_evaluations_per_step', r['calls_per_step']):.0f} | "
                     f"{r['seconds_first']:.1f} / {r['seconds_steady']:.2f} | {r['ratio']:.0f}x | " + (
                     f"{r['per_row_exact']}/{r['rows']}, {r['per_row_calls_median']:.0f} / {r['per_row_calls_worst']:.0f} |"
                     if "per_row_calls" in r else "- |"))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.exact_inversion", description=__doc__.splitlines()[0])
    parser.add_argument("--model", nargs="+", default=list(digits.MODELS), choices=digits.MODELS)
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--first", type=int, default=0, help="the first held-out digit used (rows first .. first + rows)")
    parser.add_argument("--orders", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 25, 50])
    parser.add_argument("--guidance", type=float, nargs="+", default=[1.0, 3.0])
    parser.add_argument("--data", nargs="+", default=["real", "generated"], choices=["real", "generated"])
    parser.add_argument("--grids", nargs="+", default=list(GRIDS), choices=list(GRIDS),
                        help="the default grid is measured at guidance 1, N = 25 and 50, orders 1 and 2")
    parser.add_argument("--max-calls-per-step", type=int, default=None,
                        help="exact inversion's budget of model calls per step (ExactInversion.max_calls_per_step)")
    parser.add_argument("--per-row", action="store_true",
                        help="also invert each row alone and report its model calls per step (median, worst)")
    parser.add_argument("--append", action="store_true", help="add to the rows already in --out")
    parser.add_argument("--quick", action="store_true", help="two settings only (CI)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "exact_inversion.json"))
    args = parser.parse_args(argv)
    images, labels = digits.heldout()
    images, labels = jnp.asarray(images[args.first: args.first + args.rows]), jnp.asarray(labels[args.first: args.first + args.rows])
    settings = [(o, n, w, "lu", d) for d in args.data for o in args.orders for n in args.steps for w in args.guidance
                if "lu" in args.grids]
    settings += [(o, n, 1.0, "default", d) for d in args.data for o in (1, 2) for n in (25, 50)
                 if o in args.orders and n in args.steps and "default" in args.grids]
    if args.quick:  # one model (the first asked for), two settings: keeps the benchmark from rotting
        settings = [(2, 10, 1.0, "lu", "real"), (1, 10, 1.0, "default", "generated")]
        args.model = args.model[:1]
    rows = json.load(open(args.out))["rows"] if args.append and os.path.exists(args.out) else []
    for name in args.model:
        model = digits.load(name)
        for order, n, w, grid, data in settings:
            rows.append(measure(model, images, labels, order=order, n=n, w=w, grid=grid, data=data, name=name,
                                budget=args.max_calls_per_step, per_row=args.per_row))
            rows[-1]["first_row"] = args.first
            print(table(rows[-1:]).splitlines()[-1], flush=True)
            if not args.quick:  # after every row: a long run stopped midway keeps what it measured
                write(rows, args.out)
    print(table(rows))
    return 0


def write(rows, out) -> None:
    """The rows as JSON at ``out`` and as a Markdown table beside it."""
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(os.path.splitext(out)[0] + ".md", "w") as f:
        f.write(f"Measured with `python -m benchmarks.exact_inversion` (jax {jax.__version__}, {jax.default_backend()}, "
                f"{os.cpu_count()} CPU cores). Seconds: first call (with compilation) / steady (second) call; "
                "the last column is the steady time over plain inversion of the same batch timed in the same "
                "process. Model calls are counted inside the model (a Jacobian-vector product counts once); row "
                "evaluations weight each call by the rows it evaluates, per row of the batch and step (the labels "
                "are passed as cond, so exact inversion finishes the rows its fast path leaves in a sub-batch of "
                "their own; rows measured before that, with the labels closed over, have equal counts). The last "
                "column (with --per-row): each row inverted alone, a batch of one as Hong et al. invert one image at "
                "a time: how many came back exact, and the median and worst row's model calls per step.\n\n")
        f.write(table(rows) + "\n")
    with open(out, "w") as f:
        json.dump({"jax": jax.__version__, "backend": jax.default_backend(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    raise SystemExit(main())

"""Does every step of the shipped digits models' sampler invert? :func:`dpmjax.check_step_inversion`
per model, guidance scale, grid and step count; one line per setting listing the steps where some
row did not come back to its true input.

    python -m benchmarks.step_inversion [--model mlp unet] [--guidance 1 3] [--grids default lu karras]
                                        [--steps 10 25 50] [--rows 32] [--append] [--out benchmarks/results/step_inversion_check.txt]

Rows: noise from ``PRNGKey(0)``, guided by the true labels of the first held-out digits (the
conditioning passed as ``cond``). Each line is ``model w guidance grid N injective <bool> [(step,
sigma from, sigma to, rows converged elsewhere (the step folds), rows unsolved), ...]``.
"""

from __future__ import annotations

import argparse
import os

import jax
import jax.numpy as jnp
import numpy as np

import dpmjax
from dpmjax.apps.digits_job import guided_model
from dpmjax.models import digits

GRIDS = {"default": {}, "lu": {"use_lu_lambdas": True}, "karras": {"use_karras_sigmas": True}}
HEADER = ("# check_step_inversion: order 2, final_sigmas_type=sigma_min, {rows} rows (noise: PRNGKey(0)), guidance by the "
          "true labels of the first {rows} held-out digits\n"
          "# per grid: the steps where some row did not come back to its true input: (step, sigma from, sigma to, rows "
          "converged elsewhere (fold), rows unsolved)\n")


def line(name: str, w: float, grid: str, n: int, report) -> str:
    """One setting's line: the steps where some row missed its true input."""
    missed = [(k + 1, round(float(report.sigma_from[k]), 3), round(float(report.sigma_to[k]), 3),
               int(report.elsewhere[k]), int(report.unsolved[k]))
              for k in range(len(report.sigma_from)) if report.elsewhere[k] or report.unsolved[k]]
    return f"{name} w {float(w)} {grid} {n} injective {not missed} {missed}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.step_inversion", description=__doc__.splitlines()[0])
    parser.add_argument("--model", nargs="+", default=list(digits.MODELS), choices=digits.MODELS)
    parser.add_argument("--guidance", type=float, nargs="+", default=[1.0, 3.0])
    parser.add_argument("--grids", nargs="+", default=list(GRIDS), choices=list(GRIDS))
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 25, 50])
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--append", action="store_true", help="add to the lines already in --out")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "step_inversion_check.txt"))
    args = parser.parse_args(argv)
    labels = jnp.asarray(digits.heldout()[1][: args.rows])
    noise = jax.random.normal(jax.random.PRNGKey(0), (args.rows, *digits.SHAPE))
    text = open(args.out).read() if args.append and os.path.exists(args.out) else HEADER.format(rows=args.rows)
    for name in args.model:
        model = digits.load(name)
        for w in args.guidance:
            def guided(x, t, row_labels, w=w):
                return guided_model(model, row_labels, w)(x, t)

            for grid in args.grids:
                for n in args.steps:
                    scheduler = dpmjax.DPMSolverMultistepScheduler(solver_order=2, final_sigmas_type="sigma_min", **GRIDS[grid])
                    report = dpmjax.check_step_inversion(guided, noise, scheduler, n, cond=labels)
                    text += line(name, w, grid, n, report) + "\n"
                    print(text.splitlines()[-1], flush=True)
                    write(text, args.out)
    return 0


def write(text: str, out: str) -> None:
    """``text`` at ``out``, whole (a temporary file beside it, renamed)."""
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    temporary = out + ".tmp"
    with open(temporary, "w") as f:
        f.write(text)
    os.replace(temporary, out)


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    raise SystemExit(main())

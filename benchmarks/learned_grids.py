"""Learned grids (LD3-style, :func:`dpmjax.learn_grid`) against hand-made grids on the shipped
digits models, judged on held-out noise the training never saw.

    python -m benchmarks.learned_grids [--models mlp unet] [--steps 4 5 6 8 10] [--guidance 1 3] [--quick]

For each model, guidance scale ``w`` and step count ``N``: a grid is learned from 256 training
noises (labels 0-9 in turn) against a 100-step teacher; then, on 500 held-out noises, each grid's
samples are compared with the teacher's (RMSE per pixel), read by the digits classifier (accuracy
on the requested label) and summarised by a Frechet distance between the classifier's logits of
the samples and of the 359 held-out real digits. Every grid runs the same sampler: DPM-Solver++(2M),
``final_sigmas_type="sigma_min"``. Writes ``benchmarks/results/learned_grids.{json,md}``.
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
from dpmjax.apps.digits_job import guided_model
from dpmjax.models import digits

CONFIG = dict(solver_order=2, final_sigmas_type="sigma_min")
HAND_MADE = {"default": {}, "lu": dict(use_lu_lambdas=True), "karras": dict(use_karras_sigmas=True)}
TRAIN_ROWS, TEST_ROWS, TEACHER_STEPS = 256, 500, 100


def logits(classifier, images):
    w, b = classifier
    return np.asarray(images.reshape(images.shape[0], -1) @ w + b, np.float64)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """``|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2))`` of two feature sets (rows)."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    roots = np.sqrt(np.clip(np.linalg.eigvals(cov_a @ cov_b).real, 0.0, None))
    return float(np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a) + np.trace(cov_b) - 2.0 * roots.sum())


def hand_made_sigmas(name: str, n: int) -> jax.Array:
    sched = dpmjax.DPMSolverMultistepScheduler(**CONFIG, **HAND_MADE[name])
    return sched.set_timesteps(sched.create_state(), n, (1,)).sigmas[: n + 1]


def measure(name: str, w: float, n: int, *, iterations: int, real_logits: np.ndarray) -> dict:
    model = digits.load(name)

    def conditional(x, t, labels):
        return guided_model(model, labels, w)(x, t)

    sched = dpmjax.DPMSolverMultistepScheduler(**CONFIG)
    train_noise = jax.random.normal(jax.random.PRNGKey(0), (TRAIN_ROWS, 1, 8, 8))
    train_labels = jnp.arange(TRAIN_ROWS) % 10
    learned = dpmjax.learn_grid(conditional, sched, n, train_noise, cond=train_labels, iterations=iterations,
                                teacher_steps=TEACHER_STEPS, progress=False)
    test_noise = jax.random.normal(jax.random.PRNGKey(1000), (TEST_ROWS, 1, 8, 8))
    test_labels = jnp.arange(TEST_ROWS) % 10
    teacher = dpmjax.sample(conditional, test_noise, sched, TEACHER_STEPS, cond=test_labels).sample
    grids = {"learned": jnp.asarray(learned.sigmas)} | {k: hand_made_sigmas(k, n) for k in HAND_MADE}
    row = dict(model=name, guidance=w, steps=n, train_seconds=round(learned.seconds, 1), improved=learned.improved,
               learned_sigmas=[float(s) for s in learned.sigmas])
    for grid, sigmas in grids.items():
        out = dpmjax.sample(conditional, test_noise, sched, sigmas=sigmas, cond=test_labels).sample
        row[grid] = dict(rmse=float(jnp.sqrt(jnp.mean((out - teacher) ** 2))),
                         accuracy=float(jnp.mean(digits.classify(model.classifier, out) == test_labels)),
                         frechet=frechet_distance(logits(model.classifier, out), real_logits))
    row["teacher"] = dict(accuracy=float(jnp.mean(digits.classify(model.classifier, teacher) == test_labels)),
                          frechet=frechet_distance(logits(model.classifier, teacher), real_logits))
    best = min(HAND_MADE, key=lambda k: row[k]["rmse"])
    row["best_hand_made"] = best
    row["rmse_ratio"] = row["learned"]["rmse"] / row[best]["rmse"]
    return row


def table(rows) -> str:
    lines = ["| model | w | N | learned RMSE | default | Lu | Karras | learned / best hand-made | accuracy learned / default "
             "| Frechet learned / default (teacher) | training s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['guidance']:g} | {r['steps']} | {r['learned']['rmse']:.4f} | {r['default']['rmse']:.4f} "
            f"| {r['lu']['rmse']:.4f} | {r['karras']['rmse']:.4f} | {r['rmse_ratio']:.2f} ({r['best_hand_made']}) "
            f"| {r['learned']['accuracy']:.3f} / {r['default']['accuracy']:.3f} "
            f"| {r['learned']['frechet']:.2f} / {r['default']['frechet']:.2f} ({r['teacher']['frechet']:.2f}) "
            f"| {r['train_seconds']} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(digits.MODELS), choices=digits.MODELS)
    parser.add_argument("--steps", type=int, nargs="+", default=[4, 5, 6, 8, 10])
    parser.add_argument("--guidance", type=float, nargs="+", default=[1.0, 3.0])
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--quick", action="store_true", help="one small setting (CI): MLP, N = 4, w = 1, 20 iterations")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "learned_grids.json"))
    args = parser.parse_args(argv)
    if args.quick:
        args.models, args.steps, args.guidance, args.iterations = ["mlp"], [4], [1.0], 20
    images, _ = digits.heldout()
    real_logits = logits(digits.load("mlp").classifier, jnp.asarray(images))
    rows = []
    began = time.perf_counter()
    for name in args.models:
        for w in args.guidance:
            for n in args.steps:
                rows.append(measure(name, w, n, iterations=args.iterations, real_logits=real_logits))
                print(table(rows[-1:]).splitlines()[-1], flush=True)
    text = table(rows)
    print(text)
    print(f"total {time.perf_counter() - began:.0f} s on {jax.devices()[0].device_kind}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(dict(rows=rows, device=jax.devices()[0].device_kind, iterations=args.iterations,
                       train_rows=TRAIN_ROWS, test_rows=TEST_ROWS, teacher_steps=TEACHER_STEPS), f, indent=1)
    with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
        f.write("# Learned grids on the shipped digits models\n\n" + text + "\n")


if __name__ == "__main__":
    main()

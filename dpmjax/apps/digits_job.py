"""The main job: invert real held-out handwritten digits to noise with the shipped model and sample
them back, plain vs exact inversion, with and without classifier-free guidance.

For each number of steps N and guidance scale w, the held-out digits are inverted with the
guided model (label = the digit's true label, scale w) through ``dpmjax.invert`` on the sampler's
mirrored grid (plain, and exact), then sampled back with the same guided model; and by null-text
inversion (the null label's embedding tuned per step with optax to retrace the w = 1 inversion).
PSNR (peak-to-peak 2, images in [-1, 1]) of the reconstruction against the original. Also: guided samples from pure noise scored by
the shipped classifier, with and without dynamic thresholding (pixel space is where it matters).
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ..models import digits
from ..scheduler import DPMSolverMultistepScheduler
from ..trajectories import progress as progress_line
from ..trajectories.guidance import classifier_free_guidance
from ..trajectories.inversion import invert
from ..trajectories.null_text import null_text_inversion
from ..trajectories.scan import sample
from .messages import fail

GRIDS = {"lu": {"use_lu_lambdas": True}, "default": {}}


def psnr(x: jax.Array, reference: jax.Array) -> float:
    """Peak signal-to-noise ratio in dB of images in [-1, 1] (peak-to-peak 2), over the whole batch."""
    mse = float(jnp.mean((jnp.asarray(x, jnp.float32) - jnp.asarray(reference, jnp.float32)) ** 2))
    return float("inf") if mse == 0.0 else 10.0 * np.log10(4.0 / mse)


def guided_model(model: digits.Digits, labels: jax.Array, scale: float):
    null = jnp.full_like(labels, digits.NULL_LABEL)
    return classifier_free_guidance(model.conditional, labels, null, guidance_scale=scale)


def reconstruct(model, images, labels, *, scheduler, n: int, scale: float, exact: bool, progress: bool = False):
    """``(noise, reconstruction)`` of ``images`` through ``n``-step inversion and sampling at guidance ``scale``."""
    noise, recon, _ = reconstruct_counted(model, images, labels, scheduler=scheduler, n=n, scale=scale, exact=exact,
                                          progress=progress)
    return noise, recon


def reconstruct_counted(model, images, labels, *, scheduler, n: int, scale: float, exact: bool, progress: bool = False):
    """:func:`reconstruct` and the number of rows whose round trip converged (exact inversion; None for plain)."""
    fn = guided_model(model, labels, scale)
    result = invert(fn, images, scheduler, num_inference_steps=n, exact=exact, progress=progress)
    converged = int(jnp.sum(result.converged)) if exact else None
    return result.sample, sample(fn, result.sample, scheduler, num_inference_steps=n, progress=progress).sample, converged


def reconstruct_null_text(model, images, labels, *, scheduler, n: int, scale: float, inner_steps: int, progress: bool = False):
    """``(noise, reconstruction)`` by null-text inversion: the null label embedding tuned per step
    (optax Adam, learning rate 1e-2, ``inner_steps`` per step) to retrace the ``w = 1`` inversion."""
    result = null_text_inversion(model.conditional, images, scheduler, num_inference_steps=n, cond=model.embed(labels),
                                 uncond=model.embed(jnp.full_like(labels, digits.NULL_LABEL)), guidance_scale=scale,
                                 inner_steps=inner_steps, progress=progress)
    return result.noise, result.reconstruction


def sample_quality(model, scheduler_config, count: int, n: int, scale: float, thresholding: bool, seed: int = 0):
    """``(accuracy, fraction of pixels outside [-1.05, 1.05])`` of guided samples of every class (the
    margin allows for the sampler's final noise level, sigma_min ~ 0.01)."""
    labels = jnp.arange(count) % 10
    noise = jax.random.normal(jax.random.PRNGKey(seed), (count,) + digits.SHAPE)
    scheduler = DPMSolverMultistepScheduler(scheduler_config.replace(thresholding=thresholding, sample_max_value=1.0))
    images = sample(guided_model(model, labels, scale), noise, scheduler, num_inference_steps=n).sample
    accuracy = float(jnp.mean(digits.classify(model.classifier, images) == labels))
    return accuracy, float(jnp.mean(jnp.abs(images) > 1.05)), images


def plot_grid(rows, titles, path: str, suptitle: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    count = rows[0].shape[0]
    fig, axes = plt.subplots(len(rows), count, figsize=(0.9 * count, 1.0 * len(rows) + 0.4), squeeze=False)
    for r, (images, title) in enumerate(zip(rows, titles)):
        for c in range(count):
            ax = axes[r, c]
            noise = title.startswith("noise")  # noise rows on their own scale
            ax.imshow(np.asarray(images[c, 0]), cmap="gray_r", vmin=None if noise else -1.0, vmax=None if noise else 1.0)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(title, fontsize=7, rotation=0, ha="right", va="center")
    fig.suptitle(suptitle, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="dpmjax digits", description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 25], help="inference steps (default: 10 25)")
    parser.add_argument("--guidance", type=float, nargs="+", default=[1.0, 7.5], help="guidance scales (default: 1 7.5)")
    parser.add_argument("--count", type=int, default=100, help="held-out digits to invert (default: 100)")
    parser.add_argument("--model", default="mlp", choices=digits.MODELS,
                        help="the shipped network: mlp (residual MLP, default) or unet (Stable-Diffusion-style UNet)")
    parser.add_argument("--order", type=int, default=2, choices=(1, 2, 3), help="solver order (default: 2)")
    parser.add_argument("--grid", default="lu", choices=tuple(GRIDS),
                        help="noise levels: lu = uniform in log-SNR (default: every step of this model's sampler inverts), "
                             "default = diffusers' default (uniform in t; its last step folds, so exact inversion misses rows)")
    parser.add_argument("--no-exact", action="store_true", help="no exact inversion (it takes longer)")
    parser.add_argument("--null-text-steps", type=int, default=20,
                        help="Adam steps per sampler step of null-text inversion (default: 20; the paper's 10 are too few for "
                             "this model; 0: skip it)")
    parser.add_argument("--out", default="dpmjax-digits.png", help="PNG grid path (default: dpmjax-digits.png)")
    args = parser.parse_args(argv)
    problems = []
    if any(n < 1 for n in args.steps):
        problems.append(f"--steps must be >= 1 (got {' '.join(map(str, args.steps))})")
    if any(not w >= 1.0 for w in args.guidance):
        problems.append(f"--guidance scales must be >= 1 (got {' '.join(f'{w:g}' for w in args.guidance)})")
    if args.count < 1:
        problems.append(f"--count must be >= 1 (got {args.count})")
    if args.null_text_steps < 0:
        problems.append(f"--null-text-steps must be >= 0 (got {args.null_text_steps})")
    if problems:  # one line, like argparse's own errors but without the usage
        return fail("dpmjax digits", "; ".join(problems))

    model = digits.load(args.model)
    images, labels = digits.heldout()
    images, labels = jnp.asarray(images[: args.count]), jnp.asarray(labels[: args.count])
    # The sampler ends at the smallest training noise level, not at zero: a final step to zero noise
    # returns the denoiser's output, whose range need not contain a real held-out image.
    scheduler = DPMSolverMultistepScheduler(solver_order=args.order, final_sigmas_type="sigma_min", **GRIDS[args.grid])
    print(f"dpmjax on {jax.default_backend()} (jax {jax.__version__}): {images.shape[0]} held-out 8x8 digits, "
          f"{args.model} model, DPM-Solver++ order {args.order}, {args.grid} grid ending at sigma_min, float32")
    print("round trip PSNR (dB) of sample(invert(x)) against x, guided by the true label at scale w")
    methods = ["plain"] + ([] if args.no_exact else ["exact"]) + (["null-text"] if args.null_text_steps else [])
    columns = [c for m in methods for c in ([m, "rows exact"] if m == "exact" else [m])]
    print("| N | w | " + " | ".join(columns) + " |")
    print("|---|---|" + "---|" * len(columns))
    start = time.perf_counter()
    table = {}
    shown = None
    runs, total = 0, len(args.steps) * len(args.guidance) * len(methods)
    for n in args.steps:
        for w in args.guidance:
            cells = []
            for method in methods:
                progress_line.show("digits", runs, total, unit="runs", suffix=f"  now: N={n} w={w:g} {method}")
                if method == "null-text":
                    noise, recon = reconstruct_null_text(model, images, labels, scheduler=scheduler, n=n, scale=w,
                                                         inner_steps=args.null_text_steps)
                else:
                    noise, recon, converged = reconstruct_counted(model, images, labels, scheduler=scheduler, n=n, scale=w,
                                                                  exact=method == "exact")
                runs += 1
                table[(n, w, method)] = psnr(recon, images)
                cells.append(f"{table[(n, w, method)]:.1f}")
                if method == "exact":
                    cells.append(f"{converged}/{images.shape[0]}")
                if n == args.steps[len(args.steps) // 2] and w == args.guidance[-1]:
                    shown = (shown or {}) | {method: (noise, recon)}
            progress_line.clear()
            print(f"| {n} | {w:g} | " + " | ".join(cells) + " |", flush=True)

    n_quality = args.steps[len(args.steps) // 2]
    w_quality = args.guidance[-1]
    print(f"\nguided samples from noise (N={n_quality}, w={w_quality:g}, one per class x {max(1, args.count // 10)}): "
          "classifier accuracy, pixels outside [-1.05, 1.05]")
    for thresholding in (False, True):
        accuracy, outside, _ = sample_quality(model, scheduler.config, max(10, args.count), n=n_quality, scale=w_quality,
                                              thresholding=thresholding)
        print(f"  thresholding={thresholding}: accuracy {accuracy:.2f}, outside {100 * outside:.1f}% of pixels")

    k = min(10, images.shape[0])
    rows, titles = [images[:k]], ["original"]
    for method in methods:
        noise, recon = shown[method]
        rows += [noise[:k], recon[:k]]
        titles += [f"noise ({method})", f"{method}: {psnr(recon, images):.0f} dB"]
    plot_grid(rows, titles, args.out,
              suptitle=f"held-out digits, N={args.steps[len(args.steps) // 2]}, guidance {args.guidance[-1]:g}")
    print(f"wrote {args.out} ({time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

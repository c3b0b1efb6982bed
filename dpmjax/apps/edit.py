"""``dpmjax edit``: edit images with a saved diffusers 0.39 Flax Stable Diffusion pipeline.

Encodes the images, inverts them with the source prompt (exact, plain or null-text), samples with
the target prompt, decodes, and writes one PNG with a row per image (original | edited); see
:func:`dpmjax.models.flax_sd_edit.edit_images` for the library call it makes.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

import jax.numpy as jnp
import numpy as np

from ..models import flax_sd
from ..models.flax_sd_edit import (
    INSTALL,
    METHODS,
    edit_images,
    read_image,
    write_images,
)

# what --out may end with (the ones this Pillow writes are accepted)
OUT_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dpmjax edit",
        description="Edit images with a saved diffusers 0.39 Flax Stable Diffusion pipeline: encode, invert with the "
                    "source prompt, sample with the target prompt, decode. Writes one row per image: original | edited.")
    parser.add_argument("--pipeline", required=True, help="folder of a FlaxStableDiffusionPipeline (save_pretrained layout)")
    parser.add_argument("--image", required=True, action="append", help="input PNG/JPEG (repeat for a batch); "
                        "centre-cropped and resized to the pipeline's size")
    parser.add_argument("--prompt", required=True, help="what the images show (the source prompt)")
    parser.add_argument("--target-prompt", required=True, help="what they should show")
    parser.add_argument("--out", required=True, help="output image (.png, .jpg, .webp, .bmp or .tif; its folder is created)")
    parser.add_argument("--method", choices=METHODS, default="exact")
    parser.add_argument("--steps", type=int, default=50, help="sampler steps (default 50)")
    parser.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale (default 3)")
    parser.add_argument("--order", type=int, choices=(1, 2, 3), default=2, help="DPM-Solver++ order (default 2)")
    parser.add_argument("--size", type=int, default=None, help="image size in pixels (default: the pipeline's)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="weights and compute dtype")
    parser.add_argument("--edited-only", action="store_true", help="write the edited images only (no original column)")
    return parser


def _out_problems(out: str) -> list:
    """What is wrong with ``--out`` (checked before any work): an image extension Pillow writes,
    not a folder, and a folder that exists or can be created (the nearest existing one writable)."""
    from PIL import Image

    Image.init()
    extension = os.path.splitext(out)[1].lower()
    writable = [e for e in OUT_EXTENSIONS if Image.registered_extensions().get(e) in Image.SAVE]
    if extension not in writable:
        found = f"unknown image extension {extension}" if extension else "no image extension"
        return [f"--out {out}: {found} (use one of {', '.join(writable)})"]
    if os.path.isdir(out):
        return [f"--out {out} is a folder, not an image file"]
    folder = os.path.dirname(os.path.abspath(out))
    existing = folder
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return [f"--out {out}: its folder cannot be created ({existing} is not a folder)"]
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "is not writable" if existing == folder else f"cannot be created ({existing} is not writable)"
        return [f"--out {out}: its folder {what}"]
    return []


def _old_flax_stack():
    """``FlaxStableDiffusionPipeline`` of diffusers < 0.40 (with transformers < 5), or a sentence
    saying what is missing and what to install."""
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    found = []
    for name, limit in (("diffusers", (0, 40)), ("transformers", (5, 0))):
        try:
            module = __import__(name)
            version = tuple(int(p) for p in module.__version__.split(".")[:2])
        except Exception:  # noqa: BLE001 - missing, or broken by a mismatched dependency
            found.append(f"{name} missing")
            continue
        if version >= limit:
            found.append(f"{name} {module.__version__}")
    if not found:
        try:
            from diffusers import FlaxStableDiffusionPipeline

            return FlaxStableDiffusionPipeline
        except Exception as error:  # noqa: BLE001 - e.g. flax missing
            found.append(f"the Flax pipeline failed to import ({type(error).__name__})")
    raise ImportError(f"dpmjax edit needs diffusers < 0.40 and transformers < 5, the last releases with Flax "
                      f"(found {', '.join(found)}): {INSTALL}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``dpmjax edit`` (options: ``dpmjax edit --help``).

    Encodes the images, inverts them with the source prompt, samples with the target prompt,
    decodes, and writes one PNG with one row per image (original | edited).

    Args:
        argv: The command-line arguments; ``None`` (default) reads ``sys.argv``.

    Returns:
        The exit status: 0 on success; 2 when diffusers < 0.40 / transformers < 5 are missing,
        the pipeline folder or an image is missing or unreadable, ``--out`` is no image path
        that can be written, or ``--steps`` / ``--guidance`` / ``--size`` is out of range.
    """
    args = _parser().parse_args(argv)
    problems = [f"no such image file: {p}" for p in args.image if not os.path.isfile(p)]
    if not os.path.isfile(os.path.join(args.pipeline, "model_index.json")):
        problems.insert(0, f"not a saved pipeline folder (no model_index.json): {args.pipeline}")
    problems += _out_problems(args.out)
    if args.steps < 1:
        problems.append(f"--steps must be >= 1 (got {args.steps})")
    if not args.guidance > 0:
        problems.append(f"--guidance must be > 0 (got {args.guidance:g})")
    if args.size is not None and args.size < 1:
        problems.append(f"--size must be >= 1 (got {args.size})")
    if problems:
        print(f"dpmjax edit: {'; '.join(problems)}", file=sys.stderr)
        return 2
    try:
        Pipeline = _old_flax_stack()
    except ImportError as error:
        print(error, file=sys.stderr)
        return 2
    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    pipeline, params = Pipeline.from_pretrained(args.pipeline, dtype=dtype, safety_checker=None, feature_extractor=None)
    if dtype != jnp.float32:
        params = {k: flax_sd.cast_floating(v, dtype) if k in ("unet", "vae", "text_encoder") else v for k, v in params.items()}
    size = args.size or pipeline.unet.config.sample_size * pipeline.vae_scale_factor
    try:
        images = np.stack([read_image(p, size, size) for p in args.image])
    except OSError as error:
        print(f"dpmjax edit: cannot read an image: {error}", file=sys.stderr)
        return 2
    result = edit_images(pipeline, params, images, source_prompt=args.prompt, target_prompt=args.target_prompt,
                         method=args.method, num_inference_steps=args.steps, guidance_scale=args.guidance,
                         solver_order=args.order, progress=True)
    rows = [[edited] if args.edited_only else [original, edited] for original, edited in zip(images, result.images)]
    write_images(args.out, rows)
    for i, path in enumerate(args.image):
        line = f"{path}: edited"
        if result.round_trip is not None:
            line += (f", exact inversion round trip {float(result.round_trip[i]):.1e} "
                     f"({'converged' if bool(result.converged[i]) else 'NOT converged: try more --steps or lower --guidance'})")
        print(line)
    print(f"wrote {args.out} ({len(rows)} row(s): {'edited' if args.edited_only else 'original | edited'})")
    return 0

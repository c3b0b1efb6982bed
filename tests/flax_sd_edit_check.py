"""Run under diffusers 0.39 and transformers 4.x (both first on sys.path): ``edit_images`` on a tiny
random Flax Stable Diffusion pipeline (``flax_sd.testing.tiny_pipeline``), saved and loaded back with
``FlaxStableDiffusionPipeline.from_pretrained`` as a user would. Prints one JSON object of
measurements; tests/test_flax_sd_edit.py asserts on them.

    PYTHONPATH=<diffusers 0.39>:<transformers 4.x> python tests/flax_sd_edit_check.py OUT_DIR
"""

from __future__ import annotations

import json
import logging
import sys
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
logging.disable(logging.WARNING)

import diffusers  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import transformers  # noqa: E402

import dpmjax  # noqa: E402
from dpmjax.trajectories import scan  # noqa: E402
from dpmjax.apps.images import write_images  # noqa: E402
from dpmjax.models.flax_sd import testing  # noqa: E402
from dpmjax.models.flax_sd import edit as edit_module  # noqa: E402
from dpmjax.models.flax_sd.edit import decode_latents, edit_images, encode_images  # noqa: E402
from dpmjax.models.flax_sd.edit_methods import ExactEdit, NullTextEdit  # noqa: E402

STEPS = 15
GUIDANCE = 3.0
ORDER = 1  # exact inversion of the random UNet compiles in ~30 s at order 1 (order 2: ~2 minutes)
SOURCE, TARGET = "the cat", "a dog"


def test_images() -> np.ndarray:
    """Two smooth 16 px RGB images in [0, 1] (NHWC)."""
    y, x = np.mgrid[0:16, 0:16] / 15.0
    return np.stack([np.stack([x, y, 0.5 + 0.3 * np.sin(6 * x + k)], -1) for k in (0.0, 2.0)]).astype(np.float32)


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


class _Stopped(Exception):
    """Raised by the recording invert once it has seen its arguments (nothing is computed)."""


def exact_settings_passed(pipeline, params, images, settings) -> dict:
    """What edit_images hands invert as ``exact=``, for each way of asking (the call stops there):
    ``method="exact"``, ``method=ExactEdit(inversion=...)`` and ``method="plain"``."""
    seen = []

    def recording_invert(*args, **kwargs):
        seen.append(kwargs["exact"])
        raise _Stopped

    real, edit_module.invert = edit_module.invert, recording_invert
    try:
        asks = {"default": "exact", "given": ExactEdit(inversion=dpmjax.ExactInversion(tolerance=1e-3, max_sweeps=2)),
                "plain": "plain"}
        passed = {}
        for name, method in asks.items():
            try:
                edit_images(pipeline, params, images, SOURCE, TARGET, method=method, **settings)
            except _Stopped:
                passed[name] = repr(seen[-1])
    finally:
        edit_module.invert = real
    return passed


def main(out: Path) -> dict:
    started = time.perf_counter()
    phases: dict = {}

    def phase(name):
        phases[name] = round(time.perf_counter() - started - sum(phases.values()), 1)

    report = {"diffusers": diffusers.__version__, "transformers": transformers.__version__}
    testing.tiny_pipeline(str(out / "pipeline"))
    pipeline, params = diffusers.FlaxStableDiffusionPipeline.from_pretrained(out / "pipeline", safety_checker=None,
                                                                            feature_extractor=None)
    images = test_images()
    write_images(str(out / "a.png"), [[images[0]]])
    write_images(str(out / "b.png"), [[images[1]]])
    phase("build, save, from_pretrained")

    # the VAE's own encode/decode round trip, measured on its own
    latents = encode_images(pipeline.vae, params["vae"], images)
    vae_round_trip = decode_latents(pipeline.vae, params["vae"], latents)
    report["vae"] = {"image_error": [float(np.max(np.abs(vae_round_trip[i] - images[i]))) for i in range(2)],
                     "latent_std": float(jnp.std(latents))}

    settings = dict(num_inference_steps=STEPS, guidance_scale=GUIDANCE, scheduler_config={"solver_order": ORDER})
    # rows 0, 1: the source prompt as target (a reconstruction); row 2: image 0 with another target prompt
    batch = np.concatenate([images, images[:1]])
    result = edit_images(pipeline, params, batch, SOURCE, [SOURCE, SOURCE, TARGET], method="exact", **settings)
    report["exact"] = {
        "round_trip": np.asarray(result.round_trip).tolist(), "converged": np.asarray(result.converged).tolist(),
        "latents_rel": [rel(result.latents[i], result.source_latents[i]) for i in range(3)],
        "reconstruction_rel": [rel(result.reconstruction_latents[i], result.source_latents[i]) for i in range(3)],
        "source_latents_rel_to_encoded": rel(result.source_latents[:2], latents),
        "image_error": [float(np.max(np.abs(result.images[i] - images[i % 2]))) for i in range(3)],
        "image_diff_to_vae_round_trip": [float(np.max(np.abs(result.images[i] - vae_round_trip[i % 2]))) for i in range(3)],
        "edit_image_change": float(np.max(np.abs(result.images[2] - result.images[0]))),
        "edit_latent_change_rel": rel(result.latents[2], result.latents[0]),
        "noise_rel_rows_0_2": rel(result.noise[2], result.noise[0]),
        "shape": list(result.images.shape), "noise_std": float(jnp.std(result.noise))}
    phase("exact")

    rows = {}
    for method, settings_object in (("plain", "plain"), ("null-text", NullTextEdit(inner_steps=3))):
        first = edit_images(pipeline, params, images, SOURCE, TARGET, method=settings_object, reconstruct=True,
                            **settings)
        sizes = (scan.scan_steps_jit._cache_size(),)
        again = edit_images(pipeline, params, images[::-1], ["the dog", "a cat"], SOURCE, method=settings_object,
                            reconstruct=True, **settings)
        rows[method] = {
            "finite": bool(np.all(np.isfinite(first.images)) and np.all(np.isfinite(again.images))),
            "shape": list(first.images.shape),
            "reconstruction_rel": rel(first.reconstruction_latents, first.source_latents),
            "image_change": float(np.max(np.abs(first.images - decode_latents(pipeline.vae, params["vae"],
                                                                                 first.reconstruction_latents)))),
            "recompiled_on_second_call": (scan.scan_steps_jit._cache_size(),) != sizes,
            "losses": None if first.null_text_losses is None else np.asarray(first.null_text_losses).tolist()}
        phase(method)
    report["methods"] = rows
    report["exact_passed"] = exact_settings_passed(pipeline, params, images, settings)
    phase("exact settings passed")
    report["seconds"] = round(time.perf_counter() - started, 1)
    report["phase_seconds"] = phases
    return report


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]))))

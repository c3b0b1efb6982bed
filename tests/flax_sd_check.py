"""Run under diffusers 0.39 (the last release with Flax classes; it must come first on sys.path):
dpmjax's Flax Stable Diffusion path against diffusers' own Flax scheduler loop on the same small
random-initialised UNet of the real architecture. Prints one JSON object of measurements;
tests/test_flax_sd.py asserts on them.

    PYTHONPATH=<folder holding diffusers 0.39> python tests/flax_sd_check.py OUT_DIR [--quick]
"""

from __future__ import annotations

import json
import logging
import sys
import time
import warnings

warnings.filterwarnings("ignore")
logging.disable(logging.WARNING)

import diffusers  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import dpmjax  # noqa: E402
from dpmjax.models import flax_sd  # noqa: E402
from dpmjax.models.flax_sd import testing  # noqa: E402
from dpmjax.trajectories.null_text import null_text_inversion  # noqa: E402

SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
# the Flax class ended at the smallest training noise level (dpmjax.FlaxDPMSolverMultistepScheduler does too)
FLAX_END = dict(final_sigmas_type="sigma_min")


def psnr(x, reference) -> float:
    """PSNR in dB against the reference's own peak-to-peak range."""
    peak = float(jnp.max(reference) - jnp.min(reference))
    return float(10 * np.log10(peak**2 / float(jnp.mean((x - reference) ** 2))))


def old_pipeline_loop(unet, params, config, n, noise, text, uncond, w):
    """diffusers' Flax SD pipeline denoising loop (<= 0.39), in our words: scaled initial noise,
    doubled batch [uncond; text], guidance, ``FlaxDPMSolverMultistepScheduler.step``."""
    scheduler = diffusers.FlaxDPMSolverMultistepScheduler(**config)
    state = scheduler.set_timesteps(scheduler.create_state(), n, noise.shape)
    context = jnp.concatenate([jnp.broadcast_to(uncond, text.shape), text])

    def body(i, carry):
        latents, state = carry
        t = jnp.asarray(state.timesteps, jnp.int32)[i]
        doubled = scheduler.scale_model_input(state, jnp.concatenate([latents, latents]), t)
        out = unet.apply({"params": params}, doubled, jnp.broadcast_to(t, (doubled.shape[0],)),
                         encoder_hidden_states=context.astype(unet.dtype)).sample
        eps_uncond, eps_text = jnp.split(out.astype(latents.dtype), 2)
        return scheduler.step(state, eps_uncond + w * (eps_text - eps_uncond), t, latents).to_tuple()

    latents, _ = jax.jit(lambda x: jax.lax.fori_loop(0, n, body, (x * state.init_noise_sigma, state)))(noise)
    return latents


def main(out_dir: str, quick: bool) -> dict:
    report = {"diffusers": diffusers.__version__}
    started = time.perf_counter()
    phases = {}

    def phase(name):
        phases[name] = round(time.perf_counter() - started - sum(phases.values()), 1)
    unet, params = testing.tiny_unet(seed=0)
    unet.save_pretrained(f"{out_dir}/unet", params=params)
    loaded, loaded_params = flax_sd.load_unet(f"{out_dir}/unet")
    report["loaded_equal"] = bool(all(np.array_equal(a, b) for a, b in
                                      zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(loaded_params))))
    report["parameters"] = int(sum(p.size for p in jax.tree_util.tree_leaves(params)))
    report["blocks"] = [*loaded.down_block_types, *loaded.up_block_types]
    report["cross_attention_layers"] = sum("attentions" in "/".join(map(str, path)) and "attn2" in "/".join(map(str, path))
                                           for path, _ in jax.tree_util.tree_flatten_with_path(params)[0])
    phase("build, save, load")

    rng = np.random.default_rng(0)
    text = jnp.asarray(rng.standard_normal((2, 7, 32)), jnp.float32)
    uncond = jnp.asarray(rng.standard_normal((1, 7, 32)), jnp.float32)
    noise = jnp.asarray(rng.standard_normal((2, 4, 8, 8)), jnp.float32)

    # 1. forward sampling: dpmjax vs diffusers 0.39's Flax loop, float32 and bf16 weights
    cases = {"order2-w7.5-N10": (dict(SD), 10, 7.5), "order3-trailing-heun-w1-N8": (dict(SD, solver_order=3, timestep_spacing="trailing", solver_type="heun"), 8, 1.0)}
    report["sampling"] = {}
    for name, (config, n, w) in cases.items():
        ours = dpmjax.sample(flax_sd.guided_unet(loaded, w), noise, dpmjax.DPMSolverMultistepScheduler(**config, **FLAX_END), n,
                             cond=flax_sd.UNetInputs(loaded_params, text, uncond)).sample
        theirs = old_pipeline_loop(loaded, loaded_params, config, n, noise, text, uncond, w)
        report["sampling"][name] = {"max_abs_diff": float(jnp.max(jnp.abs(ours - theirs))),
                                    "scale": float(jnp.max(jnp.abs(theirs)))}
        phase(f"sampling {name}")
    bf16_unet, bf16_params = flax_sd.load_unet(f"{out_dir}/unet", dtype=jnp.bfloat16)
    config, n, w = cases["order2-w7.5-N10"]
    ours = dpmjax.sample(flax_sd.guided_unet(bf16_unet, w), noise, dpmjax.DPMSolverMultistepScheduler(**config, **FLAX_END), n,
                         cond=flax_sd.UNetInputs(bf16_params, text, uncond)).sample
    theirs = old_pipeline_loop(bf16_unet, bf16_params, config, n, noise, text, uncond, w)
    report["bf16"] = {"params_dtype": str(jax.tree_util.tree_leaves(bf16_params)[0].dtype), "out_dtype": str(ours.dtype),
                      "max_abs_diff": float(jnp.max(jnp.abs(ours - theirs))), "finite": bool(jnp.all(jnp.isfinite(ours))),
                      "max_abs_diff_to_f32": float(jnp.max(jnp.abs(ours - dpmjax.sample(
                          flax_sd.guided_unet(loaded, w), noise, dpmjax.DPMSolverMultistepScheduler(**config, **FLAX_END), n,
                          cond=flax_sd.UNetInputs(loaded_params, text, uncond)).sample)))}

    phase("bf16")

    # 2. inversion of latents the UNet generated (at w = 1, from known noise): plain / exact / null-text.
    # (Real images would not do for a random UNet: it predicts eps ~ 0, so its data prediction is
    # x / alpha and an image of range 2 inverts to noise of std ~0.06, where GroupNorm makes the
    # UNet wildly nonlinear. Its own samples have the range it maps N(0, 1) noise to.)
    order = 1 if quick else 2  # order 2 exact inversion of the UNet compiles for ~100 s on 2 CPU cores
    scheduler = dpmjax.DPMSolverMultistepScheduler(**SD, solver_order=order, **FLAX_END)
    n = 10
    data = dpmjax.sample(flax_sd.guided_unet(loaded, 1.0), noise, scheduler, n,
                         cond=flax_sd.UNetInputs(loaded_params, text)).sample
    report["inversion"] = {"order": order, "N": n, "data_range": float(jnp.max(data) - jnp.min(data))}
    for w in (1.0, 7.5) if quick else (1.0, 3.0, 7.5):
        model_fn, inputs = flax_sd.guided_unet(loaded, w), flax_sd.UNetInputs(loaded_params, text, uncond)
        row = {}
        for method in ("plain",) if quick and w == 1.0 else ("plain", "exact"):
            inverted = dpmjax.invert(model_fn, data, scheduler, n, cond=inputs, exact=method == "exact")
            back = dpmjax.sample(model_fn, inverted.sample, scheduler, n, cond=inputs).sample
            row[method] = psnr(back, data)
            if method == "exact":
                row["exact_round_trip"] = float(jnp.max(inverted.round_trip))
                if w == 1.0:
                    row["exact_noise_error"] = float(jnp.max(jnp.abs(inverted.sample - noise)))
            phase(f"{method} w={w:g}")
        if w != 1.0:  # Adam at 0.1, not the paper's 1e-2: this random UNet barely reacts to its text input
            result = null_text_inversion(flax_sd.unet_with_embedding(loaded), data, scheduler, n, cond=text,
                                         uncond=jnp.broadcast_to(uncond, text.shape), guidance_scale=w,
                                         inner_steps=20, model_params=loaded_params, optimizer=optax.adam(0.1))
            row["null-text"] = psnr(result.reconstruction, data)
            row["null-text_loss_ratio"] = float(jnp.mean(result.losses / result.initial_losses))
            phase(f"null-text w={w:g}")
        report["inversion"][f"w={w:g}"] = row
    report["seconds"] = time.perf_counter() - started
    report["phase_seconds"] = phases
    return report


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], "--quick" in sys.argv)))

"""Run under diffusers 0.39 and transformers 4.x (both first on sys.path): dpmjax's scheduler inside
diffusers' own Flax Stable Diffusion pipelines, against diffusers' own FlaxDPMSolverMultistepScheduler
in the same pipelines (txt2img, img2img, inpaint, SDXL), on tiny random components built offline
(CLIP tokenizer and text encoders, VAE, UNets of the real architectures). Prints one JSON object of measurements;
tests/test_flax_sd_pipelines.py asserts on them.

    XLA_FLAGS=--xla_force_host_platform_device_count=1 \\
    PYTHONPATH=<diffusers 0.39>:<transformers 4.x> python tests/flax_sd_pipelines_check.py OUT_DIR
"""

from __future__ import annotations

import inspect
import json
import logging
import sys
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
logging.disable(logging.WARNING)

import diffusers  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import transformers  # noqa: E402
from flax.jax_utils import replicate  # noqa: E402
from flax.training.common_utils import shard  # noqa: E402

from dpmjax.models import flax_sd  # noqa: E402
from dpmjax.models.flax_sd import testing  # noqa: E402

Ours = flax_sd.for_diffusers_pipelines()

# Stable Diffusion 1.5's scheduler_config.json (a PNDM config; loaded into the DPM-Solver class)
SD15_SCHEDULER = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
                  "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
                  "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True,
                  "steps_offset": 1, "trained_betas": None}
LETTERS = "abcdefghijklmnopqrstuvwxyz"
MAX_LENGTH = 16
STEPS = 10
GUIDANCE = 7.5


def tiny_tokenizer(folder: Path) -> transformers.CLIPTokenizer:
    """A CLIP tokenizer over single letters (and a few merges), written to ``folder`` offline."""
    tokens = ["<|startoftext|>", "<|endoftext|>", *LETTERS, *(c + "</w>" for c in LETTERS), "th", "the</w>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\nt h\nth e</w>\n")
    return transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=MAX_LENGTH)


def tiny_text_encoder(vocab_size: int):
    """``(text_encoder, params)``: a 2-layer random CLIP text encoder of width 32 (the tiny UNet's
    cross-attention width)."""
    config = transformers.CLIPTextConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=37, num_attention_heads=4,
                                         num_hidden_layers=2, max_position_embeddings=MAX_LENGTH, projection_dim=32)
    model = transformers.FlaxCLIPTextModel(config, _do_init=False)
    shapes = jax.eval_shape(lambda: model.init_weights(jax.random.PRNGKey(0), (1, MAX_LENGTH)))
    return model, testing.random_params(shapes, seed=1)


def tiny_text_encoder_2(vocab_size: int):
    """``(text_encoder_2, params)``: SDXL's second text encoder (a CLIP text model with a pooled
    projection) at toy size: width 32, projection 32."""
    config = transformers.CLIPTextConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=37, num_attention_heads=4,
                                         num_hidden_layers=2, max_position_embeddings=MAX_LENGTH, projection_dim=32)
    model = transformers.FlaxCLIPTextModelWithProjection(config, _do_init=False)
    shapes = jax.eval_shape(lambda: model.init_weights(jax.random.PRNGKey(0), (1, MAX_LENGTH)))
    return model, testing.random_params(shapes, seed=4)


def tiny_sdxl_unet():
    """``(unet, params)``: SDXL's UNet conditioning at toy size: cross-attention over both encoders'
    hidden states (32 + 32), ``text_time`` added embeddings of the pooled projection (32) and the six
    size/crop ids (8 channels each: 6 * 8 + 32 = 80 inputs)."""
    unet = diffusers.FlaxUNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=8, cross_attention_dim=64,
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 32)
    return unet, testing.random_params(jax.eval_shape(lambda: unet.init_weights(jax.random.PRNGKey(0))), seed=5)


def tiny_vae():
    """``(vae, params)``: a random 2-block AutoencoderKL (scale factor 2: 16 px images, 8 px latents)."""
    vae = diffusers.FlaxAutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                                      up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 64),
                                      layers_per_block=1, latent_channels=4, sample_size=16)
    return vae, testing.random_params(jax.eval_shape(lambda: vae.init_weights(jax.random.PRNGKey(0))), seed=2)


def max_rel(a, b) -> float:
    """Largest difference relative to the reference's largest magnitude."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def public(config) -> dict:
    """A diffusers config without its ``_``-keys (its class name, version, which values were defaults)."""
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}


def run(pipeline, params, inputs: dict, jit: bool):
    """The pipeline's images for ``inputs`` (prompt ids, images...), pmapped over one device with ``jit``."""
    rng = jax.random.PRNGKey(0)
    if jit:
        count = jax.device_count()
        sharded = {k: shard(np.concatenate([v] * count)) for k, v in inputs.items()}
        out = pipeline(**sharded, params=replicate(params), prng_seed=jax.random.split(rng, count),
                       num_inference_steps=STEPS, guidance_scale=GUIDANCE, jit=True)
        return np.asarray(out.images)[0]
    # a 0-d array, not a float: diffusers 0.39 turns a float into one scale per prompt, which only its
    # pmapped path broadcasts (unpmapped, a batch of 2 fails to broadcast [1, 2] against the latents)
    return np.asarray(pipeline(**inputs, params=params, prng_seed=rng, num_inference_steps=STEPS,
                               guidance_scale=jnp.asarray(GUIDANCE), jit=False).images)


def compare(name, pipeline, params, inputs, report, schedulers, jits=(False, True)) -> dict:
    """Images of ``pipeline`` with dpmjax's and with diffusers' scheduler (``schedulers``: who ->
    (scheduler, state), each swapped in as ``pipeline.scheduler`` as a user would), for each ``jit``:
    ``{(who, jit): images}``."""
    images = {}
    for jit in jits:
        for who, (scheduler, state) in schedulers.items():
            pipeline.scheduler = scheduler
            images[who, jit] = run(pipeline, dict(params, scheduler=state), inputs, jit)
        theirs = images["diffusers", jit]
        report["images"][f"{name} jit={jit}"] = {
            "max_rel_diff": max_rel(images["ours", jit], theirs), "shape": list(theirs.shape),
            "unsaturated": float(np.mean((theirs > 0) & (theirs < 1))), "finite": bool(np.all(np.isfinite(images["ours", jit])))}
    pipeline.scheduler = schedulers["ours"][0]
    return images


def main(out: Path) -> dict:
    started = time.perf_counter()
    phases: dict = {}

    def phase(name):
        phases[name] = round(time.perf_counter() - started - sum(phases.values()), 1)

    report = {"diffusers": diffusers.__version__, "transformers": transformers.__version__,
              "devices": jax.device_count(), "images": {}}
    (out / "sd15" / "scheduler").mkdir(parents=True)
    (out / "sd15" / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD15_SCHEDULER))
    theirs, theirs_state = diffusers.FlaxDPMSolverMultistepScheduler.from_pretrained(out / "sd15", subfolder="scheduler")
    ours, ours_state = Ours.from_pretrained(out / "sd15", subfolder="scheduler")
    tokenizer = tiny_tokenizer(out / "tokenizer-src")
    text_encoder, text_encoder_params = tiny_text_encoder(len(tokenizer))
    vae, vae_params = tiny_vae()
    unet, unet_params = testing.tiny_unet(seed=0, output_scale=1.0)
    components = dict(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, safety_checker=None, feature_extractor=None)
    params = dict(vae=vae_params, text_encoder=text_encoder_params, unet=unet_params)
    phase("build")

    # 1. a folder saved by plain diffusers with its own class; loaded with ours passed in
    diffusers.FlaxStableDiffusionPipeline(**components, scheduler=theirs).save_pretrained(out / "base", params=params)
    pipeline, loaded = diffusers.FlaxStableDiffusionPipeline.from_pretrained(out / "base", scheduler=ours, safety_checker=None, feature_extractor=None)
    report["from_pretrained_scheduler_is_ours"] = pipeline.scheduler is ours
    report["from_pretrained_no_scheduler_state"] = "scheduler" not in loaded
    phase("save (diffusers) and from_pretrained(scheduler=ours)")

    schedulers = {"ours": (ours, ours_state), "diffusers": (theirs, theirs_state)}
    report["to_diffusers_config_equal"] = public(ours.to_diffusers().config) == public(theirs.config)
    prompt = pipeline.prepare_inputs(["the cat", "a dog"])
    report["prompt_ids"] = np.asarray(prompt).tolist()
    images = compare("txt2img", pipeline, loaded, {"prompt_ids": prompt}, report, schedulers)
    # the same pipeline with diffusers' class at first order: how far another scheduler lands
    pipeline.scheduler = diffusers.FlaxDPMSolverMultistepScheduler.from_config(dict(theirs.config), solver_order=1)
    first_order = run(pipeline, dict(loaded, scheduler=pipeline.scheduler.create_state()), {"prompt_ids": prompt}, jit=False)
    report["images"]["txt2img jit=False"]["max_rel_diff_to_first_order"] = max_rel(first_order, images["diffusers", False])
    # a grid of the config's own (as dpmjax.learn_grid saves one): the pipeline passes num_inference_steps,
    # and a scheduler whose config holds a grid of that many steps runs it
    karras = Ours.from_config(ours.config.to_dict(), use_karras_sigmas=True)
    karras_sched = karras[0] if isinstance(karras, tuple) else karras
    grid = np.asarray(karras_sched.set_timesteps(karras_sched.create_state(), STEPS, (1,)).sigmas[: STEPS + 1])
    tuned = Ours.from_config(ours.config.to_dict(), sigmas=[float(v) for v in grid])
    tuned = tuned[0] if isinstance(tuned, tuple) else tuned
    pipeline.scheduler = tuned
    on_grid = run(pipeline, dict(loaded, scheduler=tuned.create_state()), {"prompt_ids": prompt}, jit=False)
    state = tuned.set_timesteps(tuned.create_state(), STEPS, (2, 4, 8, 8))
    report["config_grid"] = {"finite": bool(np.all(np.isfinite(on_grid))),
                             "state_sigmas_equal": bool(np.array_equal(np.asarray(state.sigmas), grid)),
                             "max_rel_diff_to_default_grid": max_rel(on_grid, images["ours", False])}
    pipeline.scheduler = ours
    phase("txt2img")

    # 2. save with ours inside -> the files plain diffusers writes for its own class
    pipeline.scheduler = ours
    pipeline.save_pretrained(out / "saved", params=loaded)
    files = {}
    for name in ("model_index.json", "scheduler/scheduler_config.json"):
        mine, reference = (json.loads((out / folder / name).read_text()) for folder in ("saved", "base"))
        files[name] = {"equal": mine == reference, "text_equal": (out / "saved" / name).read_text() == (out / "base" / name).read_text(),
                       "scheduler_entry": mine.get("scheduler"), "_class_name": mine.get("_class_name")}
    report["saved_files"] = files
    plain, plain_params = diffusers.FlaxStableDiffusionPipeline.from_pretrained(out / "saved", safety_checker=None, feature_extractor=None)
    report["plain_reload"] = {"class": type(plain.scheduler).__module__ + "." + type(plain.scheduler).__name__,
                              "config_equal": public(plain.scheduler.config) == public(theirs.config),
                              "state_timesteps_equal": bool(np.array_equal(plain_params["scheduler"].timesteps, theirs_state.timesteps))}
    again, again_params = diffusers.FlaxStableDiffusionPipeline.from_pretrained(out / "saved", scheduler=Ours.from_pretrained(
        out / "saved", subfolder="scheduler")[0], safety_checker=None, feature_extractor=None)
    report["dpmjax_reload"] = {"class": type(again.scheduler).__module__, "equal_to_saved": again.scheduler == ours}
    reloaded = run(again, dict(again_params, scheduler=ours_state), {"prompt_ids": prompt}, jit=False)
    report["dpmjax_reload"]["max_rel_diff_to_first_run"] = max_rel(reloaded, images["ours", False])
    phase("save (ours), reload plain and with ours")

    # dpmjax settings diffusers' class lacks: written as extra keys (which diffusers keeps and ignores)
    settings = Ours(**{k: SD15_SCHEDULER[k] for k in ("beta_start", "beta_end", "beta_schedule")}, use_karras_sigmas=True, steps_offset=1)
    settings.save_pretrained(out / "settings")
    diffusers_parameters = inspect.signature(diffusers.FlaxDPMSolverMultistepScheduler.__init__).parameters
    written = json.loads((out / "settings" / "scheduler_config.json").read_text())
    report["dpmjax_settings_round_trip"] = {
        "written": {k: v for k, v in written.items() if not k.startswith("_") and k not in diffusers_parameters},
        "reloaded_equal": Ours.from_pretrained(out / "settings")[0] == settings,
        "diffusers_loads": type(diffusers.FlaxDPMSolverMultistepScheduler.from_pretrained(out / "settings")[0]).__name__}

    # 3. img2img from the same folder (passed scheduler), starting part-way down the schedule
    img2img, img2img_params = diffusers.FlaxStableDiffusionImg2ImgPipeline.from_pretrained(out / "saved", scheduler=ours, safety_checker=None, feature_extractor=None)
    image = np.asarray(jax.random.uniform(jax.random.PRNGKey(1), (2, 3, 16, 16), minval=-1, maxval=1))
    compare("img2img", img2img, img2img_params, {"prompt_ids": prompt, "image": image}, report, schedulers)
    phase("img2img")

    # 4. inpainting: its own 9-channel UNet
    inpaint_unet, inpaint_unet_params = testing.tiny_unet(seed=1, output_scale=1.0, in_channels=9)
    inpaint = diffusers.FlaxStableDiffusionInpaintPipeline(**dict(components, unet=inpaint_unet), scheduler=ours)
    mask = np.zeros((2, 1, 16, 16), np.float32)
    mask[:, :, 4:12, 4:12] = 1
    compare("inpaint", inpaint, dict(params, unet=inpaint_unet_params),
            {"prompt_ids": prompt, "mask": mask, "masked_image": image * (1 - mask)}, report, schedulers)
    phase("inpaint")

    # 5. SDXL: two tokenizers and text encoders, text_time conditioning; a folder saved by plain
    # diffusers with its own class, loaded with ours passed in, then saved with ours and reloaded
    text_encoder_2, text_encoder_2_params = tiny_text_encoder_2(len(tokenizer))
    sdxl_unet, sdxl_unet_params = tiny_sdxl_unet()
    diffusers.FlaxStableDiffusionXLPipeline(
        text_encoder=text_encoder, text_encoder_2=text_encoder_2, vae=vae, tokenizer=tokenizer, tokenizer_2=tokenizer,
        unet=sdxl_unet, scheduler=theirs).save_pretrained(out / "sdxl", params=dict(
            text_encoder=text_encoder_params, text_encoder_2=text_encoder_2_params, vae=vae_params, unet=sdxl_unet_params))
    sdxl, sdxl_params = diffusers.FlaxStableDiffusionXLPipeline.from_pretrained(out / "sdxl", scheduler=ours)
    report["sdxl_from_pretrained"] = {"scheduler_is_ours": sdxl.scheduler is ours, "no_scheduler_state": "scheduler" not in sdxl_params}
    sdxl_prompt = sdxl.prepare_inputs(["the cat", "a dog"])
    report["sdxl_from_pretrained"]["prompt_ids_shape"] = list(sdxl_prompt.shape)
    sdxl_images = compare("sdxl", sdxl, sdxl_params, {"prompt_ids": sdxl_prompt}, report, schedulers)
    phase("sdxl")
    sdxl.save_pretrained(out / "sdxl-saved", params=sdxl_params)
    mine, reference = (json.loads((out / folder / "model_index.json").read_text()) for folder in ("sdxl-saved", "sdxl"))
    plain = diffusers.FlaxStableDiffusionXLPipeline.from_pretrained(out / "sdxl-saved")[0]
    again, again_params = diffusers.FlaxStableDiffusionXLPipeline.from_pretrained(
        out / "sdxl-saved", scheduler=Ours.from_pretrained(out / "sdxl-saved", subfolder="scheduler")[0])
    reloaded = run(again, dict(again_params, scheduler=ours_state), {"prompt_ids": sdxl_prompt}, jit=False)
    report["sdxl_reload"] = {"model_index_equal": mine == reference, "scheduler_entry": mine.get("scheduler"),
                             "plain_class": type(plain.scheduler).__name__, "plain_module": type(plain.scheduler).__module__,
                             "ours_equal_to_saved": again.scheduler == ours,
                             "max_rel_diff_to_first_run": max_rel(reloaded, sdxl_images["ours", False])}
    phase("sdxl save (ours), reload plain and with ours")
    report["seconds"] = round(time.perf_counter() - started, 1)
    report["phase_seconds"] = phases
    return report


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]))))

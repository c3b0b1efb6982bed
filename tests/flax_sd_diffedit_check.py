"""Run under diffusers 0.39 and transformers 4.x (both first on sys.path): DiffEdit through
``edit_images(method=DiffEditEdit(...))`` against diffusers' own PyTorch
``StableDiffusionDiffEditPipeline`` on the same tiny components: random PyTorch weights (UNet, VAE,
CLIP text encoder) saved with ``save_pretrained`` and loaded into the Flax classes with
``from_pt=True``, as a user converts a PyTorch checkpoint. Prints one JSON object of measurements;
tests/test_flax_sd_diffedit.py asserts on them.

Both sides get the same inputs where diffusers draws at random: the mask's noisings are dpmjax's
(``jax.random.normal(PRNGKey(seed), (mask_noisings, *latents.shape))``), handed to the PyTorch
pipeline in place of its ``randn_tensor``; the VAE encodes to its latent distribution's mean (the
PyTorch pipeline's ``latent_dist.sample`` is pointed at the mean for the run).

    PYTHONPATH=<diffusers 0.39>:<transformers 4.x> python tests/flax_sd_diffedit_check.py OUT_DIR
"""

from __future__ import annotations

import json
import logging
import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
logging.disable(logging.WARNING)

import diffusers  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

import dpmjax  # noqa: E402
from dpmjax.models.flax_sd import DiffEditEdit, EditParts, edit_images  # noqa: E402
from dpmjax.models.flax_sd.edit import SD_SCHEDULE  # noqa: E402
from flax_sd_pipelines_check import MAX_LENGTH, tiny_tokenizer  # noqa: E402  (beside this file)

STEPS = 10
GUIDANCE = 3.0
SEED = 0
SOURCE, TARGET = "the cat", "a dog"
# the random UNet's two predictions differ little and evenly: a lower clamp than the default 3 gives a
# mask of half the latent pixels here (the same ratio on both sides)
THRESHOLD = 2.0
# the schedulers both sides use: DPM-Solver++(2M) on Stable Diffusion's noise schedule and diffusers'
# default grid (the inverse scheduler has no log-SNR grid)
SCHEDULER = {**SD_SCHEDULE, "algorithm_type": "dpmsolver++", "solver_order": 2, "use_lu_lambdas": False,
             "final_sigmas_type": "zero", "timestep_spacing": "linspace"}


def torch_pipeline(folder: Path):
    """diffusers' PyTorch DiffEdit pipeline with Stable Diffusion's components at toy size (random
    weights, the UNet's output layer scaled by 0.1 as in ``flax_sd.testing.tiny_unet``), saved to
    ``folder`` as PyTorch weights."""
    torch.manual_seed(0)
    tokenizer = tiny_tokenizer(folder / "vocab")
    text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
        max_position_embeddings=MAX_LENGTH, projection_dim=32))
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 64),
                                  layers_per_block=1, latent_channels=4, sample_size=16, scaling_factor=1.4)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), block_out_channels=(32, 64), layers_per_block=1,
        attention_head_dim=8, cross_attention_dim=32)
    with torch.no_grad():
        unet.conv_out.weight.mul_(0.1)
    scheduler = diffusers.DPMSolverMultistepScheduler(**SCHEDULER)
    inverse = diffusers.DPMSolverMultistepInverseScheduler.from_config(scheduler.config)
    pipeline = diffusers.StableDiffusionDiffEditPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler, safety_checker=None,
        feature_extractor=None, inverse_scheduler=inverse, requires_safety_checker=False)
    pipeline.save_pretrained(str(folder), safe_serialization=False)
    return pipeline


GUIDE = Path(__file__).resolve().parents[1] / "docs" / "guides" / "weights-to-edit.md"


def guide_blocks(heading: str) -> list:
    """The Python blocks of the weights-to-edit guide's section ``heading``."""
    import re

    text = GUIDE.read_text()
    section = text[text.index(heading):]
    section = section[: section.index("\n## ", 1)] if "\n## " in section[1:] else section
    return re.findall(r"```python\n(.*?)```", section, re.S)


def run_guide(code: str, names: dict, scope: dict) -> dict:
    """``code`` run as written, the guide's file names and its image size replaced by the tiny ones."""
    for old, new in names.items():
        code = code.replace(old, new)
    exec(compile(code, str(GUIDE), "exec"), scope)
    return scope


def converted(pipeline, out: Path) -> float:
    """The guide's conversion of PyTorch weights, run as written on the same components saved as a
    PyTorch Stable Diffusion pipeline with safetensors weights (what checkpoints ship): re-saved with
    ``.bin`` weights, loaded with ``FlaxStableDiffusionPipeline.from_pretrained(..., from_pt=True)``
    and saved in the Flax layout at ``out / "flax"``. Returns the largest difference between the UNet
    weights it gives and those of :func:`flax_parts`."""
    components = {k: getattr(pipeline, k) for k in ("vae", "text_encoder", "tokenizer", "unet", "scheduler")}
    torch_sd = diffusers.StableDiffusionPipeline(**components, safety_checker=None, feature_extractor=None,
                                                requires_safety_checker=False)
    torch_sd.save_pretrained(str(out / "pt-sd"))  # safetensors, the default
    (block,) = guide_blocks("## 2. The weights")
    scope = run_guide(block, {'"sd-pytorch-bin"': repr(str(out / "pt-sd-bin")), '"sd-pytorch"': repr(str(out / "pt-sd")),
                              '"sd-flax"': repr(str(out / "flax"))}, {})
    _, reference = flax_parts(out / "pt")
    leaves = zip(jax.tree_util.tree_leaves(scope["params"]["unet"]), jax.tree_util.tree_leaves(reference["unet"]))
    return max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in leaves)


def step_by_step(out: Path) -> dict:
    """The guide's step-by-step blocks, run as written on the converted folder (16 px images, 10 steps)."""
    step, diffedit_block = guide_blocks("## 4. Step by step")
    names = {'"sd-flax"': repr(str(out / "flax")), '"cat.png"': repr(str(out / "image.png")),
             '"dog.png"': repr(str(out / "guide-dog.png")), "(512, 512)": "(16, 16)", ", 50,": ", 10,"}
    scope = run_guide(step, names, {})
    scope = run_guide(diffedit_block, names, scope)
    return {"guide_edit_change": float(np.max(np.abs(np.asarray(scope["edited"]) - np.asarray(scope["latents"])))),
            "guide_image_written": (out / "guide-dog.png").is_file(),
            "guide_pixels_shape": list(scope["pixels"].shape),
            "guide_mask_shape": list(scope["result"].mask.shape)}


def flax_parts(folder: Path):
    """``(EditParts, params)``: the same components in diffusers' Flax classes, from the PyTorch
    weights (``from_pt=True``)."""
    unet, unet_params = diffusers.FlaxUNet2DConditionModel.from_pretrained(str(folder), subfolder="unet", from_pt=True)
    vae, vae_params = diffusers.FlaxAutoencoderKL.from_pretrained(str(folder), subfolder="vae", from_pt=True)
    text_encoder = transformers.FlaxCLIPTextModel.from_pretrained(str(folder / "text_encoder"), from_pt=True)
    tokenizer = transformers.CLIPTokenizer.from_pretrained(str(folder / "tokenizer"))
    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    parts = EditParts(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, unet=unet, scheduler_config=config)
    return parts, {"unet": unet_params, "vae": vae_params, "text_encoder": text_encoder.params}


def test_image() -> np.ndarray:
    """One smooth 16 px RGB image in [0, 1] (NHWC), brighter in one corner."""
    y, x = np.mgrid[0:16, 0:16] / 15.0
    return np.stack([x, y, 0.5 + 0.3 * np.sin(6 * x * y)], -1)[None].astype(np.float32)


def _add_noise_crashes(scheduler) -> bool:
    """Whether the scheduler's add_noise fails on a 0-d timestep, as generate_mask passes it."""
    scheduler.set_timesteps(STEPS)
    try:
        scheduler.add_noise(torch.zeros(1, 4, 8, 8), torch.zeros(1, 4, 8, 8), scheduler.timesteps[STEPS // 2])
    except TypeError:
        return True
    return False


def iou(a, b) -> float:
    a, b = np.asarray(a) > 0.5, np.asarray(b) > 0.5
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def main(out: Path) -> dict:
    from diffusers.models.autoencoders import vae as vae_module
    from diffusers.pipelines.deprecated.stable_diffusion_diffedit import pipeline_stable_diffusion_diffedit as module

    image = test_image()
    pipeline = torch_pipeline(out / "pt")
    conversion_diff = converted(pipeline, out)
    from PIL import Image

    Image.fromarray((255 * image[0]).round().astype(np.uint8)).save(out / "image.png")
    parts, params = flax_parts(out / "pt")
    settings = dpmjax.DiffEdit(background="diffusers", mask_threshold=THRESHOLD)
    ours = edit_images(parts, params, image, SOURCE, TARGET, method=DiffEditEdit(diffedit=settings, seed=SEED),
                       num_inference_steps=STEPS, guidance_scale=GUIDANCE, scheduler_config=SCHEDULER)
    latents = np.asarray(ours.source_latents)
    noises = np.asarray(jax.random.normal(jax.random.PRNGKey(SEED), (settings.mask_noisings,) + latents.shape))
    # diffusers draws one noise per (row, map), rows outer: [B * maps, ...]
    drawn = torch.from_numpy(np.ascontiguousarray(np.swapaxes(noises, 0, 1).reshape((-1,) + latents.shape[1:])))
    module.randn_tensor = lambda shape, **kwargs: drawn.reshape(shape).clone()
    vae_module.DiagonalGaussianDistribution.sample = lambda self, generator=None: self.mean
    # generate_mask hands the scheduler's add_noise a 0-d timestep, which DPMSolverMultistepScheduler
    # cannot iterate (TypeError: iteration over a 0-d tensor): the same timestep as a 1-d tensor
    scheduler = pipeline.scheduler
    crashes = _add_noise_crashes(scheduler)
    scheduler.add_noise = lambda x, noise, t: type(scheduler).add_noise(scheduler, x, noise, t.reshape(-1))
    with torch.no_grad():
        torch_latents = pipeline.vae.config.scaling_factor * pipeline.vae.encode(
            torch.from_numpy(2 * image.transpose(0, 3, 1, 2) - 1)).latent_dist.mean
        mask = pipeline.generate_mask(image=image, source_prompt=SOURCE, target_prompt=TARGET, num_inference_steps=STEPS,
                                      guidance_scale=GUIDANCE, mask_thresholding_ratio=THRESHOLD, output_type="np")
        inverted = pipeline.invert(prompt=SOURCE, image=image, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                                   output_type="np").latents
        edited = pipeline(prompt=TARGET, mask_image=mask, image_latents=inverted, num_inference_steps=STEPS,
                          guidance_scale=GUIDANCE, output_type="latent").images
        decoded = pipeline.vae.decode(edited / pipeline.vae.config.scaling_factor).sample
    torch_image = np.clip(decoded.numpy().transpose(0, 2, 3, 1) / 2 + 0.5, 0, 1)
    # dpmjax's own DiffEdit: the background at the level each step ends on (the input's latents at the end)
    same = edit_images(parts, params, image, SOURCE, TARGET, method=DiffEditEdit(diffedit=settings.replace(
        background="same-level"), seed=SEED), num_inference_steps=STEPS, guidance_scale=GUIDANCE, scheduler_config=SCHEDULER)
    keep = np.broadcast_to(np.asarray(same.mask) == 0, latents.shape)
    ours_mask = np.asarray(ours.mask)[:, 0]
    agree = (ours_mask > 0.5) == (np.asarray(mask) > 0.5)  # [B, h, w] in latent pixels
    factor = image.shape[1] // agree.shape[1]
    agree_pixels = np.repeat(np.repeat(agree, factor, axis=1), factor, axis=2)
    scale = float(np.max(np.abs(edited.numpy())))
    return {
        "diffusers": diffusers.__version__,
        "diffusers_add_noise_crashes_on_0d_timestep": crashes,
        "converted_unet_diff": conversion_diff,
        **step_by_step(out),
        "mask_fraction_ours": float(ours_mask.mean()),
        "mask_fraction_diffusers": float(np.asarray(mask).mean()),
        "mask_iou": iou(ours_mask, mask),
        "source_latents_diff": float(np.max(np.abs(latents - torch_latents.numpy()))),
        "noise_diff": float(np.max(np.abs(np.asarray(ours.noise) - inverted[:, 0].numpy()))),
        "latents_diff_where_masks_agree": float(np.max(np.abs(np.asarray(ours.latents) - edited.numpy())[
            np.broadcast_to(agree[:, None], edited.shape)])),
        "latents_scale": scale,
        "image_diff_where_masks_agree": float(np.max(np.abs(ours.images - torch_image)[
            np.broadcast_to(agree_pixels[..., None], torch_image.shape)])),
        "same_level_mask_equal": bool(np.array_equal(np.asarray(same.mask), np.asarray(ours.mask))),
        "same_level_outside_mask_diff_to_source": float(np.max(np.abs(np.asarray(same.latents) - latents)[keep])),
        "diffusers_outside_mask_diff_to_source": float(np.max(np.abs(edited.numpy() - latents)[keep])),
        "same_level_inside_mask_change": float(np.max(np.abs(np.asarray(same.latents) - latents)[~keep])),
    }


if __name__ == "__main__":
    out = Path(sys.argv[1])
    print(json.dumps(main(out)))

"""Stable Diffusion at toy size with random weights, built offline in seconds: fixtures for tests,
notebooks and examples (the images they make are not pictures).

:func:`tiny_unet` is SD's UNet architecture at toy size; :func:`tiny_pipeline` a whole diffusers 0.39
``FlaxStableDiffusionPipeline`` (tokenizer, text encoder, VAE, UNet, scheduler); :func:`random_params`
fills any Flax parameter shapes from NumPy. They import diffusers (< 0.40) and, for the pipeline,
transformers (< 5).

    from dpmjax.models.flax_sd import testing
    pipeline, params = testing.tiny_pipeline()
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from .edit import SD_SCHEDULE
from .requirements import old_diffusers


def tiny_unet(seed: int = 0, sample_size: int = 8, cross_attention_dim: int = 32, dtype=jnp.float32,
              output_scale: float = 0.1, in_channels: int = 4):
    """``(unet, params)``: Stable Diffusion's UNet architecture at toy size (cross-attention down
    and up blocks, a cross-attention mid block, 32/64 channels, 4 latent channels) with random
    weights, for tests and notebooks. The weights come from NumPy in the layout of Flax's default
    initialisers (LeCun-normal kernels, small biases, unit norm scales; a seeded ``init`` of this
    UNet compiles for ~25 s on a CPU). The output convolution is scaled by ``output_scale``, as
    diffusion models often start from a zero output layer: at full scale a random noise prediction
    makes the data prediction ``(x - sigma eps) / alpha`` ~15x the data at SD's largest noise level.
    ``in_channels=9`` gives the inpainting UNet's input (latents, mask, masked-image latents).

    Args:
        seed: The NumPy seed of the weights (default 0).
        sample_size: The latents' height and width (default 8).
        cross_attention_dim: The text embeddings' width ``D`` (default 32).
        dtype: The UNet's compute dtype and the params' dtype (default float32).
        output_scale: The scale of the output convolution's weights (default 0.1).
        in_channels: The input channels (default 4; 9 for the inpainting UNet).

    Returns:
        ``(unet, params)``: the Flax UNet module and its random parameters.

    Raises:
        ImportError: diffusers is missing, or is 0.40 or newer.
    """
    diffusers = old_diffusers()
    unet = diffusers.FlaxUNet2DConditionModel(
        sample_size=sample_size, in_channels=in_channels, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=8,
        cross_attention_dim=cross_attention_dim, dtype=dtype,
    )
    x = jnp.zeros((1, in_channels, sample_size, sample_size))
    shapes = jax.eval_shape(lambda: unet.init(jax.random.PRNGKey(0), x, jnp.zeros((1,)), jnp.zeros((1, 7, cross_attention_dim))))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        names = [str(getattr(p, "key", p)) for p in path]
        name = names[-1]
        if name == "kernel":
            fan_in = int(np.prod(leaf.shape[:-1]))
            scale = output_scale if names[0] == "conv_out" else 1.0
            return jnp.asarray(scale * rng.standard_normal(leaf.shape) / np.sqrt(fan_in), dtype)
        if name == "scale":
            return jnp.ones(leaf.shape, dtype)
        return jnp.asarray(0.02 * rng.standard_normal(leaf.shape), dtype)  # biases: small, not zero, to be felt

    return unet, jax.tree_util.tree_map_with_path(fill, shapes["params"])


def random_params(shapes, seed: int):
    """Random weights of the given shapes from NumPy: LeCun-normal kernels, N(0, 0.02) embeddings
    and biases, unit norm scales (a seeded Flax ``init`` compiles for seconds).

    Args:
        shapes: A pytree of shape-and-dtype leaves (e.g. from ``jax.eval_shape`` of an ``init``);
            leaves named ``kernel`` and ``scale`` are treated as such, all others as biases and
            embeddings.
        seed: The NumPy seed.

    Returns:
        The pytree of random arrays, in the leaves' dtypes.
    """
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = str(getattr(path[-1], "key", path[-1]))
        if name == "kernel":
            return jnp.asarray(rng.standard_normal(leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1])), leaf.dtype)
        if name == "scale":
            return jnp.ones(leaf.shape, leaf.dtype)
        return jnp.asarray(0.02 * rng.standard_normal(leaf.shape), leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


_TINY_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def tiny_pipeline(folder: Optional[str] = None, seed: int = 0, unet_output_scale: float = 0.1, vae_scaling_factor: float = 1.4):
    """``(pipeline, params)``: diffusers 0.39's ``FlaxStableDiffusionPipeline`` with Stable
    Diffusion's components at toy size and random weights (a CLIP tokenizer over single letters,
    a 2-layer CLIP text encoder of width 32, a 2-block VAE: 16 px images, 8 px latents, and
    :func:`tiny_unet`), diffusers' ``FlaxDPMSolverMultistepScheduler`` on SD's noise schedule and
    no safety checker; built offline in seconds. ``vae_scaling_factor`` scales the VAE's latents
    to about unit standard deviation (as Stable Diffusion's 0.18215 does its VAE's);
    ``unet_output_scale`` scales the UNet's output convolution (see :func:`tiny_unet`). With ``folder`` it is also saved there
    (``save_pretrained``), so ``FlaxStableDiffusionPipeline.from_pretrained(folder)`` loads it.
    Needs diffusers < 0.40 and transformers < 5 (the last releases with Flax classes). For tests,
    notebooks and trying the editing workflow: the images it makes are not pictures.

    Args:
        folder: A folder to save the pipeline in; ``None`` (default) saves nothing.
        seed: The seed of the random weights (default 0).
        unet_output_scale: The scale of the UNet's output convolution (default 0.1).
        vae_scaling_factor: The VAE's latent scaling factor (default 1.4).

    Returns:
        ``(pipeline, params)``: the pipeline and its ``params`` dict (``"vae"``,
        ``"text_encoder"``, ``"unet"``, ``"scheduler"``), as diffusers' Flax pipelines take them.

    Raises:
        ImportError: diffusers (< 0.40) or transformers (< 5) is missing or too new.
    """
    diffusers = old_diffusers(transformers=True)
    import transformers

    max_length = 16
    tokens = ["<|startoftext|>", "<|endoftext|>", *_TINY_LETTERS, *(c + "</w>" for c in _TINY_LETTERS), "th", "the</w>"]
    with tempfile.TemporaryDirectory() as vocab:
        with open(os.path.join(vocab, "vocab.json"), "w") as f:
            json.dump({t: i for i, t in enumerate(tokens)}, f)
        with open(os.path.join(vocab, "merges.txt"), "w") as f:
            f.write("#version: 0.2\nt h\nth e</w>\n")
        tokenizer = transformers.CLIPTokenizer(os.path.join(vocab, "vocab.json"), os.path.join(vocab, "merges.txt"),
                                               model_max_length=max_length)
    config = transformers.CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_attention_heads=4,
                                         num_hidden_layers=2, max_position_embeddings=max_length, projection_dim=32)
    text_encoder = transformers.FlaxCLIPTextModel(config, _do_init=False)
    text_params = random_params(jax.eval_shape(lambda: text_encoder.init_weights(jax.random.PRNGKey(0), (1, max_length))), seed + 1)
    vae = diffusers.FlaxAutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                                      up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 64),
                                      layers_per_block=1, latent_channels=4, sample_size=16,
                                      scaling_factor=vae_scaling_factor)
    vae_params = random_params(jax.eval_shape(lambda: vae.init_weights(jax.random.PRNGKey(0))), seed + 2)
    unet, unet_params = tiny_unet(seed=seed, output_scale=unet_output_scale)
    scheduler = diffusers.FlaxDPMSolverMultistepScheduler(**SD_SCHEDULE)
    pipeline = diffusers.FlaxStableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                                     scheduler=scheduler, safety_checker=None, feature_extractor=None)
    params = {"vae": vae_params, "text_encoder": text_params, "unet": unet_params, "scheduler": scheduler.create_state()}
    if folder is not None:
        pipeline.save_pretrained(folder, params={k: v for k, v in params.items() if k != "scheduler"})
    return pipeline, params

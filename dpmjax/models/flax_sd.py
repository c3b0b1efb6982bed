"""Flax Stable Diffusion: diffusers <= 0.39's ``FlaxUNet2DConditionModel`` as a dpmjax model.

dpmjax never imports diffusers; this module does so only in :func:`load_unet` and
:func:`tiny_unet` (``pip install "dpmjax[flax-sd]"`` pins ``diffusers<0.40``, the last releases
with Flax classes). A UNet you already hold (its module and params) needs no diffusers import here.

The parameters travel as an *argument* of the compiled scan (``cond``), never closed over: a
closed-over array becomes a constant of the XLA program, and 860 M of them would be compiled in.

    unet, params = load_unet("path/to/unet", dtype=jnp.bfloat16)     # bf16 params and compute
    model_fn = guided_unet(unet, guidance_scale=7.5)                  # model_fn(x, t, UNetInputs)
    inputs = UNetInputs(params, text_embeddings, uncond_embeddings)   # [B or 1, 77, 768] each
    noise = dpmjax.invert(model_fn, latents, scheduler, 50, cond=inputs).sample   # NCHW latents
    latents = dpmjax.sample(model_fn, noise, scheduler, 50, cond=inputs).sample

Latents are NCHW (``[B, 4, H/8, W/8]``, as diffusers' Flax pipeline keeps them); the UNet runs in
its own dtype and its output is cast back to the latents' dtype, so the scheduler state stays
float32 with bf16 params.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from .. import checks
from ..trajectories import guidance

Array = jax.Array


class UNetInputs(NamedTuple):
    """What the guided UNet model takes as ``cond``: the UNet's ``params``, the text embeddings
    ``[B or 1, L, D]`` and the unconditional ones (same shape; ``None`` without guidance).

    Attributes:
        params: The UNet's parameters (they travel as an argument of the compiled scan).
        text_embeddings: ``[B or 1, L, D]``, the text embeddings (e.g. ``[1, 77, 768]`` for SD 1.x).
        uncond_embeddings: The unconditional embeddings (same shape), or ``None`` without
            guidance.
    """

    params: Any
    text_embeddings: Array
    uncond_embeddings: Optional[Array] = None


def unet_eps(unet, params, latents: Array, timestep, encoder_hidden_states: Array) -> Array:
    """One UNet call: ``eps(latents [B, C, H, W], timestep, encoder_hidden_states [B or 1, L, D])``
    in the latents' dtype (timestep broadcast over the batch, as diffusers' Flax pipeline does).

    Args:
        unet: The Flax UNet module (diffusers' ``FlaxUNet2DConditionModel``); it runs in its own
            ``dtype``.
        params: Its parameters.
        latents: ``[B, C, H, W]``, NCHW latents.
        timestep: The timestep, a scalar or ``[B]``.
        encoder_hidden_states: ``[B or 1, L, D]``, the text embeddings (broadcast over the batch).

    Returns:
        The UNet's noise prediction, with the latents' shape and dtype.
    """
    batch = latents.shape[0]
    t = jnp.broadcast_to(jnp.asarray(timestep), (batch,))
    states = jnp.broadcast_to(encoder_hidden_states, (batch,) + encoder_hidden_states.shape[1:])
    dtype = getattr(unet, "dtype", latents.dtype)
    out = unet.apply({"params": params}, latents.astype(dtype), t, encoder_hidden_states=states.astype(dtype)).sample
    return out.astype(latents.dtype)


_BUILT: dict = {}


def _per_unet(make):
    """Cache ``make(unet, *args)`` per UNet object and arguments, so that repeated calls return the
    same function (jit caches compiled programs by the model function's identity). Keyed by the
    object's id, with the object kept alive: a UNet loaded from a config holds lists and is not
    hashable."""

    signature = inspect.signature(make)

    @functools.wraps(make)
    def cached(unet, *args, **kwargs):
        bound = signature.bind(unet, *args, **kwargs)
        bound.apply_defaults()
        key = (make.__name__, id(unet)) + tuple(bound.arguments.values())[1:]
        try:
            hit = key in _BUILT and _BUILT[key][0] is unet
        except TypeError:  # an unhashable argument: let make() say what is wrong with it
            return make(*bound.args, **bound.kwargs)
        if not hit:
            if len(_BUILT) >= 64:
                _BUILT.clear()
            _BUILT[key] = (unet, make(*bound.args, **bound.kwargs))
        return _BUILT[key][1]

    return cached


@_per_unet
def guided_unet(unet, guidance_scale: float = 7.5) -> Callable[[Array, Array, UNetInputs], Array]:
    """``model_fn(latents, t, inputs: UNetInputs)`` with classifier-free guidance (Ho & Salimans
    2022): ``u + w (c - u)`` from one UNet call on the doubled batch ``[uncond; text]``; at
    ``w = 1`` one call on the text embeddings alone. Cached per ``(unet, w)``, so repeated
    ``sample``/``invert`` calls reuse one compiled program.

    Args:
        unet: The Flax UNet module.
        guidance_scale: The guidance scale ``w``, a Python number (it is static; default 7.5).

    Returns:
        ``model_fn(latents, t, inputs)``, for :func:`dpmjax.sample` and :func:`dpmjax.invert` with
        ``cond=inputs`` (a :class:`UNetInputs`).

    Raises:
        ValueError: ``guidance_scale`` is not a real number; when ``model_fn`` is called with
            ``w != 1`` and ``inputs.uncond_embeddings`` is ``None``.
    """
    w = checks.real("guidance_scale", guidance_scale, note=" (a Python number: it is static)")

    def model_fn(latents, t, inputs: UNetInputs):
        if w == 1.0:
            return unet_eps(unet, inputs.params, latents, timestep=t, encoder_hidden_states=inputs.text_embeddings)
        if inputs.uncond_embeddings is None:
            raise ValueError(f"guidance_scale={w} needs UNetInputs.uncond_embeddings.")
        batch = latents.shape[0]
        text, uncond = (jnp.broadcast_to(e, (batch,) + e.shape[1:]) for e in (inputs.text_embeddings, inputs.uncond_embeddings))
        doubled_latents, embeddings = guidance.doubled(latents, uncond, text)
        eps = unet_eps(unet, inputs.params, doubled_latents, timestep=t, encoder_hidden_states=embeddings)
        return guidance.guide_doubled(eps, w)

    return model_fn


@_per_unet
def unet_with_embedding(unet) -> Callable[[Array, Array, Any], Array]:
    """``model(latents, t, embeddings, params)``: the conditional form that
    :func:`dpmjax.null_text_inversion` takes with ``model_params=params``.

    Args:
        unet: The Flax UNet module.

    Returns:
        ``model(latents, t, embeddings, params)``, one UNet call (:func:`unet_eps`); cached per
        UNet.
    """

    def model(latents, t, embeddings, params):
        return unet_eps(unet, params, latents, timestep=t, encoder_hidden_states=embeddings)

    return model


def _old_diffusers():
    try:
        import diffusers
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError('the Flax UNet needs diffusers < 0.40: pip install "dpmjax[flax-sd]"') from error
    major, minor = (int(p) for p in diffusers.__version__.split(".")[:2])
    if (major, minor) >= (0, 40):
        raise ImportError(
            f"diffusers {diffusers.__version__} has no Flax classes (removed in 0.40): install diffusers<0.40 "
            '(pip install "dpmjax[flax-sd]"), e.g. in its own environment or with pip --target.'
        )
    return diffusers


def for_diffusers_pipelines():
    """dpmjax's ``FlaxDPMSolverMultistepScheduler`` for diffusers 0.39's own Flax pipelines
    (:class:`dpmjax.models.flax_sd_pipelines.FlaxDPMSolverMultistepScheduler`): a ``FlaxSchedulerMixin``
    that ``from_pretrained(folder, scheduler=...)`` accepts and ``save_pretrained`` saves as diffusers'
    own class. Imports diffusers (< 0.40): an ImportError says what to install when it is missing.

    Returns:
        The class :class:`dpmjax.models.flax_sd_pipelines.FlaxDPMSolverMultistepScheduler`.

    Raises:
        ImportError: diffusers is missing, or is 0.40 or newer.
    """
    from .flax_sd_pipelines import FlaxDPMSolverMultistepScheduler

    return FlaxDPMSolverMultistepScheduler


def cast_floating(params, dtype):
    """``params`` with every floating leaf cast to ``dtype`` (e.g. bf16 weights for a bf16 UNet).

    Args:
        params: A pytree of parameters.
        dtype: The floating-point dtype to cast to.

    Returns:
        The pytree with floating leaves cast; other leaves unchanged.
    """
    return jax.tree_util.tree_map(lambda p: p.astype(dtype) if jnp.issubdtype(jnp.asarray(p).dtype, jnp.floating) else p, params)


def load_unet(path: str, dtype=jnp.float32, **kwargs):
    """``(unet, params)`` from a folder in diffusers' Flax layout (``config.json`` and
    ``diffusion_flax_model.msgpack``, as ``save_pretrained`` writes them; ``subfolder="unet"`` for
    a whole pipeline folder). ``dtype`` is the compute dtype; the params are cast to it as well.

    Args:
        path: The folder (or a pipeline folder, with ``subfolder="unet"``).
        dtype: The compute dtype (default float32); the params are cast to it.
        **kwargs: Passed to diffusers' ``FlaxUNet2DConditionModel.from_pretrained`` (e.g.
            ``subfolder``).

    Returns:
        ``(unet, params)``: the Flax UNet module and its parameters.

    Raises:
        ImportError: diffusers is missing, or is 0.40 or newer.
    """
    diffusers = _old_diffusers()
    unet, params = diffusers.FlaxUNet2DConditionModel.from_pretrained(path, dtype=dtype, **kwargs)
    return unet, cast_floating(params, dtype)


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
    diffusers = _old_diffusers()
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
# Stable Diffusion 1.5's noise schedule (its scheduler_config.json, loaded into the DPM-Solver class)
SD_SCHEDULE = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000}


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
        ImportError: diffusers (< 0.40) or transformers is missing, or diffusers is 0.40 or newer.
    """
    import tempfile

    diffusers = _old_diffusers()
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

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
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


class UNetInputs(NamedTuple):
    """What the guided UNet model takes as ``cond``: the UNet's ``params``, the text embeddings
    ``[B or 1, L, D]`` and the unconditional ones (same shape; ``None`` without guidance)."""

    params: Any
    text_embeddings: Array
    uncond_embeddings: Optional[Array] = None


def unet_eps(unet, params, latents: Array, timestep, encoder_hidden_states: Array) -> Array:
    """One UNet call: ``eps(latents [B, C, H, W], timestep, encoder_hidden_states [B or 1, L, D])``
    in the latents' dtype (timestep broadcast over the batch, as diffusers' Flax pipeline does)."""
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
    ``sample``/``invert`` calls reuse one compiled program."""
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)):
        raise ValueError(f"guidance_scale must be a Python number (it is static), got {guidance_scale!r}.")
    w = float(guidance_scale)

    def model_fn(latents, t, inputs: UNetInputs):
        if w == 1.0:
            return unet_eps(unet, inputs.params, latents, t, inputs.text_embeddings)
        if inputs.uncond_embeddings is None:
            raise ValueError(f"guidance_scale={w} needs UNetInputs.uncond_embeddings.")
        batch = latents.shape[0]
        text, uncond = (jnp.broadcast_to(e, (batch,) + e.shape[1:]) for e in (inputs.text_embeddings, inputs.uncond_embeddings))
        both = unet_eps(unet, inputs.params, jnp.concatenate([latents, latents]), t, jnp.concatenate([uncond, text]))
        eps_uncond, eps_text = jnp.split(both, 2)
        return eps_uncond + w * (eps_text - eps_uncond)

    return model_fn


@_per_unet
def unet_with_embedding(unet) -> Callable[[Array, Array, Any], Array]:
    """``model(latents, t, embeddings, params)``: the conditional form that
    :func:`dpmjax.null_text.null_text_inversion` takes with ``model_params=params``."""

    def model(latents, t, embeddings, params):
        return unet_eps(unet, params, latents, t, embeddings)

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
    own class. Imports diffusers (< 0.40): an ImportError says what to install when it is missing."""
    from .flax_sd_pipelines import FlaxDPMSolverMultistepScheduler

    return FlaxDPMSolverMultistepScheduler


def cast_floating(params, dtype):
    """``params`` with every floating leaf cast to ``dtype`` (e.g. bf16 weights for a bf16 UNet)."""
    return jax.tree_util.tree_map(lambda p: p.astype(dtype) if jnp.issubdtype(jnp.asarray(p).dtype, jnp.floating) else p, params)


def load_unet(path: str, dtype=jnp.float32, **kwargs):
    """``(unet, params)`` from a folder in diffusers' Flax layout (``config.json`` and
    ``diffusion_flax_model.msgpack``, as ``save_pretrained`` writes them; ``subfolder="unet"`` for
    a whole pipeline folder). ``dtype`` is the compute dtype; the params are cast to it as well."""
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
    ``in_channels=9`` gives the inpainting UNet's input (latents, mask, masked-image latents)."""
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

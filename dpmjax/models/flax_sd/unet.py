"""diffusers <= 0.39's Flax Stable Diffusion UNet (``FlaxUNet2DConditionModel``) as a guided dpmjax
model function, and its loading.

dpmjax never imports diffusers; this module does so only in :func:`load_unet`
(``pip install "dpmjax[flax-sd]"`` pins ``diffusers<0.40``, the last releases with Flax classes). A
UNet you already hold (its module and params) needs no diffusers import here.

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

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from ... import checks
from ...static_cache import ByIdentity, StaticCache
from ...trajectories import guidance
from .requirements import old_diffusers

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


# jit compiles once per model function (a static argument, compared by identity): repeated calls get
# the function built the first time for the same UNet object (by identity: a UNet loaded from a
# config holds lists and is not hashable) and settings.
_MODEL_FNS = StaticCache("Flax UNet model functions")


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
    return _MODEL_FNS.get(("guided", ByIdentity(unet), w), lambda: _guided(unet, w))


def _guided(unet, w: float):
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


def unet_with_embedding(unet) -> Callable[[Array, Array, Any], Array]:
    """``model(latents, t, embeddings, params)``: the conditional form that
    :func:`dpmjax.null_text_inversion` takes with ``model_params=params``.

    Args:
        unet: The Flax UNet module.

    Returns:
        ``model(latents, t, embeddings, params)``, one UNet call (:func:`unet_eps`); cached per
        UNet.
    """
    return _MODEL_FNS.get(("with embedding", ByIdentity(unet)), lambda: _with_embedding(unet))


def _with_embedding(unet):
    def model(latents, t, embeddings, params):
        return unet_eps(unet, params, latents, timestep=t, encoder_hidden_states=embeddings)

    return model


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
    diffusers = old_diffusers()
    unet, params = diffusers.FlaxUNet2DConditionModel.from_pretrained(path, dtype=dtype, **kwargs)
    return unet, cast_floating(params, dtype)

"""Edit real images with a Flax Stable Diffusion pipeline: encode, invert, sample with another
prompt, decode, in one call.

    from diffusers import FlaxStableDiffusionPipeline          # diffusers < 0.40, transformers < 5
    from dpmjax.models.flax_sd import edit_images

    pipeline, params = FlaxStableDiffusionPipeline.from_pretrained(folder, safety_checker=None, feature_extractor=None)
    result = edit_images(pipeline, params, images, source_prompt="a photo of a cat",
                         target_prompt="a photo of a dog", method="exact", num_inference_steps=50,
                         guidance_scale=3.0)
    result.images                                # [B, H, W, 3] in [0, 1], the edited images

``images`` are NHWC floats in [0, 1] (what diffusers' Flax pipelines return, a PNG read and
divided by 255; uint8 arrays are divided by 255 here). They are encoded with the VAE (the mean of
its latent distribution times its scaling factor), inverted to noise with the source prompt under
classifier-free guidance, sampled back with the target prompt and decoded:

* ``method="exact"``: exact inversion of the guided sampler (:func:`dpmjax.invert` with
  ``exact=True``; ``method=ExactEdit(inversion=dpmjax.ExactInversion(...))`` for other settings):
  sampling the noise with the *source* prompt gives back the source latents to float32 precision
  (per-row ``round_trip``/``converged`` in the result), so the only change to the image comes from
  the prompt (and the VAE's own encode/decode error);
* ``method="plain"`` (``PlainEdit()``): DDIM-style inversion of the same sampler (one UNet call per
  step);
* ``method="null-text"``: null-text inversion (:mod:`dpmjax.trajectories.null_text`): the unconditional
  embedding is tuned per step so that guided sampling with the source prompt retraces the
  ``w = 1`` inversion; the edit samples the target prompt with those per-step embeddings
  (``method=NullTextEdit(inner_steps=..., optimizer=...)`` for other settings);
* ``method="diffedit"``: DiffEdit (:mod:`dpmjax.trajectories.diffedit`): a mask where the UNet's
  predictions under the two prompts disagree (``result.mask``), then only the masked region is
  sampled again with the target prompt; outside it the result is the input's latents
  (``method=DiffEditEdit(diffedit=dpmjax.DiffEdit(...), seed=...)`` for other settings).

A method's name stands for its settings object with the defaults
(:mod:`dpmjax.models.flax_sd.edit_methods`: frozen, hashable, checked when built).

The sampler is dpmjax's DPM-Solver++ on the pipeline's noise schedule (its ``scheduler.config``),
on noise levels uniform in log-SNR (``use_lu_lambdas=True``, where every step inverts) ending at
the smallest training noise level. The UNet, VAE and text encoder run inside jitted programs with
their parameters as arguments: one compiled program per shape, reused across calls.

This module never imports diffusers: the edit call takes the pipeline (or its parts) you already
hold. The ``dpmjax edit`` command (:mod:`dpmjax.apps.edit`) loads a saved pipeline and calls it.
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from ...config import SchedulerConfig
from ...scheduler import DPMSolverMultistepScheduler
from ...static_cache import ByIdentity, StaticCache
from ...trajectories.diffedit import diffedit
from ...trajectories.inversion import invert
from ...trajectories.null_text import null_text_inversion, sample_with_null_embeddings
from ...trajectories.scan import sample
from .edit_methods import (
    DiffEditEdit,
    EditMethod,
    ExactEdit,
    NullTextEdit,
    edit_method,
    rejects_removed_keywords,
)
from .unet import UNetInputs, guided_unet, unet_with_embedding

Array = jax.Array
# The sampler the edit runs on the pipeline's noise schedule: DPM-Solver++ on noise levels uniform in
# log-SNR (where every step of the sampler inverts), ending at the smallest training noise level.
EDIT_SCHEDULER = {"algorithm_type": "dpmsolver++", "use_lu_lambdas": True, "final_sigmas_type": "sigma_min",
                  "use_karras_sigmas": False, "timestep_spacing": "linspace"}
# Stable Diffusion 1.5's noise schedule (its scheduler_config.json, loaded into the DPM-Solver class)
SD_SCHEDULE = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000}


class EditParts(NamedTuple):
    """The parts of a Flax Stable Diffusion pipeline the edit uses (a pipeline has them as
    attributes). ``scheduler_config``: the pipeline's scheduler config (a dict), for its noise
    schedule; ``None`` for Stable Diffusion's.

    Attributes:
        tokenizer: The pipeline's CLIP tokenizer.
        text_encoder: The Flax CLIP text encoder.
        vae: The Flax VAE (``FlaxAutoencoderKL``).
        unet: The Flax UNet (``FlaxUNet2DConditionModel``).
        scheduler_config: The pipeline's scheduler config (a dict), for its noise schedule;
            ``None`` for Stable Diffusion's.
    """

    tokenizer: Any
    text_encoder: Any
    vae: Any
    unet: Any
    scheduler_config: Optional[Mapping[str, Any]] = None


class EditResult(NamedTuple):
    """Result of :func:`edit_images`.

    Attributes:
        images: ``[B, H, W, 3]`` float32 in [0, 1], the edited images (a NumPy array).
        latents: ``[B, 4, h, w]``, the edited latents.
        source_latents: The input images' latents (VAE mean times its scaling factor).
        noise: Their inversion.
        reconstruction_latents: Sampling ``noise`` with the source prompt (``None`` where not
            computed, see ``reconstruct``).
        round_trip: ``[B]``, exact inversion's measured
            ``max|sample(noise) - source_latents| / max(1, max|source_latents|)`` per row
            (``None`` for the other methods).
        converged: ``[B]``, whether ``round_trip`` is within the exact settings' ``tolerance``
            (``None`` for the other methods).
        null_text_losses: ``[N]``, the per-step losses of null-text inversion (``None``
            otherwise).
        mask: DiffEdit only: ``[B, 1, h, w]``, the latent mask (1: drawn again with the target
            prompt, 0: the input kept; ``None`` for the other methods).
    """

    images: np.ndarray
    latents: Array
    source_latents: Array
    noise: Array
    reconstruction_latents: Optional[Array] = None
    round_trip: Optional[Array] = None
    converged: Optional[Array] = None
    null_text_losses: Optional[Array] = None
    mask: Optional[Array] = None


# ----------------------------------------------------------------------------- jitted parts
# one jitted function per (kind, module object): jit keeps its compiled programs on the function
_JITTED = StaticCache("jitted VAE and text-encoder calls")


def _per_object(kind: str, obj, make):
    """``make()`` once per (kind, object), the object by identity (a module need not be hashable)."""
    return _JITTED.get((kind, ByIdentity(obj)), make)


def _encoder(vae):
    scale = float(vae.config.scaling_factor)

    def encode(params, images):  # NHWC in [0, 1] -> NCHW latents
        pixels = 2.0 * jnp.transpose(images, (0, 3, 1, 2)) - 1.0
        dist = vae.apply({"params": params}, pixels.astype(vae.dtype), method=vae.encode).latent_dist
        return scale * jnp.transpose(dist.mean, (0, 3, 1, 2)).astype(jnp.float32)

    return _per_object("encode", vae, lambda: jax.jit(encode))


def _decoder(vae):
    scale = float(vae.config.scaling_factor)

    def decode(params, latents):  # NCHW latents -> NHWC in [0, 1]
        pixels = vae.apply({"params": params}, (latents / scale).astype(vae.dtype), method=vae.decode).sample
        return jnp.clip(jnp.transpose(pixels.astype(jnp.float32), (0, 2, 3, 1)) / 2 + 0.5, 0.0, 1.0)

    return _per_object("decode", vae, lambda: jax.jit(decode))


def _text_embedder(text_encoder):
    def embed(params, ids):
        return text_encoder(ids, params=params)[0].astype(jnp.float32)

    return _per_object("text", text_encoder, lambda: jax.jit(embed))


def encode_images(vae, vae_params, images) -> Array:
    """``[B, 4, H/f, W/f]`` latents of NHWC images in [0, 1] (uint8: 0-255): the mean of the VAE's
    latent distribution times its scaling factor, as diffusers' pipelines scale latents.

    Args:
        vae: The Flax VAE (``FlaxAutoencoderKL``).
        vae_params: Its parameters.
        images: ``[B, H, W, 3]`` (or one image ``[H, W, 3]``), floats in [0, 1] or uint8.

    Returns:
        ``[B, 4, H/f, W/f]`` float32 NCHW latents (``f`` the VAE's downsampling factor).

    Raises:
        ValueError: ``images`` is not NHWC RGB, is neither floating point nor uint8, or has
            values outside [0, 1].
    """
    return _encoder(vae)(vae_params, _as_unit_images(images))


def decode_latents(vae, vae_params, latents) -> np.ndarray:
    """NHWC images in [0, 1] (float32) of NCHW latents: the VAE's decoder on latents / scaling factor.

    Args:
        vae: The Flax VAE (``FlaxAutoencoderKL``).
        vae_params: Its parameters.
        latents: ``[B, 4, h, w]``, NCHW latents.

    Returns:
        ``[B, H, W, 3]`` float32 images in [0, 1] (a NumPy array).
    """
    return np.asarray(_decoder(vae)(vae_params, jnp.asarray(latents, jnp.float32)))


def embed_prompts(tokenizer, text_encoder, text_params, prompts: Sequence[str]) -> Array:
    """``[len(prompts), L, D]`` text embeddings, tokenized as diffusers' pipelines do (padded to
    the tokenizer's ``model_max_length``).

    Args:
        tokenizer: The CLIP tokenizer.
        text_encoder: The Flax CLIP text encoder.
        text_params: Its parameters.
        prompts: The prompts.

    Returns:
        ``[len(prompts), L, D]`` float32 embeddings (``L`` the tokenizer's ``model_max_length``).
    """
    ids = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="np").input_ids
    return _text_embedder(text_encoder)(text_params, jnp.asarray(ids))


def _as_unit_images(images) -> Array:
    array = np.asarray(images)
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4 or array.shape[-1] != 3:
        raise ValueError(f"images must be NHWC RGB ([B, H, W, 3]; one image [H, W, 3]), got shape {array.shape}.")
    if array.dtype == np.uint8:
        return jnp.asarray(array, jnp.float32) / 255.0
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"images must be floats in [0, 1] or uint8, got dtype {array.dtype}.")
    low, high = float(np.min(array)), float(np.max(array))
    if low < -1e-3 or high > 1 + 1e-3:
        raise ValueError(f"images must be in [0, 1] (got values in [{low:.3g}, {high:.3g}]); "
                         "for images in [-1, 1] pass (images + 1) / 2.")
    return jnp.asarray(array, jnp.float32)


def _parts(pipeline_or_parts) -> EditParts:
    if isinstance(pipeline_or_parts, EditParts):
        return pipeline_or_parts
    if isinstance(pipeline_or_parts, Mapping):
        return EditParts(**{k: pipeline_or_parts.get(k) for k in EditParts._fields})
    missing = [k for k in ("tokenizer", "text_encoder", "vae", "unet") if getattr(pipeline_or_parts, k, None) is None]
    if missing:
        raise ValueError(f"a Flax Stable Diffusion pipeline (or EditParts) is needed; this one lacks {', '.join(missing)}.")
    scheduler = getattr(pipeline_or_parts, "scheduler", None)
    config = getattr(scheduler, "config", None)
    return EditParts(tokenizer=pipeline_or_parts.tokenizer, text_encoder=pipeline_or_parts.text_encoder,
                     vae=pipeline_or_parts.vae, unet=pipeline_or_parts.unet,
                     scheduler_config=None if config is None else dict(config))


def edit_scheduler(scheduler_config: Optional[Mapping[str, Any]] = None, solver_order: int = 2,
                   overrides: Union[Mapping[str, Any], SchedulerConfig, None] = None) -> DPMSolverMultistepScheduler:
    """The sampler the edit inverts and samples with: the noise schedule of ``scheduler_config`` (a
    pipeline's ``scheduler.config``; Stable Diffusion's when ``None``), DPM-Solver++ of
    ``solver_order`` on the log-SNR grid ending at the smallest noise level (:data:`EDIT_SCHEDULER`),
    then ``overrides`` (a dict of scheduler parameters; a full :class:`~dpmjax.SchedulerConfig` is
    used as it is).

    Args:
        scheduler_config: A pipeline's ``scheduler.config`` (its noise schedule is used; keys that
            are not scheduler fields are ignored); ``None`` (default) for Stable Diffusion's.
        solver_order: The DPM-Solver++ order, 1, 2 or 3 (default 2).
        overrides: A dict of scheduler parameters applied last, or a full
            :class:`~dpmjax.SchedulerConfig` used as it is.

    Returns:
        The :class:`~dpmjax.DPMSolverMultistepScheduler`.

    Raises:
        ValueError: A value is invalid (see :class:`~dpmjax.SchedulerConfig`).
    """
    if isinstance(overrides, SchedulerConfig):
        return DPMSolverMultistepScheduler(overrides)
    base = dict(SD_SCHEDULE if scheduler_config is None else scheduler_config)
    values = {**base, **EDIT_SCHEDULER, "solver_order": solver_order, **dict(overrides or {})}
    fields = SchedulerConfig.field_names()
    return DPMSolverMultistepScheduler(SchedulerConfig.from_dict({k: v for k, v in values.items() if k in fields}))


def _prompts(prompt, batch: int, name: str) -> list:
    prompts = [prompt] * batch if isinstance(prompt, str) else list(prompt)
    if len(prompts) != batch or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"{name} must be a string or {batch} strings (one per image), got {prompt!r}.")
    return prompts


@rejects_removed_keywords
def edit_images(
    pipeline_or_parts,
    params: Mapping[str, Any],
    images,
    source_prompt: Union[str, Sequence[str]],
    target_prompt: Union[str, Sequence[str]],
    *,
    method: str | EditMethod = "exact",
    num_inference_steps: int = 50,
    guidance_scale: float = 3.0,
    scheduler_config: Union[Mapping[str, Any], SchedulerConfig, None] = None,
    negative_prompt: str = "",
    inversion_guidance_scale: Optional[float] = None,
    reconstruct: Optional[bool] = None,
    progress: bool = False,
) -> EditResult:
    """Edit ``images`` from ``source_prompt`` (what they show) to ``target_prompt``.

    The images are encoded with the VAE, inverted to noise with the source prompt under
    classifier-free guidance, sampled back with the target prompt and decoded (see the module
    docstring for the three methods).

    Args:
        pipeline_or_parts: A diffusers 0.39 Flax Stable Diffusion pipeline (its tokenizer, text
            encoder, VAE, UNet and scheduler config are used), :class:`EditParts`, or a mapping
            with those keys.
        params: The pipeline's params (``"text_encoder"``, ``"vae"``, ``"unet"``; others are
            ignored).
        images: NHWC in [0, 1] (``[B, H, W, 3]``, or one image ``[H, W, 3]``; uint8 0-255
            accepted), H and W multiples of the VAE's factor (8 for Stable Diffusion).
        source_prompt: What the images show: one string, or one per image.
        target_prompt: What they should show: one string, or one per image.
        method: ``"exact"`` (default), ``"plain"``, ``"null-text"`` or ``"diffedit"`` (see the
            module docstring) with their defaults, or a method's settings object:
            :class:`~dpmjax.models.flax_sd.edit_methods.ExactEdit` (``inversion=`` an
            :class:`~dpmjax.ExactInversion`), :class:`~dpmjax.models.flax_sd.edit_methods.PlainEdit`
            :class:`~dpmjax.models.flax_sd.edit_methods.NullTextEdit` (``inner_steps``,
            ``optimizer``) or :class:`~dpmjax.models.flax_sd.edit_methods.DiffEditEdit`
            (``diffedit=`` a :class:`~dpmjax.DiffEdit`, ``seed``).
        num_inference_steps: Sampler steps (default 50).
        guidance_scale: Classifier-free guidance of the edit (and of the inversion, unless
            ``inversion_guidance_scale`` is given; default 3.0).
        scheduler_config: Scheduler parameters overriding the edit's sampler, a dict (e.g.
            ``{"solver_order": 3}``: DPM-Solver++ of order 2 by default), or a full
            :class:`~dpmjax.SchedulerConfig` used as it is (see :func:`edit_scheduler`).
        negative_prompt: The prompt whose embedding is the unconditional input (default ``""``).
        inversion_guidance_scale: Another guidance scale for plain and exact inversion; ``None``
            (default) uses ``guidance_scale``.
        reconstruct: Also sample the noise with the source prompt (``reconstruction_latents``);
            by default (``None``) where it is cheap next to the inversion (exact: one sampling
            pass against many; null-text: free) and not for plain. ``False`` never returns it;
            DiffEdit never does (outside its mask the result is the input).
        progress: Progress bars on stderr.

    Returns:
        An :class:`EditResult` with the edited images and latents, the source latents, the noise,
        and, depending on the method, the reconstruction, the round trips or the null-text
        losses.

    Raises:
        ValueError: ``method`` is neither a method's name nor its settings object;
            ``pipeline_or_parts`` lacks a tokenizer, text encoder, VAE or UNet; ``images`` is not
            NHWC RGB, not floats in [0, 1] or uint8, or its height or width is not a multiple of
            the VAE's factor; a prompt is neither a string nor one string per image; or the
            scheduler, inversion or sampling refuses its arguments (see :func:`edit_scheduler`,
            :func:`dpmjax.invert`, :func:`dpmjax.null_text_inversion`).
        TypeError: A removed keyword is passed (``exact``, exact inversion's fields such as
            ``tolerance``, ``null_text_steps``, ``optimizer``, ``solver_order``: see
            :data:`~dpmjax.models.flax_sd.edit_methods.REMOVED_KEYWORDS`); the message gives the
            call to write.
    """
    settings = edit_method(method)
    parts = _parts(pipeline_or_parts)
    pixels = _as_unit_images(images)
    batch = pixels.shape[0]
    factor = 2 ** (len(parts.vae.config.block_out_channels) - 1)
    if pixels.shape[1] % factor or pixels.shape[2] % factor:
        raise ValueError(f"image height and width must be multiples of the VAE's factor {factor}, got {pixels.shape[1:3]}.")
    source, target = _prompts(source_prompt, batch, "source_prompt"), _prompts(target_prompt, batch, "target_prompt")
    scheduler = edit_scheduler(parts.scheduler_config, overrides=scheduler_config)
    w = float(guidance_scale)
    w_invert = w if inversion_guidance_scale is None else float(inversion_guidance_scale)

    embed = lambda prompts: embed_prompts(  # noqa: E731
        parts.tokenizer, parts.text_encoder, params["text_encoder"], prompts=prompts)
    both = embed(source + target + [negative_prompt])
    source_emb, target_emb, uncond = both[:batch], both[batch:2 * batch], both[2 * batch:]
    same_prompt = source == target
    latents = _encoder(parts.vae)(params["vae"], pixels)
    unet_params = params["unet"]
    n = num_inference_steps
    round_trip = converged = losses = recon = mask = None

    if isinstance(settings, DiffEditEdit):
        source_inputs = UNetInputs(unet_params, source_emb, uncond)
        masked = diffedit(guided_unet(parts.unet, w), latents, scheduler, num_inference_steps=n, source_cond=source_inputs,
                           target_cond=UNetInputs(unet_params, target_emb, uncond),
                           key=jax.random.PRNGKey(settings.seed), settings=settings.diffedit,
                           inversion_model_fn=guided_unet(parts.unet, w_invert), progress=progress)
        edited, noise, mask = masked.sample, masked.noise, masked.mask
        round_trip, converged = masked.round_trip, masked.converged
    elif isinstance(settings, NullTextEdit):
        model = unet_with_embedding(parts.unet)
        nulls = jnp.broadcast_to(uncond, source_emb.shape)
        inverted = null_text_inversion(model, latents, scheduler, num_inference_steps=n, cond=source_emb, uncond=nulls,
                                       guidance_scale=w, optimizer=settings.optimizer,
                                       inner_steps=settings.inner_steps, model_params=unet_params, progress=progress)
        noise, recon, losses = inverted.noise, inverted.reconstruction, inverted.losses
        edited = recon if same_prompt else sample_with_null_embeddings(
            model, noise, scheduler, num_inference_steps=n, cond=target_emb, null_embeddings=inverted.null_embeddings,
            guidance_scale=w, model_params=unet_params, progress=progress)
    else:  # ExactEdit or PlainEdit
        exactly = isinstance(settings, ExactEdit)
        source_inputs = UNetInputs(unet_params, source_emb, uncond)
        inverted = invert(guided_unet(parts.unet, w_invert), latents, scheduler, num_inference_steps=n,
                          cond=source_inputs, exact=settings.inversion if exactly else False, progress=progress)
        noise = inverted.sample
        if exactly:
            round_trip, converged = inverted.round_trip, inverted.converged
        model_fn = guided_unet(parts.unet, w)
        edited = sample(model_fn, noise, scheduler, num_inference_steps=n,
                        cond=UNetInputs(unet_params, target_emb, uncond), progress=progress).sample
        if same_prompt and w == w_invert:
            recon = edited
        elif reconstruct or (reconstruct is None and exactly):
            recon = sample(guided_unet(parts.unet, w_invert), noise, scheduler, num_inference_steps=n,
                           cond=source_inputs, progress=progress).sample
    if reconstruct is False:
        recon = None
    return EditResult(images=decode_latents(parts.vae, params["vae"], edited), latents=edited, source_latents=latents,
                      noise=noise, reconstruction_latents=recon, round_trip=round_trip, converged=converged,
                      null_text_losses=losses, mask=mask)

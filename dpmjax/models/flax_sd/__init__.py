"""Flax Stable Diffusion with dpmjax: diffusers <= 0.39's Flax UNet as a guided model function
(:mod:`.unet`), editing real images in one call (:mod:`.edit`), and dpmjax's scheduler inside
diffusers 0.39's own Flax pipelines (:mod:`.pipelines`, through :func:`for_diffusers_pipelines`).

dpmjax never imports diffusers on its own: only :func:`load_unet`, :func:`for_diffusers_pipelines`
and the fixtures of :mod:`.testing` (Stable Diffusion at toy size, random weights) do, after the
one check of the installed versions (:mod:`.requirements`: diffusers < 0.40, transformers < 5 for
the pipelines' text encoders; ``pip install "dpmjax[flax-sd]"``).

    from dpmjax.models import flax_sd

    unet, params = flax_sd.load_unet("path/to/unet", dtype=jnp.bfloat16)
    model_fn = flax_sd.guided_unet(unet, guidance_scale=7.5)
    noise = dpmjax.invert(model_fn, latents, scheduler, 50,
                          cond=flax_sd.UNetInputs(params, text_embeddings, uncond_embeddings)).sample
    result = flax_sd.edit_images(pipeline, params, images, source_prompt="a cat", target_prompt="a dog")
    result = flax_sd.edit_images(pipeline, params, images, source_prompt="a cat", target_prompt="a dog",
                                 method=flax_sd.NullTextEdit(inner_steps=5))   # a method's own settings
"""

from .edit import EDIT_SCHEDULER, SD_SCHEDULE, EditParts, EditResult, edit_images, edit_scheduler
from .edit_methods import METHODS, DiffEditEdit, EditMethod, ExactEdit, NullTextEdit, PlainEdit, edit_method
from .unet import UNetInputs, cast_floating, guided_unet, load_unet, unet_eps, unet_with_embedding

__all__ = ["UNetInputs", "guided_unet", "unet_with_embedding", "unet_eps", "load_unet", "cast_floating",
           "for_diffusers_pipelines", "edit_images", "edit_scheduler", "EditParts", "EditResult", "METHODS",
           "EditMethod", "ExactEdit", "PlainEdit", "NullTextEdit", "DiffEditEdit", "edit_method", "EDIT_SCHEDULER", "SD_SCHEDULE"]


def for_diffusers_pipelines():
    """dpmjax's ``FlaxDPMSolverMultistepScheduler`` for diffusers 0.39's own Flax pipelines
    (:class:`dpmjax.models.flax_sd.pipelines.FlaxDPMSolverMultistepScheduler`): a ``FlaxSchedulerMixin``
    that ``from_pretrained(folder, scheduler=...)`` accepts and ``save_pretrained`` saves as diffusers'
    own class. Imports diffusers (< 0.40): an ImportError says what to install when it is missing.

    Returns:
        The class :class:`dpmjax.models.flax_sd.pipelines.FlaxDPMSolverMultistepScheduler`.

    Raises:
        ImportError: diffusers is missing, or is 0.40 or newer.
    """
    from .pipelines import FlaxDPMSolverMultistepScheduler

    return FlaxDPMSolverMultistepScheduler

"""DiffEdit (Couairon et al., "DiffEdit: Diffusion-based semantic image editing with mask guidance",
ICLR 2023, arXiv:2210.11427): edit only where two prompts disagree.

1. **The mask** (:func:`diffedit_mask`). The data ``x_0`` is noised to the level of step
   ``N - floor(N * mask_strength)`` of the sampler's grid, ``x_t = alpha_t x_0 + sigma_t eps``, for
   ``mask_noisings`` draws of ``eps``; the model's outputs under the source and target conditions
   differ where the prompts disagree. Their absolute difference, averaged over the draws and the
   channels, is clamped at ``mask_threshold`` times its mean and the map divided by that clamp is
   thresholded at 0.5: ``M = [D > mask_threshold * mean(D) / 2]``.
2. **The inversion**: the data is inverted with the source condition over the last
   ``K = floor(N * strength)`` steps of the grid (plain or exact, :func:`dpmjax.invert`), keeping
   the latents it passes at each noise level.
3. **Masked sampling**: from the inverted noise the target condition is sampled over the same
   ``K`` steps; after each step, where ``M = 0``, the sample is replaced by the inverted latents at
   the noise level the step ended on (:class:`~dpmjax.trajectories.scan.Kept`), so the last step
   puts back the data itself there.

Where dpmjax differs from diffusers' ``StableDiffusionDiffEditPipeline`` (``background=`` and
the mask's scale):

* diffusers blends the sample after step ``i`` (at level ``sigma_{i+1}``) with the inverted
  latents at ``sigma_i``, one step noisier, so its last step leaves the inverted latents of the
  first inversion step, not the image, outside the mask (noise at ``sigma_1``: 0.34 at 10 steps
  on Stable Diffusion's default grid). dpmjax blends at the level the step ended on, so outside
  the mask the result *is* the input; ``background="diffusers"`` reproduces diffusers' images
  (its inverse scheduler's own grid, the noisier latents), for comparing with it.
* diffusers scales the mask by the mean over the whole batch, so a row's mask depends on the other
  rows; dpmjax scales each row by its own mean (identical for a batch of one).
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax import lax

from .. import checks
from ..scheduler import DPMSolverMultistepInverseScheduler
from .exact_options import resolved
from .grid_entry import grid_state
from .inversion import invert
from .model_fn import ConditionalModelFn
from .scan import Kept, ScanOptions, as_array, check_scheduler, scan_steps_jit

Array = jax.Array
BACKGROUNDS = ("same-level", "diffusers")


@dataclasses.dataclass(frozen=True)
class DiffEdit:
    """DiffEdit's settings (:func:`diffedit`); frozen, hashable, checked when built. The defaults
    are diffusers' pipeline's.

    Attributes:
        strength: The fraction of the grid's steps, from its noisy end, that are inverted and
            sampled again (diffusers' ``inpaint_strength``; in (0, 1], default 0.8):
            ``floor(N * strength)`` steps, at least one.
        mask_strength: Where the mask's noisings are made: at step ``N - floor(N * mask_strength)``
            of the grid (diffusers' ``mask_encode_strength``; in (0, 1], default 0.5).
        mask_noisings: The noise draws the mask averages (``num_maps_per_mask``; default 10).
        mask_threshold: The clamp of the difference map in units of its mean
            (``mask_thresholding_ratio``; > 0, default 3.0): a point is in the mask where the
            difference exceeds half the clamp.
        inversion: ``False`` (default): plain inversion; ``True`` or an
            :class:`~dpmjax.ExactInversion`: exact inversion of the sampler's last steps.
        background: ``"same-level"`` (default): outside the mask the sample after each step is
            the inverted latents at the level that step ended on (the data itself after the last
            step); ``"diffusers"``: as diffusers' pipeline does, the inverse scheduler's own grid
            and the latents one level noisier (plain inversion only; see the module docstring).
    """

    strength: float = 0.8
    mask_strength: float = 0.5
    mask_noisings: int = 10
    mask_threshold: float = 3.0
    inversion: Any = False
    background: str = "same-level"

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
        fraction = dict(low=0.0, high=1.0, open_low=True)
        set_("strength", checks.real("strength", self.strength, **fraction, note=" (the fraction of the steps sampled again)"))
        set_("mask_strength", checks.real("mask_strength", self.mask_strength, **fraction,
                                          note=" (where on the grid the mask is measured)"))
        set_("mask_noisings", checks.integer("mask_noisings", self.mask_noisings, 1, note=" (noise draws averaged)"))
        threshold = self.mask_threshold
        if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or not 0.0 < float(threshold) < float("inf"):
            raise ValueError(f"mask_threshold must be a finite number > 0 (the clamp in units of the map's mean), got {threshold!r}.")
        set_("mask_threshold", float(threshold))
        resolved("inversion", self.inversion)  # True, False or an ExactInversion
        if self.background not in BACKGROUNDS:
            raise ValueError(f"background must be one of {', '.join(map(repr, BACKGROUNDS))}, got {self.background!r}.")
        if self.background == "diffusers" and resolved("inversion", self.inversion) is not None:
            raise ValueError("background='diffusers' inverts with diffusers' inverse scheduler, which is plain inversion: "
                             "pass inversion=False (exact inversion keeps background='same-level').")

    def replace(self, **changes) -> "DiffEdit":
        """A copy with ``changes`` (checked again)."""
        return dataclasses.replace(self, **changes)

    def steps(self, num_inference_steps: int) -> int:
        """``K``, the steps inverted and sampled again on a grid of ``num_inference_steps``."""
        return min(int(num_inference_steps * self.strength), num_inference_steps)

    def mask_step(self, num_inference_steps: int) -> int:
        """The grid index whose noise level the mask's noisings use.

        Raises:
            ValueError: ``floor(N * mask_strength)`` is 0 (the noisings would be made at the grid's
                end, where there is no noise to tell the conditions apart).
        """
        if int(num_inference_steps * self.mask_strength) < 1:
            raise ValueError(f"mask_strength={self.mask_strength} of num_inference_steps={num_inference_steps} noises at the "
                             f"grid's end (floor(N * mask_strength) = 0): raise mask_strength to at least "
                             f"{1 / num_inference_steps:.3g} or take more steps.")
        return num_inference_steps - min(int(num_inference_steps * self.mask_strength), num_inference_steps)


class DiffEditResult(NamedTuple):
    """Result of :func:`diffedit`.

    Attributes:
        sample: The edited data (the input's shape).
        mask: The mask used (1: drawn again with the target condition, 0: kept), broadcastable
            to the data (``[B, 1, ...]`` with a channel axis).
        noise: The inverted latents the sampling started from (at the grid's level
            ``N - K``).
        round_trip: Exact inversion only: per row, ``max|sample(noise) - x| / max(1, max|x|)``
            of the source sampler (``None`` for plain inversion).
        converged: Exact inversion only: whether ``round_trip`` is within the tolerance.
    """

    sample: Array
    mask: Array
    noise: Array
    round_trip: Optional[Array] = None
    converged: Optional[Array] = None


def _row_mean(a: Array) -> Array:
    return jnp.mean(a.reshape(a.shape[0], -1), axis=1).reshape((-1,) + (1,) * (a.ndim - 1))


def _mask_map(model_fn, *, latents, noises, timestep, alpha, sigma, source_cond, target_cond, channel_axis):
    """The difference map ``mean_draws |f(x_t, cond_target) - f(x_t, cond_source)|`` (averaged
    over ``channel_axis`` too, kept as a size-one axis)."""

    def one(total, eps):
        noisy = (alpha * latents + sigma * eps).astype(latents.dtype)
        source = model_fn(noisy, timestep, source_cond)
        target = model_fn(noisy, timestep, target_cond)
        return total + jnp.abs(target.astype(jnp.float32) - source.astype(jnp.float32)), None

    total, _ = lax.scan(one, jnp.zeros(latents.shape, jnp.float32), noises)
    mean = total / noises.shape[0]
    return mean if channel_axis is None else jnp.mean(mean, axis=channel_axis, keepdims=True)


def _mask_from_map(difference: Array, threshold: float) -> Array:
    clamp = _row_mean(difference) * threshold
    scaled = jnp.clip(difference, 0.0, clamp) / clamp
    return (scaled > 0.5).astype(jnp.float32)


def _mask_program(*, model_fn, channel_axis, threshold, state, latents, noises, index, source_cond, target_cond):
    sigma_d = state.sigmas[index]  # diffusers' sigma = sigma_t / alpha_t
    alpha = 1.0 / jnp.sqrt(1.0 + sigma_d**2)
    difference = _mask_map(model_fn, latents=latents, noises=noises, timestep=state.timesteps[index],
                           alpha=alpha, sigma=sigma_d * alpha, source_cond=source_cond, target_cond=target_cond,
                           channel_axis=channel_axis)
    return _mask_from_map(difference, threshold)


def _checked_key(key) -> Array:
    """``key`` if it is a ``jax.random`` key (``jax.random.key(seed)`` or ``PRNGKey(seed)``), else a
    ``ValueError`` naming it."""
    typed = isinstance(key, jax.Array) and jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
    raw = isinstance(key, jax.Array) and key.dtype == jnp.uint32 and key.shape == (2,)
    if not (typed or raw):
        raise ValueError(f"key must be a jax.random key (jax.random.key(seed) or jax.random.PRNGKey(seed)), got {key!r}.")
    return key


def _checked_mask(mask, shape) -> Array:
    """``mask`` as float32, after refusing one that does not broadcast to ``shape`` or (when its
    values are known here) holds values outside [0, 1] or NaN."""
    mask = as_array(mask).astype(jnp.float32)
    try:
        fits = jnp.broadcast_shapes(mask.shape, shape) == tuple(shape)
    except ValueError:
        fits = False
    if not fits:
        raise ValueError(f"mask must broadcast to the data's shape {tuple(shape)}, got {tuple(mask.shape)}.")
    if not isinstance(mask, jax.core.Tracer):
        low, high = float(jnp.min(mask)), float(jnp.max(mask))
        if not (0.0 <= low and high <= 1.0):  # also NaN
            raise ValueError(f"mask must hold values in [0, 1] (1: drawn again, 0: kept), got values in [{low:g}, {high:g}].")
    return mask


def _checked_conditions(source_cond, target_cond, rows: int) -> None:
    """Refuse a ``target_cond`` whose leaf has another number of rows where ``source_cond``'s has one
    per row of the data (``rows`` on axis 0): the model would meet it inside the trace, as a
    broadcasting error. A leaf of one row (shared by every row), conditions of different structure
    and leaves without the data's rows are the model's to judge."""
    source, target = jax.tree_util.tree_leaves(source_cond), jax.tree_util.tree_leaves(target_cond)
    if jax.tree_util.tree_structure(source_cond) != jax.tree_util.tree_structure(target_cond):
        return
    for a, b in zip(source, target):
        per_row = jnp.ndim(a) >= 1 and jnp.shape(a)[0] == rows
        if per_row and jnp.ndim(b) >= 1 and jnp.shape(b)[0] not in (rows, 1):
            raise ValueError(f"target_cond must have one row per row of the data ({rows}) or one row for all, where "
                             f"source_cond has one per row: got a leaf of shape {tuple(jnp.shape(b))} against "
                             f"{tuple(jnp.shape(a))}.")


def _checked(scheduler, settings, latents, *, why: str) -> Array:
    """``latents`` as an array, after refusing a scheduler that is no sampler, settings that are no
    :class:`DiffEdit` and data that is not floating point."""
    check_scheduler(scheduler)
    if not scheduler.forward:
        raise ValueError(f"{why}: pass a DPMSolverMultistepScheduler.")
    if not isinstance(settings, DiffEdit):
        raise ValueError(f"settings must be a dpmjax.DiffEdit, got {settings!r}.")
    x = as_array(latents)
    checks.floating_array("latents", x)
    return x


_mask_jit = jax.jit(_mask_program, static_argnames=("model_fn", "channel_axis", "threshold"))


def diffedit_mask(
    model_fn: ConditionalModelFn,
    latents: Array,
    scheduler,
    num_inference_steps: int,
    *,
    source_cond: Any,
    target_cond: Any,
    key: Optional[Array] = None,
    noises: Optional[Array] = None,
    settings: DiffEdit = DiffEdit(),
    channel_axis: Optional[int] = 1,
) -> Array:
    """DiffEdit's mask: where the model's outputs under ``source_cond`` and ``target_cond``
    disagree on noised copies of ``latents`` (module docstring, step 1).

    Args:
        model_fn: ``model_fn(x, t, cond)``, guided or not (e.g. :func:`dpmjax.classifier_free_guidance`).
        latents: The data ``[B, ...]``.
        scheduler: The :class:`~dpmjax.DPMSolverMultistepScheduler` whose grid places the noisings.
        num_inference_steps: ``N``, its number of steps.
        source_cond: What the data shows (``model_fn``'s third argument).
        target_cond: What it should show.
        key: A ``jax.random`` key for the noisings; or pass ``noises``.
        noises: ``[mask_noisings, *latents.shape]``, the noisings' standard normal draws.
        settings: A :class:`DiffEdit` (its ``mask_strength``, ``mask_noisings`` and
            ``mask_threshold`` are used).
        channel_axis: The axis averaged into the map (default 1: NCHW latents), ``None`` for
            none (the mask then has the data's shape).

    Returns:
        The float32 mask of 0s and 1s, ``latents``' shape with ``channel_axis`` of size one.

    Raises:
        ValueError: ``scheduler`` is not a forward dpmjax scheduler; both or neither of ``key``
            and ``noises``; ``key`` is no ``jax.random`` key; ``noises`` has another shape;
            ``channel_axis`` is outside the data; ``settings`` is not a :class:`DiffEdit`;
            ``floor(N * mask_strength)`` is 0; a ``target_cond`` leaf with another number of rows than
            ``source_cond``'s per-row leaf (1 is allowed).
    """
    x = _checked(scheduler, settings, latents, why="diffedit_mask places its noisings on a sampler's grid")
    _checked_conditions(source_cond, target_cond, rows=x.shape[0])
    if channel_axis is not None and not (isinstance(channel_axis, int) and 1 <= channel_axis < x.ndim):
        raise ValueError(f"channel_axis must be None or an axis of the data after the batch axis (1 to {x.ndim - 1}), "
                         f"got {channel_axis!r}.")
    shape = (settings.mask_noisings,) + x.shape
    if (key is None) == (noises is None):
        raise ValueError("diffedit_mask takes key (a jax.random key) or noises (the draws), exactly one.")
    if noises is None:
        noises = jax.random.normal(_checked_key(key), shape, x.dtype)
    noises = as_array(noises)
    if noises.shape != shape:
        raise ValueError(f"noises must have shape {shape} ([mask_noisings, *latents.shape]), got {noises.shape}.")
    state = grid_state(scheduler, x.shape, num_inference_steps=num_inference_steps, sigmas=None, dtype=jnp.float32,
                       caller="diffedit_mask")
    return _mask_jit(model_fn=model_fn, channel_axis=channel_axis, threshold=settings.mask_threshold,
                     state=state, latents=x, noises=noises,
                     index=settings.mask_step(num_inference_steps), source_cond=source_cond, target_cond=target_cond)


def diffedit(
    model_fn: ConditionalModelFn,
    latents: Array,
    scheduler,
    num_inference_steps: int,
    *,
    source_cond: Any,
    target_cond: Any,
    mask: Optional[Array] = None,
    key: Optional[Array] = None,
    settings: DiffEdit = DiffEdit(),
    inversion_model_fn: Optional[ConditionalModelFn] = None,
    channel_axis: Optional[int] = 1,
    progress: bool = False,
) -> DiffEditResult:
    """Edit ``latents`` from ``source_cond`` to ``target_cond`` only where they disagree: the mask
    (:func:`diffedit_mask`, or ``mask``), the inversion of the grid's last steps, and sampling that
    keeps the inverted latents outside the mask (the module docstring).

    Args:
        model_fn: ``model_fn(x, t, cond)``, used for the mask and the sampling (and the inversion,
            unless ``inversion_model_fn`` is given).
        latents: The data ``[B, ...]``.
        scheduler: The sampler, a :class:`~dpmjax.DPMSolverMultistepScheduler`.
        num_inference_steps: ``N``, the steps of its whole grid (``floor(N * strength)`` run).
        source_cond: What the data shows.
        target_cond: What it should show.
        mask: A mask of your own (1: drawn again, 0: kept; broadcastable to the data), instead
            of DiffEdit's.
        key: The ``jax.random`` key of the mask's noisings (needed without ``mask``).
        settings: A :class:`DiffEdit` (default: diffusers' defaults, plain inversion, the
            background at the same level).
        inversion_model_fn: Another model for the inversion (e.g. another guidance scale).
        channel_axis: The mask's averaged axis (see :func:`diffedit_mask`).
        progress: Progress lines on stderr.

    Returns:
        A :class:`DiffEditResult`.

    Raises:
        ValueError: ``settings`` is not a :class:`DiffEdit`; ``floor(N * strength)`` is 0, or
            the steps it runs span no noise (a grid ending in a zero-length step); both or neither
            of ``mask`` and ``key``; a ``key`` that is no ``jax.random`` key; a ``mask`` that does
            not broadcast to the data or holds values outside [0, 1]; a ``target_cond`` leaf with
            another number of rows than ``source_cond``'s per-row leaf; and what
            :func:`diffedit_mask`, :func:`dpmjax.invert` and :func:`dpmjax.sample` refuse.
    """
    x = _checked(scheduler, settings, latents, why="diffedit samples with a sampler (the inversion uses it mirrored, "
                 "or diffusers' inverse scheduler with background='diffusers')")
    _checked_conditions(source_cond, target_cond, rows=x.shape[0])
    checks.integer("num_inference_steps", num_inference_steps, 1)
    n, k = num_inference_steps, settings.steps(num_inference_steps)
    if k < 1:
        raise ValueError(f"strength={settings.strength} of num_inference_steps={n} is no step (floor(N * strength) = 0): "
                         f"raise strength to at least {1 / n:.3g} or take more steps.")
    if (mask is None) == (key is None):
        raise ValueError("diffedit takes key (a jax.random key for the mask's noisings) or a mask of your own, exactly one.")
    state = grid_state(scheduler, x.shape, num_inference_steps=n, sigmas=None, dtype=jnp.float32, caller="diffedit")
    if not float(state.sigmas[n - k]) > float(state.sigmas[n]):  # the last steps span no noise (a zero-length step)
        raise ValueError(f"strength={settings.strength} of num_inference_steps={n} runs {k} step(s) that span no noise on "
                         f"this grid (its last step has zero length: final_sigmas_type='sigma_min'): raise strength to at "
                         f"least {(k + 1) / n:.3g} or take more steps.")
    if mask is None:
        mask = diffedit_mask(model_fn, x, scheduler, num_inference_steps=n, source_cond=source_cond, target_cond=target_cond,
                             key=key, settings=settings, channel_axis=channel_axis)
    mask = _checked_mask(mask, x.shape)
    inverting = model_fn if inversion_model_fn is None else inversion_model_fn
    label = dict(progress=progress)
    if settings.background == "diffusers":  # the inverse scheduler's first K steps; blend one level noisier
        inverse = DPMSolverMultistepInverseScheduler(scheduler.config)
        inverse_state = grid_state(inverse, x.shape, num_inference_steps=n, sigmas=None, dtype=jnp.float32,
                                   caller="diffedit")
        _, path, _ = scan_steps_jit(inverse, inverting, ScanOptions(return_samples=True, steps=(0, k), label="invert",
                                                                    **label),
                                    state=inverse_state, x=x, cond=source_cond, keys=None, noises=None)
        reference = path[::-1]
        noise = reference[0]
        out, _, _ = scan_steps_jit(scheduler, model_fn, ScanOptions(steps=(n - k, n), label="diffedit", **label),
                                   state=state, x=noise, cond=target_cond, keys=None, noises=None,
                                   kept=Kept(mask=mask, reference=reference))
        return DiffEditResult(sample=out, mask=mask, noise=noise)
    # same level: the sampler's last K steps as a grid of their own, inverted (plain or exact) and sampled
    grid = dict(num_inference_steps=n) if k == n else dict(sigmas=state.sigmas[n - k:n + 1])
    inverted = invert(inverting, x, scheduler, cond=source_cond, exact=settings.inversion, return_samples=True,
                      progress=progress, **grid)
    path = inverted.samples  # after each inversion step, the noise last
    if path.shape[0] == k + 1:  # exact inversion's path starts at the data
        path = path[1:]
    reference = jnp.concatenate([path[: k - 1][::-1], x[None].astype(path.dtype)], axis=0)
    sample_state = state if k == n else grid_state(scheduler, x.shape, num_inference_steps=None, sigmas=grid["sigmas"],
                                                   dtype=jnp.float32, caller="diffedit")
    out, _, _ = scan_steps_jit(scheduler, model_fn, ScanOptions(label="diffedit", **label), state=sample_state,
                               x=inverted.sample.astype(x.dtype), cond=target_cond, keys=None, noises=None,
                               kept=Kept(mask=mask, reference=reference.astype(x.dtype)))
    return DiffEditResult(sample=out, mask=mask, noise=inverted.sample, round_trip=inverted.round_trip,
                          converged=inverted.converged)

"""Null-text inversion with optax (Mokady et al. 2023, "Null-text Inversion for Editing Real Images
using Guided Diffusion Models", CVPR; arXiv:2211.09794), for any multistep DPM-Solver sampler.

Inverting an image with classifier-free guidance at a large scale ``w`` reconstructs it badly: the
guided model is not the one the (approximate) inversion assumed. Null-text inversion keeps the
model and the conditioning ``c`` and instead tunes the *unconditional* input per step, so that
guided sampling retraces a pivot trajectory ``z*_N, ..., z*_0 = x`` (the inversion of ``x`` at
``w = 1``, where inversion is accurate):

    guided(x, t; u) = eps(x, t, u) + w (eps(x, t, c) - eps(x, t, u))
    u_k = argmin_u || F_k(xbar_k; u) - z*_{k+1} ||^2,   xbar_{k+1} = F_k(xbar_k; u_k),   xbar_0 = z*_N,

where ``F_k`` is the sampler's step ``k`` (a multistep update: it also uses the converted outputs
of the steps before, which are already fixed by then). Each ``u_k`` starts from ``u_{k-1}`` and
takes up to ``inner_steps`` optimiser steps (Adam, learning rate 1e-2 by default, as in the paper),
stopping early per row once its mean squared error is below ``tolerance``. The per-step
embeddings then reconstruct ``x`` at scale ``w`` (:func:`sample_with_null_embeddings`) and, with
another ``cond``, edit it (prompt-to-prompt style).

``model(x, t, cond)`` is the conditional model of :func:`dpmjax.classifier_free_guidance`; ``cond``
and ``uncond`` are pytrees whose leaves are batched on axis 0 like ``x`` (text embeddings
``[B, L, D]`` for Stable Diffusion; label embeddings ``[B, width]`` for the shipped digits model).
The whole inversion is one jitted scan with the optimisation inside (``lax.while_loop``). Large
models should pass their weights as ``model_params`` (then ``model(x, t, cond, model_params)``):
they then enter the compiled program as an argument rather than as constants.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax import lax

from .. import checks, solver
from ..numerics.rows import per_row
from ..scheduler import DPMSolverMultistepScheduler
from ..static_cache import ByIdentity, StaticCache, static_key, value_key
from . import guidance
from . import progress as progress_line
from .grid_entry import empty_history, grid_state, grid_steps
from .inversion import invert
from .model_fn import ConditionalModelFn, ParametrisedModelFn
from .scan import Trajectory, check_model_output, check_scheduler

Array = jax.Array


@flax.struct.dataclass
class NullTextInversion:
    """Result of :func:`null_text_inversion`.

    Attributes:
        noise: The pivot's noise ``z*_N`` (start of the reconstruction).
        null_embeddings: ``uncond`` with a leading ``[N]`` axis, one per sampler step.
        reconstruction: Guided sampling from ``noise`` with those embeddings (the image it
            restores).
        losses: ``[N]``, the largest per-row mean squared error to the pivot after each step's
            optimisation.
        initial_losses: ``[N]``, the same before it (with the embedding carried over from the step
            before).
        optimizer_steps: ``[N]``, optimiser steps taken at each sampler step.
        pivot: The ``w = 1`` inversion that was retraced (a :class:`~dpmjax.Trajectory`).
    """

    noise: Array
    null_embeddings: Any
    reconstruction: Array
    losses: Array
    initial_losses: Array
    optimizer_steps: Array
    pivot: Trajectory


def _row_mse(x: Array, target: Array) -> Array:
    diff = (x.astype(jnp.float32) - target.astype(jnp.float32)).reshape(x.shape[0], -1)
    return jnp.mean(diff**2, axis=1)


def _mask_rows(tree, active: Array):
    """Zero the updates of finished rows (leaves batched on axis 0 like the sample)."""
    rows = active.shape[0]

    def mask(u):
        if u.ndim == 0 or u.shape[0] != rows:
            return u
        return jnp.where(per_row(active, u), u, jnp.zeros_like(u))

    return jax.tree_util.tree_map(mask, tree)


class _Carry(NamedTuple):
    """Carry of the scan over the sampler's steps: the sample, the model-output history and the
    null embedding of the step before (the optimisation's start)."""

    sample: Array
    history: Array
    null: Any


class _Tuning(NamedTuple):
    """Carry of one step's optimisation: the null embedding, the optimiser's state, steps taken, the
    per-row losses of the last step and of the first."""

    null: Any
    opt_state: Any
    taken: Array
    losses: Array
    first_losses: Array


class _ScanSettings(NamedTuple):
    """Static settings of :func:`_guided_scan` (hashable: one compiled program per value).
    ``optimize``: tune each step's null towards its target; else use the nulls given."""

    guidance_scale: float
    optimizer: ByIdentity  # of the optax transformation
    inner_steps: int
    tolerance: float
    optimize: bool
    progress: bool


def _guided_scan(scheduler, model, settings: _ScanSettings, *, state, noise, cond, nulls, targets, model_params):
    """One scan over the sampler's steps. ``settings.optimize``: tune each step's null (from the
    previous step's) towards ``targets[k]``; else use ``nulls[k]`` as given. ``_guided_scan_jit`` is
    this function jitted with the first three arguments static; the others are keyword-only."""
    guidance_scale, inner_steps, tolerance = settings.guidance_scale, settings.inner_steps, settings.tolerance
    optimize, progress, optimizer = settings.optimize, settings.progress, settings.optimizer.value
    config = scheduler.config
    n = state.timesteps.shape[0]
    rows = noise.shape[0]
    if model_params is not None:
        model = (lambda f: lambda x, t, c: f(x, t, c, model_params))(model)

    def body(carry, inputs):
        x, history, null = carry.sample, carry.history, carry.null
        (i, t, row), null_given, target = inputs
        null = null if optimize else null_given
        out_cond = model(x, t, cond)
        check_model_output(out_cond, x, name="model", config=config)

        def step_with(u):  # the guided step with null embedding u: (next sample, history)
            out_null = model(x, t, u)
            check_model_output(out_null, x, name="model", config=config)
            out = guidance.guide(out_null, out_cond, guidance_scale)
            return solver.step_from_output(config, state, index=i, row=row, sample=x, model_output=out, history=history)

        if optimize:
            def loss(u):
                per_row = _row_mse(step_with(u)[0], target)
                return jnp.sum(per_row), per_row

            def unfinished(c: _Tuning):
                return (c.taken < inner_steps) & jnp.any(c.losses > tolerance)

            def optimise(c: _Tuning) -> _Tuning:
                (_, per_row), grad = jax.value_and_grad(loss, has_aux=True)(c.null)
                updates, opt_state = optimizer.update(grad, c.opt_state, c.null)
                return _Tuning(null=optax.apply_updates(c.null, _mask_rows(updates, per_row > tolerance)),
                               opt_state=opt_state, taken=c.taken + 1, losses=per_row,
                               first_losses=jnp.where(c.taken == 0, per_row, c.first_losses))

            unknown = jnp.full((rows,), jnp.inf, jnp.float32)
            tuned = lax.while_loop(unfinished, optimise, _Tuning(null=null, opt_state=optimizer.init(null), taken=jnp.asarray(0),
                                                                 losses=unknown, first_losses=unknown))
            null, taken, first = tuned.null, tuned.taken, tuned.first_losses
        else:
            taken = jnp.asarray(0)
        x_next, history = step_with(null)
        if optimize:
            error = _row_mse(x_next, target)
            before = jnp.where(taken > 0, first, error)
            errors = (jnp.max(error), jnp.max(before))
        else:
            errors = (jnp.asarray(0.0, jnp.float32),) * 2
        progress_line.report(progress, i, n, label="null-text inversion" if optimize else "sample (null-text)")
        return _Carry(sample=x_next, history=history, null=null), (null, errors, taken)

    first_null = jax.tree_util.tree_map(lambda a: a[0], nulls)
    per_step = (grid_steps(state), nulls, targets)
    start = _Carry(sample=noise, history=empty_history(config, noise), null=first_null)
    done, (used, errors, taken) = lax.scan(body, start, per_step)
    x = done.sample
    return x, used, errors, taken


# ----------------------------------------------------------------------------- static arguments
# jit compiles once per static argument; an optax transformation compares by identity, and
# ``optax.adam(1e-2)`` builds new closures on every call. Equal settings (``value_key``: the code of
# its functions and the values they close over) find the handle made the first time.
_OPTIMIZERS = StaticCache("null-text optimisers")
_PIVOT_MODELS = StaticCache("null-text pivot models")


def _static_optimizer(optimizer: optax.GradientTransformation) -> ByIdentity:
    """One handle per optimiser settings, for :class:`_ScanSettings` (a static argument)."""
    return _OPTIMIZERS.get(value_key(optimizer), lambda: ByIdentity(optimizer))


_NO_OPTIMIZER = ByIdentity(optax.identity())
_guided_scan_jit = jax.jit(_guided_scan, static_argnums=(0, 1, 2))


def _checked(scheduler, guidance_scale, *, inner_steps, tolerance):
    check_scheduler(scheduler)
    if not scheduler.forward:
        raise ValueError("null-text inversion retraces a sampler: pass a DPMSolverMultistepScheduler.")
    if scheduler.config.is_sde:
        raise ValueError(f"null-text inversion needs a deterministic sampler, not algorithm_type={scheduler.config.algorithm_type!r}.")
    checks.real("guidance_scale", guidance_scale, finite=True, note=" (a Python number: it is static)")
    checks.integer("inner_steps", inner_steps, 0)
    checks.real("tolerance", tolerance, low=0.0, finite=True)


def _pivot_model(model, packed: bool, config):
    """The pivot inversion's ``model_fn(x, t, cond)``: ``model`` with its output checked under this
    function's name for it (``model``); with ``packed``, ``model(x, t, cond, params)`` called as
    ``model_fn(x, t, (cond, params))``. One per model and config: jit caches by identity."""
    return _PIVOT_MODELS.get((static_key(model), packed, config), lambda: _make_pivot_model(model, packed, config))


def _make_pivot_model(model, packed: bool, config):
    def checked(out, x):
        check_model_output(out, x, name="model", config=config)
        return out

    if packed:
        return lambda x, t, both: checked(model(x, t, both[0], both[1]), x)
    return lambda x, t, cond: checked(model(x, t, cond), x)


def _per_step(tree, n: int):
    return jax.tree_util.tree_map(lambda a: jnp.broadcast_to(a, (n,) + jnp.shape(a)), tree)


def null_text_inversion(
    model: ConditionalModelFn | ParametrisedModelFn,
    data: Array,
    scheduler: DPMSolverMultistepScheduler,
    num_inference_steps: int,
    *,
    cond: Any,
    uncond: Any,
    guidance_scale: float,
    optimizer: Optional[optax.GradientTransformation] = None,
    inner_steps: int = 10,
    tolerance: float = 1e-5,
    exact_pivot: bool = False,
    model_params: Any = None,
    progress: bool = False,
) -> NullTextInversion:
    """Invert ``data`` so that guided sampling at ``guidance_scale`` reconstructs it.

    Mokady et al. 2023 (arXiv:2211.09794), see the module docstring: the pivot ``z*`` is the
    inversion of ``data`` at ``w = 1``; then, step by step, the unconditional input ``u_k`` of the
    guided model ``eps(x, t, u) + w (eps(x, t, c) - eps(x, t, u))`` is tuned so that the guided
    sampler's step lands on the pivot:
    ``u_k = argmin_u || F_k(xbar_k; u) - z*_{k+1} ||^2``. Each ``u_k`` starts from ``u_{k-1}``.

    The inversion compiles once per shape and optimiser *settings*: a fresh ``optax.adam(1e-2)``
    on every call reuses the program, because the optimiser is recognised by the code of its
    functions and the values they close over (numbers, strings, dtypes, small concrete arrays,
    nested transformations and schedules). An optimiser closing over anything else (a traced
    value, an array over 64 KiB, an object with its own ``__eq__``) is recognised by identity
    only: pass the same object again to reuse its program.

    Args:
        model: The conditional model ``model(x, t, cond)`` of
            :func:`dpmjax.classifier_free_guidance` (``model(x, t, cond, model_params)`` when
            ``model_params`` is given).
        data: The data to invert, batched on axis 0 (e.g. Stable Diffusion latents).
        scheduler: A deterministic :class:`~dpmjax.DPMSolverMultistepScheduler` (the sampler to
            retrace).
        num_inference_steps: ``N``, the number of sampler steps.
        cond: The conditioning ``c``: a pytree whose leaves are batched on axis 0 like ``data``
            (text embeddings ``[B, L, D]`` for Stable Diffusion).
        uncond: The initial unconditional input (e.g. the embedding of the empty prompt), a pytree
            like ``cond``.
        guidance_scale: The guidance scale ``w``, a Python number (it is static).
        optimizer: Any optax transformation (default ``optax.adam(1e-2)``, as in the paper).
        inner_steps: Optimiser steps per sampler step at most (an integer >= 0, default 10).
        tolerance: Per row, stop a step's optimisation once its mean squared error to the pivot is
            below this (a number >= 0, default ``1e-5``).
        exact_pivot: Retrace the *exact* inversion at ``w = 1`` (:func:`dpmjax.invert` with
            ``exact=True``), whose reconstruction is exact, instead of the plain one.
        model_params: The model's weights, passed as ``model(x, t, cond, model_params)``, so that
            they enter the compiled program as an argument rather than as constants (for large
            models); ``None`` (default) calls ``model(x, t, cond)``.
        progress: Print progress lines on stderr.

    Returns:
        A :class:`NullTextInversion`: the noise, the per-step null embeddings, the reconstruction,
        the losses and the pivot.

    Raises:
        ValueError: ``scheduler`` is not a dpmjax scheduler, is an inverse scheduler or is
            stochastic (an SDE ``algorithm_type``); ``guidance_scale`` is not a real number;
            ``inner_steps`` is not an integer >= 0; ``tolerance`` is not a number >= 0; ``data``
            has no batch axis, has size zero or is not floating point; ``model`` returns something
            other than one floating-point array of the data's shape; or :func:`dpmjax.invert` refuses the pivot's inversion (e.g.
            ``num_inference_steps`` not an integer in ``[1, num_train_timesteps]``).
    """
    _checked(scheduler, guidance_scale, inner_steps=inner_steps, tolerance=tolerance)
    checks.function("model", model)
    checks.boolean("exact_pivot", exact_pivot)
    checks.boolean("progress", progress)
    if optimizer is not None and not (callable(getattr(optimizer, "init", None)) and callable(getattr(optimizer, "update", None))):
        raise ValueError(f"optimizer must be an optax GradientTransformation (e.g. optax.adam(1e-2)), got {optimizer!r}.")
    optimizer = _static_optimizer(optax.adam(1e-2) if optimizer is None else optimizer)
    x = jnp.asarray(data)
    if x.ndim == 0:
        raise ValueError("data must have a batch axis (rows on axis 0), got a scalar.")
    checks.floating_array("data", x)
    checks.non_empty("data", x)
    pivot_model = _pivot_model(model, model_params is not None, scheduler.config)
    pivot_cond = cond if model_params is None else (cond, model_params)
    pivot = invert(pivot_model, x, scheduler, num_inference_steps=num_inference_steps, cond=pivot_cond,
                   exact=exact_pivot, return_samples=True, progress=progress)
    path = pivot.samples  # inversion order: path[j] is the sampler's point N - 1 - j; path[-1] the noise
    targets = jnp.concatenate([path[:-1][::-1], x[None].astype(path.dtype)])
    state = grid_state(scheduler, x.shape, num_inference_steps=num_inference_steps, sigmas=None,
                       dtype=solver.compute_dtype(x), caller="null_text_inversion")
    n = state.num_inference_steps
    settings = _ScanSettings(guidance_scale=float(guidance_scale), optimizer=optimizer, inner_steps=int(inner_steps),
                             tolerance=float(tolerance), optimize=True, progress=progress)
    recon, nulls, (losses, initial), taken = _guided_scan_jit(scheduler, model, settings, state=state, noise=pivot.sample,
                                                              cond=cond, nulls=_per_step(uncond, n), targets=targets,
                                                              model_params=model_params)
    return NullTextInversion(noise=pivot.sample, null_embeddings=nulls, reconstruction=recon, losses=losses,
                             initial_losses=initial, optimizer_steps=taken, pivot=pivot)


def sample_with_null_embeddings(
    model: ConditionalModelFn | ParametrisedModelFn,
    noise: Array,
    scheduler: DPMSolverMultistepScheduler,
    num_inference_steps: int,
    *,
    cond: Any,
    null_embeddings: Any,
    guidance_scale: float,
    model_params: Any = None,
    progress: bool = False,
) -> Array:
    """Guided sampling from ``noise`` with one unconditional input per step.

    The embeddings come from :func:`null_text_inversion`. With the inversion's ``cond`` it
    reconstructs the image; with another ``cond`` it edits it (prompt-to-prompt style).

    Args:
        model: The conditional model ``model(x, t, cond)`` (``model(x, t, cond, model_params)``
            when ``model_params`` is given).
        noise: The starting sample, e.g. :attr:`NullTextInversion.noise`, batched on axis 0.
        scheduler: A deterministic :class:`~dpmjax.DPMSolverMultistepScheduler`.
        num_inference_steps: ``N``, the number of sampler steps (as in the inversion).
        cond: The conditioning: a pytree whose leaves are batched on axis 0 like ``noise``.
        null_embeddings: One unconditional input per step: a pytree with a leading ``[N]`` axis
            on every leaf (:attr:`NullTextInversion.null_embeddings`).
        guidance_scale: The guidance scale ``w``, a Python number (it is static).
        model_params: The model's weights, passed as ``model(x, t, cond, model_params)``;
            ``None`` (default) calls ``model(x, t, cond)``.
        progress: Print a progress line on stderr.

    Returns:
        The sample after the ``N`` guided steps, with ``noise``'s shape.

    Raises:
        ValueError: ``scheduler`` is not a dpmjax scheduler, is an inverse scheduler or is
            stochastic; ``guidance_scale`` is not a real number; ``num_inference_steps`` is not
            an integer in ``[1, num_train_timesteps]``; ``noise`` is not floating point or has
            size zero; some leaf of ``null_embeddings`` does not have a leading axis of ``N``;
            ``model`` returns something other than one floating-point array of the noise's shape.
    """
    _checked(scheduler, guidance_scale, inner_steps=0, tolerance=0.0)
    checks.function("model", model)
    checks.boolean("progress", progress)
    noise = jnp.asarray(noise)
    checks.floating_array("noise", noise)
    checks.non_empty("noise", noise)
    state = grid_state(scheduler, noise.shape, num_inference_steps=num_inference_steps, sigmas=None,
                       dtype=solver.compute_dtype(noise), caller="sample_with_null_embeddings")
    n = state.num_inference_steps
    leading = {jnp.shape(a)[0] if jnp.ndim(a) else None for a in jax.tree_util.tree_leaves(null_embeddings)}
    if leading != {n}:
        raise ValueError(f"null_embeddings must have a leading axis of num_inference_steps={n} on every leaf, got {leading}.")
    settings = _ScanSettings(guidance_scale=float(guidance_scale), optimizer=_NO_OPTIMIZER, inner_steps=0, tolerance=0.0,
                             optimize=False, progress=progress)
    x, _, _, _ = _guided_scan_jit(scheduler, model, settings, state=state, noise=noise, cond=cond, nulls=null_embeddings,
                                  targets=None, model_params=model_params)
    return x

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

import functools
from typing import Any, Callable, Optional

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax import lax

from . import solver
from .scheduler import DPMSolverMultistepScheduler
from .trajectory import Trajectory, _check_scheduler, _report_progress, invert

Array = jax.Array


@flax.struct.dataclass
class NullTextInversion:
    """Result of :func:`null_text_inversion`.

    noise: the pivot's noise ``z*_N`` (start of the reconstruction). null_embeddings: ``uncond``
    with a leading ``[N]`` axis, one per sampler step. reconstruction: guided sampling from ``noise``
    with those embeddings (the image it restores). losses: ``[N]``, the largest per-row mean squared
    error to the pivot after each step's optimisation; initial_losses: the same before it (with the
    embedding carried over from the step before). optimizer_steps: ``[N]``, steps taken.
    pivot: the ``w = 1`` inversion that was retraced.
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
        return jnp.where(active.reshape((rows,) + (1,) * (u.ndim - 1)), u, jnp.zeros_like(u))

    return jax.tree_util.tree_map(mask, tree)


def _guided_scan(scheduler, model, guidance_scale, optimizer, inner_steps, tolerance, optimize, progress,
                 state, noise, cond, nulls, targets, model_params):
    """One scan over the sampler's steps. ``optimize``: tune each step's null (from the previous
    step's) towards ``targets[k]``; else use ``nulls[k]`` as given."""
    config = scheduler.config
    n = state.timesteps.shape[0]
    K = config.solver_order
    cdt = solver.compute_dtype(noise)
    rows = noise.shape[0]
    if model_params is not None:
        model = (lambda f: lambda x, t, c: f(x, t, c, model_params))(model)

    def body(carry, inputs):
        x, history, null = carry
        i, t, row, null_given, target = inputs
        null = null if optimize else null_given
        out_cond = model(x, t, cond)
        previous = [lax.dynamic_index_in_dim(history, (i - k) % K, 0, keepdims=False) for k in range(1, K)]

        def step_with(u):
            out_u = model(x, t, u)
            out = out_u + guidance_scale * (out_cond - out_u)
            m0 = solver.convert_model_output(config, state, i, solver.mean_of_model_output(config, out, x), x)
            return solver.update(config, row, x, m0, previous), m0

        if optimize:
            def loss(u):
                per_row = _row_mse(step_with(u)[0], target)
                return jnp.sum(per_row), per_row

            def unfinished(c):
                _, _, j, per_row, _ = c
                return (j < inner_steps) & jnp.any(per_row > tolerance)

            def one(c):
                u, opt_state, j, _, first = c
                (_, per_row), grad = jax.value_and_grad(loss, has_aux=True)(u)
                updates, opt_state = optimizer.update(grad, opt_state, u)
                u = optax.apply_updates(u, _mask_rows(updates, per_row > tolerance))
                return u, opt_state, j + 1, per_row, jnp.where(j == 0, per_row, first)

            unknown = jnp.full((rows,), jnp.inf, jnp.float32)
            null, _, taken, _, first = lax.while_loop(unfinished, one, (null, optimizer.init(null), jnp.asarray(0), unknown, unknown))
        else:
            taken = jnp.asarray(0)
        x_next, m0 = step_with(null)
        history = lax.dynamic_update_index_in_dim(history, m0.astype(cdt), i % K, 0)
        if optimize:
            error = _row_mse(x_next, target)
            before = jnp.where(taken > 0, first, error)
            errors = (jnp.max(error), jnp.max(before))
        else:
            errors = (jnp.asarray(0.0, jnp.float32),) * 2
        _report_progress(progress, i, n, "null-text inversion" if optimize else "sample (null-text)")
        return (x_next, history, null), (null, errors, taken)

    first_null = jax.tree_util.tree_map(lambda a: a[0], nulls)
    history = jnp.zeros((K,) + noise.shape, cdt)
    per_step = (jnp.arange(n), state.timesteps, solver.trajectory_rows(state), nulls, targets)
    (x, _, _), (used, errors, taken) = lax.scan(body, (noise, history, first_null), per_step)
    return x, used, errors, taken


_NO_OPTIMIZER = optax.identity()
_STATIC = ("scheduler", "model", "guidance_scale", "optimizer", "inner_steps", "tolerance", "optimize", "progress")
_guided_scan_jit = jax.jit(_guided_scan, static_argnums=tuple(range(len(_STATIC))))


def _checked(scheduler, guidance_scale, inner_steps, tolerance):
    _check_scheduler(scheduler)
    if not scheduler.forward:
        raise ValueError("null-text inversion retraces a sampler: pass a DPMSolverMultistepScheduler.")
    if scheduler.config.is_sde:
        raise ValueError(f"null-text inversion needs a deterministic sampler, not algorithm_type={scheduler.config.algorithm_type!r}.")
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)):
        raise ValueError(f"guidance_scale must be a Python number (it is static), got {guidance_scale!r}.")
    if isinstance(inner_steps, bool) or not isinstance(inner_steps, int) or inner_steps < 0:
        raise ValueError(f"inner_steps must be a non-negative integer, got {inner_steps!r}.")
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or tolerance < 0:
        raise ValueError(f"tolerance must be a non-negative number, got {tolerance!r}.")


@functools.lru_cache(maxsize=32)
def _packed(model):
    """``model(x, t, (cond, params))`` for ``model(x, t, cond, params)`` (one per model: jit caches by identity)."""
    return lambda x, t, packed: model(x, t, packed[0], packed[1])


def _per_step(tree, n: int):
    return jax.tree_util.tree_map(lambda a: jnp.broadcast_to(a, (n,) + jnp.shape(a)), tree)


def null_text_inversion(
    model: Callable[..., Array],
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
    """Invert ``data`` so that guided sampling at ``guidance_scale`` reconstructs it; see the module
    docstring. ``uncond`` is the initial unconditional input (e.g. the embedding of the empty
    prompt), ``optimizer`` any optax transformation (default ``optax.adam(1e-2)``).
    ``exact_pivot=True`` retraces the *exact* inversion at ``w = 1`` (:func:`dpmjax.invert` with
    ``exact=True``), whose reconstruction is exact, instead of the plain one."""
    _checked(scheduler, guidance_scale, inner_steps, tolerance)
    optimizer = optax.adam(1e-2) if optimizer is None else optimizer
    x = jnp.asarray(data)
    if x.ndim == 0:
        raise ValueError("data must have a batch axis.")
    pivot_model, pivot_cond = (model, cond) if model_params is None else (_packed(model), (cond, model_params))
    pivot = invert(pivot_model, x, scheduler, num_inference_steps, cond=pivot_cond, exact=exact_pivot,
                   return_samples=True, progress=progress)
    path = pivot.samples  # inversion order: path[j] is the sampler's point N - 1 - j; path[-1] the noise
    targets = jnp.concatenate([path[:-1][::-1], x[None].astype(path.dtype)])
    state = scheduler.set_timesteps(scheduler.create_state(), num_inference_steps, x.shape, solver.compute_dtype(x))
    n = state.num_inference_steps
    recon, nulls, (losses, initial), taken = _guided_scan_jit(
        scheduler, model, float(guidance_scale), optimizer, inner_steps, float(tolerance), True, progress,
        state, pivot.sample, cond, _per_step(uncond, n), targets, model_params)
    return NullTextInversion(pivot.sample, nulls, recon, losses, initial, taken, pivot)


def sample_with_null_embeddings(
    model: Callable[..., Array],
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
    """Guided sampling from ``noise`` with one unconditional input per step (``null_embeddings``,
    leading axis ``[N]``, from :func:`null_text_inversion`). With the inversion's ``cond`` it
    reconstructs the image; with another ``cond`` it edits it."""
    _checked(scheduler, guidance_scale, 0, 0.0)
    noise = jnp.asarray(noise)
    state = scheduler.set_timesteps(scheduler.create_state(), num_inference_steps, noise.shape, solver.compute_dtype(noise))
    n = state.num_inference_steps
    leading = {jnp.shape(a)[0] if jnp.ndim(a) else None for a in jax.tree_util.tree_leaves(null_embeddings)}
    if leading != {n}:
        raise ValueError(f"null_embeddings must have a leading axis of num_inference_steps={n} on every leaf, got {leading}.")
    x, _, _, _ = _guided_scan_jit(scheduler, model, float(guidance_scale), _NO_OPTIMIZER, 0, 0.0, False, progress,
                                  state, noise, cond, null_embeddings, None, model_params)
    return x

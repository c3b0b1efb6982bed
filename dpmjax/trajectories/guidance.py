"""Classifier-free guidance (Ho & Salimans 2022, arXiv:2207.12598): ``out = u + w (c - u)``.

``u`` and ``c`` are the model's outputs without and with the condition; one batched model call
computes both by doubling the batch along axis 0.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from .. import checks
from .model_fn import ConditionalModelFn, ModelFn

Array = jax.Array


def guide(unconditional: Array, conditional: Array, guidance_scale) -> Array:
    """``u + w (c - u)``: the guided output from the two model outputs."""
    return unconditional + guidance_scale * (conditional - unconditional)


def doubled(x: Array, uncond: Any, cond: Any) -> tuple:
    """``(x twice, [uncond; cond])`` along axis 0: the inputs of one model call for both outputs
    (``uncond``/``cond`` are pytrees batched on axis 0)."""
    both = jax.tree_util.tree_map(lambda u, c: jnp.concatenate([u, c], axis=0), uncond, cond)
    return jnp.concatenate([x, x], axis=0), both


def guide_doubled(output: Array, guidance_scale) -> Array:
    """The guided output from a model call on :func:`doubled` inputs (unconditional half first)."""
    unconditional, conditional = jnp.split(output, 2, axis=0)
    return guide(unconditional, conditional, guidance_scale)


_BOTH_OR_NEITHER = object()


def classifier_free_guidance(model: ConditionalModelFn, cond: Any = _BOTH_OR_NEITHER, uncond: Any = _BOTH_OR_NEITHER,
                             guidance_scale: float = None) -> ModelFn:
    """A model function applying classifier-free guidance with one batched model call per step.

    Two forms. ``classifier_free_guidance(model, guidance_scale=w)`` returns ``model_fn(x, t, (cond,
    uncond))``: pass the conditions as ``cond=(cond, uncond)`` to :func:`dpmjax.sample` /
    :func:`dpmjax.invert`, so they are inputs of the compiled program: another prompt reuses it
    (no recompilation), and exact inversion can gather the rows it finishes apart with their
    conditions. ``classifier_free_guidance(model, cond, uncond, w)`` returns ``model_fn(x, t)`` with
    the conditions fixed in it (they become constants of the program: a new prompt compiles again).

    Args:
      model: ``model(x, t, c)``, the conditional model.
      cond: the condition (a pytree batched on axis 0, e.g. text embeddings or labels); omitted with
        ``uncond`` for the first form.
      uncond: the unconditional (null) condition, shaped like ``cond``.
      guidance_scale: ``w``; exactly 1 calls the model on ``cond`` alone (no doubled batch).

    Returns:
      ``model_fn(x, t, (cond, uncond))`` (first form) or ``model_fn(x, t)`` (second), computing
      ``u + w (c - u)``. Build one per direction for separate inversion and sampling scales.

    Raises:
      ValueError: ``model`` is not callable, only one of ``cond`` and ``uncond`` is given, or
        ``guidance_scale`` is missing or not a finite real number (a JAX array is taken as it is:
        a traced scale can be differentiated).

    Example:
      >>> import jax.numpy as jnp, dpmjax
      >>> model = lambda x, t, c: x * c[:, None]
      >>> guided = dpmjax.classifier_free_guidance(model, guidance_scale=2.0)
      >>> guided(jnp.ones((2, 3)), 0, (jnp.array([1.0, 2.0]), jnp.zeros(2)))[:, 0]
      Array([2., 4.], dtype=float32)
    """
    checks.function("model", model)
    if (cond is _BOTH_OR_NEITHER) != (uncond is _BOTH_OR_NEITHER):
        raise ValueError("classifier_free_guidance takes cond and uncond together (the conditions fixed in model_fn), "
                         "or neither (model_fn(x, t, (cond, uncond)) takes them as dpmjax's cond=).")
    if not isinstance(guidance_scale, jax.Array):
        guidance_scale = checks.real("guidance_scale", guidance_scale, finite=True)
    alone = isinstance(guidance_scale, float) and guidance_scale == 1.0

    def guided_by(x, t, conditions):
        c, u = conditions
        if alone:
            return model(x, t, c)
        inputs, both = doubled(x, u, c)
        output = model(inputs, t, both)
        checks.output_array("model", output, note=" (the conditional model's output for the doubled batch "
                                                  f"{tuple(inputs.shape)})")
        return guide_doubled(output, guidance_scale)

    if cond is _BOTH_OR_NEITHER:
        return guided_by
    return lambda x, t: guided_by(x, t, (cond, uncond))

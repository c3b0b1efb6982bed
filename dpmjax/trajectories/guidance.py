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


def classifier_free_guidance(model: ConditionalModelFn, cond: Any, uncond: Any, guidance_scale: float) -> ModelFn:
    """A ``model_fn(x, t)`` applying classifier-free guidance with one batched model call per step.

    Args:
      model: ``model(x, t, c)``, the conditional model.
      cond: the condition (a pytree batched on axis 0, e.g. text embeddings or labels).
      uncond: the unconditional (null) condition, shaped like ``cond``.
      guidance_scale: ``w``; exactly 1 calls the model on ``cond`` alone (no doubled batch).

    Returns:
      ``model_fn(x, t)`` computing ``u + w (c - u)``. Build one per direction for separate
      inversion and sampling scales.

    Raises:
      ValueError: ``model`` is not callable, or ``guidance_scale`` is not a finite real number
        (a JAX array is taken as it is: a traced scale can be differentiated).
    """
    checks.function("model", model)
    if not isinstance(guidance_scale, jax.Array):
        guidance_scale = checks.real("guidance_scale", guidance_scale, finite=True)
    if isinstance(guidance_scale, float) and guidance_scale == 1.0:
        return lambda x, t: model(x, t, cond)

    def guided(x, t):
        inputs, conditions = doubled(x, uncond, cond)
        output = model(inputs, t, conditions)
        checks.output_array("model", output, note=" (the conditional model's output for the doubled batch "
                                                  f"{tuple(inputs.shape)})")
        return guide_doubled(output, guidance_scale)

    return guided

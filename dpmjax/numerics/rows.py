"""Row-wise reductions and broadcasts: axis 0 of an array holds ``rows`` independent problems (the
batch, or 1 for one coupled problem), each reduced over all its other axes."""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def working_dtype(dtype):
    """float32 arithmetic for bf16/fp16/fp32 inputs; float64 for float64 ones (``jax_enable_x64``)."""
    return jnp.promote_types(dtype, jnp.float32)


def row_dot(u: Array, v: Array, rows: int) -> Array:
    """``[rows]`` inner products of the rows of ``u`` and ``v``, in the working dtype."""
    dt = working_dtype(u.dtype)
    return jnp.sum((u.astype(dt) * v.astype(dt)).reshape(rows, -1), axis=1)


def row_norm(u: Array, rows: int) -> Array:
    """``[rows]`` Euclidean norms of the rows of ``u``."""
    return jnp.sqrt(row_dot(u, u, rows))


def row_max_abs(x: Array, rows: int) -> Array:
    """``[rows]`` largest absolute values of the rows of ``x``."""
    return jnp.max(jnp.abs(x.astype(working_dtype(x.dtype))).reshape(rows, -1), axis=1)


def per_row(values: Array, like: Array) -> Array:
    """``values`` (``[rows]``) shaped to broadcast over the rows of ``like`` (``[rows or batch, ...]``)."""
    return values.reshape(values.shape + (1,) * (like.ndim - 1))


def scale_rows(weights: Array, vectors: Array) -> Array:
    """``weights[r] * vectors[r]``, in ``vectors``' dtype."""
    return per_row(weights, vectors).astype(vectors.dtype) * vectors

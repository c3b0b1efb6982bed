"""Anderson acceleration of a fixed-point iteration ``y = g(y)``, one problem per batch row.

Plain iteration ``y <- g(y)`` converges linearly, at the rate of g's contraction. Anderson mixing
(Anderson 1965, J. ACM 12; Walker & Ni 2011, SIAM J. Numer. Anal. 49) keeps the last ``m`` iterates
``y_i`` and values ``g_i = g(y_i)`` and takes

    y_next = g_k - sum_j gamma_j (g_{j+1} - g_j),   gamma = argmin || f_k - sum_j gamma_j (f_{j+1} - f_j) ||

with ``f_i = g_i - y_i``: a secant method that uses one evaluation of g per iteration and no
Jacobian. Each row has its own least-squares problem, so rows never mix. Generic: knows nothing of
schedulers.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax import lax

from .rows import per_row

Array = jax.Array


def mix(G: Array, F: Array, valid: Array) -> Array:
    """Anderson's next iterate per row from the histories ``G`` and ``F`` (``[m, rows, D]``, oldest
    first, newest last; ``valid[m]`` marks entries that hold real iterates). Falls back to the newest
    ``g`` where the mixing is not finite."""
    pairs = valid[1:] & valid[:-1]
    dF = jnp.where(pairs[None, None, :], jnp.moveaxis(F[1:] - F[:-1], 0, 2), 0.0)  # [rows, D, m - 1]
    dG = jnp.where(pairs[None, None, :], jnp.moveaxis(G[1:] - G[:-1], 0, 2), 0.0)
    gamma = jax.vmap(lambda A, b: jnp.linalg.lstsq(A, b)[0])(dF, F[-1])
    mixed = G[-1] - jnp.einsum("rdm,rm->rd", dG, gamma)
    return jnp.where(jnp.isfinite(mixed), mixed, G[-1])


class FixedPointResult(NamedTuple):
    solution: Array  # each row's best iterate
    residual: Array  # [rows]: its residual, as ``residual_of`` measures it
    iterations: Array  # [rows]: evaluations of g the row used before it stopped
    evaluations: Array  # batched evaluations of g made


class _Carry(NamedTuple):
    """The loop's carry: the iterate, the windows of ``g`` and ``f``, the iterations made (all and per
    row), each row's best iterate and its residual."""

    y: Array
    G: Array
    F: Array
    count: Array
    row_count: Array
    best_y: Array
    best: Array


def anderson_fixed_point(
    g: Callable[[Array], Array],
    y0: Array,
    *,
    residual_of: Callable[[Array], Array],
    threshold: Array,
    rows: int,
    iterations: int,
    window: int = 5,
    max_evaluations: Optional[Array] = None,
) -> FixedPointResult:
    """Iterate ``y = g(y)`` from ``y0`` with Anderson mixing over the last ``window`` differences, at most
    ``iterations`` evaluations of g (and at most ``max_evaluations``, an integer that may be traced: a
    budget); stop when every row's ``residual_of(g(y) - y)`` (``[rows]``) is within ``threshold``.
    Each row keeps its best iterate (the iteration is not monotone).

    A row stops when its best residual is within ``threshold``: from then on its iterate, windows and
    best are frozen (``jnp.where`` on the per-row mask), so its answer does not depend on how long the
    other rows of the batch keep the loop running (a NaN row runs to ``iterations``)."""
    by_row = lambda a: a.reshape(rows, -1)  # noqa: E731
    dtype = jnp.promote_types(y0.dtype, jnp.float32)
    history = jnp.zeros((window + 1, rows, y0.size // rows), dtype)  # window differences

    def unfinished(c: _Carry):
        within = True if max_evaluations is None else c.count < max_evaluations
        return (c.count < iterations) & jnp.any(c.best > threshold) & within

    def iterate(c: _Carry) -> _Carry:
        active = c.best > threshold  # rows not yet stopped; a stopped row is never touched again
        gy = g(c.y)
        res = residual_of(gy - c.y)
        res = jnp.where(jnp.isfinite(res), res, jnp.inf)
        improved = active & (res < c.best)
        # an active row has been active at every iteration, so its window holds ``count`` real entries
        G = jnp.where(active[None, :, None], jnp.roll(c.G, -1, axis=0).at[-1].set(by_row(gy).astype(dtype)), c.G)
        F = jnp.where(active[None, :, None], jnp.roll(c.F, -1, axis=0).at[-1].set(by_row(gy - c.y).astype(dtype)), c.F)
        valid = jnp.arange(window + 1) >= window - c.count
        y_next = mix(G, F, valid).reshape(c.y.shape).astype(c.y.dtype)
        keep = per_row(improved, c.y)
        return _Carry(y=jnp.where(per_row(active, c.y), y_next, c.y), G=G, F=F, count=c.count + 1,
                      row_count=c.row_count + active.astype(c.row_count.dtype),
                      best_y=jnp.where(keep, c.y, c.best_y), best=jnp.where(improved, res, c.best))

    start = _Carry(y=y0, G=history, F=history, count=jnp.asarray(0), row_count=jnp.zeros((rows,), jnp.int32),
                   best_y=y0, best=jnp.full((rows,), jnp.inf, dtype))
    done = lax.while_loop(unfinished, iterate, start)
    return FixedPointResult(solution=done.best_y, residual=done.best, iterations=done.row_count,
                            evaluations=jnp.asarray(done.count, jnp.int32))

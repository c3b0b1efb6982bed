"""Restarted GMRES with one Krylov space per row: ``J d = b`` for a Jacobian that is block diagonal
over the rows (axis 0) of a batch, solved with one batched matrix-vector product per iteration.

A model that treats the rows of a batch independently (a UNet at inference, any element-wise or
per-example map) has a block-diagonal Jacobian. GMRES on the whole batch must then make one
polynomial small on the eigenvalues of *every* block at once; giving each row its own Arnoldi basis
(inner products and least-squares problems per row, Saad & Schultz 1986, SIAM J. Sci. Stat. Comput.
7) solves each block as if alone, at the same cost in products: one ``matvec`` of the whole batch.
With ``rows=1`` it is ordinary GMRES on the flattened vector.

The basis is orthogonalised by classical Gram-Schmidt applied twice ("CGS2", Giraud et al. 2005,
Numer. Math. 101), which is as stable as modified Gram-Schmidt and vectorises over the basis.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array


class GMRESResult(NamedTuple):
    solution: Array
    relative_residual: Array  # [rows]: ||b - J x|| / ||b|| estimated by the last least-squares solve


def row_dot(u: Array, v: Array, rows: int) -> Array:
    """``[rows]`` inner products of the rows of ``u`` and ``v`` (float32 at least)."""
    dt = jnp.promote_types(u.dtype, jnp.float32)
    return jnp.sum((u.astype(dt) * v.astype(dt)).reshape(rows, -1), axis=1)


def row_norm(u: Array, rows: int) -> Array:
    return jnp.sqrt(row_dot(u, u, rows))


def _per_row(weights: Array, vectors: Array, rows: int) -> Array:
    """``weights[r] * vectors[r]`` for weights ``[rows]`` broadcast over each row of ``vectors``."""
    return weights.reshape((rows,) + (1,) * (vectors.ndim - 1)).astype(vectors.dtype) * vectors


def gmres(
    matvec: Callable[[Array], Array],
    b: Array,
    rows: int,
    restart: int = 20,
    cycles: int = 3,
    rtol: float = 1e-6,
) -> GMRESResult:
    """Solve ``matvec(x) = b`` from ``x = 0`` with ``cycles`` restarts of at most ``restart`` steps;
    rows stop contributing once ``||b_r - J x_r|| <= rtol ||b_r||`` and the loop ends when all do."""
    if rows < 1 or b.shape[0] % rows:
        raise ValueError(f"rows must divide the leading axis of b ({b.shape}), got {rows}.")
    b_norm = row_norm(b, rows)
    tiny = jnp.finfo(jnp.float32).tiny

    def cycle(carry):
        x, _, count = carry
        r = b - matvec(x)
        beta = row_norm(r, rows)
        V = jnp.zeros((restart + 1,) + b.shape, b.dtype).at[0].set(_per_row(1.0 / jnp.maximum(beta, tiny), r, rows))
        H = jnp.zeros((rows, restart + 1, restart), jnp.float32)
        rhs = jnp.zeros((rows, restart + 1), jnp.float32).at[:, 0].set(beta)

        def least_squares(H):
            y = jax.vmap(lambda h, c: jnp.linalg.lstsq(h, c)[0])(H, rhs)
            res = jnp.linalg.norm(rhs - jnp.einsum("rij,rj->ri", H, y), axis=1)
            return y, res

        def arnoldi_unfinished(state):
            j, _, _, res = state
            return (j < restart) & jnp.any(res > rtol * b_norm)

        def arnoldi(state):
            j, V, H, _ = state
            w = matvec(V[j])
            h = jnp.zeros((rows, restart + 1), jnp.float32)
            for _ in range(2):  # CGS2
                coeffs = jax.vmap(lambda v: row_dot(v, w, rows))(V)  # [restart + 1, rows]; unused basis vectors are 0
                w = w - jnp.sum(jax.vmap(lambda c, v: _per_row(c, v, rows))(coeffs, V), axis=0)
                h = h + coeffs.T
            norm = row_norm(w, rows)
            V = V.at[j + 1].set(_per_row(jnp.where(norm > tiny, 1.0 / jnp.maximum(norm, tiny), 0.0), w, rows))
            H = H.at[:, :, j].set(h.at[:, j + 1].set(norm))
            _, res = least_squares(H)
            return j + 1, V, H, res

        _, V, H, res = lax.while_loop(arnoldi_unfinished, arnoldi, (0, V, H, beta))
        y, res = least_squares(H)
        x = x + jnp.sum(jax.vmap(lambda c, v: _per_row(c, v, rows))(y.T, V[:restart]), axis=0)
        return x, res, count + 1

    def unfinished(carry):
        _, res, count = carry
        return (count < cycles) & jnp.any(res > rtol * b_norm)

    x, res, _ = lax.while_loop(unfinished, cycle, (jnp.zeros_like(b), b_norm, 0))
    return GMRESResult(x, res / jnp.maximum(b_norm, tiny))

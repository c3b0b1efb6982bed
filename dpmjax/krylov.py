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
    a cycle ends when every row has ``||b_r - J x_r|| <= rtol ||b_r||``. The least-squares problem
    of each row is kept triangular by Givens rotations, so its residual is known at every step
    without solving it (Saad & Schultz 1986)."""
    if rows < 1 or b.shape[0] % rows:
        raise ValueError(f"rows must divide the leading axis of b ({b.shape}), got {rows}.")
    m = restart
    b_norm = row_norm(b, rows)
    wdt = b_norm.dtype  # the working precision: float32, or float64 for float64 systems
    tiny = jnp.finfo(wdt).tiny

    def cycle(carry):
        x, _, count = carry
        r = b - matvec(x)
        beta = row_norm(r, rows)
        V = jnp.zeros((m + 1,) + b.shape, b.dtype).at[0].set(_per_row(1.0 / jnp.maximum(beta, tiny), r, rows))
        R = jnp.zeros((rows, m, m), wdt)
        cs = jnp.ones((rows, m), wdt)
        sn = jnp.zeros((rows, m), wdt)
        g = jnp.zeros((rows, m + 1), wdt).at[:, 0].set(beta)

        def unfinished(state):
            j, *_, res = state
            return (j < m) & jnp.any(res > rtol * b_norm)

        def arnoldi(state):
            j, V, R, cs, sn, g, _ = state
            w = matvec(V[j])
            h = jnp.zeros((rows, m + 1), wdt)
            for _ in range(2):  # CGS2; basis vectors not made yet are zero
                coeffs = jax.vmap(lambda v: row_dot(v, w, rows))(V)  # [m + 1, rows]
                w = w - jnp.sum(jax.vmap(lambda c, v: _per_row(c, v, rows))(coeffs, V), axis=0)
                h = h + coeffs.T
            norm = row_norm(w, rows)
            V = V.at[j + 1].set(_per_row(jnp.where(norm > tiny, 1.0 / jnp.maximum(norm, tiny), 0.0), w, rows))
            h = h.at[:, j + 1].set(norm)

            def rotate(i, h):  # the rotations of the earlier columns
                hi, hn = h[:, i], h[:, i + 1]
                return h.at[:, i].set(cs[:, i] * hi + sn[:, i] * hn).at[:, i + 1].set(-sn[:, i] * hi + cs[:, i] * hn)

            h = lax.fori_loop(0, j, rotate, h)
            hj, hn = h[:, j], h[:, j + 1]
            radius = jnp.hypot(hj, hn)
            c = jnp.where(radius > 0, hj / jnp.where(radius > 0, radius, 1.0), 1.0)
            s_ = jnp.where(radius > 0, hn / jnp.where(radius > 0, radius, 1.0), 0.0)
            h = h.at[:, j].set(radius).at[:, j + 1].set(0.0)
            R = R.at[:, :, j].set(h[:, :m])
            cs, sn = cs.at[:, j].set(c), sn.at[:, j].set(s_)
            gj = g[:, j]
            g = g.at[:, j].set(c * gj).at[:, j + 1].set(-s_ * gj)
            return j + 1, V, R, cs, sn, g, jnp.abs(g[:, j + 1])

        j, V, R, _, _, g, res = lax.while_loop(unfinished, arnoldi, (0, V, R, cs, sn, g, beta))
        used = jnp.arange(m) < j
        R = jnp.where(used[None, :, None] & used[None, None, :], R, 0.0) + jnp.diag(jnp.where(used, 0.0, 1.0))[None]
        # a zero pivot means the row's Krylov space was exhausted earlier: its later columns are 0
        R = R + jnp.where(jnp.abs(jnp.diagonal(R, axis1=1, axis2=2)) > 0, 0.0, 1.0)[:, :, None] * jnp.eye(m)[None]
        y = jax.vmap(lambda a, c: jax.scipy.linalg.solve_triangular(a, c, lower=False))(R, jnp.where(used, g[:, :m], 0.0))
        x = x + jnp.sum(jax.vmap(lambda c, v: _per_row(c, v, rows))(y.T, V[:m]), axis=0)
        return x, res, count + 1

    def unfinished_cycles(carry):
        _, res, count = carry
        return (count < cycles) & jnp.any(res > rtol * b_norm)

    x, res, _ = lax.while_loop(unfinished_cycles, cycle, (jnp.zeros_like(b), b_norm, 0))
    return GMRESResult(x, res / jnp.maximum(b_norm, tiny))

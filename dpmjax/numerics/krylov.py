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

from .rows import row_dot, row_norm, scale_rows

Array = jax.Array


class _Cycles(NamedTuple):
    """Carry of the restarts: the solution so far, per row its residual norm, the cycles made."""

    x: Array
    residual: Array
    count: Array


class _Arnoldi(NamedTuple):
    """Carry of one GMRES cycle after ``j`` Arnoldi steps: the basis ``V``, per row the rotated
    Hessenberg matrix ``R``, the Givens rotations ``(cs, sn)``, the rotated right-hand side ``g``
    and the residual norm it gives."""

    j: Array
    V: Array
    R: Array
    cs: Array
    sn: Array
    g: Array
    residual: Array


class GMRESResult(NamedTuple):
    solution: Array
    relative_residual: Array  # [rows]: ||b - J x|| / ||b|| estimated by the last least-squares solve


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

    def cycle(carry: _Cycles) -> _Cycles:
        x, count = carry.x, carry.count
        r = b - matvec(x)
        beta = row_norm(r, rows)
        V = jnp.zeros((m + 1,) + b.shape, b.dtype).at[0].set(scale_rows(1.0 / jnp.maximum(beta, tiny), r))
        R = jnp.zeros((rows, m, m), wdt)
        cs = jnp.ones((rows, m), wdt)
        sn = jnp.zeros((rows, m), wdt)
        g = jnp.zeros((rows, m + 1), wdt).at[:, 0].set(beta)

        def unfinished(state: _Arnoldi):
            return (state.j < m) & jnp.any(state.residual > rtol * b_norm)

        def arnoldi(state: _Arnoldi) -> _Arnoldi:
            j, V, R, cs, sn, g, _ = state
            w = matvec(V[j])
            h = jnp.zeros((rows, m + 1), wdt)
            for _ in range(2):  # CGS2; basis vectors not made yet are zero
                coeffs = jax.vmap(lambda v: row_dot(v, w, rows))(V)  # [m + 1, rows]
                w = w - jnp.sum(jax.vmap(lambda c, v: scale_rows(c, v))(coeffs, V), axis=0)
                h = h + coeffs.T
            norm = row_norm(w, rows)
            V = V.at[j + 1].set(scale_rows(jnp.where(norm > tiny, 1.0 / jnp.maximum(norm, tiny), 0.0), w))
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
            return _Arnoldi(j=j + 1, V=V, R=R, cs=cs, sn=sn, g=g, residual=jnp.abs(g[:, j + 1]))

        j, V, R, _, _, g, res = lax.while_loop(unfinished, arnoldi, _Arnoldi(j=0, V=V, R=R, cs=cs, sn=sn, g=g, residual=beta))
        used = jnp.arange(m) < j
        R = jnp.where(used[None, :, None] & used[None, None, :], R, 0.0) + jnp.diag(jnp.where(used, 0.0, 1.0))[None]
        # a zero pivot means the row's Krylov space was exhausted earlier: its later columns are 0
        R = R + jnp.where(jnp.abs(jnp.diagonal(R, axis1=1, axis2=2)) > 0, 0.0, 1.0)[:, :, None] * jnp.eye(m)[None]
        y = jax.vmap(lambda a, c: jax.scipy.linalg.solve_triangular(a, c, lower=False))(R, jnp.where(used, g[:, :m], 0.0))
        x = x + jnp.sum(jax.vmap(lambda c, v: scale_rows(c, v))(y.T, V[:m]), axis=0)
        return _Cycles(x=x, residual=res, count=count + 1)

    def unfinished_cycles(carry: _Cycles):
        return (carry.count < cycles) & jnp.any(carry.residual > rtol * b_norm)

    x, res, _ = lax.while_loop(unfinished_cycles, cycle, _Cycles(x=jnp.zeros_like(b), residual=b_norm, count=0))
    return GMRESResult(x, res / jnp.maximum(b_norm, tiny))

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

from .rows import per_row, row_dot, row_norm, scale_rows

Array = jax.Array


class _Cycles(NamedTuple):
    """Carry of the restarts: the solution so far, per row its residual norm and the Arnoldi steps it
    made, the cycles made."""

    x: Array
    residual: Array
    steps: Array
    count: Array
    products: Array


class _Arnoldi(NamedTuple):
    """Carry of one GMRES cycle after ``j`` Arnoldi steps: the basis ``V``, per row the rotated
    Hessenberg matrix ``R``, the Givens rotations ``(cs, sn)``, the rotated right-hand side ``g``,
    the residual norm it gives and the steps the row made (``k <= j``: a row stops extending its
    basis once it meets ``rtol``)."""

    j: Array
    V: Array
    R: Array
    cs: Array
    sn: Array
    g: Array
    residual: Array
    k: Array


class GMRESResult(NamedTuple):
    solution: Array
    relative_residual: Array  # [rows]: ||b - J x|| / ||b|| estimated by the last least-squares solve
    iterations: Array  # [rows]: the Arnoldi steps (products with J) the row used
    products: Array  # the batched products with J made (each restart's residual and every Arnoldi step)


def gmres(
    matvec: Callable[[Array], Array],
    b: Array,
    rows: int,
    restart: int = 20,
    cycles: int = 3,
    rtol: float = 1e-6,
) -> GMRESResult:
    """Solve ``matvec(x) = b`` from ``x = 0`` with ``cycles`` restarts of at most ``restart`` steps;
    a row stops when ``||b_r - J x_r|| <= rtol ||b_r||`` (its least-squares residual), the solve when
    every row has stopped. The least-squares problem of each row is kept triangular by Givens
    rotations, so its residual is known at every step without solving it (Saad & Schultz 1986).

    A row that has stopped (or whose residual is not finite) is frozen: its basis, Hessenberg
    matrix and solution are never changed again (``jnp.where`` on the per-row mask), so a row's
    answer does not depend on how many steps the other rows of the batch need."""
    if rows < 1 or b.shape[0] % rows:
        raise ValueError(f"rows must divide the leading axis of b ({b.shape}), got {rows}.")
    m = restart
    b_norm = row_norm(b, rows)
    wdt = b_norm.dtype  # the working precision: float32, or float64 for float64 systems
    tiny = jnp.finfo(wdt).tiny
    by_row = lambda mask, new, old: jnp.where(per_row(mask, new), new, old)  # noqa: E731

    def cycle(carry: _Cycles) -> _Cycles:
        x, count = carry.x, carry.count
        working = carry.residual > rtol * b_norm  # rows still solving (False where not finite)
        # the first cycle starts from x = 0, whose residual is b: no product is spent on it (under vmap
        # with a batched loop the cond becomes a select, the product is made and not counted). With one
        # cycle the product is not even traced: each traced product is a copy of the model in the program
        r = b if isinstance(cycles, int) and cycles == 1 else lax.cond(count > 0, lambda: b - matvec(x), lambda: b)
        beta = row_norm(r, rows)
        V = jnp.zeros((m + 1,) + b.shape, b.dtype).at[0].set(scale_rows(1.0 / jnp.maximum(beta, tiny), r))
        R = jnp.zeros((rows, m, m), wdt)
        cs = jnp.ones((rows, m), wdt)
        sn = jnp.zeros((rows, m), wdt)
        g = jnp.zeros((rows, m + 1), wdt).at[:, 0].set(beta)

        def extending(state: _Arnoldi):
            """Rows that take Arnoldi step ``j``: an active row has taken every step so far (k == j)."""
            return working & (state.k == state.j) & (state.residual > rtol * b_norm)

        def unfinished(state: _Arnoldi):
            return (state.j < m) & jnp.any(extending(state))

        def arnoldi(state: _Arnoldi) -> _Arnoldi:
            j, V, R, cs, sn, g = state.j, state.V, state.R, state.cs, state.sn, state.g
            active = extending(state)
            w = matvec(V[j])
            h = jnp.zeros((rows, m + 1), wdt)
            for _ in range(2):  # CGS2; basis vectors not made yet are zero
                coeffs = jax.vmap(lambda v: row_dot(v, w, rows))(V)  # [m + 1, rows]
                w = w - jnp.sum(jax.vmap(lambda c, v: scale_rows(c, v))(coeffs, V), axis=0)
                h = h + coeffs.T
            norm = row_norm(w, rows)
            v_next = scale_rows(jnp.where(norm > tiny, 1.0 / jnp.maximum(norm, tiny), 0.0), w)
            V = V.at[j + 1].set(by_row(active, v_next, V[j + 1]))
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
            gj = g[:, j]
            return _Arnoldi(
                j=j + 1, V=V,
                R=R.at[:, :, j].set(by_row(active, h[:, :m], R[:, :, j])),
                cs=cs.at[:, j].set(jnp.where(active, c, cs[:, j])), sn=sn.at[:, j].set(jnp.where(active, s_, sn[:, j])),
                g=by_row(active, g.at[:, j].set(c * gj).at[:, j + 1].set(-s_ * gj), g),
                residual=jnp.where(active, jnp.abs(s_ * gj), state.residual),
                k=state.k + active.astype(state.k.dtype),
            )

        start = _Arnoldi(j=0, V=V, R=R, cs=cs, sn=sn, g=g, residual=beta, k=jnp.zeros((rows,), jnp.int32))
        done = lax.while_loop(unfinished, arnoldi, start)
        R, g, k = done.R, done.g, done.k
        used = jnp.arange(m)[None, :] < k[:, None]  # [rows, m]: the columns each row made
        R = jnp.where(used[:, :, None] & used[:, None, :], R, 0.0) + jax.vmap(jnp.diag)(jnp.where(used, 0.0, 1.0))
        # a zero pivot means the row's Krylov space was exhausted earlier: its later columns are 0
        R = R + jnp.where(jnp.abs(jnp.diagonal(R, axis1=1, axis2=2)) > 0, 0.0, 1.0)[:, :, None] * jnp.eye(m)[None]
        y = jax.vmap(lambda a, c: jax.scipy.linalg.solve_triangular(a, c, lower=False))(R, jnp.where(used, g[:, :m], 0.0))
        x_next = x + jnp.sum(jax.vmap(lambda c, v: scale_rows(c, v))(y.T, done.V[:m]), axis=0)
        products = jnp.minimum(count, 1) + done.j  # the residual's product (none in the first cycle), Arnoldi's
        return _Cycles(x=by_row(working, x_next, x), residual=jnp.where(working, done.residual, carry.residual),
                       steps=carry.steps + k, count=count + 1, products=carry.products + products.astype(jnp.int32))

    def unfinished_cycles(carry: _Cycles):
        return (carry.count < cycles) & jnp.any(carry.residual > rtol * b_norm)

    start = _Cycles(x=jnp.zeros_like(b), residual=b_norm, steps=jnp.zeros((rows,), jnp.int32), count=0,
                    products=jnp.asarray(0, jnp.int32))
    done = lax.while_loop(unfinished_cycles, cycle, start)
    return GMRESResult(solution=done.x, relative_residual=done.residual / jnp.maximum(b_norm, tiny), iterations=done.steps,
                       products=done.products)

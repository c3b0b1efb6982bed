"""A damped Newton-Krylov solver for ``F(y) = target``, for any differentiable ``F`` (e.g. a UNet step
or a whole sampling trajectory).

Each iteration solves ``J d = -r`` with GMRES on Jacobian-vector products (``jax.jvp``; the Jacobian
is never formed), then backtracks along ``d`` until the residual norm falls by the Armijo factor
(Knoll & Keyes 2004, "Jacobian-free Newton-Krylov methods", J. Comput. Phys. 193).

With ``rows = B`` (the batch size) the rows of the batch are independent problems, as they are for
any model that treats batch rows independently: each row gets its own Krylov space
(:mod:`dpmjax.krylov`), step length and stopping test, all from one batched ``F``/``jvp`` call.
With ``rows = 1`` it is one problem over the whole array.

A row stops at ``max|r| <= tolerance * max(1, max|target|)`` (its own maximum), or when its line
search finds no decrease (the float32 floor); the solve stops when all rows have stopped or after
``max_iterations``. Runs inside ``jit``/``scan`` (``lax.while_loop``).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from .krylov import gmres, row_norm

Array = jax.Array


class NewtonResult(NamedTuple):
    solution: Array
    residual: Array  # [rows]: max|F(y) - target| / max(1, max|target|) per row at the solution
    iterations: Array


def row_max_abs(x: Array, rows: int) -> Array:
    return jnp.max(jnp.abs(x.astype(jnp.float32)).reshape(rows, -1), axis=1)


def _broadcast(per_row: Array, like: Array) -> Array:
    return per_row.reshape(per_row.shape + (1,) * (like.ndim - 1))


def newton_krylov(
    F: Callable[[Array], Array],
    target: Array,
    y0: Array,
    max_iterations: int = 30,
    tolerance: float = 1e-6,
    gmres_restart: int = 20,
    gmres_maxiter: int = 3,
    max_backtracks: int = 30,
    rows: int = 1,
) -> NewtonResult:
    """Solve ``F(y) = target`` from ``y0``; see the module docstring."""
    scale = jnp.maximum(1.0, row_max_abs(target, rows))
    threshold = tolerance * scale

    def residual(y):
        return F(y) - target

    def unconverged(carry):
        _, _, active, it = carry
        return (it < max_iterations) & jnp.any(active)

    def iterate(carry):
        y, r, active, it = carry
        matvec = lambda v: jax.jvp(residual, (y,), (v,))[1]  # noqa: E731
        d = gmres(matvec, -r, rows, gmres_restart, gmres_maxiter, rtol=1e-6).solution
        d = jnp.where(_broadcast(active, d), d, jnp.zeros_like(d))
        r_norm = row_norm(r, rows)

        def insufficient(ls):
            step, _, r_norm_new, k = ls
            return jnp.any(active & (r_norm_new > (1.0 - 1e-4 * step) * r_norm)) & (k < max_backtracks)

        def halve(ls):
            step, r_new, r_norm_new, k = ls
            step = jnp.where(r_norm_new > (1.0 - 1e-4 * step) * r_norm, 0.5 * step, step)
            r_new = residual(y + _broadcast(step, d).astype(d.dtype) * d)
            return step, r_new, row_norm(r_new, rows), k + 1

        ones = jnp.ones(r_norm.shape, jnp.float32)
        r_full = residual(y + d)
        step, r_new, r_norm_new, _ = lax.while_loop(insufficient, halve, (ones, r_full, row_norm(r_full, rows), 0))
        better = active & (r_norm_new < r_norm)
        y = jnp.where(_broadcast(better, y), y + _broadcast(step, d).astype(d.dtype) * d, y)
        r = jnp.where(_broadcast(better, r), r_new, r)
        active = better & (row_max_abs(r, rows) > threshold)
        return y, r, active, it + 1

    r0 = residual(y0)
    active0 = row_max_abs(r0, rows) > threshold
    y, r, _, iterations = lax.while_loop(unconverged, iterate, (y0, r0, active0, jnp.asarray(0)))
    return NewtonResult(y, row_max_abs(r, rows) / scale, iterations)

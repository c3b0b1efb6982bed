"""A damped Newton-Krylov solver for ``F(y) = target``, for any differentiable ``F`` (e.g. a UNet step).

Each iteration solves ``J d = -r`` with GMRES on Jacobian-vector products (``jax.jvp``; the Jacobian
is never formed), then backtracks along ``d`` until the residual norm falls by the Armijo factor
(Knoll & Keyes 2004, "Jacobian-free Newton-Krylov methods", J. Comput. Phys. 193). It stops at
``max|r| <= tolerance * max(1, max|target|)``, at ``max_iterations``, or when a line search finds no
decrease (the float32 floor). Runs inside ``jit``/``scan`` (``lax.while_loop``).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.scipy.sparse.linalg import gmres

Array = jax.Array


class NewtonResult(NamedTuple):
    solution: Array
    residual: Array  # max|F(y) - target| / max(1, max|target|) at the solution
    iterations: Array


def _norm(x: Array) -> Array:
    return jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32))))


def newton_krylov(
    F: Callable[[Array], Array],
    target: Array,
    y0: Array,
    max_iterations: int = 30,
    tolerance: float = 1e-6,
    gmres_restart: int = 20,
    gmres_maxiter: int = 3,
    max_backtracks: int = 12,
) -> NewtonResult:
    """Solve ``F(y) = target`` from ``y0``; see the module docstring."""
    scale = jnp.maximum(1.0, jnp.max(jnp.abs(target))).astype(jnp.float32)
    threshold = tolerance * scale

    def residual(y):
        return F(y) - target

    def unconverged(carry):
        _, r, it, stalled = carry
        return (it < max_iterations) & (jnp.max(jnp.abs(r)) > threshold) & ~stalled

    def iterate(carry):
        y, r, it, _ = carry
        matvec = lambda v: jax.jvp(residual, (y,), (v,))[1]  # noqa: E731
        d, _ = gmres(matvec, -r, x0=jnp.zeros_like(r), tol=1e-6, atol=0.0,
                     restart=gmres_restart, maxiter=gmres_maxiter, solve_method="batched")
        r_norm = _norm(r)

        def insufficient(ls):
            step, r_new, k = ls
            return (_norm(r_new) > (1.0 - 1e-4 * step) * r_norm) & (k < max_backtracks)

        def halve(ls):
            step, _, k = ls
            step = 0.5 * step
            return step, residual(y + step * d), k + 1

        step, r_new, _ = lax.while_loop(insufficient, halve, (jnp.asarray(1.0, y.dtype), residual(y + d), 0))
        better = _norm(r_new) < r_norm
        y = jnp.where(better, y + step * d, y)
        r = jnp.where(better, r_new, r)
        return y, r, it + 1, ~better

    r0 = residual(y0)
    y, r, iterations, _ = lax.while_loop(unconverged, iterate, (y0, r0, jnp.asarray(0), jnp.asarray(False)))
    return NewtonResult(y, jnp.max(jnp.abs(r)) / scale, iterations)

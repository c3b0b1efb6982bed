"""The linear and non-linear solvers behind exact inversion: row-wise GMRES and Newton-Krylov."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpmjax.numerics.krylov import gmres
from dpmjax.numerics.newton import newton_krylov


def block_diagonal_system(rows=64, dim=8, seed=0):
    """Per-row matrices with row-dependent spectra (eigenvalues spread over [0.1, 10])."""
    rng = np.random.default_rng(seed)
    mats = []
    for r in range(rows):
        q, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
        eig = np.exp(rng.uniform(np.log(0.1), np.log(10.0), dim))
        mats.append(q @ np.diag(eig) @ q.T + 0.3 * rng.normal(size=(dim, dim)))
    return np.stack(mats).astype(np.float32), rng.normal(size=(rows, dim)).astype(np.float32)


def test_row_wise_gmres_solves_each_block_in_its_dimension():
    A, b = block_diagonal_system()
    matvec = lambda v: jnp.einsum("rij,rj->ri", A, v)  # noqa: E731
    x = gmres(matvec, jnp.asarray(b), rows=64, restart=8, cycles=1, rtol=1e-7).solution
    want = np.linalg.solve(A.astype(np.float64), b.astype(np.float64)[..., None])[..., 0]
    np.testing.assert_allclose(np.asarray(x), want, rtol=0, atol=1e-3 * np.abs(want).max())
    # the same budget with one Krylov space for the whole batch leaves a large residual
    shared = gmres(matvec, jnp.asarray(b), rows=1, restart=8, cycles=1, rtol=1e-7)
    assert float(shared.relative_residual[0]) > 1e-2


def test_gmres_on_one_dense_system_and_its_argument_check():
    rng = np.random.default_rng(1)
    A = (np.eye(30) * 3 + rng.normal(size=(30, 30)) * 0.3).astype(np.float32)
    b = rng.normal(size=(30,)).astype(np.float32)
    result = gmres(lambda v: jnp.asarray(A) @ v, jnp.asarray(b), rows=1, restart=30, cycles=2, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(result.solution), np.linalg.solve(A, b), atol=1e-4)
    assert float(result.relative_residual[0]) < 1e-5
    with pytest.raises(ValueError, match="rows"):
        gmres(lambda v: v, jnp.ones((6, 2)), rows=4)


@pytest.mark.parametrize("restart, cycles", [(3, 1), (3, 3), (5, 2)])
def test_gmres_reports_the_products_it_made_and_spends_none_on_the_first_residual(restart, cycles):
    """A product is a model Jacobian-vector product in exact inversion, whose budget counts them:
    the reported count is what ``matvec`` ran (counted on the host), and the first cycle starts at
    x = 0, whose residual is b, so it costs ``restart`` products and each later cycle one more."""
    A, b = block_diagonal_system(rows=4, dim=12, seed=2)
    ran = []

    def matvec(v):
        jax.debug.callback(lambda: ran.append(1))
        return jnp.einsum("rij,rj->ri", A, v)

    result = gmres(matvec, jnp.asarray(b), rows=4, restart=restart, cycles=cycles, rtol=1e-12)
    jax.block_until_ready(result.solution)
    assert int(result.products) == len(ran) == cycles * restart + (cycles - 1)


@pytest.mark.parametrize("preconditioned", [False, True])
def test_newton_krylov_reports_the_evaluations_it_made(preconditioned):
    """Exact inversion's budget counts what Newton reports: its first residual, each GMRES product,
    each preconditioning, the full step and every halving of the line search, as ``F`` itself
    saw them (counted on the host). The arctan rows from 3 overshoot, so their line search halves."""
    ran = []

    def F(y):
        jax.debug.callback(lambda: ran.append(1))
        return jnp.arctan(y)

    def precondition(y, value, v):  # the exact inverse Jacobian, counted as one evaluation
        jax.debug.callback(lambda: ran.append(1))
        return v * (1.0 + y ** 2)

    y0 = jnp.array([[3.0, 0.5], [0.2, -0.1], [2.5, 1.0]])
    result = jax.jit(lambda y: newton_krylov(F, jnp.zeros_like(y), y, rows=3, tolerance=1e-7, gmres_restart=2,
                                             gmres_maxiter=1,
                                             preconditioner=precondition if preconditioned else None))(y0)
    jax.block_until_ready(result.solution)
    assert int(result.evaluations) == len(ran), (int(result.evaluations), len(ran))
    assert float(jnp.max(result.residual)) < 1e-6 and int(result.iterations) >= 3


def test_newton_krylov_per_row_on_a_coupled_nonlinear_map():
    """F(y) = y + tanh(A_r y) * 2 per row (strongly non-linear, rows independent)."""
    A, target = block_diagonal_system(rows=16, dim=6, seed=2)
    F = lambda y: y + 2.0 * jnp.tanh(jnp.einsum("rij,rj->ri", A, y))  # noqa: E731
    result = jax.jit(lambda t: newton_krylov(F, t, jnp.zeros_like(t), rows=16))(jnp.asarray(target))
    assert result.residual.shape == (16,)
    assert float(jnp.max(jnp.abs(F(result.solution) - target))) < 1e-5
    assert float(jnp.max(result.residual)) < 1e-5


def test_newton_krylov_backtracks_where_a_full_step_overshoots():
    """arctan: Newton's full step from y0 = 3 overshoots and diverges; the line search converges."""
    F = lambda y: jnp.arctan(y)  # noqa: E731
    result = newton_krylov(F, jnp.zeros((1,)), jnp.full((1,), 3.0), max_iterations=30, tolerance=1e-7)
    assert abs(float(result.solution[0])) < 1e-6


def test_anderson_fixed_point_solves_each_row_and_beats_plain_iteration():
    """y = g(y) with g(y) = b + M y + 0.05 tanh(y) per row, M with eigenvalues up to 0.95: after 12
    calls plain iteration keeps ~10% of its error, Anderson mixing (5 differences) a thousandth of
    that; in 20 it reaches the float32 floor. Each row keeps its own least-squares problem and stops
    at its threshold: a NaN row does not touch the others."""
    from dpmjax.numerics.anderson import anderson_fixed_point

    rng = np.random.default_rng(0)
    Q = np.linalg.qr(rng.normal(size=(6, 6)))[0]
    M = jnp.asarray(Q @ np.diag([0.95, -0.9, 0.8, 0.5, -0.3, 0.1]) @ Q.T, jnp.float32)
    b = jnp.asarray(rng.normal(size=(4, 6)), jnp.float32)
    residual_of = lambda f: jnp.max(jnp.abs(f), axis=1)  # noqa: E731

    def solve(offset, iterations):
        g = lambda y: offset + y @ M.T + 0.05 * jnp.tanh(y)  # noqa: E731
        return anderson_fixed_point(g, jnp.zeros_like(b), residual_of=residual_of, threshold=1e-6, rows=4,
                                    iterations=iterations), g

    plain = jnp.zeros_like(b)
    g = solve(b, 1)[1]
    for _ in range(12):
        plain = g(plain)
    early = solve(b, 12)[0]
    assert float(jnp.max(early.residual)) < 1e-3 * float(jnp.max(residual_of(g(plain) - plain)))
    result = solve(b, 20)[0]
    assert float(jnp.max(residual_of(g(result.solution) - result.solution))) <= 1e-5, result.residual
    other = solve(b.at[1].set(jnp.nan), 20)[0]
    keep = np.array([0, 2, 3])
    # a row is frozen once it meets the threshold: the NaN row (which runs all 20 iterations) leaves the
    # others bitwise as they are (tests/test_rows_independent.py checks every solver)
    np.testing.assert_array_equal(np.asarray(other.solution)[keep], np.asarray(result.solution)[keep])
    np.testing.assert_array_equal(np.asarray(other.residual)[keep], np.asarray(result.residual)[keep])

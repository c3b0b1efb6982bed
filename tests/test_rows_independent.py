"""Rows of a batch are independent problems, bitwise: once a row meets its stop rule its iterate is
frozen, so a NaN row or a row that needs many more iterations leaves every other row's answer
exactly as it is without it (same batch shape). Checked on each solver alone and through
``dpmjax.invert(..., exact=True)`` on the analytic model and the shipped digits model."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dpmjax
from dpmjax.models import digits
from dpmjax.models.analytic import GaussianMixture, timestep_model
from dpmjax.numerics.anderson import anderson_fixed_point
from dpmjax.numerics.krylov import gmres
from dpmjax.numerics.newton import newton_krylov

ROWS = 6
OTHERS = np.array([0, 1, 3, 4])  # rows 2 (NaN or slow) and 5 (slow) are the odd ones


def assert_rows_equal(a, b, rows=OTHERS):
    """The given rows of every field of two results are bitwise equal."""
    for name, x, y in zip(a._fields, a, b):
        x, y = np.asarray(x), np.asarray(y)
        if x.ndim and x.shape[0] == ROWS:
            np.testing.assert_array_equal(x[rows], y[rows], err_msg=name)


def batch_variants(clean, slow):
    """``(clean, with a NaN row 2, with a slow row 5)``."""
    return clean, clean.at[2].set(jnp.nan), clean.at[5].set(slow)


def test_anderson_rows_are_frozen_once_converged():
    """y = b + s_r M y + 0.05 tanh(y): row 5 contracts at 0.999 (hundreds of plain iterations; many more
    for Anderson than the others)."""
    rng = np.random.default_rng(0)
    Q = np.linalg.qr(rng.normal(size=(6, 6)))[0]
    M = jnp.asarray(Q @ np.diag([0.95, -0.9, 0.8, 0.5, -0.3, 0.1]) @ Q.T, jnp.float32)
    b = jnp.asarray(rng.normal(size=(ROWS, 6)), jnp.float32)

    @jax.jit
    def solve(offset, contraction):
        g = lambda y: offset + contraction[:, None] * (y @ M.T) + 0.05 * jnp.tanh(y)  # noqa: E731
        return anderson_fixed_point(g, jnp.zeros_like(offset), residual_of=lambda f: jnp.max(jnp.abs(f), axis=1),
                                    threshold=1e-6, rows=ROWS, iterations=60)

    ones = jnp.ones((ROWS,), jnp.float32)
    clean = solve(b, ones)
    nan_row = solve(b.at[2].set(jnp.nan), ones)
    slow_row = solve(b.at[5].multiply(1e3), ones.at[5].set(1.04))
    assert np.all(np.asarray(clean.residual) <= 1e-6)
    assert int(slow_row.iterations[5]) > int(jnp.max(clean.iterations)), slow_row.iterations
    assert int(nan_row.iterations[2]) == 60 and not np.isfinite(float(nan_row.residual[2]))
    for other in (nan_row, slow_row):
        assert_rows_equal(clean, other)


def block_system(seed=0, dim=8):
    rng = np.random.default_rng(seed)
    mats = []
    for _ in range(ROWS):
        q, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
        mats.append(q @ np.diag(np.exp(rng.uniform(np.log(0.5), np.log(2.0), dim))) @ q.T)
    return np.stack(mats).astype(np.float32), rng.normal(size=(ROWS, dim)).astype(np.float32)


def test_gmres_rows_are_frozen_once_converged():
    """Well-conditioned blocks converge in a few Arnoldi steps; row 5's block (eigenvalues over six
    decades) needs every step of every restart."""
    A, b = block_system()
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    hard = (q @ np.diag(np.logspace(-3, 3, 8)) @ q.T).astype(np.float32)

    @jax.jit
    def solve(A, b):
        return gmres(lambda v: jnp.einsum("rij,rj->ri", A, v), b, rows=ROWS, restart=6, cycles=3, rtol=1e-6)

    clean = solve(jnp.asarray(A), jnp.asarray(b))
    nan_row = solve(jnp.asarray(A), jnp.asarray(b).at[2].set(jnp.nan))
    slow_row = solve(jnp.asarray(A).at[5].set(hard), jnp.asarray(b))
    assert np.all(np.asarray(clean.relative_residual) <= 1e-6)
    assert int(slow_row.iterations[5]) > int(jnp.max(clean.iterations)), slow_row.iterations
    for other in (nan_row, slow_row):
        assert_rows_equal(clean, other)


def test_newton_krylov_rows_are_frozen_once_converged():
    """F(y) = y + c_r tanh(A_r y) in 16 dimensions: c_r = 0.5 (Jacobian near the identity: a few
    Newton iterations, a few GMRES steps each); row 5 with c = -1.5 started at y = 3 (not monotone:
    non-monotone steps, line searches and full Krylov spaces, four times the iterations)."""
    A, target = block_system(seed=2, dim=16)
    A, target = jnp.asarray(A) * 1.5, jnp.asarray(target)

    @jax.jit
    def solve(coef, t, y0):
        F = lambda y: y + coef[:, None] * jnp.tanh(jnp.einsum("rij,rj->ri", A, y))  # noqa: E731
        return newton_krylov(F, t, y0, rows=ROWS, max_iterations=40, tolerance=1e-7)

    coef, y0 = jnp.full((ROWS,), 0.5), jnp.zeros_like(target)
    clean = solve(coef, target, y0)
    nan_row = solve(coef, target.at[2].set(jnp.nan), y0)
    slow_row = solve(coef.at[5].set(-1.5), target, y0.at[5].set(3.0))
    assert np.all(np.asarray(clean.residual) <= 1e-6) and float(slow_row.residual[5]) <= 1e-6
    assert int(slow_row.iterations) > 2 * int(clean.iterations), (slow_row.iterations, clean.iterations)
    for other in (nan_row, slow_row):
        assert_rows_equal(clean, other)


def assert_invert_rows_equal(a, b):
    for name in ("sample", "round_trip", "converged"):
        np.testing.assert_array_equal(np.asarray(getattr(a, name))[OTHERS], np.asarray(getattr(b, name))[OTHERS],
                                      err_msg=name)


def test_exact_inversion_of_the_analytic_model_keeps_other_rows_bitwise():
    """Order 2, log-SNR grid, N = 10: the clean rows converge on the fast path (one defect-correction
    sweep and the preconditioned solve); the slow row (between the mixture's modes) needs the robust
    path, which then runs for the whole batch."""
    fwd = dpmjax.DPMSolverMultistepScheduler(solver_order=2, final_sigmas_type="sigma_min", use_lu_lambdas=True)
    gmm = GaussianMixture()
    model = timestep_model(gmm, fwd.config)
    x = gmm.sample(jax.random.PRNGKey(0), (12, 16))
    clean, nan_row, slow_row = (dpmjax.invert(model, v, fwd, 10, exact=True)
                                for v in batch_variants(x[np.array([0, 4, 5, 7, 8, 9])], x[1]))
    assert bool(jnp.all(clean.converged)), clean.round_trip
    assert int(slow_row.sweeps) + int(slow_row.iterations) > int(clean.sweeps) + int(clean.iterations)
    assert not bool(nan_row.converged[2])
    for other in (nan_row, slow_row):
        assert_invert_rows_equal(clean, other)


@pytest.mark.slow
@pytest.mark.parametrize("finish_apart, slow", [(False, 3), (None, 105)])
def test_exact_inversion_of_the_digits_model_keeps_other_rows_bitwise(finish_apart, slow):
    """The shipped MLP, order 2, log-SNR grid, N = 25, guidance 3 (labels passed as ``cond``): the
    clean rows converge on the fast path. ``finish_apart=False``: held-out digit 3 needs the robust
    path (measured alone: 16 sweeps), which then runs for the whole batch, masked. Default (rows
    finished apart, as ``cond`` is given): the whole batch's short fast path leaves held-out digit
    105, which is finished in a sub-batch of its own; either way the other rows are bitwise
    unchanged, and a NaN row beside the slow one leaves the slow one as it is without it."""
    images, labels = digits.heldout()
    images, labels = jnp.asarray(images), jnp.asarray(labels)
    model = digits.load()

    batch_sizes = set()  # the rows each model call evaluated

    def guided(x, t, label):
        unconditional = model.conditional(x, t, jnp.full_like(label, digits.NULL_LABEL))
        out = unconditional + 3.0 * (model.conditional(x, t, label) - unconditional)
        jax.debug.callback(lambda rows_evaluated: batch_sizes.add(rows_evaluated.shape[0]), out[:, 0, 0, 0])
        return out

    fwd = dpmjax.DPMSolverMultistepScheduler(solver_order=2, final_sigmas_type="sigma_min", use_lu_lambdas=True)
    rows = np.array([1, 2, 5, 6, 12, 14])
    settings = dpmjax.ExactInversion(finish_apart=finish_apart)
    slow_images, slow_labels = images[rows].at[5].set(images[slow]), labels[rows].at[5].set(labels[slow])
    clean, nan_row, slow_row, both = (dpmjax.invert(guided, v, fwd, num_inference_steps=25, exact=settings, cond=c)
                                      for v, c in ((images[rows], labels[rows]), (images[rows].at[2].set(jnp.nan), labels[rows]),
                                                   (slow_images, slow_labels), (slow_images.at[2].set(jnp.nan), slow_labels)))
    assert bool(jnp.all(clean.converged)) and bool(slow_row.converged[5]), (clean.round_trip, slow_row.round_trip)
    if finish_apart is False:
        assert int(slow_row.sweeps) > int(clean.sweeps) + 5, (slow_row.sweeps, clean.sweeps)
    else:  # the slow row was finished apart: some calls evaluated a sub-batch
        assert min(batch_sizes) < len(rows), batch_sizes
    assert not bool(nan_row.converged[2]) and not bool(both.converged[2])
    for other in (nan_row, slow_row):
        assert_invert_rows_equal(clean, other)
    # with the NaN row beside the slow one, the slow row's result is as without it (a NaN row is not
    # finished apart: it would change the sub-batch the slow row is solved in)
    for name in ("sample", "round_trip", "converged"):
        np.testing.assert_array_equal(np.asarray(getattr(both, name))[5], np.asarray(getattr(slow_row, name))[5],
                                      err_msg=name)

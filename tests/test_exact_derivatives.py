"""Derivatives of exact inversion (``dpmjax.invert(..., exact=True)``) by implicit differentiation of
``sample(z) = x``: forward mode gives ``dz = J^{-1} (dx - dS/dtheta dtheta)`` with ``J = dS/dz`` at the
noise found, on every row; reverse mode is its transpose; tangents of ``cond`` and of values the model
closes over are included. Checked against the Jacobian itself in float32 and against central finite
differences in float64."""

from __future__ import annotations

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dpmjax
from dpmjax.models.analytic import GaussianMixture, timestep_model

EPS32 = float(jnp.finfo(jnp.float32).eps)


def tanh_model(x, t):
    return 0.5 * jnp.tanh(x) + 1e-3 * t


def lu_sampler(order=2):
    return dpmjax.DPMSolverMultistepScheduler(solver_order=order, use_lu_lambdas=True, final_sigmas_type="sigma_min")


def test_forward_mode_solves_the_samplers_jacobian_on_every_row():
    """2 rows x 3 values, N = 4 (every row converges): ``J dz = v`` on both rows (it once returned a
    NaN tangent on row 1 by differentiating the solver's iterations). The tangent's linear solve stops
    at a relative residual of tolerance / 10 = 1e-6; the check allows float32 rounding of the
    sampler's Jacobian-vector product on top (100x)."""
    fwd = lu_sampler()
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 3))
    v = jax.random.normal(jax.random.PRNGKey(1), (2, 3))
    result = dpmjax.invert(tanh_model, x, fwd, 4, exact=True)
    assert bool(jnp.all(result.converged)), result.round_trip
    z, dz = jax.jvp(lambda x: dpmjax.invert(tanh_model, x, fwd, 4, exact=True).sample, (x,), (v,))
    np.testing.assert_array_equal(np.asarray(z), np.asarray(result.sample))
    assert np.all(np.isfinite(np.asarray(dz))), dz
    back = jax.jvp(lambda z: dpmjax.sample(tanh_model, z, fwd, 4).sample, (z,), (dz,))[1]
    scale = np.max(np.abs(np.asarray(v)), axis=1)
    assert np.all(np.max(np.abs(np.asarray(back - v)), axis=1) <= 1e-4 * scale), (back, v)
    # the same as J^{-1} v with J formed densely (block diagonal: 3x3 per row)
    J = jax.jacfwd(lambda z: dpmjax.sample(tanh_model, z, fwd, 4).sample)(z)
    for r in range(2):
        want = np.linalg.solve(np.asarray(J[r, :, r, :], np.float64), np.asarray(v[r], np.float64))
        np.testing.assert_allclose(np.asarray(dz[r]), want, rtol=0, atol=1e-4 * np.max(np.abs(want)))


def test_reverse_mode_is_the_transpose_of_forward_mode():
    """``jax.grad`` through exact inversion works (it once raised JAX's while_loop error) and
    ``<grad_x <w, z(x)>, v> = <w, dz(v)>``: both are linear solves to a relative residual of 1e-6."""
    fwd = lu_sampler()
    gmm = GaussianMixture()
    model = timestep_model(gmm, fwd.config)
    x = gmm.sample(jax.random.PRNGKey(2), (4, 16))
    v, w = jax.random.normal(jax.random.PRNGKey(3), (2, 4, 16))
    noise = lambda x: dpmjax.invert(model, x, fwd, 10, exact=True).sample  # noqa: E731
    dz = jax.jvp(noise, (x,), (v,))[1]
    grad = jax.grad(lambda x: jnp.sum(w * noise(x)))(x)
    assert np.all(np.isfinite(np.asarray(grad)))
    forward, reverse = float(jnp.sum(w * dz)), float(jnp.sum(grad * v))
    assert abs(forward - reverse) <= 1e-4 * float(jnp.sum(jnp.abs(w * dz))), (forward, reverse)


def test_a_nan_row_leaves_the_other_rows_tangents_bitwise():
    """Each row's tangent is its own linear solve: a NaN row gets a non-finite tangent (and is not
    converged); the other rows' tangents are those of the batch without it, bit for bit."""
    fwd = lu_sampler()
    gmm = GaussianMixture()
    model = timestep_model(gmm, fwd.config)
    x = gmm.sample(jax.random.PRNGKey(4), (4, 16))
    v = jax.random.normal(jax.random.PRNGKey(5), (4, 16))
    tangent = jax.jit(lambda x, v: jax.jvp(lambda x: dpmjax.invert(model, x, fwd, 10, exact=True).sample, (x,), (v,)))
    clean = tangent(x, v)[1]
    bad = tangent(x.at[2].set(jnp.nan), v)[1]
    others = np.array([0, 1, 3])
    np.testing.assert_array_equal(np.asarray(bad)[others], np.asarray(clean)[others])
    assert np.all(np.isfinite(np.asarray(clean))) and not np.all(np.isfinite(np.asarray(bad)[2]))


def test_a_non_finite_tangent_on_one_row_gives_that_row_a_non_finite_tangent_never_zero():
    """A NaN or infinite input tangent on one row (the data finite) is no tangent: that row's
    output tangent is NaN, as plain inversion's would be, never a zero that passes for one; the
    other rows keep theirs bit for bit, forward and reverse."""
    fwd = lu_sampler()
    gmm = GaussianMixture()
    model = timestep_model(gmm, fwd.config)
    x = gmm.sample(jax.random.PRNGKey(4), (4, 16))
    v = jax.random.normal(jax.random.PRNGKey(5), (4, 16))
    invert = lambda x: dpmjax.invert(model, x, fwd, 10, exact=True).sample  # noqa: E731
    tangent = jax.jit(lambda x, v: jax.jvp(invert, (x,), (v,))[1])
    clean = np.asarray(tangent(x, v))
    others = np.array([0, 1, 3])
    for bad_value in (jnp.nan, jnp.inf):
        bad = np.asarray(tangent(x, v.at[2, 5].set(bad_value)))
        assert np.all(np.isnan(bad[2])), bad[2]
        np.testing.assert_array_equal(bad[others], clean[others])
    cotangent = jax.jit(lambda x, g: jax.vjp(invert, x)[1](g)[0])
    clean_back = np.asarray(cotangent(x, v))
    bad_back = np.asarray(cotangent(x, v.at[2, 5].set(jnp.nan)))
    assert np.all(np.isnan(bad_back[2])) and np.all(np.isfinite(clean_back))
    np.testing.assert_array_equal(bad_back[others], clean_back[others])


_FLOAT64_SCRIPT = """
import jax
jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp, numpy as np, dpmjax
from dpmjax.models.analytic import GaussianMixture, timestep_model

def check(name, f, a, da, h=1e-5):
    tangent = np.asarray(jax.jvp(f, (a,), (da,))[1])
    fd = (np.asarray(f(a + h * da)) - np.asarray(f(a - h * da))) / (2 * h)
    err = np.max(np.abs(tangent - fd)) / np.max(np.abs(fd))
    assert np.all(np.isfinite(tangent)) and err <= 1e-6, (name, err)

gmm = GaussianMixture()
for order in (1, 2, 3):
    fwd = dpmjax.DPMSolverMultistepScheduler(solver_order=order, use_lu_lambdas=True, final_sigmas_type="sigma_min")
    model = timestep_model(gmm, fwd.config)
    x = gmm.sample(jax.random.PRNGKey(order), (3, 16)).astype(jnp.float64)
    v = jax.random.normal(jax.random.PRNGKey(10 + order), x.shape, jnp.float64)
    invert = lambda x: dpmjax.invert(model, x, fwd, 10, exact=dpmjax.ExactInversion(tolerance=1e-12))
    assert bool(jnp.all(invert(x).converged))
    check(f"data, order {order}", lambda x: invert(x).sample, x, v)

fwd = dpmjax.DPMSolverMultistepScheduler(solver_order=2, use_lu_lambdas=True, final_sigmas_type="sigma_min")
x = jax.random.normal(jax.random.PRNGKey(0), (2, 3), jnp.float64)
cond_model = lambda x, t, c: c * jnp.tanh(x) + 1e-3 * t  # one model object: one compiled program
def with_cond(c):
    return dpmjax.invert(cond_model, x, fwd, 4, exact=dpmjax.ExactInversion(tolerance=1e-12), cond=c).sample
check("cond", with_cond, jnp.array([[0.5], [0.3]]), jnp.array([[1.0], [-2.0]]))
def closed_over(a):
    model = lambda x, t: a * jnp.tanh(x) + 1e-3 * t
    return dpmjax.invert(model, x, fwd, 4, exact=dpmjax.ExactInversion(tolerance=1e-12)).sample
check("closed-over parameter", jax.jit(closed_over), jnp.asarray(0.5), jnp.asarray(1.0))  # jit: one trace for a + h, a - h
print("ok")
"""


@pytest.mark.slow
def test_tangents_match_central_differences_in_float64():
    """Under ``jax_enable_x64``, tolerance 1e-12: forward-mode tangents w.r.t. the data (orders 1-3, the
    analytic mixture), ``cond`` and a parameter the model closes over agree with central differences
    (h = 1e-5: truncation ~1e-8 here, measured to scale as h^2; the solves' error / h <= 1e-7) to 1e-6
    relative."""
    done = subprocess.run([sys.executable, "-c", _FLOAT64_SCRIPT], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-3000:]

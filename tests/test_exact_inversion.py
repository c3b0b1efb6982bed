"""Exact inversion through the public call (``dpmjax.invert(..., exact=True)``): rows are independent
problems, every row reports its own measured round trip and whether it converged, and it holds on
the shipped trained model as well as on analytic data."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dpmjax
from dpmjax.models.analytic import GaussianMixture, timestep_model

GMM = GaussianMixture()
EPS32 = float(jnp.finfo(jnp.float32).eps)


def sampler(order=2, **config):
    return dpmjax.DPMSolverMultistepScheduler(solver_order=order, final_sigmas_type="sigma_min", **config)


def measured_round_trip(model, noise, x, fwd, n):
    """Per row: max|sample(noise) - x| / max(1, max|x|), as invert reports it."""
    back = np.asarray(dpmjax.sample(model, noise, fwd, n).sample, np.float64).reshape(x.shape[0], -1)
    x = np.asarray(x, np.float64).reshape(x.shape[0], -1)
    return np.max(np.abs(back - x), axis=1) / np.maximum(1.0, np.max(np.abs(x), axis=1))


@pytest.mark.parametrize("order", [1, 2, 3])
def test_a_batch_of_one_row_is_inverted_exactly(order):
    """A (1, 16) batch once got one line-search halving (the batch size went into max_backtracks)."""
    fwd = sampler(order)
    model = timestep_model(GMM, fwd.config)
    x = GMM.sample(jax.random.PRNGKey(0), (1, 16))
    result = dpmjax.invert(model, x, fwd, 10, exact=True)
    assert result.round_trip.shape == (1,) and result.converged.shape == (1,)
    assert float(result.round_trip[0]) <= 1e-5 and bool(result.converged[0])
    assert measured_round_trip(model, result.sample, x, fwd, 10)[0] <= 1e-5


@pytest.mark.parametrize("order", [1, 2])
def test_each_row_gets_what_it_gets_alone(order):
    fwd = sampler(order)
    model = timestep_model(GMM, fwd.config)
    x = GMM.sample(jax.random.PRNGKey(1), (6, 16))
    together = dpmjax.invert(model, x, fwd, 10, exact=True)
    for i in (0, 3, 5):
        alone = dpmjax.invert(model, x[i:i + 1], fwd, 10, exact=True)
        # both are solutions of the same row's problem; they agree to the solve's tolerance amplified by
        # the sampler's inverse (noise-space error = data-space error / the sampler's contraction)
        scale = float(jnp.max(jnp.abs(alone.sample)))
        assert float(jnp.max(jnp.abs(together.sample[i] - alone.sample[0]))) <= 1e-3 * scale
        assert bool(together.converged[i]) and bool(alone.converged[0])


def test_round_trip_is_each_rows_own_measured_value_at_every_order():
    for order in (1, 2, 3):
        fwd = sampler(order)
        model = timestep_model(GMM, fwd.config)
        x = GMM.sample(jax.random.PRNGKey(2), (8, 16)) * jnp.linspace(0.5, 2.0, 8)[:, None]
        result = dpmjax.invert(model, x, fwd, 10, exact=True)
        measured = measured_round_trip(model, result.sample, x, fwd, 10)
        reported = np.asarray(result.round_trip)
        assert reported.shape == (8,)
        np.testing.assert_allclose(reported, measured, atol=4 * EPS32, rtol=0.0)
        assert len(set(reported.tolist())) > 1, "one batch-wide value reported for every row"


def test_a_nan_or_huge_row_leaves_the_other_rows_unchanged():
    fwd = sampler(2)
    model = timestep_model(GMM, fwd.config)
    x = GMM.sample(jax.random.PRNGKey(3), (8, 16))
    clean = dpmjax.invert(model, x, fwd, 10, exact=True)
    for bad_value in (jnp.nan, 1e6):
        bad = x.at[5].set(bad_value)
        result = dpmjax.invert(model, bad, fwd, 10, exact=True)
        others = np.r_[0:5, 6:8]
        np.testing.assert_allclose(np.asarray(result.sample)[others], np.asarray(clean.sample)[others], rtol=0, atol=1e-5)
        assert np.all(np.asarray(result.converged)[others])
        assert np.all(np.asarray(result.round_trip)[others] <= 1e-5)
    assert not bool(result.converged[5]) or float(result.round_trip[5]) <= 1e-5
    nan_result = dpmjax.invert(model, x.at[5].set(jnp.nan), fwd, 10, exact=True)
    assert not bool(nan_result.converged[5]), "a NaN row is never reported converged"


def test_a_model_that_couples_the_batch_converges_as_one_problem():
    fwd = sampler(2)
    base = timestep_model(GMM, fwd.config)
    model = lambda x, t: base(x, t) + 0.05 * jnp.tanh(jnp.mean(x, axis=0, keepdims=True))  # noqa: E731
    x = GMM.sample(jax.random.PRNGKey(4), (8, 16))
    result = dpmjax.invert(model, x, fwd, 10, exact=dpmjax.ExactInversion(independent_rows=False))
    assert result.round_trip.shape == (1,) and bool(result.converged[0])
    assert float(np.max(measured_round_trip(model, result.sample, x, fwd, 10))) <= 1e-5


def test_exact_inversion_refuses_settings_it_does_not_use():
    fwd = sampler(2)
    model = timestep_model(GMM, fwd.config)
    x = GMM.sample(jax.random.PRNGKey(5), (2, 16))
    with pytest.raises(ValueError, match="^checkpoint applies to plain inversion"):
        dpmjax.invert(model, x, fwd, 5, exact=True, checkpoint=True)
    with pytest.raises(ValueError, match="^unroll applies to plain inversion"):
        dpmjax.invert(model, x, fwd, 5, exact=True, unroll=2)
    with pytest.raises(ValueError, match="at least one row"):
        dpmjax.invert(model, x[:0], fwd, 5, exact=True)
    with pytest.raises(ValueError, match="tolerance"):
        dpmjax.invert(model, x, fwd, 5, exact=dpmjax.ExactInversion(tolerance=0.0))
    with pytest.raises(ValueError, match="max_sweeps"):
        dpmjax.invert(model, x, fwd, 5, exact=dpmjax.ExactInversion(max_sweeps=-1))

_FLOAT64_SCRIPT = """
import jax
jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp, dpmjax
from dpmjax.models.analytic import GaussianMixture, timestep_model
gmm = GaussianMixture()
for order in (1, 2, 3):
    fwd = dpmjax.DPMSolverMultistepScheduler(solver_order=order, final_sigmas_type="sigma_min", use_lu_lambdas=True)
    x = gmm.sample(jax.random.PRNGKey(order), (3, 16)).astype(jnp.float64)
    result = dpmjax.invert(timestep_model(gmm, fwd.config), x, fwd, 10, exact=dpmjax.ExactInversion(tolerance=1e-11))
    assert result.sample.dtype == jnp.float64, result.sample.dtype
    assert bool(jnp.all(result.converged)) and float(jnp.max(result.round_trip)) <= 1e-11, result.round_trip
print("ok")
"""


def test_float64_exact_inversion_under_x64_reaches_float64_precision():
    """Under ``jax_enable_x64`` a float64 batch is solved in float64 (it once failed a ``while_loop``
    dtype check: the Krylov solver kept float32 carries); a tolerance no float32 solve can reach."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _FLOAT64_SCRIPT], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-2000:]



# ----------------------------------------------------------------------------- the shipped digits model

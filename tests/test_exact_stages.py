"""The stages of exact inversion (:mod:`dpmjax.trajectories.exact`), each tested alone on one
explicit problem record (``_Problem``): plain inversion and the sampler are the public ones, the
round trip is the reported measure, defect correction and the whole-sampler solve lower it, the
first-order path inverts the first-order sampler, and ``_better_of`` keeps per row the smaller
error. The public entry point is tested in test_exact_inversion.py."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dpmjax
from dpmjax import solver
from dpmjax.models.analytic import GaussianMixture, timestep_model
from dpmjax.trajectories import exact
from dpmjax.trajectories.inversion import mirrored_state

GMM = GaussianMixture()
EPS32 = float(jnp.finfo(jnp.float32).eps)
N = 10


def sampler(order):
    return dpmjax.DPMSolverMultistepScheduler(solver_order=order, final_sigmas_type="sigma_min", use_lu_lambdas=True)


def problem_for(order, x, *, tolerance=1e-5, budget=None):
    """The ``_Problem`` that ``dpmjax.invert(model, x, sampler(order), N, exact=True)`` solves, and its model."""
    fwd = sampler(order)
    model = timestep_model(GMM, fwd.config)
    dtype = solver.compute_dtype(x)
    state = fwd.set_timesteps(fwd.create_state(), N, x.shape, dtype=dtype)
    inverse, mirror = mirrored_state(fwd, state, x.shape, dtype=dtype)
    options = exact.ExactOptions(max_sweeps=10, max_iterations=30, tolerance=tolerance, gmres_restart=5,
                                 gmres_maxiter=1, rows=x.shape[0])
    inputs = exact._Inputs(state=state, mirror=mirror, data=x, cond=None, noises=None, params=[],
                           budget=jnp.asarray(exact._UNLIMITED if budget is None else budget, jnp.int32))
    hoisted = exact._Model(lambda y, t, c: model(y, t), conditional=False)
    return exact._problem_of(fwd, inverse, hoisted, options=options, inputs=inputs), model, fwd


def fast_stages(problem):
    """The fast path's stages one by one: plain inversion, the defect-correction sweeps from it, the
    preconditioned whole-sampler solve from theirs (each returns its start, error, count and calls)."""
    plain, plain_sampled = exact._plain_inversion(problem)
    swept = exact._defect_correction(problem, plain.noise, start_sampled=plain_sampled, start_error=plain.error,
                                     plain_noise=plain.noise, calls=plain.calls)
    shot = exact._shooting(problem, swept[0], swept[1], preconditioned=True, calls=swept[3])
    return plain, swept, shot


def data(rows=6, seed=0):
    return GMM.sample(jax.random.PRNGKey(seed), (rows, 16)) * jnp.linspace(0.5, 2.0, rows)[:, None]


def close(a, b, ulps=8):
    a, b = np.asarray(a), np.asarray(b)
    np.testing.assert_allclose(a, b, rtol=0, atol=ulps * EPS32 * max(1.0, float(np.max(np.abs(b)))))


def test_plain_is_plain_inversion_and_sampled_is_sample():
    x = data()
    problem, model, fwd = problem_for(2, x)
    close(jax.jit(lambda y: exact._plain(problem, y))(x), dpmjax.invert(model, x, fwd, N).sample)
    z = jax.random.normal(jax.random.PRNGKey(1), x.shape)
    close(jax.jit(lambda y: exact._sampled(problem, y))(z), dpmjax.sample(model, z, fwd, N).sample)


def test_round_trip_is_the_per_row_relative_max_error():
    x = data()
    problem, _, _ = problem_for(2, x)
    delta = jax.random.normal(jax.random.PRNGKey(2), x.shape) * 1e-3
    got = np.asarray(exact._round_trip(problem, x + delta))
    x64, moved = np.asarray(x, np.float64), np.asarray(x + delta, np.float64)
    want = np.max(np.abs(moved - x64), axis=1) / np.maximum(1.0, np.max(np.abs(x64), axis=1))
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert got.shape == (x.shape[0],)


@pytest.mark.parametrize("order", [2, 3])
def test_defect_correction_then_shooting_lower_the_round_trip_of_plain_inversion(order):
    """Each stage alone: the sweeps never make a row worse and close half the rows of the analytic
    model to the tolerance (where plain inversion is accurate enough for them to converge); the
    preconditioned whole-sampler solve then never makes a row worse either. The errors they report
    are the measured round trips of the starts they return."""
    x = data()
    problem, _, _ = problem_for(order, x)

    @jax.jit
    def stages():
        plain, swept, shot = fast_stages(problem)
        return plain, swept, shot, exact._round_trip(problem, exact._sampled(problem, swept[0])), \
            exact._round_trip(problem, exact._sampled(problem, shot[0]))

    plain, (_, swept_error, count, swept_calls), (_, shot_error, _, shot_calls), swept_measured, shot_measured = stages()
    # the calls count on: plain inversion and its check 2 N, each sweep 2 N, then the solve's
    assert int(plain.calls) == 2 * N and int(swept_calls) == 2 * N + 2 * N * int(count) and int(shot_calls) >= int(swept_calls)
    plain_error, swept_error, shot_error = (np.asarray(e) for e in (plain.error, swept_error, shot_error))
    assert int(count) >= 1
    assert np.all(swept_error <= plain_error)
    assert np.sum(swept_error <= 1e-5) >= 3 and np.sum(swept_error <= plain_error / 1000) >= 3, (plain_error, swept_error)
    assert np.all(shot_error <= swept_error) and np.sum(shot_error <= 1e-5) >= np.sum(swept_error <= 1e-5), shot_error
    np.testing.assert_array_equal(swept_error, np.asarray(swept_measured))
    np.testing.assert_array_equal(shot_error, np.asarray(shot_measured))


def test_the_first_order_path_inverts_the_first_order_sampler():
    x = data()
    problem, _, _ = problem_for(1, x)
    X, M, calls = jax.jit(lambda: exact._first_order_path(problem, calls=jnp.asarray(0, jnp.int32)))()
    assert int(calls) >= 2 * N  # at least the predictor and the output at the solution, each step
    assert X.shape == (N,) + x.shape and M.shape == (N,) + x.shape
    assert np.all(np.asarray(exact._round_trip(problem, exact._sampled(problem, X[0]))) <= 1e-5)


def test_history_sweeps_never_return_worse_than_their_start():
    """Order 2 from the first-order path (the robust path's start): each row keeps its best sweep,
    never worse than the first-order path's own start."""
    x = data()
    problem, _, _ = problem_for(2, x)

    @jax.jit
    def stages():
        X, _, _ = exact._first_order_path(problem, calls=jnp.asarray(0, jnp.int32))
        start_error = exact._round_trip(problem, exact._sampled(problem, X[0]))
        noise, error, count, _ = exact._history_sweeps(problem, calls=jnp.asarray(0, jnp.int32),
                                                       max_sweeps=problem.options.max_sweeps)
        return start_error, error, count, exact._round_trip(problem, exact._sampled(problem, noise))

    start_error, error, count, measured = stages()
    # (the loop's first pass is the first-order path compiled at another place: allow a few roundings)
    assert np.all(np.asarray(error) <= np.asarray(start_error) * (1 + 64 * EPS32)), (error, start_error)
    np.testing.assert_array_equal(np.asarray(error), np.asarray(measured))
    assert 0 <= int(count) <= problem.options.max_sweeps


def test_better_of_takes_per_row_the_smaller_error_among_the_open_rows():
    a = exact._Result(noise=jnp.zeros((4, 3)), error=jnp.array([1.0, 2.0, 3.0, jnp.nan]), sweeps=jnp.asarray(2),
                      iterations=jnp.asarray(5), calls=jnp.asarray(10))
    b = exact._Result(noise=jnp.ones((4, 3)), error=jnp.array([2.0, 1.0, 0.5, 0.1]), sweeps=jnp.asarray(3),
                      iterations=jnp.asarray(7), calls=jnp.asarray(20))
    both = exact._better_of(a, b)
    np.testing.assert_array_equal(np.asarray(both.error), [1.0, 1.0, 0.5, np.nan])  # a NaN row keeps a
    np.testing.assert_array_equal(np.asarray(both.noise)[:, 0], [0.0, 1.0, 1.0, 0.0])
    assert int(both.sweeps) == 5 and int(both.iterations) == 12 and int(both.calls) == 30
    some = exact._better_of(a, b, rows_open=jnp.array([True, False, True, True]))
    np.testing.assert_array_equal(np.asarray(some.error), [1.0, 2.0, 0.5, np.nan])
    np.testing.assert_array_equal(np.asarray(some.noise)[:, 0], [0.0, 0.0, 1.0, 0.0])


def test_a_sweep_starts_only_where_its_cost_fits_in_the_budget():
    """Defect correction under a budget: each sweep costs 2 N calls and starts only where it fits, so
    with room for one sweep after plain inversion exactly one is made; the whole-sampler solve then
    makes no iteration (none fits) and returns its start."""
    x = data()
    problem, _, _ = problem_for(2, x, budget=4 * N + 1)

    _, (noise, error, count, calls), (shot_noise, shot_error, iterations, shot_calls) = jax.jit(lambda: fast_stages(problem))()
    assert int(count) == 1 and int(calls) == 4 * N
    assert int(iterations) == 0 and int(shot_calls) == 5 * N  # the solve's first residual alone
    np.testing.assert_array_equal(np.asarray(shot_noise), np.asarray(noise))

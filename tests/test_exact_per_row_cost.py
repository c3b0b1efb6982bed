"""Exact inversion finishing hard rows apart (ExactInversion.finish_apart): through dpmjax.invert on the
shipped MLP, a ``cond`` leaf that merely has the batch's length cannot fake a converged row; the
stage itself (what the sub-batch is handed, which result each row keeps, the whole batch's
correction, the budget) on a stand-in solver. (The cost per row is tested in
tests/test_exact_budget.py.)"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dpmjax
from dpmjax.models import digits

EASY = np.array([1, 2, 5, 6, 12, 14])  # held-out digits the fast path inverts at guidance 3
HARD = 3  # a held-out digit that needs the robust path at guidance 3 (measured: 16 sweeps alone)


@pytest.mark.slow
def test_a_condition_leaf_that_merely_has_the_batch_length_cannot_fake_a_converged_row():
    """A ``cond`` leaf used whole (a 7 x 7 weight matrix for 7 rows) is gathered with the rows it
    seems to belong to; the finished rows are then measured in the whole batch with the real
    ``cond``, so every reported round trip is the true one."""
    model = digits.load("mlp")
    images, labels = digits.heldout()
    rows = np.append(EASY, HARD)
    x = jnp.asarray(images[rows])
    cond = {"label": jnp.asarray(labels[rows]), "W": jax.random.normal(jax.random.PRNGKey(0), (7, 7))}

    def guided(x, t, c):
        null = model.conditional(x, t, jnp.full_like(c["label"], digits.NULL_LABEL))
        return null + 3.0 * (model.conditional(x, t, c["label"]) - null) + 1e-3 * jnp.mean(c["W"])

    sched = dpmjax.DPMSolverMultistepScheduler(solver_order=2, final_sigmas_type="sigma_min", use_lu_lambdas=True)
    result = dpmjax.invert(guided, x, sched, 25, cond=cond, exact=dpmjax.ExactInversion(finish_apart=True))
    back = dpmjax.sample(guided, result.sample, sched, 25, cond=cond).sample
    true = jnp.max(jnp.abs(back - x).reshape(7, -1), axis=1) / jnp.maximum(1.0, jnp.max(jnp.abs(x).reshape(7, -1), axis=1))
    np.testing.assert_allclose(np.asarray(result.round_trip), np.asarray(true), rtol=1e-3, atol=1e-7)
    np.testing.assert_array_equal(np.asarray(result.converged), np.asarray(true) <= 1e-5)


def _stage_record(rows, n=3, width=2, round_trip=None, calls=60):
    """A fake first pass: ``(X, outputs, round_trip, sweeps, iterations, calls)`` with row ``r``'s
    path filled with ``r`` (so a test sees which result each row ended with)."""
    X = jnp.broadcast_to(jnp.arange(rows, dtype=jnp.float32)[None, :, None], (n, rows, width))
    return X, X + 100.0, jnp.asarray(round_trip, jnp.float32), jnp.asarray(4), jnp.asarray(3), jnp.asarray(calls)


def test_finish_apart_goes_on_from_the_first_pass_and_corrects_rows_that_land_above_the_tolerance():
    """The stage's bookkeeping, on a stand-in solver (each result is tagged by where it came from):
    the sub-batch is handed the open rows' data, conditioning and first-pass starts; a finished row
    is kept only where it measures better in the whole batch; a kept row still above the tolerance
    there takes the whole batch's correction where that is better; converged rows are never
    touched; every run's calls are added."""
    from dpmjax.trajectories.finish_apart import finish_apart

    tolerance = 1e-5
    first = _stage_record(6, round_trip=[1e-6, 3e-4, 2e-6, 5e-4, 7e-4, 1e-6], calls=60)  # rows 1, 3, 4 open
    data = jnp.arange(6, dtype=jnp.float32)[:, None] * jnp.ones((6, 2))
    cond = {"label": jnp.arange(6) * 10, "weight": jnp.ones((3, 3))}
    seen = {}

    def solve(sub_data, sub_cond, budget, *, start):
        seen.update(data=np.asarray(sub_data[:, 0]), label=np.asarray(sub_cond["label"]), start=np.asarray(start[:, 0]),
                    weight=sub_cond["weight"].shape, budget=budget)
        size = sub_data.shape[0]
        X = jnp.full((3, size, 2), 50.0) + jnp.arange(size, dtype=jnp.float32)[None, :, None]
        return X, X + 100.0, jnp.zeros(size), jnp.asarray(1), jnp.asarray(2), jnp.asarray(90)

    def measure(noise):
        # rows 1 and 3 finished better than the first pass (3: just above the tolerance); row 4 worse
        return jnp.asarray([1e-6, 4e-6, 2e-6, 1.3e-5, 9e-4, 1e-6]), noise * 2

    def correct(noise, sampled):
        np.testing.assert_array_equal(np.asarray(sampled), np.asarray(noise) * 2)  # measure's sample
        X = jnp.full((3, 6, 2), 70.0)
        return X, X + 100.0, jnp.asarray([0.0, 0.0, 0.0, 8e-6, 1e-3, 0.0]), 9

    X, outputs, round_trip, sweeps, iterations, calls = finish_apart(
        solve, first=first, data=data, cond=cond, tolerance=tolerance, measure=measure, correct=correct, budget=None)
    # the sub-batch: the 3 open rows padded to 4 by repeating the first, each with its label and its first-pass start
    np.testing.assert_array_equal(seen["data"], [1, 3, 4, 1])
    np.testing.assert_array_equal(seen["label"], [10, 30, 40, 10])
    np.testing.assert_array_equal(seen["start"], [1, 3, 4, 1])
    assert seen["weight"] == (3, 3) and seen["budget"] is None
    rows_ended_with = np.asarray(X[0, :, 0])
    np.testing.assert_array_equal(rows_ended_with, [0, 50, 2, 70, 4, 5])  # row 1 finished, 3 corrected, 4 kept
    np.testing.assert_array_equal(np.asarray(outputs[0, :, 0]), rows_ended_with + 100)
    np.testing.assert_allclose(np.asarray(round_trip), [1e-6, 4e-6, 2e-6, 8e-6, 7e-4, 1e-6])
    # the first pass's calls, the sub-batch's, the measure's in the whole batch (N = 3), the correction's
    assert (int(sweeps), int(iterations), int(calls)) == (5, 5, 60 + 90 + 3 + 9)


def test_finish_apart_starts_nothing_the_budget_has_no_room_for():
    """The sub-batch makes 4 runs of the N-step sampler or of plain inversion whatever its budget
    (its measure in the whole batch included), the correction 3, so neither starts unless those
    fit: with the budget spent by the first pass there is no sub-batch, and the correction runs only
    where the sub-batch left room for it (N = 3 here: 12 and 9 calls)."""
    from dpmjax.trajectories.finish_apart import finish_apart

    first = _stage_record(4, round_trip=[1e-6, 3e-4, 2e-6, 2e-6], calls=60)
    data, ran = jnp.zeros((4, 2)), []

    def solve(sub_data, sub_cond, budget, *, start):
        ran.append(("solve", budget))
        X = jnp.zeros((3, sub_data.shape[0], 2))
        return X, X, jnp.zeros(sub_data.shape[0]), jnp.asarray(0), jnp.asarray(0), jnp.asarray(40)

    def measure(noise):
        return jnp.asarray([1e-6, 2e-5, 2e-6, 2e-6]), noise

    def correct(noise, sampled):
        ran.append(("correct",))
        return jnp.zeros((3, 4, 2)), jnp.zeros((3, 4, 2)), jnp.zeros(4), 9

    def run(budget):
        ran.clear()
        return finish_apart(solve, first=first, data=data, cond=None, tolerance=1e-5, measure=measure, correct=correct,
                            budget=budget)

    for budget in (60, 71):  # nothing left, or less than the sub-batch's 4 runs
        assert run(budget) is first and ran == []
    result = run(72)  # the solve is handed what is left less the measure's 3 calls
    assert ran == [("solve", 9)] and int(result[5]) == 60 + 40 + 3
    result = run(111)  # 8 calls left after the sub-batch and its measure: no correction
    assert ran == [("solve", 48)] and int(result[5]) == 103
    result = run(112)
    assert ran == [("solve", 49), ("correct",)] and int(result[5]) == 112


def test_a_row_with_a_non_finite_round_trip_is_not_finished_apart():
    """A NaN (or infinite) round trip comes from NaN data or model output, which no solve mends:
    the row stays as the first pass left it (flagged), and the sub-batch holds only the other open
    rows, so its size, and the open rows' results, are as without the NaN row."""
    from dpmjax.trajectories.finish_apart import finish_apart

    first = _stage_record(4, round_trip=[1e-6, np.nan, 3e-4, np.inf], calls=60)  # row 2 open, rows 1 and 3 not finite
    handed = []

    def solve(sub_data, sub_cond, budget, *, start):
        handed.append(np.asarray(sub_data[:, 0]))
        X = jnp.full((3, sub_data.shape[0], 2), 50.0)
        return X, X, jnp.zeros(sub_data.shape[0]), jnp.asarray(1), jnp.asarray(2), jnp.asarray(90)

    def measure(noise):
        return jnp.asarray([1e-6, np.nan, 1e-6, np.inf]), noise

    X, _, round_trip, _, _, _ = finish_apart(
        solve, first=first, data=jnp.arange(4, dtype=jnp.float32)[:, None] * jnp.ones((4, 2)), cond=None,
        tolerance=1e-5, measure=measure, correct=None, budget=None)
    assert len(handed) == 1
    np.testing.assert_array_equal(handed[0], [2])
    np.testing.assert_array_equal(np.asarray(X[0, :, 0]), [0, 1, 50, 3])
    assert np.isnan(np.asarray(round_trip)[1]) and np.isinf(np.asarray(round_trip)[3])

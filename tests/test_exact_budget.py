"""Exact inversion's cost per row and its model-call budget, through ``dpmjax.invert`` on the shipped
digits models: a batch with one hard row costs about what the easy rows cost plus that row's own work
(``ExactInversion.finish_apart``); ``ExactInversion.max_calls_per_step`` bounds the calls, which
``Trajectory.model_calls`` counts. (The tests share their runs: each compiles and solves a while.)"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dpmjax
from dpmjax.models import digits

EASY = np.array([1, 2, 5, 6, 12, 14])  # held-out digits the MLP's fast path inverts at guidance 3
HARD = 3  # a held-out digit that needs the MLP's robust path at guidance 3 when the batch is finished whole
# (its whole batch's short fast path brings it within the tolerance); this one it leaves at 1.7e-5
APART = 105
# the UNet's: its whole batch's short fast path leaves the hard digit at 7.3e-4, the easy ones within 4e-6
UNET_EASY = np.array([0, 3, 5, 10, 14, 18])
UNET_HARD = 30
UNET_ANOTHER_EASY = 19  # in the hard row's place: a batch of the same size, whose program rounds alike
N = 25


def _invert(name: str, rows, settings, *, steps: int = N, guidance: float = 3.0):
    return _inverted(name, tuple(int(r) for r in rows), settings, steps, guidance)[:3]


def _row_evaluations(name: str, rows, settings) -> tuple:
    """``(trajectory, row evaluations)``: the model's calls made by exact inversion weighted by the
    rows each evaluates (the final run that returns the path included)."""
    result, _, _, evaluations = _inverted(name, tuple(int(r) for r in rows), settings, N, 3.0)
    return result, evaluations


@functools.lru_cache(maxsize=None)  # the tests share runs (each one compiles and solves for a while)
def _inverted(name: str, rows: tuple, settings, steps: int, guidance: float):
    """``(trajectory, the model calls exact inversion made, counted on the host, plain inversion's round
    trip per row, the rows evaluated by those calls)``: order 2, Lu grid, labels as ``cond``."""
    model = digits.load(name)
    images, labels = digits.heldout()
    tally = [0, 0]  # calls, and rows evaluated
    cfg = dpmjax.classifier_free_guidance(model.conditional, guidance_scale=guidance)  # one doubled-batch call

    def count(rows_evaluated):
        tally[0] += 1
        tally[1] += rows_evaluated.shape[0]

    def guided(x, t, conditions):
        out = cfg(x, t, conditions)
        jax.debug.callback(count, out[:, 0, 0, 0])
        return out

    sched = dpmjax.DPMSolverMultistepScheduler(solver_order=2, final_sigmas_type="sigma_min", use_lu_lambdas=True)
    rows = np.asarray(rows)
    x = jnp.asarray(images[rows])
    # the labels and the null label as cond: per-row leaves, so exact inversion can finish rows apart
    cond = (jnp.asarray(labels[rows]), jnp.full(len(rows), digits.NULL_LABEL))
    result = dpmjax.invert(guided, x, sched, num_inference_steps=steps, cond=cond, exact=settings)
    jax.block_until_ready(result.sample)
    calls, row_evaluations = tally
    plain = dpmjax.invert(guided, x, sched, num_inference_steps=steps, cond=cond)
    back = dpmjax.sample(guided, plain.sample, sched, num_inference_steps=steps, cond=cond).sample
    scale = jnp.maximum(1.0, jnp.max(jnp.abs(x).reshape(len(rows), -1), axis=1))
    plain_round_trip = jnp.max(jnp.abs(back - x).reshape(len(rows), -1), axis=1) / scale
    return result, calls, np.asarray(plain_round_trip), row_evaluations


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mlp", "unet"])
def test_one_hard_row_costs_its_own_work_not_the_batch_s(name):
    """MLP and UNet, order 2, Lu grid, N = 25, guidance 3, labels as ``cond``, six easy rows and one
    that the whole batch's short fast path leaves: all seven cost at most 1.3x (the easy rows alone,
    scaled to 7 rows) + (the hard row alone) (measured, in row evaluations: MLP 9450 against 10150;
    UNet 10400 against 11300), and finishing the MLP's batch whole instead (``finish_apart=False``)
    costs more (measured: 14000; not run on the UNet, whose robust program at 7 rows takes long to
    compile). Every row ends exact; the hard row's further calls evaluate fewer rows than the batch
    (its sub-batch); and the easy rows' noise is bitwise the same with or without the hard row (on
    the UNet, whose convolutions round differently at another batch size, against a batch of the
    same size with another easy row in its place)."""
    easy_rows, hard_row = (EASY, APART) if name == "mlp" else (UNET_EASY, UNET_HARD)
    apart = dpmjax.ExactInversion(finish_apart=True)
    easy, easy_cost = _row_evaluations(name, easy_rows, apart)
    hard, hard_cost = _row_evaluations(name, np.array([hard_row]), apart)
    rows = np.append(easy_rows, hard_row)
    both, both_calls, _, both_cost = _inverted(name, tuple(int(r) for r in rows), apart, N, 3.0)
    assert bool(jnp.all(easy.converged)) and bool(jnp.all(both.converged)), np.asarray(both.round_trip)
    assert both_cost < 7 * both_calls, (both_cost, both_calls)  # some calls ran on the sub-batch alone
    if name == "mlp":
        np.testing.assert_array_equal(np.asarray(both.sample[:6]), np.asarray(easy.sample))
    else:  # at 6 and 7 rows (12 and 14 with guidance's doubled batch) the UNet's outputs differ in the last bits
        neighbour, _ = _row_evaluations(name, np.append(easy_rows, UNET_ANOTHER_EASY), apart)
        np.testing.assert_array_equal(np.asarray(both.sample[:6]), np.asarray(neighbour.sample[:6]))
    budget = easy_cost * 7 / 6 + hard_cost
    assert both_cost <= 1.3 * budget, (both_cost, easy_cost, hard_cost)
    if name == "mlp":
        whole, whole_cost = _row_evaluations(name, rows, dpmjax.ExactInversion(finish_apart=False))
        assert bool(jnp.all(whole.converged)) and whole_cost > both_cost, (whole_cost, both_cost)


@pytest.mark.slow
def test_model_calls_is_what_the_model_saw():
    """``Trajectory.model_calls`` counts every call of the solve (a Jacobian-vector product once):
    the host's count is it plus the final run that returns the path (``N`` calls)."""
    result, calls, _ = _invert("mlp", np.append(EASY, HARD), dpmjax.ExactInversion(finish_apart=False))
    assert round(float(result.model_calls) * N) + N == calls, (float(result.model_calls), calls)
    assert float(result.model_calls) > 20  # the hard row took the robust path: a real count, not plain's 2


@pytest.mark.slow
def test_a_budget_stops_the_solve_and_flags_the_rows_it_leaves():
    """Six easy rows and a hard one, finished whole (measured: 418 calls per step without a budget):
    with a budget of 30 calls per step the solve stops near it (measured 27.0: no stage starts
    that the budget has no room for), every row keeps the best start it met (never worse than
    plain inversion's round trip), rows within the tolerance say so and the others are flagged;
    the easy rows still end exact."""
    rows = np.append(EASY, HARD)
    free, free_calls, plain = _invert("mlp", rows, dpmjax.ExactInversion(finish_apart=False))
    capped, capped_calls, _ = _invert("mlp", rows, dpmjax.ExactInversion(finish_apart=False, max_calls_per_step=30))
    assert float(free.model_calls) > 4 * 30 and bool(jnp.all(free.converged)), float(free.model_calls)
    assert round(float(capped.model_calls) * N) + N == capped_calls
    assert float(capped.model_calls) <= 2 * 30, float(capped.model_calls)
    round_trip = np.asarray(capped.round_trip)
    assert np.all(round_trip <= plain), (round_trip, plain)
    np.testing.assert_array_equal(np.asarray(capped.converged), round_trip <= 1e-5)
    assert bool(jnp.all(capped.converged[:6])), round_trip


@pytest.mark.slow
def test_rows_finished_apart_spend_what_the_batch_left_them():
    """With the hard row finished apart (labels as ``cond``), the whole batch's pass and the hard
    row's sub-batch share one budget: 30 calls per step in all (measured: 30.0, every row exact; with
    the two model calls of guidance made separately, the hard row stopped flagged at 1.0006e-5);
    without a budget the same batch costs 47."""
    rows = np.append(EASY, HARD)
    free, _, _ = _invert("mlp", rows, dpmjax.ExactInversion(finish_apart=True))
    capped, calls, plain = _invert("mlp", rows, dpmjax.ExactInversion(finish_apart=True, max_calls_per_step=30))
    assert bool(jnp.all(free.converged)) and float(free.model_calls) > 30, float(free.model_calls)
    assert float(capped.model_calls) <= 2 * 30, float(capped.model_calls)
    # the host saw the solve's calls (the sub-batch's measure in the whole batch among them) and the runs that
    # return the path, the whole batch's and the sub-batch's
    assert round(float(capped.model_calls) * N) + N <= calls <= round(float(capped.model_calls) * N) + 3 * N
    assert bool(jnp.all(capped.converged[:6])) and np.all(np.asarray(capped.round_trip) <= plain)
    np.testing.assert_array_equal(np.asarray(capped.converged), np.asarray(capped.round_trip) <= 1e-5)


@pytest.mark.parametrize("value, allowed", [(1, "an integer >= 2"), (2.5, "an integer >= 2"), (True, "an integer"),
                                            ("30", "an integer")])
def test_a_budget_that_cannot_work_is_refused_naming_the_field(value, allowed):
    with pytest.raises(ValueError, match=f"max_calls_per_step must be {allowed}"):
        dpmjax.ExactInversion(max_calls_per_step=value)

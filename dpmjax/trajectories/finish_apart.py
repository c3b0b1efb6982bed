"""Exact inversion's hard rows finished apart, so that one hard row does not make the batch pay.

The fast path (orders >= 2) runs on the whole batch; the rows it leaves above the tolerance are
gathered, with their rows of ``cond``, into a sub-batch of a fixed size (the next power of two, so a
few compiled programs serve every count) and solved there from the whole batch's best start, with
the robust path where needed, whose model calls are then paid for those rows only. Their results
are measured in the whole batch and scattered back where they are better. Rows are independent
problems (:mod:`dpmjax.trajectories.exact`), so a row's solution does not depend on its neighbours;
its round trip does, at the float32 floor, on the program that samples it (a sub-batch and the whole
batch round differently), which one defect-correction sweep in the whole batch's program mends.

This needs the rows to finish to be known, so it runs between two compiled programs, on concrete
arrays: a call being traced (``jit``, ``grad``, ``vmap``) keeps the single masked program.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from .exact_options import ExactInversion

Array = jax.Array

# Newton iterations of the whole batch's fast path when hard rows are finished apart: easy rows
# converge within a few; a row that needs more is cheaper alone than dragging the batch along
FIRST_PASS_ITERATIONS = 3
FIRST_PASS_SWEEPS = 4
# runs of the sampler or of plain inversion (N model calls each) that the sub-batch makes whatever its
# budget (plain inversion, its check, the run from the whole batch's start, and its rows' measure in
# the whole batch), and that the whole batch's correction makes (I(x), I(S(z)), S of the corrected
# start): neither starts unless they fit
SUB_BATCH_RUNS = 4
CORRECTION_RUNS = 3


def traced(*trees) -> bool:
    """Whether any leaf of ``trees`` is a tracer (the call is being transformed)."""
    return any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree_util.tree_leaves(trees))


def finishes_apart(settings: ExactInversion, *, order: int, rows: int, cond: Any, noises: Any, arrays) -> bool:
    """Whether exact inversion finishes its hard rows apart (see ``ExactInversion.finish_apart``)."""
    if settings.finish_apart is False or not settings.independent_rows or order < 2 or rows < 2 or noises is not None:
        return False
    if traced(arrays, cond):
        return False
    if settings.finish_apart is True:
        return True
    # by default only a condition made of per-row leaves alone (labels, embeddings): one that also
    # carries weights could hold a leaf that merely has the batch's length
    leaves = jax.tree_util.tree_leaves(cond)
    return bool(leaves) and all(jnp.ndim(leaf) >= 1 and jnp.shape(leaf)[0] == rows for leaf in leaves)


def bucket(count: int, rows: int) -> int:
    """The sub-batch size for ``count`` rows: the next power of two, at most ``rows``."""
    return min(rows, 1 << max(0, count - 1).bit_length())


def rows_of(tree: Any, index: np.ndarray, rows: int) -> Any:
    """``tree`` with the leaves that have the batch's leading axis (``rows``) taken at ``index``;
    other leaves (weights, scalars) unchanged."""
    return jax.tree_util.tree_map(lambda a: a[index] if jnp.ndim(a) >= 1 and jnp.shape(a)[0] == rows else a, tree)


def finish_apart(solve: Callable, *, first, data: Array, cond: Any, tolerance: float, measure: Callable,
                 correct: Callable, budget=None):
    """Finish the rows ``first`` leaves open.

    Args:
        solve: ``solve(data, cond, budget, start=noise)`` -> ``(X, outputs, round_trip, sweeps,
            iterations, calls)``: exact inversion with the robust path, for a sub-batch, within
            ``budget`` model calls (``None``: no budget), going on from ``noise`` (the first pass's
            best start of those rows) where it beats plain inversion.
        first: The whole batch's result after the fast path, in the same form.
        data: The batch inverted (rows on axis 0).
        cond: Its condition (leaves with the batch's leading axis are gathered with the rows).
        tolerance: The round trip a row must reach.
        measure: ``measure(noise)`` -> ``(round_trip, sampled)``: every row sampled in the whole
            batch with its own ``cond``, and its round trip: a finished row's result is checked
            where it will be used (a ``cond`` leaf gathered by mistake, one that merely has the
            batch's length, would otherwise go unseen), and kept only where it beats the fast
            path's.
        correct: ``correct(noise, sampled)`` -> ``(X, outputs, round_trip, calls)``: one
            defect-correction sweep of the whole batch, ``z + I(x) - I(S(z))``, its path (and
            model outputs where asked for), its round trip and the model calls it made. A row
            solved in its sub-batch is at that program's rounding floor; sampled in the whole
            batch it can land just above the tolerance (the two programs round differently), and
            one sweep in the whole batch's program brings it back (measured on the digits at
            guidance 3: 1 or 2 of 3 such rows). It is made for the rows finished apart that are
            still above the tolerance in the whole batch; rows it improves take it.
        budget: The model calls a row may cost in all (``None``: no budget): the sub-batch gets
            what the whole batch's pass left of it (less the measure in the whole batch), and the
            correction what the sub-batch left; neither starts unless the runs it makes whatever
            its budget (4 and 3 runs of ``N`` steps) fit.

    Returns:
        The whole batch's result, the open rows replaced by their result in the sub-batch where
        that result, measured in the whole batch, is better (and by its correction where that is
        better still); the sweeps, iterations and model calls of all runs added (the sub-batch's
        calls are calls of fewer rows; the measure in the whole batch is counted).
    """
    X, outputs, round_trip, sweeps, iterations, calls = first
    rows = data.shape[0]
    measured_first = np.asarray(round_trip)
    # a row with a non-finite round trip (NaN or infinite data or model output) stays as it is, flagged:
    # no solve mends it, and beside the open rows it would change the sub-batch they are solved in
    open_rows = np.flatnonzero(np.isfinite(measured_first) & (measured_first > tolerance))
    runs = X.shape[0]  # N: a run of the sampler costs N model calls
    left = None if budget is None else budget - int(calls)
    if open_rows.size == 0 or (left is not None and left < SUB_BATCH_RUNS * runs):
        return first
    size = bucket(open_rows.size, rows)
    index = np.concatenate([open_rows, np.full(size - open_rows.size, open_rows[0])])  # padding repeats a row
    sub_budget = None if left is None else left - runs  # the measure below is the sub-batch's too
    sub_X, sub_outputs, _, sub_sweeps, sub_iterations, sub_calls = solve(data[index], rows_of(cond, index, rows),
                                                                         sub_budget, start=X[0][index])
    count = open_rows.size
    candidate = X[0].at[open_rows].set(sub_X[0, :count])
    measured, sampled = measure(candidate)
    measured = np.asarray(measured)
    before = measured_first[open_rows]  # finite: rows with a non-finite round trip are not open
    keep = measured[open_rows] < before  # per open row: its finished result is better where it is used
    take, position = open_rows[keep], np.flatnonzero(keep)
    X = X.at[:, take].set(sub_X[:, position])
    if outputs is not None:
        outputs = outputs.at[:, take].set(sub_outputs[:, position])
    round_trip = round_trip.at[take].set(measured[take])
    calls = calls + sub_calls + runs  # the sub-batch's calls, and the measure's in the whole batch
    left = None if left is None else left - int(sub_calls) - runs
    still = open_rows[~(np.asarray(round_trip)[open_rows] <= tolerance)]
    if still.size and (left is None or left >= CORRECTION_RUNS * runs):  # one sweep in the whole batch's program
        polished_X, polished_outputs, polished, correction_calls = correct(candidate, sampled)
        polished = np.asarray(polished)
        better = still[polished[still] < np.nan_to_num(np.asarray(round_trip)[still], nan=np.inf)]
        X = X.at[:, better].set(polished_X[:, better])
        if outputs is not None:
            outputs = outputs.at[:, better].set(polished_outputs[:, better])
        round_trip = round_trip.at[better].set(polished[better])
        calls = calls + correction_calls
    return X, outputs, round_trip, sweeps + sub_sweeps, iterations + sub_iterations, calls

"""Exact inversion finishing hard rows apart (ExactInversion.finish_apart), through dpmjax.invert on the
shipped MLP: a ``cond`` leaf that merely has the batch's length cannot fake a converged row. (The cost
per row is tested in tests/test_exact_budget.py.)"""

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

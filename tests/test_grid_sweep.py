"""Exponential and Beta grids against diffusers' PyTorch schedulers, live, for every step count
from 1 to 100, every beta schedule and every timestep spacing (set_timesteps only, no stepping).

These grids compute fractional timesteps from their sigmas; diffusers removes duplicate timesteps
while they are still fractional and only then casts them to integers, so where several noise levels
truncate to one integer timestep (the cosine schedule's noisiest sigmas all give 998, the least
noisy ones of a long inverse grid all give 0) every one of them remains a step. dpmjax must keep
exactly diffusers' steps: the same integer timesteps and the same float32 sigmas.

Where diffusers itself fails (raises, or gives non-finite sigmas), the combination is not compared:
dpmjax must then either refuse with a ValueError or give a finite, monotone grid of the requested
length. No combination of this sweep does so with diffusers 0.42 (every one is compared); the branch
is there so that a future diffusers failure shows up as a reported, checked difference rather than
as a crash of the test.
"""

from __future__ import annotations

import numpy as np
import pytest

from conftest import dpmjax_class, make_diffusers

SCHEDULES = ["linear", "scaled_linear", "squaredcos_cap_v2"]
SPACINGS = ["linspace", "leading", "trailing"]
GRIDS = ["use_exponential_sigmas", "use_beta_sigmas"]
STEP_COUNTS = range(1, 101)


def _diffusers_grid(d, n):
    """diffusers' (timesteps, sigmas), or None where it fails."""
    try:
        d.set_timesteps(n)
    except Exception:  # noqa: BLE001 (any failure of diffusers is a reason not to compare)
        return None
    timesteps, sigmas = d.timesteps.numpy(), d.sigmas.numpy()
    if not np.all(np.isfinite(sigmas)):
        return None
    return timesteps, sigmas


def _assert_sane(kind, state, n):
    sigmas = np.asarray(state.sigmas, np.float64)
    timesteps = np.asarray(state.timesteps)
    assert np.all(np.isfinite(sigmas)) and len(timesteps) == n and len(sigmas) == n + 1
    steps = np.diff(sigmas) if kind == "inverse" else -np.diff(sigmas)
    assert np.all(steps >= 0), "the grid must run monotonically in its direction"


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("kind", ["inverse", "forward"])
def test_exponential_and_beta_grids_match_diffusers_for_every_step_count(kind, schedule, spacing, grid):
    config = {"beta_schedule": schedule, "timestep_spacing": spacing, grid: True}
    d = make_diffusers(kind, **config)
    scheduler = dpmjax_class(kind)(**config)
    compared, repeated = 0, 0
    for n in STEP_COUNTS:
        reference = _diffusers_grid(d, n)
        if reference is None:
            try:
                state = scheduler.set_timesteps(scheduler.create_state(), n, (1,))
            except ValueError:
                continue  # a clear refusal where diffusers fails
            _assert_sane(kind, state, n)
            continue
        timesteps, sigmas = reference
        state = scheduler.set_timesteps(scheduler.create_state(), n, (1,))
        ours = np.asarray(state.timesteps)
        np.testing.assert_array_equal(ours, timesteps, err_msg=f"timesteps, n={n}")
        assert len(state.sigmas) == len(sigmas), f"n={n}: {len(state.sigmas)} sigmas, diffusers {len(sigmas)}"
        np.testing.assert_allclose(np.asarray(state.sigmas), sigmas, rtol=2e-6, atol=0, err_msg=f"sigmas, n={n}")
        assert state.num_inference_steps == d.num_inference_steps == n
        compared += 1
        repeated += len(np.unique(ours)) < len(ours)
    assert compared > 0
    if kind == "inverse" and schedule == "squaredcos_cap_v2":
        assert repeated > 0  # the sweep does reach grids whose integer timesteps repeat


def test_cosine_trailing_25_keeps_the_repeated_noisiest_timesteps():
    """The reported case: diffusers gives 25 steps ending 998 x 5 with distinct sigmas."""
    for grid in GRIDS:
        config = {"beta_schedule": "squaredcos_cap_v2", "timestep_spacing": "trailing", grid: True}
        scheduler = dpmjax_class("inverse")(**config)
        state = scheduler.set_timesteps(scheduler.create_state(), 25, (1,))
        timesteps = np.asarray(state.timesteps)
        assert len(timesteps) == 25 and list(timesteps[-5:]) == [998] * 5
        assert len(np.unique(np.asarray(state.sigmas)[-6:-1])) == 5

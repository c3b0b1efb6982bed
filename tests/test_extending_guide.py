"""The worked example of docs/guides/extending.md runs as written: its Python blocks are executed in
order, in one namespace, and what they build is checked here. A grid of your own built through
``state_on_grid`` is the built-in Karras grid when given Karras' sigmas; the new (polyexponential)
grid converges at the solver's order against the closed-form flow in both directions, and
``sample(invert(x))`` closes as the steps shrink. The table of the guide is the measured one."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

import dpmjax
from dpmjax.grids import karras_sigmas, mirrored_grid
from dpmjax.noise_schedule import training_schedule

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "guides" / "extending.md"
HEADING = "## Worked example: a grid of your own"


def example_section() -> str:
    text = GUIDE.read_text()
    assert HEADING in text, f"{GUIDE.name} lost its heading {HEADING!r}"
    return text.split(HEADING, 1)[1].split("\n## ", 1)[0]


def example_blocks() -> list:
    return re.findall(r"```python\n(.*?)```", example_section(), re.S)


@pytest.fixture(scope="module")
def example():
    blocks = example_blocks()
    assert len(blocks) == 3, "the worked example is three Python blocks: the grid, the state, the scan"
    namespace = {"__name__": "extending_guide_example"}
    for block in blocks:
        exec(compile(block, str(GUIDE), "exec"), namespace)  # noqa: S102 (the guide's own code)
    return namespace


@pytest.mark.parametrize("final_sigmas_type", ["zero", "sigma_min"])
@pytest.mark.parametrize("n", [1, 7, 25])
def test_karras_sigmas_through_the_seam_are_the_builtin_karras_grid(example, n, final_sigmas_type):
    shape = (3,)
    sampler = dpmjax.DPMSolverMultistepScheduler(final_sigmas_type=final_sigmas_type, solver_order=3)
    grid = example["grid_from_sigmas"](sampler.config, n, karras_sigmas)
    mine = sampler.state_on_grid(sampler.create_state(), grid.timesteps, grid.sigmas, shape=shape)
    karras = dpmjax.DPMSolverMultistepScheduler(sampler.config.replace(use_karras_sigmas=True))
    builtin = karras.set_timesteps(karras.create_state(), n, shape)
    for field in ("timesteps", "sigmas", "step_alpha", "step_sigma", "convert_coefficients", "update_coefficients",
                  "order_cap"):
        np.testing.assert_array_equal(np.asarray(getattr(mine, field)), np.asarray(getattr(builtin, field)), field)


def test_the_custom_grid_is_a_valid_forward_grid_and_its_mirror_ascends(example):
    sampler = dpmjax.DPMSolverMultistepScheduler(final_sigmas_type="sigma_min")
    train = training_schedule(sampler.config)
    for n in (1, 2, 20, 40, 200):
        grid = example["grid_from_sigmas"](sampler.config, n, example["polyexponential_sigmas"])
        assert grid.timesteps.shape == (n,) and grid.sigmas.shape == (n + 1,) and grid.sigmas.dtype == np.float32
        assert grid.timesteps.min() >= 0 and grid.timesteps.max() <= sampler.config.num_train_timesteps - 1
        assert np.all(np.diff(grid.sigmas) <= 0), "noisiest first"
        assert grid.sigmas[0] == train.sigmas[-1] and grid.sigmas[-1] == train.sigmas[0]
        mirror = mirrored_grid(grid, n, train)
        assert np.all(np.diff(mirror.sigmas) >= 0), "the inverse walks the same noise levels upwards"
        np.testing.assert_array_equal(mirror.sigmas, grid.sigmas[::-1])
    with pytest.raises(ValueError, match="non-increasing"):
        example["grid_from_sigmas"](sampler.config, 5, lambda first, last, n: np.linspace(last, first, n))


def test_the_new_grid_converges_at_second_order_in_both_directions(example):
    orders, errors = example["observed_order"], example["errors"]
    assert set(orders) == {"sample", "invert"}
    for name, p in orders.items():
        assert p >= 1.8, f"{name}: observed order {p:.2f} ({errors[name]})"
        assert errors[name][40] < 2e-2, errors[name]


def test_sample_after_invert_closes_as_the_steps_shrink(example):
    round_trip = example["errors"]["round trip"]
    assert round_trip[40] < 1e-2 and round_trip[40] <= round_trip[20] / 3, round_trip


def test_the_guide_table_is_what_the_example_measures(example):
    """The numbers printed in the guide, to the two significant digits shown."""
    errors, orders = example["errors"], example["observed_order"]
    rows = {}
    for line in example_section().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) == 4 and re.match(r"\d", cells[1]):
            rows[cells[0].split()[0]] = cells[1:]
    assert set(rows) == {"sample", "invert", "round"}, rows
    for name, key in (("sample", "sample"), ("invert", "invert"), ("round", "round trip")):
        e20, e40, order = rows[name]
        for shown, n in ((e20, 20), (e40, 40)):
            assert float(shown) == pytest.approx(errors[key][n], rel=0.05), (name, n, errors[key][n])
        if key in orders:
            assert float(order) == pytest.approx(orders[key], abs=0.051), (name, orders[key])

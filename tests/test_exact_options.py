"""ExactInversion, exact inversion's settings as one object: checked when built (each bad field
named), equal settings hash alike and share one compiled program, ``exact=True`` is the defaults bit
for bit, a setting reaches the solver, and the keywords it replaced say what to write instead."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dpmjax
from dpmjax.models.analytic import GaussianMixture, timestep_model
from dpmjax.models.flax_sd import ExactEdit
from dpmjax.trajectories.exact_options import MOVED_KEYWORDS

GMM = GaussianMixture()
DEFAULTS = {"tolerance": 1e-5, "max_sweeps": 10, "max_iterations": 30, "gmres_restart": 5, "gmres_maxiter": 1,
            "independent_rows": True}


def sampler(order=2):
    return dpmjax.DPMSolverMultistepScheduler(solver_order=order, final_sigmas_type="sigma_min")


# ----------------------------------------------------------------------------- the object
def test_the_defaults_are_invert_s_former_defaults_and_the_fields_are_these():
    assert dataclasses.asdict(dpmjax.ExactInversion()) == {**DEFAULTS, "finish_apart": None, "max_calls_per_step": None}
    assert tuple(DEFAULTS) == MOVED_KEYWORDS


@pytest.mark.parametrize("name, value, allowed", [
    ("tolerance", 0.0, r"a number in \(0, 1\)"), ("tolerance", 1.0, r"a number in \(0, 1\)"),
    ("tolerance", math.nan, r"a number in \(0, 1\)"), ("tolerance", "1e-5", "a real number"),
    ("tolerance", True, "a real number"),
    ("max_sweeps", -1, "an integer >= 0"), ("max_sweeps", 2.0, "an integer >= 0"),
    ("max_iterations", 0, "an integer >= 1"), ("max_iterations", None, "an integer >= 1"),
    ("gmres_restart", 0, "an integer >= 1"), ("gmres_restart", True, "an integer >= 1"),
    ("gmres_maxiter", 0, "an integer >= 1"), ("gmres_maxiter", "1", "an integer >= 1"),
    ("independent_rows", 1, "True or False"), ("independent_rows", np.bool_(False), "True or False"),
    ("finish_apart", 1, "True or False"), ("finish_apart", "auto", "True or False"),
])
def test_each_bad_field_is_named_with_what_is_allowed(name, value, allowed):
    with pytest.raises(ValueError, match=rf"^{name} must be {allowed}"):
        dpmjax.ExactInversion(**{name: value})


def test_a_bad_field_is_refused_by_replace_too():
    with pytest.raises(ValueError, match="^max_sweeps must be"):
        dpmjax.ExactInversion().replace(max_sweeps=-2)
    assert dpmjax.ExactInversion().replace(max_sweeps=3) == dpmjax.ExactInversion(max_sweeps=3)


def test_frozen_hashable_and_equal_whatever_number_types_were_passed():
    a = dpmjax.ExactInversion(tolerance=np.float32(0.5), max_sweeps=np.int64(3), gmres_restart=np.int32(7))
    b = dpmjax.ExactInversion(tolerance=0.5, max_sweeps=3, gmres_restart=7)
    assert a == b and hash(a) == hash(b) and {a: 1}[b] == 1
    assert type(a.tolerance) is float and type(a.max_sweeps) is int and type(a.gmres_restart) is int
    assert a != dpmjax.ExactInversion(tolerance=0.5, max_sweeps=4, gmres_restart=7)
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.tolerance = 1e-3


# ----------------------------------------------------------------------------- through invert
def _case(order=2, rows=3, seed=0):
    fwd = sampler(order)
    return fwd, timestep_model(GMM, fwd.config), GMM.sample(jax.random.PRNGKey(seed), (rows, 16))


@pytest.mark.parametrize("order", [1, 2])
def test_exact_true_is_the_default_settings_bit_for_bit(order):
    fwd, model, x = _case(order)
    by_flag = dpmjax.invert(model, x, fwd, 8, exact=True, return_samples=True)
    by_object = dpmjax.invert(model, x, fwd, 8, exact=dpmjax.ExactInversion(), return_samples=True)
    for field in ("sample", "samples", "round_trip", "converged", "sweeps", "iterations"):
        np.testing.assert_array_equal(np.asarray(getattr(by_flag, field)), np.asarray(getattr(by_object, field)),
                                      err_msg=field)


def test_a_setting_reaches_the_solver():
    """No sweeps means none are made; a looser tolerance stops earlier and is what converged tests."""
    fwd, model, x = _case(2, rows=4)
    default = dpmjax.invert(model, x, fwd, 10, exact=True)
    no_sweeps = dpmjax.invert(model, x, fwd, 10, exact=dpmjax.ExactInversion(max_sweeps=0))
    loose = dpmjax.invert(model, x, fwd, 10, exact=dpmjax.ExactInversion(tolerance=1e-2))
    assert int(jnp.max(default.sweeps)) >= 1, default.sweeps
    assert int(jnp.max(no_sweeps.sweeps)) == 0, no_sweeps.sweeps
    assert bool(jnp.all(default.round_trip <= 1e-5)) and bool(jnp.all(loose.converged))
    assert float(jnp.max(loose.round_trip)) > 1e-5, "the loose solve stopped well before the default one"
    work = lambda r: int(jnp.sum(r.sweeps) + jnp.sum(r.iterations))  # noqa: E731
    assert work(loose) < work(default), (loose.sweeps, loose.iterations, default.sweeps, default.iterations)


def test_plain_inversion_is_exact_false():
    fwd, model, x = _case(2)
    plain = dpmjax.invert(model, x, fwd, 8)
    np.testing.assert_array_equal(np.asarray(plain.sample), np.asarray(dpmjax.invert(model, x, fwd, 8, exact=False).sample))
    assert plain.round_trip is None


# ----------------------------------------------------------------------------- the keywords it replaced
@pytest.mark.parametrize("name", MOVED_KEYWORDS)
def test_a_moved_keyword_names_the_new_call(name):
    fwd, model, x = _case(2)
    value = {"tolerance": 1e-4, "independent_rows": False}.get(name, 3)
    with pytest.raises(TypeError) as raised:
        dpmjax.invert(model, x, fwd, 5, exact=True, **{name: value})
    message = str(raised.value)
    assert message.startswith(f"invert() no longer takes {name}:"), message
    assert f"exact=dpmjax.ExactInversion({name}={value!r})" in message, message


def test_several_moved_keywords_are_named_together_even_on_the_plain_path():
    fwd, model, x = _case(2)
    with pytest.raises(TypeError, match=r"no longer takes tolerance, max_sweeps: .*"
                                        r"exact=dpmjax\.ExactInversion\(tolerance=0\.001, max_sweeps=2\)"):
        dpmjax.invert(model, x, fwd, 5, tolerance=1e-3, max_sweeps=2)


def test_edit_images_takes_the_settings_object_and_refuses_its_old_keywords():
    """Checked before anything is loaded or traced (no pipeline needed). The settings reach edit_images
    inside its exact method's object, ``method=ExactEdit(inversion=...)`` (tests/test_edit_methods.py)."""
    from dpmjax.models.flax_sd.edit import edit_images

    with pytest.raises(TypeError, match=r"^edit_images\(\) no longer takes max_iterations: .*"
                                        r"method=ExactEdit\(inversion=dpmjax\.ExactInversion\(max_iterations=5\)\)"):
        edit_images(None, {}, None, "a", "b", max_iterations=5)
    with pytest.raises(TypeError, match=r"^edit_images\(\) no longer takes exact: .*"
                                        r"method=ExactEdit\(inversion=dpmjax\.ExactInversion\(tolerance=0\.001\)\)"):
        edit_images(None, {}, None, "a", "b", method="plain", exact=dpmjax.ExactInversion(tolerance=1e-3))
    with pytest.raises(ValueError, match=r"^inversion must be a dpmjax.ExactInversion"):
        edit_images(None, {}, None, "a", "b", method=ExactEdit(inversion={"tolerance": 1e-3}))


@pytest.mark.parametrize("function", ["invert", "sample", "null_text_inversion", "check_step_inversion", "batch.run",
                                      "flax_sd.edit_images"])
def test_public_calls_take_at_most_fourteen_parameters(function):
    import inspect

    from dpmjax.apps import batch
    from dpmjax.models import flax_sd

    call = {"batch.run": batch.run, "flax_sd.edit_images": flax_sd.edit_images}.get(function) or getattr(dpmjax, function)
    assert len(inspect.signature(call).parameters) <= 14


# ----------------------------------------------------------------------------- the batch job
def test_the_batch_job_builds_its_settings_once_and_passes_them(tmp_path, monkeypatch):
    from dpmjax.apps import batch
    from dpmjax.apps.batch import workers
    from dpmjax.models import digits

    images = digits.heldout()[0]
    (tmp_path / "input").mkdir()
    for i in range(2):
        np.save(tmp_path / "input" / f"part-{i:05d}.npy", images[2 * i:2 * i + 2])
    seen = []
    real = workers.invert

    def recording(*args, **kwargs):
        seen.append(kwargs["exact"])
        return real(*args, **kwargs)

    monkeypatch.setattr(workers, "invert", recording)
    batch.run(tmp_path / "input", tmp_path / "exact", num_inference_steps=4, exact=True, progress=False)
    assert len(seen) == 2 and seen[0] == dpmjax.ExactInversion(tolerance=batch.EXACT_TOLERANCE)
    assert seen[1] is seen[0], "one object, built with the plan"
    seen.clear()
    batch.run(tmp_path / "input", tmp_path / "plain", num_inference_steps=4, progress=False)
    assert seen == [False, False]

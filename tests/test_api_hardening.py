"""API hardening: integer parameters, lambda_min_clipped, channel_axis, sample's key/noises,
null-text inversion compiling once per shape and optimiser settings, timesteps that stay training
timesteps, steps past the end, size bounds, trained_betas, model outputs and empty inputs."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dpmjax
from dpmjax import DPMSolverMultistepInverseScheduler as Inverse
from dpmjax import DPMSolverMultistepScheduler as Forward
from dpmjax import SchedulerConfig
from conftest import dpmjax_class, make_diffusers
from dpmjax.trajectories import null_text

SCHEDULERS = (Forward, Inverse)
NOT_INTEGERS = (2.0, True, False, np.float64(2.0), np.float32(2.0), np.bool_(True), "2", None)


def _linear(x, t):
    """An element-wise model: enough for every check here."""
    return 0.1 * x


# ----------------------------------------------------------------------------- 1. integers
@pytest.mark.parametrize("name", ["solver_order", "num_train_timesteps", "steps_offset", "channel_axis"])
@pytest.mark.parametrize("value", NOT_INTEGERS, ids=repr)
def test_integer_config_parameters_refuse_bools_floats_and_strings(name, value):
    for cls in SCHEDULERS:
        with pytest.raises(ValueError, match=rf"{name} must be .*integer.*got"):
            cls(**{name: value})


@pytest.mark.parametrize(
    "name, value", [("solver_order", np.int64(3)), ("num_train_timesteps", np.int32(500)), ("steps_offset", np.int64(1)),
                    ("channel_axis", np.int64(-1))])
def test_integer_config_parameters_accept_numpy_integers_as_python_ints(name, value):
    config = SchedulerConfig(**{name: value})
    assert getattr(config, name) == int(value) and type(getattr(config, name)) is int
    assert config == SchedulerConfig(**{name: int(value)}) and hash(config) == hash(SchedulerConfig(**{name: int(value)}))


def test_a_diffusers_json_config_still_loads(tmp_path):
    (tmp_path / "scheduler_config.json").write_text(
        '{"_class_name": "DPMSolverMultistepScheduler", "num_train_timesteps": 1000, "solver_order": 3, '
        '"steps_offset": 1, "lambda_min_clipped": -Infinity, "beta_schedule": "scaled_linear"}')
    for cls in SCHEDULERS:
        config = cls.from_pretrained(tmp_path).config
        assert (config.solver_order, config.num_train_timesteps, config.steps_offset) == (3, 1000, 1)
        assert config.lambda_min_clipped == -math.inf


@pytest.mark.parametrize("cls", SCHEDULERS)
@pytest.mark.parametrize("value", [10.0, np.float64(10.0), True, np.bool_(True)], ids=repr)
def test_set_timesteps_refuses_non_integer_step_counts_even_after_the_integer_was_cached(cls, value):
    scheduler = cls()
    scheduler.set_timesteps(scheduler.create_state(), 10, (1, 4))  # the grid of 10 steps is now cached
    with pytest.raises(ValueError, match="num_inference_steps must be an integer"):
        scheduler.set_timesteps(scheduler.create_state(), value, (1, 4))


@pytest.mark.parametrize("cls", SCHEDULERS)
def test_set_timesteps_accepts_numpy_integer_step_counts(cls):
    scheduler = cls()
    a = scheduler.set_timesteps(scheduler.create_state(), np.int64(7), (1, 4))
    b = scheduler.set_timesteps(scheduler.create_state(), 7, (1, 4))
    np.testing.assert_array_equal(np.asarray(a.timesteps), np.asarray(b.timesteps))


@pytest.mark.parametrize("value", [5.0, np.float64(5.0), True], ids=repr)
def test_sample_and_invert_refuse_non_integer_step_counts(value):
    scheduler, x = Forward(), jnp.ones((2, 4))
    dpmjax.sample(_linear, x, scheduler, 5)
    dpmjax.invert(_linear, x, scheduler, 5)
    with pytest.raises(ValueError, match="num_inference_steps must be an integer"):
        dpmjax.sample(_linear, x, scheduler, value)
    with pytest.raises(ValueError, match="num_inference_steps must be an integer"):
        dpmjax.invert(_linear, x, scheduler, value)


# ----------------------------------------------------------------------------- 2. lambda_min_clipped
@pytest.mark.parametrize("value", [math.inf, math.nan, 100.0], ids=repr)
@pytest.mark.parametrize("schedule", ["linear", "squaredcos_cap_v2"])
def test_lambda_min_clipped_must_leave_a_timestep(value, schedule):
    for cls in SCHEDULERS:
        with pytest.raises(ValueError, match="lambda_min_clipped must be"):
            cls(beta_schedule=schedule, lambda_min_clipped=value)


@pytest.mark.parametrize("value", [-math.inf, -5.1, None])
def test_lambda_min_clipped_finite_or_minus_infinity_still_works(value):
    config = SchedulerConfig.from_dict({"beta_schedule": "squaredcos_cap_v2", "lambda_min_clipped": value})
    state = Forward(config).set_timesteps(Forward(config).create_state(), 5, (1, 4))
    assert int(jnp.min(state.timesteps)) >= 0


# ----------------------------------------------------------------------------- 3. channel_axis
@pytest.mark.parametrize("axis", [4, 5, -5, 100])
def test_channel_axis_outside_the_sample_is_refused_before_tracing(axis):
    scheduler = Forward(variance_type="learned_range", channel_axis=axis)
    with pytest.raises(ValueError, match=r"channel_axis=.* must lie in \[-4, 3\]"):
        scheduler.set_timesteps(scheduler.create_state(), 5, (2, 4, 8, 8))
    with pytest.raises(ValueError, match=r"channel_axis=.* must lie in \[-4, 3\]"):
        dpmjax.sample(lambda x, t: jnp.concatenate([x, x], axis=1), jnp.ones((2, 4, 8, 8)), scheduler, 5)


def test_channel_axis_refused_by_step_on_a_sample_of_other_rank():
    scheduler = Forward(variance_type="learned_range", channel_axis=2)
    state = scheduler.set_timesteps(scheduler.create_state(), 5, (2, 4, 8))
    x = jnp.ones((2, 4))
    with pytest.raises(ValueError, match=r"channel_axis=2 must lie in \[-2, 1\]"):
        scheduler.step(state, jnp.ones((2, 8)), state.timesteps[0], x)
    with pytest.raises(ValueError, match=r"channel_axis=2 must lie in \[-2, 1\]"):
        scheduler.convert_model_output(state.replace(step_index=jnp.asarray(0)), jnp.ones((2, 8)), x)


@pytest.mark.parametrize("axis", [-1, -4, 3, 1])
def test_channel_axis_within_the_sample_splits_there(axis):
    scheduler = Forward(variance_type="learned_range", channel_axis=axis)
    shape = (2, 4, 6, 6)
    state = scheduler.set_timesteps(scheduler.create_state(), 5, shape)
    x = jnp.ones(shape)
    out = jnp.concatenate([x * 0.1, x * 7.0], axis=axis)
    y, _ = scheduler.step(state, out, state.timesteps[0], x, return_dict=False)
    plain = Forward()
    expected, _ = plain.step(plain.set_timesteps(plain.create_state(), 5, shape), x * 0.1, state.timesteps[0], x,
                             return_dict=False)
    np.testing.assert_allclose(np.asarray(y), np.asarray(expected), rtol=1e-6)


# ----------------------------------------------------------------------------- 4. sample's key/noises
@pytest.mark.parametrize("extra", ["key", "noises"])
def test_deterministic_sample_refuses_key_and_noises(extra):
    x = jnp.ones((2, 4))
    value = jax.random.PRNGKey(0) if extra == "key" else jnp.zeros((5, 2, 4))
    with pytest.raises(ValueError, match="key/noises apply to stochastic samplers .*this one is deterministic"):
        dpmjax.sample(_linear, x, Forward(), 5, **{extra: value})


def test_stochastic_sample_still_takes_key_and_noises():
    x, scheduler = jnp.ones((2, 4)), Forward(algorithm_type="sde-dpmsolver++")
    dpmjax.sample(_linear, x, scheduler, 5, key=jax.random.PRNGKey(0))
    dpmjax.sample(_linear, x, scheduler, 5, noises=jnp.zeros((5, 2, 4)))


# ----------------------------------------------------------------------------- 5. null-text compiles once
def _conditional(x, t, cond):
    return 0.1 * x + 0.01 * cond


def _null_text(optimizer, w=3.0):
    x = jnp.linspace(-1.0, 1.0, 12).reshape(3, 4)
    scheduler = Forward(solver_order=2, final_sigmas_type="sigma_min")
    return null_text.null_text_inversion(_conditional, x, scheduler, 4, cond=jnp.ones((3, 4)),
                                         uncond=jnp.zeros((3, 4)), guidance_scale=w, optimizer=optimizer,
                                         inner_steps=2)


def _compilations(optimizers, w):
    """Programs the null-text scan adds over calls with these optimisers (one per call; each test
    uses its own guidance scale, a static argument, so that no other test's program is reused)."""
    before = null_text._guided_scan_jit._cache_size()
    results = [_null_text(o, w) for o in optimizers]
    return null_text._guided_scan_jit._cache_size() - before, results


def test_null_text_default_optimiser_compiles_once():
    added, _ = _compilations([None, None, None], w=2.0)
    assert added == 1, added


def test_null_text_fresh_inline_adam_compiles_once_and_gives_the_same_result():
    added, results = _compilations([optax.adam(1e-2), optax.adam(1e-2), optax.adam(1e-2)], w=3.0)
    assert added == 1, added
    np.testing.assert_array_equal(np.asarray(results[0].null_embeddings), np.asarray(results[2].null_embeddings))


def test_null_text_other_optimiser_settings_compile_again():
    added, results = _compilations([optax.adam(2.5e-2), optax.adam(3.5e-2), optax.sgd(2.5e-2),
                                    optax.chain(optax.clip_by_global_norm(1.0), optax.adam(2.5e-2))], w=4.0)
    assert added == 4, added
    assert not np.array_equal(np.asarray(results[0].null_embeddings), np.asarray(results[1].null_embeddings))


def test_null_text_unrecognised_optimiser_falls_back_to_identity():
    class Opaque:  # a closure cell whose value defines its own equality: not recognised
        def __init__(self, lr):
            self.lr = lr

        def __eq__(self, other):
            return True

        __hash__ = object.__hash__

    def make(lr):
        box = Opaque(lr)
        return optax.GradientTransformation(lambda p: (), lambda g, s, p=None: (jax.tree_util.tree_map(
            lambda a: -box.lr * a, g), s))

    same = make(1e-2)
    added, results = _compilations([make(1e-2), make(9e-2), same, same], w=5.0)
    assert added == 3, added
    assert not np.array_equal(np.asarray(results[0].null_embeddings), np.asarray(results[1].null_embeddings))


# ----------------------------------------------------------------------------- flags, arrays, models, numbers
X = jnp.ones((2, 3), jnp.float32)


@pytest.mark.parametrize("name", ["return_samples", "return_model_outputs", "checkpoint", "progress"])
@pytest.mark.parametrize("value", ["no", None, 1, np.bool_(True)], ids=repr)
def test_invert_flags_must_be_bools(name, value):
    with pytest.raises(ValueError, match=rf"{name} must be True or False"):
        dpmjax.invert(_linear, X, Forward(), 5, **{name: value})


@pytest.mark.parametrize("value", ["no", None, 1, np.bool_(True), {"tolerance": 1e-4}], ids=repr)
def test_invert_exact_must_be_a_bool_or_exact_settings(value):
    with pytest.raises(ValueError, match=r"exact must be True, False or a dpmjax.ExactInversion"):
        dpmjax.invert(_linear, X, Forward(), 5, exact=value)


@pytest.mark.parametrize("name", ["return_samples", "return_model_outputs", "checkpoint", "progress", "donate"])
def test_sample_flags_must_be_bools(name):
    with pytest.raises(ValueError, match=rf"{name} must be True or False"):
        dpmjax.sample(_linear, X, Forward(), 5, **{name: "no"})


@pytest.mark.parametrize("exact", [False, True])
def test_integer_data_is_refused_before_it_is_inverted(exact):
    """An integer sample would be inverted in float32 and cast back to integers: refused, named."""
    with pytest.raises(ValueError, match="sample must be a floating-point array"):
        dpmjax.invert(_linear, jnp.ones((2, 3), jnp.int32), Forward(), 5, exact=exact)
    with pytest.raises(ValueError, match="noise must be a floating-point array"):
        dpmjax.sample(_linear, jnp.ones((2, 3), jnp.int32), Forward(), 5)


def test_exact_inversion_of_bfloat16_data_returns_noise_at_the_working_precision():
    """A cast of the exact noise back to bfloat16 would undo the exactness its round trip reports."""
    x = (0.5 * jnp.arange(6.0).reshape(2, 3) / 6).astype(jnp.bfloat16)
    result = dpmjax.invert(_linear, x, Forward(), 5, exact=True)
    assert result.sample.dtype == jnp.float32 and bool(jnp.all(result.converged))
    back = dpmjax.sample(_linear, result.sample, Forward(), 5).sample
    assert float(jnp.max(jnp.abs(back - x.astype(jnp.float32)))) <= 1e-5


@pytest.mark.parametrize("model", [None, "model", 3])
def test_a_model_that_is_not_a_function_is_named(model):
    for call in (lambda: dpmjax.sample(model, X, Forward(), 5), lambda: dpmjax.invert(model, X, Forward(), 5)):
        with pytest.raises(ValueError, match="model_fn must be a function"):
            call()


@pytest.mark.parametrize("name, value", [("tolerance", math.nan), ("tolerance", 0.0), ("max_iterations", 2.0),
                                         ("max_sweeps", -5), ("gmres_restart", "a"), ("gmres_maxiter", 0),
                                         ("independent_rows", 1)])
def test_exact_settings_are_checked_when_built_before_any_inversion(name, value):
    """A mistake in an exact setting is reported when the settings are built, whatever they are used for."""
    with pytest.raises(ValueError, match=rf"^{name} must be"):
        dpmjax.ExactInversion(**{name: value})


def test_checkpoint_with_exact_inversion_names_only_what_was_passed():
    with pytest.raises(ValueError, match=r"^checkpoint applies"):
        dpmjax.invert(_linear, X, Forward(), 5, exact=True, checkpoint=True)
    with pytest.raises(ValueError, match=r"^unroll applies"):
        dpmjax.invert(_linear, X, Forward(), 5, exact=True, unroll=2)


@pytest.mark.parametrize("scale", [math.nan, math.inf, "3", True, None])
def test_guidance_scales_must_be_finite_numbers(scale):
    model = lambda x, t, c: 0.1 * x  # noqa: E731
    labels = jnp.zeros((2,), jnp.int32)
    with pytest.raises(ValueError, match="guidance_scale must be a"):
        dpmjax.classifier_free_guidance(model, labels, labels, scale)
    with pytest.raises(ValueError, match="guidance_scale must be a"):
        dpmjax.null_text_inversion(model, X, Forward(), 5, cond=labels, uncond=labels, guidance_scale=scale)


def test_a_traced_guidance_scale_is_taken_as_it_is():
    """Differentiating through the scale: a JAX array is not checked on the host."""
    model = lambda x, t, c: 0.1 * x * (1 + c[:, None])  # noqa: E731
    grad = jax.grad(lambda w: jnp.sum(dpmjax.sample(dpmjax.classifier_free_guidance(
        model, jnp.ones((2,)), jnp.zeros((2,)), w), X, Forward(), 5).sample))(jnp.asarray(2.0))
    assert bool(jnp.isfinite(grad))


@pytest.mark.parametrize("optimizer", ["adam", 1e-2])
def test_null_text_optimizer_must_be_an_optax_transformation(optimizer):
    labels = jnp.zeros((2,), jnp.int32)
    with pytest.raises(ValueError, match="optimizer must be an optax GradientTransformation"):
        dpmjax.null_text_inversion(lambda x, t, c: 0.1 * x, X, Forward(), 5, cond=labels, uncond=labels,
                                   guidance_scale=3.0, optimizer=optimizer)


@pytest.mark.parametrize("name, value", [("tolerance", math.nan), ("tolerance", -1.0), ("max_iterations", 2.0)])
def test_the_step_check_refuses_bad_settings(name, value):
    with pytest.raises(ValueError, match=name):
        dpmjax.check_step_inversion(_linear, X, Forward(), 5, **{name: value})


# ----------------------------------------------------------------------------- timesteps stay training timesteps
def _write_config(folder, values: dict):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "scheduler_config.json").write_text(json.dumps(values))
    return folder


@pytest.mark.parametrize("offset", [1000, 100000])
def test_a_steps_offset_past_the_training_timesteps_is_refused_at_construction(tmp_path, offset):
    """The config alone decides it: every 'leading' timestep would lie past num_train_timesteps - 1."""
    folder = _write_config(tmp_path / "scheduler", {"timestep_spacing": "leading", "steps_offset": offset})
    calls = [lambda cls: cls(timestep_spacing="leading", steps_offset=offset),
             lambda cls: cls.from_pretrained(folder)]
    for cls in (Forward, Inverse, dpmjax.FlaxDPMSolverMultistepScheduler):
        for call in calls:
            with pytest.raises(ValueError, match=r"steps_offset must be an integer in \[0, 999\] .*leading.* got "
                                                 rf"{offset}\."):
                call(cls)
    with pytest.raises(ValueError, match=r"steps_offset must be an integer in \[0, 99\]"):
        SchedulerConfig(num_train_timesteps=100, steps_offset=100)
    assert SchedulerConfig(num_train_timesteps=100, steps_offset=99).steps_offset == 99


def _diffusers_leading(kind: str, offset: int, n: int, T: int):
    d = make_diffusers(kind, num_train_timesteps=T, timestep_spacing="leading", steps_offset=offset)
    d.set_timesteps(n)
    return d.timesteps.numpy(), d.sigmas.numpy()


@pytest.mark.parametrize("kind", ["forward", "inverse"])
@pytest.mark.parametrize("offset", [1, 7, 40])
def test_leading_grids_are_diffusers_own_where_they_stay_in_range_and_refused_where_they_leave_it(kind, offset):
    """Every step count of a 100-step training schedule: where diffusers' timesteps stay in
    [0, 99] they are dpmjax's too; where they pass 99 (diffusers then evaluates the model there),
    set_timesteps refuses with a ValueError naming steps_offset, the spacing and the step count."""
    T = 100
    scheduler = dpmjax_class(kind)(num_train_timesteps=T, timestep_spacing="leading", steps_offset=offset)
    refused = 0
    for n in range(1, T):  # every count 'leading' spacing can space over 100 timesteps
        timesteps, sigmas = _diffusers_leading(kind, offset, n, T)
        if timesteps.max() > T - 1:
            with pytest.raises(ValueError, match=rf"^steps_offset={offset} with timestep_spacing='leading' and "
                                                 rf"num_inference_steps={n} gives timesteps up to {timesteps.max()}, "
                                                 r"outside the training timesteps \[0, 99\]"):
                scheduler.set_timesteps(scheduler.create_state(), n, (1,))
            refused += 1
            continue
        state = scheduler.set_timesteps(scheduler.create_state(), n, (1,))
        np.testing.assert_array_equal(np.asarray(state.timesteps), timesteps)
        np.testing.assert_allclose(np.asarray(state.sigmas), sigmas, rtol=2e-6, atol=0)
    assert refused > 0 if (kind, offset) != ("inverse", 1) else refused == 0


def test_stable_diffusions_leading_offset_is_refused_only_at_999_steps():
    """Stable Diffusion's scheduler config (leading, steps_offset=1): 999 steps would evaluate the
    model at timestep 1000; 998 end at 999."""
    scheduler = Forward(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, timestep_spacing="leading",
                        steps_offset=1)
    with pytest.raises(ValueError, match=r"use steps_offset <= 0 with 999 steps \(the largest step count below 999 "
                                         r"that fits steps_offset=1 is 998\)"):
        scheduler.set_timesteps(scheduler.create_state(), 999, (1,))
    assert int(jnp.max(scheduler.set_timesteps(scheduler.create_state(), 998, (1,)).timesteps)) == 999


@pytest.mark.parametrize("cls", [Forward, Inverse])
def test_sample_and_invert_refuse_an_out_of_range_offset_before_the_model_runs(cls):
    calls = []

    def model(x, t):
        calls.append(t)
        return 0.1 * x

    scheduler = cls(timestep_spacing="leading", steps_offset=990)
    run = dpmjax.sample if cls is Forward else dpmjax.invert
    with pytest.raises(ValueError, match=r"steps_offset=990 with timestep_spacing='leading' and num_inference_steps=25"):
        run(model, X, scheduler, 25)
    assert calls == []


def test_alternative_grids_ignore_the_offset_and_stay_in_range():
    """Karras, exponential, Beta, Lu and flow grids set their own timesteps: the offset is unused there."""
    for option in SchedulerConfig.SIGMA_GRID_OPTIONS:
        for cls in SCHEDULERS:
            scheduler = cls(timestep_spacing="leading", steps_offset=990, **{option: True})
            timesteps = np.asarray(scheduler.set_timesteps(scheduler.create_state(), 25, (1,)).timesteps)
            assert timesteps.min() >= 0 and timesteps.max() <= 999, (option, cls)


def test_the_batch_job_refuses_such_a_config_in_one_line(tmp_path):
    """``invert-batch --config``: an offset past the training timesteps is one line naming the config
    file and steps_offset, exit status 2, nothing written; one that only some step counts leave
    range is one line naming steps_offset and the step count."""
    folder = tmp_path / "input"
    folder.mkdir()
    np.save(folder / "part-00000.npy", np.zeros((2, 1, 8, 8), np.float32))
    config = tmp_path / "cfg.json"
    config.write_text(json.dumps({"timestep_spacing": "leading", "steps_offset": 100000}))
    late = tmp_path / "late.json"
    late.write_text(json.dumps({"timestep_spacing": "leading", "steps_offset": 990, "final_sigmas_type": "sigma_min"}))
    command = [sys.executable, "-m", "dpmjax", "invert-batch", str(folder)]
    for cfg, out, fragments in ((config, tmp_path / "out", (f"scheduler config {config}", "steps_offset")),
                                (late, tmp_path / "out-late", ("steps_offset=990", "timestep_spacing='leading'",
                                                               "num_inference_steps=5"))):
        done = subprocess.run(command + [str(out), "--config", str(cfg), "--steps", "5"], capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 2, (done.returncode, done.stderr[-3000:])
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
        for fragment in fragments:
            assert fragment in lines[0], (fragment, lines[0])
        assert not out.exists()


# a clipped cosine schedule whose 'trailing' grid diffusers rounds to timestep -1 at these step counts
CLIPPED_TRAILING = dict(beta_schedule="squaredcos_cap_v2", timestep_spacing="trailing", lambda_min_clipped=-5.1)


@pytest.mark.parametrize("kind", ["forward", "inverse"])
@pytest.mark.parametrize("n", [223, 728])
def test_trailing_timestep_minus_one_becomes_zero_with_diffusers_sigmas(kind, n):
    """diffusers gives timestep -1 (and evaluates the model there); dpmjax gives 0, the training
    timestep whose noise level that point has. Everything else is diffusers' grid."""
    d = make_diffusers(kind, **CLIPPED_TRAILING)
    d.set_timesteps(n)
    theirs = d.timesteps.numpy()
    scheduler = dpmjax_class(kind)(**CLIPPED_TRAILING)
    state = scheduler.set_timesteps(scheduler.create_state(), n, (1,))
    ours = np.asarray(state.timesteps)
    assert (theirs == -1).sum() == 1 and ours.min() == 0
    np.testing.assert_array_equal(ours, np.maximum(theirs, 0))
    np.testing.assert_allclose(np.asarray(state.sigmas), d.sigmas.numpy(), rtol=2e-6, atol=0)
    train = np.asarray(scheduler.create_state().sigmas)
    np.testing.assert_allclose(np.asarray(state.sigmas)[np.nonzero(theirs == -1)[0]], train[0], rtol=2e-6)


@pytest.mark.parametrize("cls", [Forward, Inverse])
def test_the_model_never_sees_a_negative_timestep(cls):
    def model(x, t):  # NaN wherever it would be evaluated outside the training timesteps
        return jnp.where((t < 0) | (t > 999), jnp.nan, 0.1 * x)

    scheduler = cls(**CLIPPED_TRAILING)
    run = dpmjax.sample if cls is Forward else dpmjax.invert
    result = run(model, X, scheduler, 223)
    assert bool(jnp.all(jnp.isfinite(result.sample))) and int(jnp.min(result.timesteps)) == 0
    if cls is Forward:
        inverted = dpmjax.invert(model, X, scheduler, 223)
        assert bool(jnp.all(jnp.isfinite(inverted.sample)))


# ----------------------------------------------------------------------------- past the end
def _states(cls, n=4, shape=(2, 3)):
    scheduler = cls()
    return scheduler, scheduler.set_timesteps(scheduler.create_state(), n, shape)


PAST_END_CLASSES = (Forward, Inverse, dpmjax.FlaxDPMSolverMultistepScheduler)


@pytest.mark.parametrize("cls", PAST_END_CLASSES)
def test_a_jitted_step_past_the_end_returns_its_sample_and_counts_itself(cls):
    scheduler, state = _states(cls)
    assert int(state.steps_past_end) == 0
    step = jax.jit(lambda st, out, t, x: scheduler.step(st, out, t, x, return_dict=False))
    x = jnp.linspace(-1.0, 1.0, 6).reshape(2, 3)
    for t in np.asarray(state.timesteps):
        x, state = step(state, 0.1 * x, t, x)
    assert int(state.step_index) == 4 and int(state.steps_past_end) == 0
    for extra in (1, 2):  # a NaN model output is not taken either: the step computes nothing
        y, state = step(state, jnp.full_like(x, jnp.nan), state.timesteps[-1], x)
        np.testing.assert_array_equal(np.asarray(y), np.asarray(x))
        assert int(state.step_index) == 4 and int(state.steps_past_end) == extra
    with pytest.raises(ValueError, match="past the end.*steps_past_end"):
        scheduler.step(state, 0.1 * x, state.timesteps[-1], x)


@pytest.mark.parametrize("cls", [Forward, Inverse])
def test_a_scan_longer_than_the_schedule_ends_where_the_schedule_ends(cls):
    scheduler, state = _states(cls)
    x0 = jnp.linspace(-1.0, 1.0, 6).reshape(2, 3)

    def body(carry, t):
        x, st = carry
        x, st = scheduler.step(st, 0.1 * jnp.tanh(x), t, x, return_dict=False)
        return (x, st), x

    (x4, s4), _ = jax.lax.scan(body, (x0, state), state.timesteps)
    longer = jnp.concatenate([state.timesteps, state.timesteps[-1:], state.timesteps[-1:]])
    (x6, s6), path = jax.lax.scan(body, (x0, state), longer)
    np.testing.assert_array_equal(np.asarray(x6), np.asarray(x4))
    np.testing.assert_array_equal(np.asarray(path[3]), np.asarray(path[5]))
    assert (int(s4.steps_past_end), int(s6.steps_past_end)) == (0, 2) and int(s6.step_index) == 4


def test_the_flax_drop_in_in_a_longer_fori_loop_does_not_repeat_its_last_step():
    """diffusers 0.39's Flax class looked the clamped timestep up again and repeated its last step."""
    scheduler, state = _states(dpmjax.FlaxDPMSolverMultistepScheduler, n=5)
    x0 = jnp.linspace(-1.0, 1.0, 6).reshape(2, 3)

    def body(i, args):
        x, st = args
        t = jnp.array(st.timesteps, dtype=jnp.int32)[i]
        return scheduler.step(st, 0.1 * x, t, x).to_tuple()

    x5, s5 = jax.lax.fori_loop(0, 5, body, (x0, state))
    x6, s6 = jax.lax.fori_loop(0, 6, body, (x0, state))
    np.testing.assert_array_equal(np.asarray(x6), np.asarray(x5))
    assert (int(s5.steps_past_end), int(s6.steps_past_end)) == (0, 1)


# ----------------------------------------------------------------------------- sizes
def test_num_train_timesteps_has_a_documented_bound(tmp_path):
    """A typo of 1e12 would allocate terabytes of tables: refused in one line, at construction."""
    from dpmjax.config import MAX_TRAIN_TIMESTEPS

    assert MAX_TRAIN_TIMESTEPS == 2**20
    message = r"num_train_timesteps must be an integer in \[2, 1048576\] .*MAX_TRAIN_TIMESTEPS.*, got 1000000000000\."
    folder = _write_config(tmp_path / "scheduler", {"num_train_timesteps": 10**12})
    for cls in (Forward, Inverse, dpmjax.FlaxDPMSolverMultistepScheduler):
        with pytest.raises(ValueError, match=message):
            cls(num_train_timesteps=10**12)
        with pytest.raises(ValueError, match=message):
            cls.from_pretrained(folder)
    with pytest.raises(ValueError, match=r"num_train_timesteps must be an integer in \[2, 1048576\]"):
        SchedulerConfig(num_train_timesteps=2**20 + 1)
    largest = Forward(num_train_timesteps=2**20, beta_start=1e-6, beta_end=1e-5)
    state = largest.set_timesteps(largest.create_state(), 10, (1,))
    assert int(state.timesteps[0]) == 2**20 - 1


@pytest.mark.parametrize("cls", SCHEDULERS)
def test_num_inference_steps_is_bounded_by_the_training_timesteps(cls):
    scheduler = cls(num_train_timesteps=50)
    with pytest.raises(ValueError, match=r"num_inference_steps must lie in \[1, num_train_timesteps=50\], got 10000000"):
        scheduler.set_timesteps(scheduler.create_state(), 10**7, (1,))


# ----------------------------------------------------------------------------- trained_betas
TRAINED_BETAS_MESSAGE = r"trained_betas must be a 1-D sequence of num_train_timesteps=10 finite numbers in \(0, 1\)"


@pytest.mark.parametrize("betas", [[None] * 10, [[0.01]] * 10, "0.01" * 3, np.full((10, 1), 0.01), [True] * 10,
                                   {"a": 0.01}, 0.01, [0.01] * 9, [0.01] * 9 + [math.nan], [0.01] * 9 + [math.inf],
                                   [0.01] * 9 + ["0.01"], [0.01] * 9 + [1.0]], ids=lambda b: repr(b)[:20])
def test_trained_betas_that_are_not_ten_numbers_in_the_unit_interval_are_named(betas):
    for cls in (Forward, Inverse, dpmjax.FlaxDPMSolverMultistepScheduler):
        with pytest.raises(ValueError, match=TRAINED_BETAS_MESSAGE):
            cls(num_train_timesteps=10, trained_betas=betas)


def test_trained_betas_from_a_json_with_nulls_are_named(tmp_path):
    folder = _write_config(tmp_path / "scheduler", {"num_train_timesteps": 10, "trained_betas": [None] * 10})
    with pytest.raises(ValueError, match=TRAINED_BETAS_MESSAGE + ", or None; value 0 is None"):
        Forward.from_pretrained(folder)


def test_trained_betas_as_list_tuple_or_array_are_one_config():
    betas = np.linspace(0.001, 0.02, 10)
    configs = {SchedulerConfig(num_train_timesteps=10, trained_betas=b) for b in
               (list(betas), tuple(betas), betas, betas.astype(np.float32).astype(np.float64), jnp.asarray(betas, jnp.float32))}
    assert all(isinstance(b, float) for c in configs for b in c.trained_betas)
    assert len({c.trained_betas[:1] for c in configs}) <= 2  # float64 and its float32 rounding


# ----------------------------------------------------------------------------- what the model returns
BAD_OUTPUTS = {"a tuple": lambda x: (x, x), "a float": lambda x: 0.5, "a list": lambda x: [x],
               "integers": lambda x: jnp.zeros(x.shape, jnp.int32), "another shape": lambda x: x[:1]}


@pytest.mark.parametrize("bad", list(BAD_OUTPUTS))
def test_a_model_returning_anything_but_one_array_of_the_sample_shape_is_named(bad):
    make = BAD_OUTPUTS[bad]
    model = lambda x, t: make(x)  # noqa: E731
    message = r"^model_fn must return one floating-point array of shape \(2, 3\) \(the model output"
    calls = {"sample": lambda: dpmjax.sample(model, X, Forward(), 5),
             "invert (inverse)": lambda: dpmjax.invert(model, X, Inverse(), 5),
             "invert (sampler)": lambda: dpmjax.invert(model, X, Forward(), 5),
             "invert (exact, order 2)": lambda: dpmjax.invert(model, X, Forward(), 5, exact=True),
             "invert (exact, order 1)": lambda: dpmjax.invert(model, X, Forward(solver_order=1), 5, exact=True)}
    for name, call in calls.items():
        with pytest.raises(ValueError, match=message):
            call()


@pytest.mark.parametrize("bad", ["a tuple", "a float", "another shape"])
def test_a_conditional_model_returning_anything_but_one_array_is_named(bad):
    make = BAD_OUTPUTS[bad]
    model = lambda x, t, c: make(x)  # noqa: E731
    labels = jnp.zeros((2, 3))
    with pytest.raises(ValueError, match=r"^model must return one floating-point array of shape \(2, 3\)"):
        dpmjax.null_text_inversion(model, X, Forward(), 5, cond=labels, uncond=labels, guidance_scale=3.0)
    with pytest.raises(ValueError, match=r"^model must return one floating-point array of shape \(2, 3\)"):
        dpmjax.sample_with_null_embeddings(model, X, Forward(), 5, cond=labels, null_embeddings=jnp.zeros((5, 2, 3)),
                                           guidance_scale=3.0)
    if bad != "another shape":  # a guided model of another shape is model_fn's wrong shape, named as such
        with pytest.raises(ValueError, match=r"^model must return one floating-point array"):
            dpmjax.sample(dpmjax.classifier_free_guidance(model, labels, labels, 3.0), X, Forward(), 5)


def test_a_learned_variance_model_is_told_the_doubled_shape():
    scheduler = Forward(variance_type="learned_range")
    with pytest.raises(ValueError, match=r"model_fn must return one floating-point array of shape \(2, 6\) .*twice the "
                                         r"sample's channels on channel_axis=1.*got shape \(2, 3\)"):
        dpmjax.sample(_linear, X, scheduler, 5)
    dpmjax.sample(lambda x, t: jnp.concatenate([0.1 * x, x], axis=1), X, scheduler, 5)


# ----------------------------------------------------------------------------- empty inputs
@pytest.mark.parametrize("shape", [(2, 0), (0, 3), (0,)])
def test_empty_samples_are_refused_by_every_trajectory(shape):
    empty = jnp.zeros(shape)
    message = f"must not be empty (at least one row, every axis of size >= 1), got shape {shape}."
    conditional = lambda x, t, c: 0.1 * x  # noqa: E731
    cond = jnp.zeros(shape)
    calls = {"noise": [lambda: dpmjax.sample(_linear, empty, Forward(), 5),
                       lambda: dpmjax.sample_with_null_embeddings(conditional, empty, Forward(), 5, cond=cond,
                                                                  null_embeddings=jnp.zeros((5,) + shape),
                                                                  guidance_scale=2.0)],
             "sample": [lambda: dpmjax.invert(_linear, empty, Forward(), 5),
                        lambda: dpmjax.invert(_linear, empty, Inverse(), 5),
                        lambda: dpmjax.invert(_linear, empty, Forward(), 5, exact=True)],
             "data": [lambda: null_text.null_text_inversion(conditional, empty, Forward(), 5, cond=cond, uncond=cond,
                                                            guidance_scale=2.0),
                      lambda: dpmjax.null_text_inversion(conditional, empty, Forward(), 5, cond=cond, uncond=cond,
                                                         guidance_scale=2.0)]}
    for name, functions in calls.items():
        for call in functions:
            with pytest.raises(ValueError, match="^" + name + " " + re.escape(message)):
                call()


@pytest.mark.parametrize("call", ["sample", "invert", "exact"])
def test_a_condition_with_another_number_of_rows_is_named_when_the_model_fails_on_it(call):
    """The model fails inside the trace on a per-row condition of 3 rows for a batch of 4: the error
    names ``cond`` and both row counts (the model's own error chained); a condition of 1 row, which
    the model broadcasts, still works."""
    import jax.numpy as jnp

    def model(x, t, c):
        return x * c[:, None]

    sched = dpmjax.DPMSolverMultistepScheduler(final_sigmas_type="sigma_min")
    run = {"sample": lambda c: dpmjax.sample(model, jnp.ones((4, 2)), sched, num_inference_steps=5, cond=c),
           "invert": lambda c: dpmjax.invert(model, jnp.ones((4, 2)), sched, num_inference_steps=5, cond=c),
           "exact": lambda c: dpmjax.invert(model, jnp.ones((4, 2)), sched, num_inference_steps=5, cond=c,
                                            exact=dpmjax.ExactInversion(max_iterations=2, max_sweeps=1))}[call]
    with pytest.raises(ValueError, match=r"model_fn failed on samples of 4 rows, and cond has a leaf of shape \(3,\)"):
        run(jnp.full((3,), 0.5))
    assert run(jnp.full((1,), 0.5)).sample.shape == (4, 2)

"""API hardening: integer parameters, lambda_min_clipped, channel_axis, sample's key/noises, and
null-text inversion compiling once per shape and optimiser settings."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dpmjax
from dpmjax import DPMSolverMultistepInverseScheduler as Inverse
from dpmjax import DPMSolverMultistepScheduler as Forward
from dpmjax import SchedulerConfig
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


@pytest.mark.parametrize("name", ["exact", "independent_rows", "return_samples", "return_model_outputs", "checkpoint",
                                  "progress"])
@pytest.mark.parametrize("value", ["no", None, 1, np.bool_(True)], ids=repr)
def test_invert_flags_must_be_bools(name, value):
    with pytest.raises(ValueError, match=rf"{name} must be True or False"):
        dpmjax.invert(_linear, X, Forward(), 5, **{name: value})


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
                                         ("max_sweeps", -5), ("gmres_restart", "a")])
def test_plain_inversion_checks_the_exact_settings_too(name, value):
    """A mistake in an exact-only setting is reported even where the plain path would not use it."""
    with pytest.raises(ValueError, match=name):
        dpmjax.invert(_linear, X, Forward(), 5, **{name: value})


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

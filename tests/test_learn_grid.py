"""dpmjax.learn_grid: LD3-style learned grids, through the public call, judged on held-out noise."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dpmjax
from dpmjax.apps.digits_job import guided_model
from dpmjax.models import digits
from dpmjax.models.analytic import GaussianMixture, timestep_model
from dpmjax.trajectories.learn_grid import parameterisation


def _rmse(model, noise, sched, teacher, **grid):
    out = dpmjax.sample(model, noise, sched, **grid).sample
    return float(jnp.sqrt(jnp.mean((out - teacher) ** 2)))


@pytest.fixture(scope="module")
def mixture():
    gmm = GaussianMixture()
    sched = dpmjax.DPMSolverMultistepScheduler(solver_order=2, final_sigmas_type="sigma_min")
    return gmm, sched, timestep_model(gmm, sched.config)


def test_a_learned_grid_beats_the_default_grid_on_held_out_noise(mixture):
    """On the analytic mixture (exact model), 4 steps: the learned grid's samples are closer to the
    100-step teacher than the default grid's, on noise the training never saw."""
    gmm, sched, model = mixture
    train = jax.random.normal(jax.random.PRNGKey(0), (128, 16))
    result = dpmjax.learn_grid(model, sched, 4, train, iterations=150, progress=False)
    held_out = jax.random.normal(jax.random.PRNGKey(1), (256, 16))
    teacher = dpmjax.sample(model, held_out, sched, 100).sample
    learned = _rmse(model, held_out, sched, teacher, sigmas=result.sigmas)
    default = _rmse(model, held_out, sched, teacher, num_inference_steps=4)
    assert learned < 0.9 * default, (learned, default)
    assert result.losses[-20:].mean() < result.losses[:20].mean()


def test_the_learned_levels_decrease_between_the_fixed_ends(mixture):
    _, sched, model = mixture
    train = jax.random.normal(jax.random.PRNGKey(2), (16, 16))
    result = dpmjax.learn_grid(model, sched, 5, train, iterations=5, teacher_steps=20, init="default", progress=False)
    default = np.asarray(sched.set_timesteps(sched.create_state(), 5, (1,)).sigmas[:6])
    assert result.sigmas.shape == (6,) and np.all(np.diff(result.sigmas) < 0)
    np.testing.assert_allclose(result.sigmas[[0, -1]], default[[0, -1]], rtol=1e-5)
    np.testing.assert_allclose(result.initial_sigmas, default, rtol=1e-5)
    zero = dpmjax.DPMSolverMultistepScheduler(solver_order=2, final_sigmas_type="zero")
    result = dpmjax.learn_grid(timestep_model(GaussianMixture(), zero.config), zero, 5, train, iterations=5,
                               teacher_steps=20, progress=False)
    assert result.sigmas[-1] == 0.0 and np.all(np.diff(result.sigmas) < 0)


@pytest.mark.parametrize("final", ["sigma_min", "zero"])
def test_the_parameterisation_reproduces_its_starting_grid(final):
    sched = dpmjax.DPMSolverMultistepScheduler(final_sigmas_type=final, use_karras_sigmas=True)
    sigmas = np.asarray(sched.set_timesteps(sched.create_state(), 7, (1,)).sigmas[:8], np.float64)
    grid = parameterisation(sched, 7, float(sigmas[0]))
    back = np.asarray(grid.sigmas(grid.logits(sigmas)), np.float64)
    # a zero-length final step (Karras with sigma_min ends on sigma_min twice) is kept at a 1e-6 share
    np.testing.assert_allclose(back, sigmas, rtol=2e-4)


def test_a_conditional_model_with_per_row_conditions_and_any_optax_optimiser(mixture):
    """``cond`` rows are sliced with their noises; the grid it returns works in sample, invert
    (plain and exact) and the Flax class."""
    gmm, sched, base = mixture
    model = lambda x, t, c: base(x, t) * c[:, None]  # noqa: E731
    train = jax.random.normal(jax.random.PRNGKey(3), (32, 16))
    scale = jnp.linspace(0.9, 1.1, 32)
    result = dpmjax.learn_grid(model, sched, 6, train, cond=scale, iterations=10, batch_size=8, teacher_steps=30,
                               optimizer=optax.sgd(1e-3), progress=False)
    data = dpmjax.sample(model, train, sched, sigmas=result.sigmas, cond=scale).sample
    exact = dpmjax.invert(model, data, sched, sigmas=result.sigmas, cond=scale, exact=True)
    # a 6-step grid may fold a step for a few rows (measured: 31 of 32 exact); the exact rows round-trip
    assert int(exact.converged.sum()) >= 28
    back = dpmjax.sample(model, exact.sample, sched, sigmas=result.sigmas, cond=scale).sample
    error = jnp.max(jnp.abs(back - data), axis=1) / jnp.maximum(1.0, jnp.max(jnp.abs(data), axis=1))
    assert bool(jnp.all(jnp.where(exact.converged, error <= 2e-5, True)))
    flax_sched = dpmjax.FlaxDPMSolverMultistepScheduler(solver_order=2, final_sigmas_type="sigma_min")
    state = flax_sched.set_timesteps(flax_sched.create_state(), shape=train.shape, sigmas=result.sigmas)
    np.testing.assert_allclose(np.asarray(state.sigmas), result.sigmas, rtol=1e-6)


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_inference_steps=0), "num_inference_steps"),
    (dict(teacher_steps=4), "teacher_steps"),
    (dict(iterations=0), "iterations"),
    (dict(batch_size=0), "batch_size"),
    (dict(teacher_forcing_radius=-1.0), "teacher_forcing_radius"),
    (dict(init="edm"), "init"),
    (dict(init=np.ones(3)), "init"),
    (dict(optimizer="adam"), "optimizer"),
    (dict(noise=np.ones(3, np.int32)), "noise"),
    (dict(noise=jnp.ones((4, 16)).at[0, 0].set(jnp.nan)), "noise must be finite"),
    (dict(cond=jnp.zeros(3)), "cond"),
    (dict(cond=3.0), "cond"),
    (dict(key=0), "key"),
])
def test_bad_arguments_are_refused_naming_the_parameter(mixture, kwargs, message):
    _, sched, model = mixture
    call = dict(num_inference_steps=4, noise=jnp.ones((4, 16)))
    call.update(kwargs)
    with pytest.raises(ValueError, match=message):
        dpmjax.learn_grid(model, sched, progress=False, **call)


def test_an_inverse_or_stochastic_scheduler_is_refused(mixture):
    _, _, model = mixture
    for sched in (dpmjax.DPMSolverMultistepInverseScheduler(), dpmjax.DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++")):
        with pytest.raises(ValueError, match="deterministic DPMSolverMultistepScheduler"):
            dpmjax.learn_grid(model, sched, 4, jnp.ones((4, 16)), progress=False)


@pytest.mark.slow
def test_on_the_shipped_mlp_a_learned_six_step_grid_beats_every_hand_made_one():
    """Guidance 3, 6 steps: on 300 held-out noises the learned grid is closer to the 100-step
    teacher than diffusers' default, Lu and Karras grids (measured ratio to the best: ~0.5-0.7)."""
    model = digits.load("mlp")

    def conditional(x, t, labels):
        return guided_model(model, labels, 3.0)(x, t)

    sched = dpmjax.DPMSolverMultistepScheduler(solver_order=2, final_sigmas_type="sigma_min")
    train = jax.random.normal(jax.random.PRNGKey(0), (256, 1, 8, 8))
    result = dpmjax.learn_grid(conditional, sched, 6, train, cond=jnp.arange(256) % 10, progress=False)
    noise = jax.random.normal(jax.random.PRNGKey(7), (300, 1, 8, 8))
    labels = jnp.arange(300) % 10
    teacher = dpmjax.sample(conditional, noise, sched, 100, cond=labels).sample

    def rmse(sigmas):
        out = dpmjax.sample(conditional, noise, sched, sigmas=sigmas, cond=labels).sample
        return float(jnp.sqrt(jnp.mean((out - teacher) ** 2)))

    hand_made = {}
    for name, flag in (("default", {}), ("lu", dict(use_lu_lambdas=True)), ("karras", dict(use_karras_sigmas=True))):
        other = dpmjax.DPMSolverMultistepScheduler(solver_order=2, final_sigmas_type="sigma_min", **flag)
        hand_made[name] = rmse(other.set_timesteps(other.create_state(), 6, (1,)).sigmas[:7])
    learned = rmse(jnp.asarray(result.sigmas))
    assert learned < 0.85 * min(hand_made.values()), (learned, hand_made)


def test_a_learned_grid_is_saved_and_loaded_with_the_scheduler_config(tmp_path, mixture):
    """``config.sigmas`` travels in ``scheduler_config.json``; ``set_timesteps`` (and ``sample``,
    ``invert``) run it without a step count or with its own ``N``; another ``N`` gets the
    configured grid; diffusers reads the file and ignores the key."""
    _, sched, model = mixture
    train = jax.random.normal(jax.random.PRNGKey(4), (16, 16))
    result = dpmjax.learn_grid(model, sched, 5, train, iterations=5, teacher_steps=20, progress=False)
    tuned = dpmjax.DPMSolverMultistepScheduler.from_config(sched.config, sigmas=result.sigmas)
    tuned.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "scheduler_config.json").read_text())
    np.testing.assert_array_equal(np.asarray(saved["sigmas"], np.float32), result.sigmas)
    loaded = dpmjax.DPMSolverMultistepScheduler.from_pretrained(tmp_path)
    assert loaded == tuned
    on_grid = dpmjax.sample(model, train, sched, sigmas=result.sigmas).sample
    np.testing.assert_array_equal(np.asarray(dpmjax.sample(model, train, loaded).sample), np.asarray(on_grid))
    np.testing.assert_array_equal(np.asarray(dpmjax.sample(model, train, loaded, 5).sample), np.asarray(on_grid))
    other = loaded.set_timesteps(loaded.create_state(), 8, (1,))
    np.testing.assert_array_equal(np.asarray(other.sigmas), np.asarray(sched.set_timesteps(sched.create_state(), 8, (1,)).sigmas))
    inverse = dpmjax.DPMSolverMultistepInverseScheduler.from_pretrained(tmp_path)
    np.testing.assert_allclose(np.asarray(dpmjax.invert(model, on_grid, inverse).sample),
                               np.asarray(dpmjax.invert(model, on_grid, sched, sigmas=result.sigmas).sample))
    theirs = pytest.importorskip("diffusers").DPMSolverMultistepScheduler.from_pretrained(tmp_path)
    assert theirs.config.solver_order == sched.config.solver_order


@pytest.mark.parametrize("sigmas, message", [([1.0], "N \\+ 1 >= 2"), ("abc", "noise levels"),
                                             ([1.0, 2.0], "not increase"), ([1e9, 1.0], "range")])
def test_a_config_grid_is_checked_when_the_config_is_built(sigmas, message):
    with pytest.raises(ValueError, match=message):
        dpmjax.DPMSolverMultistepScheduler(sigmas=sigmas)

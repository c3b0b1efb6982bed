"""The step under JAX's transformations: jit, scan, vmap, grad; dtypes; SDE keys; schedule edges."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dpmjax
from conftest import SHAPE, draw, jax_model, relative_error

CONFIGS = [
    dict(),
    dict(solver_order=3, lower_order_final=False),
    dict(algorithm_type="dpmsolver", solver_type="heun", final_sigmas_type="sigma_min"),
    dict(thresholding=True, prediction_type="sample"),
    dict(use_karras_sigmas=True, prediction_type="v_prediction"),
]
KINDS = {"forward": dpmjax.DPMSolverMultistepScheduler, "inverse": dpmjax.DPMSolverMultistepInverseScheduler}


def python_loop(scheduler, state, x):
    for t in np.asarray(state.timesteps):
        x, state = scheduler.step(state, jax_model(x, t), int(t), x, return_dict=False)
    return x, state


def scan_loop(scheduler, state, x):
    def body(carry, t):
        x, state = carry
        x, state = scheduler.step(state, jax_model(x, t), t, x, return_dict=False)
        return (x, state), x

    (x, state), _ = jax.lax.scan(body, (x, state), state.timesteps)
    return x, state


class TestJit(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_step_jitted_equals_eager(self):
        for kind, cls in KINDS.items():
            for config in CONFIGS:
                s = cls(**config)
                state = s.set_timesteps(s.create_state(), 8, SHAPE)
                step = self.variant(lambda st, out, t, x, s=s: s.step(st, out, t, x, return_dict=False))
                x = jnp.asarray(draw(SHAPE, 0))
                ref_x, ref_state = x, state
                for t in np.asarray(state.timesteps):
                    x, state = step(state, jax_model(x, t), jnp.asarray(t), x)
                    ref_x, ref_state = s.step(ref_state, jax_model(ref_x, t), int(t), ref_x, return_dict=False)
                    assert relative_error(x, ref_x) < 1e-5  # XLA may fuse multiply-adds differently
                assert int(state.step_index) == int(ref_state.step_index) == 8
                assert relative_error(state.model_outputs, ref_state.model_outputs) < 1e-5


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "default")
def test_scan_equals_python_loop(kind, config):
    s = KINDS[kind](**config)
    state = s.set_timesteps(s.create_state(), 12, SHAPE)
    x = jnp.asarray(draw(SHAPE, 1))
    a, sa = python_loop(s, state, x)
    b, sb = jax.jit(scan_loop, static_argnums=0)(s, state, x)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
    assert int(sa.step_index) == int(sb.step_index) == 12


@pytest.mark.parametrize("kind", list(KINDS))
def test_vmap_over_examples_equals_the_batch(kind):
    for config in CONFIGS[:3] + CONFIGS[4:]:  # thresholding is per batch row: see test below
        s = KINDS[kind](**config)
        batch = jnp.asarray(draw(SHAPE, 2))

        def trajectory(x):
            return scan_loop(s, s.set_timesteps(s.create_state(), 10, x.shape), x)[0]

        np.testing.assert_allclose(np.asarray(jax.vmap(trajectory)(batch)), np.asarray(trajectory(batch)), rtol=1e-5, atol=1e-6)


def test_vmap_with_thresholding_keeps_a_batch_axis_per_example():
    s = dpmjax.DPMSolverMultistepScheduler(thresholding=True, prediction_type="sample")
    batch = jnp.asarray(3 * draw(SHAPE, 3))

    def trajectory(x):
        return scan_loop(s, s.set_timesteps(s.create_state(), 10, x.shape), x)[0]

    per_example = jax.vmap(trajectory)(batch[:, None])[:, 0]
    np.testing.assert_allclose(np.asarray(per_example), np.asarray(trajectory(batch)), rtol=1e-5, atol=1e-6)


def test_grad_through_a_trajectory_matches_finite_differences():
    with jax.enable_x64(True):
        s = dpmjax.DPMSolverMultistepScheduler(solver_order=3)
        shape = (2, 3)

        def loss(x, w):
            state = s.set_timesteps(s.create_state(), 10, shape, dtype=jnp.float64)

            def body(carry, t):
                x, state = carry
                out = w * jnp.tanh(x) + 0.1 * x
                x, state = s.step(state, out, t, x, return_dict=False)
                return (x, state), None

            (x, _), _ = jax.lax.scan(body, (x, state), state.timesteps)
            return jnp.sum(x**2)

        x = jnp.asarray(draw(shape, 4), jnp.float64)
        w = jnp.asarray(0.7, jnp.float64)
        gx, gw = jax.grad(loss, argnums=(0, 1))(x, w)
        assert np.all(np.isfinite(np.asarray(gx)))
        eps = 1e-6
        direction = jnp.asarray(draw(shape, 5), jnp.float64)
        fd_x = (loss(x + eps * direction, w) - loss(x - eps * direction, w)) / (2 * eps)
        np.testing.assert_allclose(float(jnp.sum(gx * direction)), float(fd_x), rtol=1e-6)
        fd_w = (loss(x, w + eps) - loss(x, w - eps)) / (2 * eps)
        np.testing.assert_allclose(float(gw), float(fd_w), rtol=1e-6)


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_samples_keep_their_dtype(kind, dtype):
    s = KINDS[kind]()
    state = s.set_timesteps(s.create_state(), 10, SHAPE)
    x32 = jnp.asarray(draw(SHAPE, 6))
    x = x32.astype(dtype)
    ref, _ = python_loop(s, state, x32)
    for t in np.asarray(state.timesteps):
        x, state = s.step(state, jax_model(x.astype(jnp.float32), t).astype(dtype), int(t), x, return_dict=False)
        assert x.dtype == dtype
    assert np.all(np.isfinite(np.asarray(x, np.float32)))
    tolerance = 0.05 if dtype == jnp.bfloat16 else 0.01
    assert float(jnp.max(jnp.abs(x.astype(jnp.float32) - ref))) / float(jnp.max(jnp.abs(ref))) < tolerance


def test_history_dtype_follows_set_timesteps():
    s = dpmjax.DPMSolverMultistepScheduler()
    state = s.set_timesteps(s.create_state(), 10, SHAPE, dtype=jnp.bfloat16)
    assert state.model_outputs.dtype == jnp.bfloat16
    x = jnp.asarray(draw(SHAPE, 7))
    x2, state = s.step(state, x, 999, x, return_dict=False)
    assert state.model_outputs.dtype == jnp.bfloat16 and x2.dtype == jnp.float32


def test_sde_noise_from_key_or_variance_noise():
    s = dpmjax.DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++")
    state = s.set_timesteps(s.create_state(), 10, SHAPE)
    x = jnp.asarray(draw(SHAPE, 8))
    with pytest.raises(ValueError, match="key"):
        s.step(state, x, 999, x)
    key = jax.random.PRNGKey(3)
    a = s.step(state, x, 999, x, key=key).prev_sample
    b = s.step(state, x, 999, x, variance_noise=jax.random.normal(key, SHAPE)).prev_sample
    c = s.step(state, x, 999, x, key=jax.random.PRNGKey(4)).prev_sample
    assert relative_error(a, b) < 1e-6
    assert not np.allclose(np.asarray(a), np.asarray(c))
    jitted = jax.jit(lambda st, k: s.step(st, x, 999, x, key=k).prev_sample)
    assert relative_error(jitted(state, key), a) < 1e-5


def test_step_past_the_end_is_an_error_eagerly_and_the_identity_under_jit():
    s = dpmjax.DPMSolverMultistepScheduler()
    state = s.set_timesteps(s.create_state(), 3, SHAPE)
    x = jnp.asarray(draw(SHAPE, 9))
    x_end, state = python_loop(s, state, x)
    with pytest.raises(ValueError, match="past the end"):
        s.step(state, x_end, 0, x_end)
    y, _ = jax.jit(lambda st, v: s.step(st, v, 0, v, return_dict=False))(state, x_end)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(x_end))


def test_set_begin_index_equals_starting_from_that_timestep():
    s = dpmjax.DPMSolverMultistepScheduler()
    state = s.set_timesteps(s.create_state(), 20, SHAPE)
    x = jnp.asarray(draw(SHAPE, 10))
    by_lookup, by_index = state, s.set_begin_index(state, 6)
    xa = xb = x
    for t in np.asarray(state.timesteps)[6:]:
        xa, by_lookup = s.step(by_lookup, jax_model(xa, t), int(t), xa, return_dict=False)
        xb, by_index = s.step(by_index, jax_model(xb, t), int(t), xb, return_dict=False)
    np.testing.assert_array_equal(np.asarray(xa), np.asarray(xb))


def test_state_is_a_pytree_of_arrays_and_output_unpacks():
    s = dpmjax.DPMSolverMultistepInverseScheduler()
    state = s.set_timesteps(s.create_state(), 10, SHAPE)
    leaves = jax.tree_util.tree_leaves(state)
    assert all(isinstance(leaf, jax.Array) for leaf in leaves)
    x = jnp.asarray(draw(SHAPE, 11))
    out = s.step(state, x, 0, x)
    prev, new_state = out
    assert prev is out.prev_sample and isinstance(new_state, dpmjax.SchedulerState)
    assert out.to_tuple()[0] is prev
    np.testing.assert_array_equal(np.asarray(new_state.ordered_model_outputs()[-1]),
                                  np.asarray(s.convert_model_output(s.set_begin_index(state, 0), x, x)))

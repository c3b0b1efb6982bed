"""Live parity with diffusers' PyTorch schedulers (float32, CPU): grids, single steps, whole
trajectories, the building-block methods, add_noise, mid-schedule starts.

Tolerances. Sigmas: 2e-6 relative (a few float32 ulps) (PyTorch's float32 sqrt on this CPU is not correctly rounded;
ours is, so a few sigmas differ in the last bit). Trajectories: within 1e-4 relative of diffusers'
float32 result, plus twice diffusers' own float32-vs-float64 spread (our coefficients are computed
in float64, so where diffusers' float32 arithmetic drifts, we sit nearer its float64 result).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import (
    SHAPE,
    diffusers_trajectory,
    dpmjax_class,
    dpmjax_trajectory,
    assert_matches_diffusers,
    draw,
    jitted_step,
    jax_model,
    make_diffusers,
    relative_error,
    torch_model,
    widen,
)

import jax.numpy as jnp

SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)

COMMON_CONFIGS = [
    {},
    dict(solver_order=1),
    dict(solver_order=3),
    dict(solver_type="heun"),
    dict(solver_order=3, lower_order_final=False),
    dict(euler_at_final=True),
    dict(prediction_type="v_prediction"),
    dict(prediction_type="sample"),
    dict(algorithm_type="dpmsolver", final_sigmas_type="sigma_min"),
    dict(algorithm_type="dpmsolver", solver_type="heun", solver_order=3, final_sigmas_type="sigma_min"),
    dict(algorithm_type="dpmsolver", prediction_type="v_prediction", final_sigmas_type="sigma_min"),
    dict(algorithm_type="dpmsolver", prediction_type="sample", final_sigmas_type="sigma_min"),
    dict(SD, timestep_spacing="leading", steps_offset=1),
    dict(SD, timestep_spacing="trailing", solver_order=3),
    dict(beta_schedule="squaredcos_cap_v2", lambda_min_clipped=-5.1),
    dict(beta_schedule="squaredcos_cap_v2", timestep_spacing="trailing"),
    dict(use_karras_sigmas=True),
    dict(use_karras_sigmas=True, prediction_type="v_prediction", solver_type="heun"),
    dict(use_exponential_sigmas=True, solver_order=3),
    dict(use_beta_sigmas=True),
    dict(thresholding=True, prediction_type="sample", sample_max_value=2.0),
    dict(thresholding=True, dynamic_thresholding_ratio=0.87, sample_max_value=0.5),
    dict(thresholding=True, algorithm_type="dpmsolver", final_sigmas_type="sigma_min"),
    dict(variance_type="learned_range"),
    dict(trained_betas=list(np.linspace(1e-4, 0.02, 1000))),
    dict(num_train_timesteps=100),
]
FORWARD_ONLY = [
    dict(final_sigmas_type="sigma_min", solver_order=3),
    dict(use_lu_lambdas=True),
    dict(use_lu_lambdas=True, solver_order=3, final_sigmas_type="zero"),
    dict(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0),
    dict(use_flow_sigmas=True, prediction_type="flow_prediction", solver_order=3, euler_at_final=True),
    dict(SD, rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing"),
    dict(algorithm_type="sde-dpmsolver++"),
    dict(algorithm_type="sde-dpmsolver++", solver_type="heun", solver_order=3),
    dict(algorithm_type="sde-dpmsolver", final_sigmas_type="sigma_min"),
    dict(algorithm_type="sde-dpmsolver", solver_type="heun", final_sigmas_type="sigma_min"),
]
CASES = [("forward", c) for c in COMMON_CONFIGS + FORWARD_ONLY] + [("inverse", c) for c in COMMON_CONFIGS]
STEPS = [1, 2, 3, 7, 10, 25]


def case_id(case):
    kind, config = case
    return kind + ":" + (",".join(f"{k}={v}" for k, v in config.items() if k != "trained_betas") or "default")


def input_shape(config):
    # diffusers keeps model_output[:, :3] under a learned variance: 3 channels make that the first half.
    return (2, 3, 8, 8) if config.get("variance_type") else SHAPE


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("n", STEPS)
def test_grid_matches_diffusers(case, n):
    kind, config = case
    d = make_diffusers(kind, **config)
    d.set_timesteps(n)
    s = dpmjax_class(kind)(**config)
    state = s.set_timesteps(s.create_state(), n, SHAPE)
    np.testing.assert_array_equal(np.asarray(state.timesteps), d.timesteps.numpy())
    np.testing.assert_allclose(np.asarray(state.sigmas), d.sigmas.numpy(), rtol=2e-6, atol=0)
    assert state.num_inference_steps == d.num_inference_steps


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("n", STEPS)
def test_trajectory_matches_diffusers(case, n):
    kind, config = case
    shape = input_shape(config)
    x0 = draw(shape, 0)
    noises = [draw(shape, 100 + i) for i in range(n)] if "sde" in config.get("algorithm_type", "") else None
    ref32 = diffusers_trajectory(kind, config, n, x0, noises)
    ref64 = diffusers_trajectory(kind, config, n, x0, noises, float64=True)
    ours = dpmjax_trajectory(kind, config, n, x0, noises)
    assert len(ours) == len(ref32)
    for i, (a, b32, b64) in enumerate(zip(ours, ref32, ref64)):
        assert_matches_diffusers(a, b32, b64, where=f"step {i}")


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_single_steps_match_diffusers_on_shared_inputs(case):
    """Each step gets diffusers' own sample and model output: isolates one step's arithmetic."""
    kind, config = case
    n = 12
    shape = input_shape(config)
    d = make_diffusers(kind, **config)
    d.set_timesteps(n)
    s = dpmjax_class(kind)(**config)
    state = s.set_timesteps(s.create_state(), n, shape)
    x = torch.from_numpy(draw(shape, 1))
    d64 = make_diffusers(kind, **config)
    d64.set_timesteps(n)
    d64.sigmas = d64.sigmas.double()
    step = jitted_step(s)
    for i, t in enumerate(d.timesteps):
        out = widen(torch_model(x, t), config)
        noise = torch.from_numpy(draw(shape, 50 + i)) if s.config.is_sde else None
        expected = d.step(out, t, x, variance_noise=noise).prev_sample
        expected64 = d64.step(out.double(), t, x.double(), variance_noise=None if noise is None else noise.double()).prev_sample
        got, state = step(state, jnp.asarray(out.numpy()), jnp.asarray(int(t)), jnp.asarray(x.numpy()),
                          None if noise is None else jnp.asarray(noise.numpy()))
        assert_matches_diffusers(got, expected.numpy(), expected64.numpy(), tol=2e-5, where=f"step {i}")
        if not torch.all(torch.isfinite(expected)):
            break
        x = expected


@pytest.mark.parametrize("kind", ["forward", "inverse"])
@pytest.mark.parametrize("begin", [3, 7])
def test_mid_schedule_start_matches_diffusers(kind, begin):
    """img2img / partial inversion: the first timestep passed is not the schedule's first."""
    for config in ({}, dict(solver_order=3, lower_order_final=False)):
        x0 = draw(SHAPE, 2)
        ref = diffusers_trajectory(kind, config, 20, x0, begin=begin)
        ours = dpmjax_trajectory(kind, config, 20, x0, begin=begin)
        assert len(ours) == 20 - begin
        for a, b in zip(ours, ref):
            assert relative_error(a, b) < 1e-4


@pytest.mark.parametrize("kind", ["forward", "inverse"])
@pytest.mark.parametrize("config", [{}, dict(algorithm_type="dpmsolver", final_sigmas_type="sigma_min", solver_type="heun"),
                                    dict(thresholding=True, prediction_type="sample"), dict(prediction_type="v_prediction")],
                         ids=["default", "dpmsolver-heun", "thresholding", "v"])
def test_building_blocks_match_diffusers(kind, config):
    """convert_model_output and the three order updates, called directly at a mid-schedule step."""
    d = make_diffusers(kind, **config)
    d.set_timesteps(10)
    s = dpmjax_class(kind)(**config)
    state = s.set_begin_index(s.set_timesteps(s.create_state(), 10, SHAPE), 4)
    d._step_index = 4
    x = torch.from_numpy(draw(SHAPE, 3))
    outs = [torch.from_numpy(draw(SHAPE, 10 + k)) for k in range(3)]
    ours_x = jnp.asarray(x.numpy())
    conv_d = d.convert_model_output(outs[0], sample=x)
    conv_j = s.convert_model_output(state, jnp.asarray(outs[0].numpy()), ours_x)
    assert relative_error(conv_j, conv_d.numpy()) < 1e-5
    first_d = d.dpm_solver_first_order_update(outs[0], sample=x)
    first_j = s.dpm_solver_first_order_update(state, jnp.asarray(outs[0].numpy()), ours_x)
    assert relative_error(first_j, first_d.numpy()) < 1e-5
    second_d = d.multistep_dpm_solver_second_order_update(outs[:2], sample=x)
    second_j = s.multistep_dpm_solver_second_order_update(state, [jnp.asarray(o.numpy()) for o in outs[:2]], ours_x)
    assert relative_error(second_j, second_d.numpy()) < 1e-5
    third_d = d.multistep_dpm_solver_third_order_update(outs, sample=x)
    s3 = dpmjax_class(kind)(**dict(config, solver_order=3))
    state3 = s3.set_begin_index(s3.set_timesteps(s3.create_state(), 10, SHAPE), 4)
    third_j = s3.multistep_dpm_solver_third_order_update(state3, [jnp.asarray(o.numpy()) for o in outs], ours_x)
    assert relative_error(third_j, third_d.numpy()) < 1e-5


@pytest.mark.parametrize("kind", ["forward", "inverse"])
def test_add_noise_matches_diffusers(kind):
    d = make_diffusers(kind)
    d.set_timesteps(25)
    s = dpmjax_class(kind)()
    state = s.set_timesteps(s.create_state(), 25, SHAPE)
    x0, eps = draw(SHAPE, 4), draw(SHAPE, 5)
    t = d.timesteps[[3, 11]]
    expected = d.add_noise(torch.from_numpy(x0), torch.from_numpy(eps), t)
    got = s.add_noise(state, jnp.asarray(x0), jnp.asarray(eps), jnp.asarray(t.numpy()))
    assert relative_error(got, expected.numpy()) < 1e-6


@pytest.mark.parametrize("kind", ["forward", "inverse"])
def test_training_tables_match_diffusers(kind):
    for config in ({}, SD, dict(beta_schedule="squaredcos_cap_v2")):
        d = make_diffusers(kind, **config)
        state = dpmjax_class(kind)(**config).create_state()
        np.testing.assert_array_equal(np.asarray(state.alphas_cumprod), d.alphas_cumprod.numpy())
        for name in ("alpha_t", "sigma_t", "lambda_t"):
            np.testing.assert_allclose(np.asarray(getattr(state, name)), getattr(d, name).numpy(), rtol=5e-7, atol=1e-6)
        np.testing.assert_allclose(np.asarray(state.sigmas), d.sigmas.numpy(), rtol=2e-6)


@pytest.mark.parametrize("kind", ["forward", "inverse"])
@pytest.mark.parametrize("config", [dict(solver_order=1), dict(solver_order=1, algorithm_type="dpmsolver", final_sigmas_type="sigma_min"),
                                    dict(solver_order=1, use_karras_sigmas=True, prediction_type="v_prediction")],
                         ids=["dpmsolver++", "dpmsolver", "karras-v"])
def test_first_order_state_carries_no_history(kind, config):
    """A first-order step reads no older model output, so its state holds none: a ``[0, *shape]``
    history, through jit, a user's scan, vmap and grad; the results are diffusers'."""
    import jax

    n = 10
    s = dpmjax_class(kind)(**config)
    state = s.set_timesteps(s.create_state(), n, SHAPE)
    assert state.model_outputs.shape == (0,) + SHAPE and state.model_outputs.size == 0
    assert not [leaf.shape for leaf in jax.tree_util.tree_leaves(state) if leaf.size and leaf.shape[-len(SHAPE):] == SHAPE]
    assert state.ordered_model_outputs().shape == (0,) + SHAPE

    def body(carry, t):
        x, st = carry
        x, st = s.step(state=st, model_output=jax_model(x, t), timestep=t, sample=x, return_dict=False)
        return (x, st), x

    run = jax.jit(lambda x, st: jax.lax.scan(f=body, init=(x, st), xs=st.timesteps))
    x0 = draw(SHAPE, 0)
    (x, final), path = run(jnp.asarray(x0), state)
    assert final.model_outputs.shape == (0,) + SHAPE and int(final.step_index) == n
    ref32 = diffusers_trajectory(kind=kind, config=config, n=n, x0=x0)
    ref64 = diffusers_trajectory(kind=kind, config=config, n=n, x0=x0, float64=True)
    for i, (a, b32, b64) in enumerate(zip(np.asarray(path), ref32, ref64)):
        assert_matches_diffusers(ours=a, ref32=b32, ref64=b64, where=f"step {i}")
    # the step-by-step (jitted) path is the scan's, and vmap / grad see no history either
    ours = dpmjax_trajectory(kind=kind, config=config, n=n, x0=x0)
    for a, b in zip(ours, np.asarray(path)):
        assert relative_error(a, b) < 1e-5
    batch = jnp.stack([jnp.asarray(x0), jnp.asarray(draw(SHAPE, 1))])
    (xs, states), _ = jax.vmap(fun=run, in_axes=(0, None))(batch, state)
    assert states.model_outputs.shape == (2, 0) + SHAPE
    np.testing.assert_allclose(actual=np.asarray(xs[0]), desired=np.asarray(x), rtol=1e-6, atol=1e-6)
    grad = jax.grad(fun=lambda x: jnp.sum(run(x, state)[0][0] ** 2))(jnp.asarray(x0))
    assert grad.shape == SHAPE and bool(jnp.all(jnp.isfinite(grad)))


def test_first_order_step_matches_the_step_with_a_history_slot():
    """The order-1 step without a history is the same arithmetic as with one: the same sample,
    bit for bit, whether the state holds a ``[0, ...]`` or (a hand-made) ``[1, ...]`` history."""
    s = dpmjax_class("forward")(solver_order=1)
    state = s.set_timesteps(s.create_state(), 8, SHAPE)
    with_slot = state.replace(model_outputs=jnp.zeros((1,) + SHAPE, jnp.float32))
    x = jnp.asarray(draw(SHAPE, 3))
    for t in np.asarray(state.timesteps):
        out = jax_model(x, t)
        x_a, state = s.step(state=state, model_output=out, timestep=int(t), sample=x, return_dict=False)
        x_b, with_slot = s.step(state=with_slot, model_output=out, timestep=int(t), sample=x, return_dict=False)
        np.testing.assert_array_equal(np.asarray(x_a), np.asarray(x_b))
        x = x_a

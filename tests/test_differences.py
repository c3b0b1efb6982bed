"""Where dpmjax deliberately differs from diffusers: each case shows diffusers failing (live) and
dpmjax doing the documented thing instead. docs/numerics.md ("Differences from diffusers") lists them."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import dpmjax
from conftest import SHAPE, diffusers_trajectory, dpmjax_trajectory, draw, make_diffusers
from dpmjax.models.analytic import Gaussian
from dpmjax.apps.demo import run_grid


def test_sde_inverse_is_refused_where_diffusers_returns_nan():
    path = diffusers_trajectory("inverse", dict(algorithm_type="sde-dpmsolver++"), 10, draw(SHAPE, 0),
                                [draw(SHAPE, i) for i in range(10)])
    assert np.isnan(path[0]).all(), "diffusers' inverse SDE step is NaN from the first step (issue #10748)"
    for algorithm in ("sde-dpmsolver++", "sde-dpmsolver"):
        with pytest.raises(ValueError, match="algorithm_type='sde-dpmsolver.*inverse scheduler"):
            dpmjax.DPMSolverMultistepInverseScheduler(algorithm_type=algorithm)


@pytest.mark.parametrize(
    "kind, config, n",
    [
        ("inverse", dict(use_karras_sigmas=True, solver_type="heun"), 20),  # zero-length last step, heun
        ("inverse", dict(use_exponential_sigmas=True, solver_order=3), 20),  # zero-length last step, order 3
        ("forward", dict(use_lu_lambdas=True, solver_order=3, final_sigmas_type="sigma_min"), 20),
        ("forward", dict(use_exponential_sigmas=True, solver_type="heun", final_sigmas_type="sigma_min"), 20),
    ],
    ids=["inverse-karras-heun", "inverse-exponential-order3", "forward-lu-order3-sigma_min", "forward-exp-heun-sigma_min"],
)
def test_zero_length_steps_are_the_identity_where_diffusers_returns_nan(kind, config, n):
    x0 = draw(SHAPE, 1)
    ref = diffusers_trajectory(kind, config, n, x0)
    assert np.isnan(ref[-1]).any(), "diffusers: 0/0 in the update of a zero-length step"
    ours = dpmjax_trajectory(kind, config, n, x0)
    assert np.all(np.isfinite(ours[-1]))
    s = (dpmjax.DPMSolverMultistepScheduler if kind == "forward" else dpmjax.DPMSolverMultistepInverseScheduler)(**config)
    sigmas = np.asarray(s.set_timesteps(s.create_state(), n, SHAPE).sigmas)
    assert sigmas[n] == sigmas[n - 1], "the last step of this grid has zero length"
    np.testing.assert_array_equal(ours[-1], ours[-2])  # the exact solution over a zero-length step
    # every step before the degenerate one is diffusers' own
    for a, b in zip(ours[:-1], ref[:-1]):
        assert np.max(np.abs(a - b)) / max(1.0, np.max(np.abs(b))) < 1e-4


@pytest.mark.parametrize("prediction_type", ["sample", "v_prediction"])
def test_learned_variance_splits_channels_in_half_for_every_prediction_type(prediction_type):
    config = dict(variance_type="learned_range", prediction_type=prediction_type)
    d = make_diffusers("forward", **config)
    d.set_timesteps(10)
    x = torch.from_numpy(draw(SHAPE, 2))
    with pytest.raises(RuntimeError):  # diffusers keeps all 8 channels: size mismatch with the sample
        d.step(torch.cat([x, x], dim=1), d.timesteps[0], x)
    ours = dpmjax.DPMSolverMultistepScheduler(**config)
    plain = dpmjax.DPMSolverMultistepScheduler(prediction_type=prediction_type)
    s1 = ours.set_timesteps(ours.create_state(), 10, SHAPE)
    s2 = plain.set_timesteps(plain.create_state(), 10, SHAPE)
    xj, mean = jnp.asarray(x.numpy()), 0.3 * jnp.asarray(x.numpy())
    a, _ = ours.step(s1, jnp.concatenate([mean, jnp.full_like(mean, 99.0)], axis=1), 999, xj, return_dict=False)
    b, _ = plain.step(s2, mean, 999, xj, return_dict=False)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_learned_variance_with_four_channels_uses_the_first_half_not_three():
    """diffusers' ``model_output[:, :3]`` breaks a 4-channel latent model with learned variance."""
    config = dict(variance_type="learned")
    d = make_diffusers("forward", **config)
    d.set_timesteps(10)
    x = torch.from_numpy(draw(SHAPE, 3))
    with pytest.raises(RuntimeError):
        d.step(torch.cat([x, x], dim=1), d.timesteps[0], x)
    s = dpmjax.DPMSolverMultistepScheduler(**config)
    state = s.set_timesteps(s.create_state(), 10, SHAPE)
    out, _ = s.step(state, jnp.concatenate([jnp.asarray(x.numpy())] * 2, axis=1), 999, jnp.asarray(x.numpy()), return_dict=False)
    assert out.shape == SHAPE


def test_learned_variance_channel_axis_for_nhwc():
    s = dpmjax.DPMSolverMultistepScheduler(variance_type="learned_range", channel_axis=-1)
    plain = dpmjax.DPMSolverMultistepScheduler()
    shape = (2, 8, 8, 4)
    x = jnp.asarray(draw(shape, 4))
    a, _ = s.step(s.set_timesteps(s.create_state(), 5, shape), jnp.concatenate([0.1 * x, x + 5], axis=-1), 999, x, return_dict=False)
    b, _ = plain.step(plain.set_timesteps(plain.create_state(), 5, shape), 0.1 * x, 999, x, return_dict=False)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_flow_sigmas_under_inversion_ascend_and_round_trip():
    """diffusers' inverse scheduler runs flow sigmas in the forward order (upstream PR #12262):
    its 'inversion' lowers the noise. Ours raises it, on the mirror of the forward grid."""
    config = dict(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0)
    n = 12
    d = make_diffusers("inverse", **config)
    d.set_timesteps(n)
    assert d.sigmas[0] > d.sigmas[n - 1], "diffusers: descending sigmas in the inverse scheduler"
    inv = dpmjax.DPMSolverMultistepInverseScheduler(**config)
    fwd = dpmjax.DPMSolverMultistepScheduler(**config)
    data = Gaussian()

    def model(x, alpha, sigma):  # flow prediction: the velocity eps - x0 of the exact denoiser
        x0 = data.denoise(x, alpha, sigma)
        return (x - alpha * x0) / sigma - x0

    inversion_errors, roundtrip_errors = [], []
    for n in (12, 48):
        s_inv = inv.set_timesteps(inv.create_state(), n, (512,))
        s_fwd = fwd.set_timesteps(fwd.create_state(), n, (512,))
        inv_sigmas, fwd_sigmas = np.asarray(s_inv.sigmas), np.asarray(s_fwd.sigmas)
        assert np.all(np.diff(inv_sigmas) >= 0)
        np.testing.assert_array_equal(inv_sigmas[:n], fwd_sigmas[:n][::-1])  # same noise levels, mirrored
        a0, s0 = s_inv.step_alpha[0], s_inv.step_sigma[0]
        x = data.sample(jax.random.PRNGKey(0), (512,), a0, s0)
        noise, _ = run_grid(inv, s_inv, model, x)
        exact = data.transport(x, a0, s0, s_inv.step_alpha[n], s_inv.step_sigma[n])
        inversion_errors.append(float(jnp.max(jnp.abs(noise - exact))))
        # sample back over the forward grid, stopping at sigma_1 where the inversion started
        recon, _ = run_grid(fwd, s_fwd, model, noise, num_steps=n - 1)
        roundtrip_errors.append(float(jnp.max(jnp.abs(recon - x)) / jnp.max(jnp.abs(x))))
    assert inversion_errors[1] < inversion_errors[0] / 3, inversion_errors  # converges to the exact flow
    assert roundtrip_errors[1] < roundtrip_errors[0] / 3 and roundtrip_errors[1] < 0.03, roundtrip_errors


def test_sde_dpmsolver_third_order_is_refused_where_diffusers_crashes():
    d = make_diffusers("forward", algorithm_type="sde-dpmsolver", solver_order=3, final_sigmas_type="sigma_min")
    d.set_timesteps(20)
    x = torch.from_numpy(draw(SHAPE, 5))
    with pytest.raises(UnboundLocalError):
        for t in d.timesteps:
            x = d.step(0.1 * x, t, x, variance_noise=torch.zeros_like(x)).prev_sample
    with pytest.raises(ValueError, match="solver_order=3"):
        dpmjax.DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver", solver_order=3, final_sigmas_type="sigma_min")


def test_inverse_scheduler_honours_zero_terminal_snr():
    """diffusers' inverse scheduler silently ignores rescale_betas_zero_snr; ours rescales."""
    plain = dpmjax.DPMSolverMultistepInverseScheduler().create_state()
    zsnr = dpmjax.DPMSolverMultistepInverseScheduler(rescale_betas_zero_snr=True).create_state()
    assert float(zsnr.alphas_cumprod[-1]) == 2.0**-24
    assert float(plain.alphas_cumprod[-1]) > 1e-5


def test_a_schedule_whose_first_timestep_repeats_starts_at_step_zero():
    """Karras sigmas on the cosine schedule: timesteps 998, 998, ... . diffusers' lookup takes the
    second 998 for the first step, so the loop over all timesteps runs off the end."""
    config = dict(beta_schedule="squaredcos_cap_v2", use_karras_sigmas=True)
    with pytest.raises(IndexError):
        diffusers_trajectory("forward", config, 15, draw(SHAPE, 6))
    s = dpmjax.DPMSolverMultistepScheduler(**config)
    state = s.set_timesteps(s.create_state(), 15, SHAPE)
    timesteps = np.asarray(state.timesteps)
    assert timesteps[0] == timesteps[1]
    x = jnp.asarray(draw(SHAPE, 6))
    for t in timesteps:
        x, state = s.step(state, 0.5 * jnp.tanh(x), int(t), x, return_dict=False)
    assert int(state.step_index) == 15 and bool(jnp.all(jnp.isfinite(x)))
    by_index = s.set_begin_index(s.set_timesteps(s.create_state(), 15, SHAPE), 0)
    assert int(s.step(by_index, x, int(timesteps[0]), x).state.step_index) == 1

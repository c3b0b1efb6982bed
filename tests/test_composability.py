"""The composability table of the differentiable-sampling guide, cell by cell: each whole-trajectory
call under ``jit``, ``vmap`` over rows and over grids, ``grad`` and ``jvp`` w.r.t. the data and the
grid, with ``checkpoint``. A cell passes when the transformed call runs and gives finite values, and
the vmapped calls equal the unmapped ones."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dpmjax
from dpmjax.models.analytic import Gaussian, timestep_model

SAMPLER = dpmjax.DPMSolverMultistepScheduler(solver_order=2, use_lu_lambdas=True, final_sigmas_type="sigma_min")
N = 4
# the exact model of Gaussian data: the sampler is then affine and one-to-one, so every program finds
# the same exact inversion (a model whose sampler folds has several, and two programs may differ)
model = timestep_model(Gaussian(), SAMPLER.config)


def _user_scan(x, sigmas):
    state = SAMPLER.set_timesteps(SAMPLER.create_state(), shape=x.shape, sigmas=sigmas)

    def body(carry, t):
        sample, state = carry
        sample, state = SAMPLER.step(state, model(sample, t), t, sample, return_dict=False)
        return (sample, state), None

    return jax.lax.scan(body, (x, state), state.timesteps)[0][0]


def _null_text(x, sigmas):
    del sigmas  # null-text inversion runs on the scheduler's grid of N steps
    result = dpmjax.null_text_inversion(lambda x, t, c: model(x, t) * c, x, SAMPLER, N, cond=jnp.ones(x.shape[:1] + (1,)),
                                        uncond=jnp.zeros(x.shape[:1] + (1,)), guidance_scale=2.0, inner_steps=1)
    return result.noise


CALLS = {
    "sample": lambda x, s: dpmjax.sample(model, x, SAMPLER, sigmas=s).sample,
    "sample, checkpoint=True": lambda x, s: dpmjax.sample(model, x, SAMPLER, sigmas=s, checkpoint=True).sample,
    "invert": lambda x, s: dpmjax.invert(model, x, SAMPLER, sigmas=s).sample,
    "invert, exact=True": lambda x, s: dpmjax.invert(model, x, SAMPLER, sigmas=s, exact=True).sample,
    "scheduler.step in a scan": _user_scan,
    "null_text_inversion": _null_text,
}


@pytest.fixture(scope="module")
def inputs():
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 4))
    sigmas = SAMPLER.set_timesteps(SAMPLER.create_state(), N, (1,)).sigmas[: N + 1]
    return x, sigmas


TRANSFORMS = {
    "jit": lambda f, x, s: jax.jit(f)(x, s),
    "vmap over rows": lambda f, x, s: jax.vmap(lambda row: f(row[None], s)[0])(x),
    "vmap over grids": lambda f, x, s: jax.vmap(lambda g: f(x, g))(jnp.stack([s, s * 1.0]))[1],
    "grad (data)": lambda f, x, s: jax.grad(lambda x: jnp.sum(f(x, s) ** 2))(x),
    "grad (grid)": lambda f, x, s: jax.grad(lambda g: jnp.sum(f(x, g) ** 2))(s),
    "jvp (data)": lambda f, x, s: jax.jvp(lambda x: f(x, s), (x,), (jnp.ones_like(x),))[1],
}


@pytest.mark.parametrize("transform", list(TRANSFORMS))
@pytest.mark.parametrize("call", list(CALLS))
def test_each_call_composes_with_each_transformation(call, transform, inputs):
    x, sigmas = inputs
    f = CALLS[call]
    out = TRANSFORMS[transform](f, x, sigmas)
    assert bool(jnp.all(jnp.isfinite(out)))
    if transform in ("jit", "vmap over rows", "vmap over grids"):
        # float32, one compiled program against another: fusion may reorder sums (exact inversion:
        # both solve to its tolerance, 1e-5 relative)
        np.testing.assert_allclose(np.asarray(out), np.asarray(f(x, sigmas)), rtol=1e-4, atol=1e-4)

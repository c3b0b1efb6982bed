"""Null-text inversion with optax on the shipped digits model (real held-out digits)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dpmjax
from dpmjax.apps.digits_job import psnr, reconstruct
from dpmjax.models import digits
from dpmjax.trajectories.null_text import null_text_inversion, sample_with_null_embeddings

N = 10


@pytest.fixture(scope="module")
def setup():
    model = digits.load()
    images, labels = digits.heldout()
    images, labels = jnp.asarray(images[:24]), jnp.asarray(labels[:24])
    scheduler = dpmjax.DPMSolverMultistepScheduler(solver_order=2, final_sigmas_type="sigma_min")
    cond, uncond = model.embed(labels), model.embed(jnp.full_like(labels, digits.NULL_LABEL))
    return model, images, labels, scheduler, cond, uncond


def run(setup, w, **kwargs):
    model, images, _, scheduler, cond, uncond = setup
    return null_text_inversion(model.conditional, images, scheduler, N, cond=cond, uncond=uncond, guidance_scale=w, **kwargs)


def test_null_text_restores_the_reconstruction_at_high_guidance(setup):
    """Issue target: PSNR at guidance 7.5 within 3 dB of guidance 1 (plain inversion at w = 1, the
    pivot). Measured on these 24 digits: w=1 25.4 dB, plain w=7.5 9.4 dB, null-text with 20 Adam
    steps per step 26.4 dB (the paper's 10 steps: 21.7 dB; this model needs more than SD)."""
    model, images, labels, scheduler, *_ = setup
    unguided = psnr(reconstruct(model, images, labels, scheduler=scheduler, n=N, scale=1.0, exact=False)[1], images)
    guided = psnr(reconstruct(model, images, labels, scheduler=scheduler, n=N, scale=7.5, exact=False)[1], images)
    result = run(setup, 7.5, inner_steps=20)
    restored = psnr(result.reconstruction, images)
    assert guided < unguided - 10, (guided, unguided)
    assert restored >= unguided - 3, (restored, unguided)
    assert result.losses.shape == (N,) and result.optimizer_steps.shape == (N,)
    assert int(result.optimizer_steps[0]) == 20
    assert bool(jnp.all(result.losses <= result.initial_losses)) and float(jnp.mean(result.losses / result.initial_losses)) < 0.5


def test_the_embeddings_reconstruct_through_sampling(setup):
    model, images, _, scheduler, cond, _ = setup
    result = run(setup, 3.0, inner_steps=5)
    assert result.null_embeddings.shape == (N,) + cond.shape
    again = sample_with_null_embeddings(model.conditional, result.noise, scheduler, N, cond=cond,
                                        null_embeddings=result.null_embeddings, guidance_scale=3.0)
    np.testing.assert_allclose(np.asarray(again), np.asarray(result.reconstruction), atol=1e-5)


def test_without_optimisation_it_is_plain_guided_sampling_from_the_pivot_noise(setup):
    """inner_steps=0 keeps the null embedding: the scan must then be exactly dpmjax.sample with
    classifier-free guidance (checks the step, history and guidance of the null-text scan)."""
    model, images, _, scheduler, cond, uncond = setup
    result = run(setup, 7.5, inner_steps=0)
    guided = dpmjax.classifier_free_guidance(model.conditional, cond, uncond, 7.5)
    expected = dpmjax.sample(guided, result.noise, scheduler, N).sample
    np.testing.assert_allclose(np.asarray(result.reconstruction), np.asarray(expected), atol=2e-5)
    np.testing.assert_array_equal(np.asarray(result.null_embeddings[3]), np.asarray(uncond))
    assert int(jnp.sum(result.optimizer_steps)) == 0


def test_any_optax_optimiser_and_more_steps_fit_the_pivot_better(setup):
    few = run(setup, 7.5, inner_steps=2)
    more = run(setup, 7.5, inner_steps=20, optimizer=optax.chain(optax.clip_by_global_norm(10.0), optax.adam(2e-2)))
    assert float(more.losses[-1]) < float(few.losses[-1]) / 4


def test_rows_are_optimised_independently(setup):
    """Adam is elementwise and finished rows are masked: row 0 alone gives the same embeddings as
    row 0 in the batch, also with early stopping at different steps per row (up to float32
    rounding: the batched model's matmuls round differently, and 80 optimiser steps carry it)."""
    model, images, _, scheduler, cond, uncond = setup
    batch = run(setup, 7.5, inner_steps=20, tolerance=2e-2)
    alone = null_text_inversion(model.conditional, images[:1], scheduler, N, cond=cond[:1], uncond=uncond[:1],
                                guidance_scale=7.5, inner_steps=20, tolerance=2e-2)
    np.testing.assert_allclose(np.asarray(alone.null_embeddings[:, 0]), np.asarray(batch.null_embeddings[:, 0]), atol=3e-3)
    assert int(jnp.min(batch.optimizer_steps)) < 20, "some step stopped early"


def test_bad_input_is_refused_before_tracing(setup):
    model, images, _, scheduler, cond, uncond = setup
    call = dict(cond=cond, uncond=uncond, guidance_scale=7.5)
    with pytest.raises(ValueError, match="DPMSolverMultistepScheduler"):
        null_text_inversion(model.conditional, images, dpmjax.DPMSolverMultistepInverseScheduler(), N, **call)
    with pytest.raises(ValueError, match="deterministic"):
        null_text_inversion(model.conditional, images, dpmjax.DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++"), N, **call)
    with pytest.raises(ValueError, match="inner_steps"):
        null_text_inversion(model.conditional, images, scheduler, N, inner_steps=-1, **call)
    with pytest.raises(ValueError, match="guidance_scale"):
        null_text_inversion(model.conditional, images, scheduler, N, cond=cond, uncond=uncond, guidance_scale=jnp.array(7.5))
    with pytest.raises(ValueError, match="leading axis of num_inference_steps=10"):
        sample_with_null_embeddings(model.conditional, images, scheduler, N, cond=cond, null_embeddings=uncond, guidance_scale=7.5)

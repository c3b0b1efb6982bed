"""DiffEdit through the public calls (``dpmjax.diffedit``, ``dpmjax.diffedit_mask``) on the shipped
digits models: a label swap changes the digit inside the mask and nothing outside it.

Measured on held-out rows 0-7 (MLP, w = 2, N = 25, the log-SNR grid; labels 6 6 6 2 5 6 6 2 -> the
next digit): masks of 26% of the pixels; 6 of 8 edits classified as the target; outside the mask the
result is the input bit for bit (same-level background) and within 0.028 of it with diffusers'
background, one noise level off."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dpmjax
from dpmjax.models import digits
from dpmjax.models.digits.common import NULL_LABEL, classify, heldout

ROWS = 8
STEPS = 25
GUIDANCE = 2.0


@pytest.fixture(scope="module")
def problem():
    model = digits.load("mlp")
    images, labels = heldout()
    x, labels = jnp.asarray(images[:ROWS]), jnp.asarray(labels[:ROWS])
    null = jnp.full((ROWS,), NULL_LABEL, jnp.int32)
    guided = dpmjax.classifier_free_guidance(model.conditional, guidance_scale=GUIDANCE)
    scheduler = dpmjax.DPMSolverMultistepScheduler(dpmjax.SchedulerConfig(use_lu_lambdas=True, final_sigmas_type="sigma_min"))
    return dict(model=model, x=x, labels=labels, source=(labels, null), target=((labels + 1) % 10, null), guided=guided,
                scheduler=scheduler)


def _edit(problem, **kwargs):
    kwargs.setdefault("key", jax.random.PRNGKey(0))
    return dpmjax.diffedit(problem["guided"], problem["x"], problem["scheduler"], STEPS, source_cond=problem["source"],
                           target_cond=problem["target"], **kwargs)


@pytest.fixture(scope="module")
def plain(problem):
    return _edit(problem)


def test_outside_the_mask_the_result_is_the_input_and_inside_the_label_changes(problem, plain):
    x, mask, out = np.asarray(problem["x"]), np.asarray(plain.mask), np.asarray(plain.sample)
    assert mask.shape == (ROWS, 1, 8, 8) and set(np.unique(mask)) <= {0.0, 1.0}
    assert 0.05 < mask.mean() < 0.6, mask.mean()
    keep = np.broadcast_to(mask == 0, x.shape)
    np.testing.assert_array_equal(out[keep], x[keep])  # bit for bit: the last step puts the data back
    assert np.all(np.abs(out - x)[~keep].reshape(-1).max() > 0.5)
    predicted = np.asarray(classify(problem["model"].classifier, plain.sample))
    assert np.mean(predicted == np.asarray(problem["target"][0])) >= 0.5, predicted


def test_exact_inversion_keeps_the_outside_and_reports_its_round_trip(problem, plain):
    exact = _edit(problem, settings=dpmjax.DiffEdit(inversion=True))
    x, out = np.asarray(problem["x"]), np.asarray(exact.sample)
    np.testing.assert_array_equal(np.asarray(exact.mask), np.asarray(plain.mask))  # the same mask: same key
    keep = np.broadcast_to(np.asarray(exact.mask) == 0, x.shape)
    np.testing.assert_array_equal(out[keep], x[keep])
    assert exact.round_trip.shape == (ROWS,) and bool(np.all(exact.converged)), np.asarray(exact.round_trip)
    assert float(np.max(exact.round_trip)) <= 1e-5


def test_diffusers_background_is_one_level_noisier_outside_the_mask(problem, plain):
    """diffusers' pipeline blends each step's result with the inverted latents one step noisier, so
    its last step leaves the first inversion step's latents, not the data, outside the mask."""
    theirs = _edit(problem, settings=dpmjax.DiffEdit(background="diffusers"))
    x = np.asarray(problem["x"])
    keep = np.broadcast_to(np.asarray(theirs.mask) == 0, x.shape)
    off = np.abs(np.asarray(theirs.sample) - x)[keep]
    assert off.max() > 1e-3, off.max()
    assert off.max() < 0.2, off.max()  # still the image, at a small noise level


def test_a_full_mask_is_plain_inversion_and_sampling(problem):
    ones = jnp.ones((ROWS, 1, 8, 8))
    edited = _edit(problem, mask=ones, key=None, settings=dpmjax.DiffEdit(strength=1.0))
    noise = dpmjax.invert(problem["guided"], problem["x"], problem["scheduler"], STEPS, cond=problem["source"]).sample
    sampled = dpmjax.sample(problem["guided"], noise, problem["scheduler"], STEPS, cond=problem["target"]).sample
    np.testing.assert_allclose(np.asarray(edited.noise), np.asarray(noise), rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(edited.sample), np.asarray(sampled), rtol=0, atol=1e-5)


def test_the_same_condition_twice_gives_an_empty_mask_and_the_input_back(problem):
    mask = dpmjax.diffedit_mask(problem["guided"], problem["x"], problem["scheduler"], STEPS, source_cond=problem["source"],
                                target_cond=problem["source"], key=jax.random.PRNGKey(1))
    assert not np.any(np.isnan(np.asarray(mask))) and float(jnp.max(mask)) == 0.0
    out = _edit(problem, mask=mask, key=None)
    np.testing.assert_array_equal(np.asarray(out.sample), np.asarray(problem["x"]))


def test_a_row_s_mask_does_not_depend_on_the_other_rows(problem, plain):
    """Each row's map is scaled by its own mean (diffusers scales by the batch's)."""
    alone = dpmjax.diffedit_mask(problem["guided"], problem["x"][:1], problem["scheduler"], STEPS,
                                 source_cond=tuple(c[:1] for c in problem["source"]),
                                 target_cond=tuple(c[:1] for c in problem["target"]),
                                 noises=jax.random.normal(jax.random.PRNGKey(0), (10, ROWS, 1, 8, 8))[:, :1])
    batch, row = np.asarray(plain.mask)[0] > 0.5, np.asarray(alone)[0] > 0.5
    assert np.logical_and(batch, row).sum() / max(np.logical_or(batch, row).sum(), 1) >= 0.95


def test_the_mask_s_noisings_come_from_the_key(problem, plain):
    noises = jax.random.normal(jax.random.PRNGKey(0), (10,) + problem["x"].shape)
    mask = dpmjax.diffedit_mask(problem["guided"], problem["x"], problem["scheduler"], STEPS, source_cond=problem["source"],
                                target_cond=problem["target"], noises=noises)
    np.testing.assert_array_equal(np.asarray(mask), np.asarray(plain.mask))


@pytest.mark.parametrize("settings, message", [
    (dict(strength=0.0), "strength must be a number in (0, 1]"),
    (dict(strength=1.5), "strength must be a number in (0, 1]"),
    (dict(mask_strength=float("nan")), "mask_strength must be a number in (0, 1]"),
    (dict(mask_noisings=0), "mask_noisings must be an integer >= 1"),
    (dict(mask_threshold=-1.0), "mask_threshold must be a finite number > 0"),
    (dict(mask_threshold=float("inf")), "mask_threshold must be a finite number > 0"),
    (dict(inversion="exact"), "inversion must be True, False or a dpmjax.ExactInversion"),
    (dict(background="previous"), "background must be one of 'same-level', 'diffusers'"),
    (dict(background="diffusers", inversion=True), "background='diffusers' inverts with diffusers' inverse scheduler"),
])
def test_settings_refuse_bad_values_naming_them(settings, message):
    with pytest.raises(ValueError) as error:
        dpmjax.DiffEdit(**settings)
    assert message in str(error.value)


def test_calls_refuse_bad_input_before_tracing(problem):
    with pytest.raises(ValueError, match="no step"):
        _edit(problem, settings=dpmjax.DiffEdit(strength=0.03))
    # one step of a grid ending at sigma_min is its zero-length last step: no noise to edit with
    with pytest.raises(ValueError, match=r"strength=0.04 of num_inference_steps=25 runs 1 step\(s\) that span no noise"):
        _edit(problem, settings=dpmjax.DiffEdit(strength=0.04))
    with pytest.raises(ValueError, match="mask_strength=0.02 of num_inference_steps=25 noises at the grid's end"):
        _edit(problem, settings=dpmjax.DiffEdit(mask_strength=0.02))
    with pytest.raises(ValueError, match="key .* or a mask of your own, exactly one"):
        _edit(problem, key=None)
    with pytest.raises(ValueError, match="exactly one"):
        _edit(problem, mask=jnp.ones((ROWS, 1, 8, 8)))
    for key in (0, jnp.zeros(3, jnp.uint32)):
        with pytest.raises(ValueError, match="key must be a jax.random key"):
            _edit(problem, key=key)
    for bad in (jnp.full((ROWS, 1, 8, 8), jnp.nan), jnp.full((ROWS, 1, 8, 8), 2.0), -jnp.ones((ROWS, 1, 8, 8))):
        with pytest.raises(ValueError, match=r"mask must hold values in \[0, 1\]"):
            _edit(problem, mask=bad, key=None)
    with pytest.raises(ValueError, match="mask must broadcast"):
        _edit(problem, mask=jnp.ones((ROWS, 2, 8, 8)), key=None)
    with pytest.raises(ValueError, match=r"noises must have shape \(10, 8, 1, 8, 8\)"):
        dpmjax.diffedit_mask(problem["guided"], problem["x"], problem["scheduler"], STEPS, source_cond=problem["source"],
                             target_cond=problem["target"], noises=jnp.zeros((3, ROWS, 1, 8, 8)))
    with pytest.raises(ValueError, match="channel_axis"):
        dpmjax.diffedit_mask(problem["guided"], problem["x"], problem["scheduler"], STEPS, source_cond=problem["source"],
                             target_cond=problem["target"], key=jax.random.PRNGKey(0), channel_axis=4)
    with pytest.raises(ValueError, match="settings must be a dpmjax.DiffEdit"):
        _edit(problem, settings={"strength": 0.5})
    short = tuple(c[:2] for c in problem["target"])  # the target condition of 2 rows for a batch of 8
    with pytest.raises(ValueError, match=r"target_cond must have one row per row of the data \(8\) or one row for all"
                                         r".* \(2,\) against \(8,\)"):
        dpmjax.diffedit(problem["guided"], problem["x"], problem["scheduler"], num_inference_steps=STEPS,
                        source_cond=problem["source"], target_cond=short, key=jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="target_cond must have one row per row of the data"):
        dpmjax.diffedit_mask(problem["guided"], problem["x"], problem["scheduler"], num_inference_steps=STEPS,
                             source_cond=problem["source"], target_cond=short, key=jax.random.PRNGKey(0))
    inverse = dpmjax.DPMSolverMultistepInverseScheduler(problem["scheduler"].config)
    with pytest.raises(ValueError, match="DPMSolverMultistepScheduler"):
        dpmjax.diffedit(problem["guided"], problem["x"], inverse, STEPS, source_cond=problem["source"],
                        target_cond=problem["target"], key=jax.random.PRNGKey(0))


@pytest.mark.slow
def test_the_shipped_unet_edits_inside_its_mask_only():
    model = digits.load("unet")
    images, labels = heldout()
    x, labels = jnp.asarray(images[8:12]), jnp.asarray(labels[8:12])
    null = jnp.full((4,), NULL_LABEL, jnp.int32)
    guided = dpmjax.classifier_free_guidance(model.conditional, guidance_scale=GUIDANCE)
    scheduler = dpmjax.DPMSolverMultistepScheduler(dpmjax.SchedulerConfig(use_lu_lambdas=True, final_sigmas_type="sigma_min"))
    out = dpmjax.diffedit(guided, x, scheduler, 10, source_cond=(labels, null), target_cond=((labels + 1) % 10, null),
                          key=jax.random.PRNGKey(0))
    mask = np.asarray(out.mask)
    keep = np.broadcast_to(mask == 0, x.shape)
    assert 0.05 < mask.mean() < 0.6, mask.mean()
    np.testing.assert_array_equal(np.asarray(out.sample)[keep], np.asarray(x)[keep])
    assert np.abs(np.asarray(out.sample) - np.asarray(x))[~keep].max() > 0.5

"""The shipped digits model and the main job: real held-out data, guided sampling, exact inversion."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dpmjax
from dpmjax.apps import cli
from dpmjax.apps.digits_job import psnr, reconstruct, sample_quality
from dpmjax.models import digits
from dpmjax.models.digits import common, train


@pytest.fixture(scope="module")
def model():
    return digits.load()


@pytest.fixture(scope="module")
def heldout():
    images, labels = digits.heldout()
    return jnp.asarray(images), jnp.asarray(labels)


def test_the_held_out_digits_are_the_test_split_that_training_never_saw(heldout):
    train_x, train_y, test_x, test_y = train.load_split()
    np.testing.assert_array_equal(np.asarray(heldout[0]), test_x)
    np.testing.assert_array_equal(np.asarray(heldout[1]), test_y)
    assert len(train_y) + len(test_y) == 1797 and len(test_y) == 359
    assert np.all(test_x >= -1.0) and np.all(test_x <= 1.0)


def test_the_classifier_recognises_real_held_out_digits(model, heldout):
    accuracy = float(jnp.mean(digits.classify(model.classifier, heldout[0]) == heldout[1]))
    assert accuracy >= 0.9, accuracy


def test_guided_samples_are_recognisable_digits(model):
    """Issue target: classifier accuracy >= 90% on the requested class (100 samples, N=25, w=3)."""
    accuracy, outside, images = sample_quality(model, dpmjax.DPMSolverMultistepScheduler().config, 100, 25, 3.0, False)
    assert images.shape == (100, 1, 8, 8) and bool(jnp.all(jnp.isfinite(images)))
    assert accuracy >= 0.9, accuracy


def test_dynamic_thresholding_keeps_guided_pixel_samples_in_range(model):
    config = dpmjax.DPMSolverMultistepScheduler().config
    _, outside_plain, _ = sample_quality(model, config, 50, 25, 7.5, False)
    _, outside_thresholded, images = sample_quality(model, config, 50, 25, 7.5, True)
    assert outside_plain > 0.01, "strong guidance pushes pixels out of [-1, 1]"
    assert outside_thresholded < outside_plain / 10


def test_exact_inversion_reconstructs_held_out_digits(model, heldout):
    """The main job's sampler (order 2, log-SNR grid ending at sigma_min), N = 25, guidance 3: exact
    inversion reaches the float32 floor, far above plain."""
    fwd = dpmjax.DPMSolverMultistepScheduler(solver_order=2, use_lu_lambdas=True, final_sigmas_type="sigma_min")
    images, labels = heldout[0][:32], heldout[1][:32]
    _, plain = reconstruct(model, images, labels, scheduler=fwd, n=25, scale=3.0, exact=False)
    _, exact = reconstruct(model, images, labels, scheduler=fwd, n=25, scale=3.0, exact=True)
    assert psnr(exact, images) >= 100.0, psnr(exact, images)
    assert psnr(exact, images) >= psnr(plain, images) + 50.0


def test_the_training_script_runs_and_its_weights_load(tmp_path, monkeypatch):
    """Without --out the weights go to ./digits-weights, never over the shipped files."""
    shipped = {path: open(path, "rb").read() for path in (common.WEIGHTS, common.weights_path("unet"))}
    monkeypatch.chdir(tmp_path)
    assert train.main(["--steps", "20"]) == 0
    assert all(open(path, "rb").read() == data for path, data in shipped.items())
    assert sorted(os.listdir(tmp_path / "digits-weights")) == ["digits_heldout.npz", "digits_weights.msgpack"]
    monkeypatch.setattr(common, "WEIGHTS", str(tmp_path / "digits-weights" / "digits_weights.msgpack"))
    digits.load.cache_clear()
    try:
        trained = digits.load()
        out = trained.model_fn(jnp.zeros(4, jnp.int32))(jnp.zeros((4, 1, 8, 8)), 500)
        assert out.shape == (4, 1, 8, 8) and bool(jnp.all(jnp.isfinite(out)))
    finally:
        digits.load.cache_clear()


def test_the_main_job_prints_the_psnr_table_and_writes_the_grid(tmp_path, capsys):
    out = tmp_path / "digits.png"
    assert cli.main(["--steps", "5", "--guidance", "1", "3", "--count", "20", "--null-text-steps", "3", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| N | w | plain | exact | rows exact | null-text |" in printed and "| 5 | 3 |" in printed
    assert "order 2, lu grid" in printed
    assert "accuracy" in printed
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_unet_is_a_trained_sd_style_network_whose_guided_samples_are_digits():
    unet = digits.load("unet")
    names = str(jax.tree_util.tree_structure(unet.params))
    assert "GroupNorm" in names and "MultiHeadDotProductAttention" in names and "Conv" in names
    accuracy, _, images = sample_quality(unet, dpmjax.DPMSolverMultistepScheduler().config, 100, 25, 3.0, False)
    assert accuracy >= 0.9, accuracy
    assert unet.embed(jnp.array([1, 10])).shape == (2, 128)
    with pytest.raises(ValueError, match="model must be one of"):
        digits.load("vit")


@pytest.mark.slow
def test_the_unet_training_script_runs_and_its_weights_load(tmp_path, monkeypatch):
    assert train.main(["--model", "unet", "--steps", "3", "--out", str(tmp_path)]) == 0
    from flax import serialization
    from dpmjax.models.digits import unet

    params = serialization.from_bytes(unet.init_params(jax.random.PRNGKey(1)),
                                      (tmp_path / "digits_unet_weights.msgpack").read_bytes())
    out = unet.DigitsUNet().apply(params, jnp.zeros((2, 1, 8, 8)), 500, jnp.array([3, 10]))
    assert out.shape == (2, 1, 8, 8) and bool(jnp.all(jnp.isfinite(out)))


@pytest.mark.parametrize("args, named, not_named", [
    (["--steps", "5", "0"], ["--steps must be >= 1 (got 5 0)"], ["--count"]),
    (["--count", "0"], ["--count must be >= 1 (got 0)"], ["--steps"]),
    (["--steps", "0", "--count", "-2"], ["--steps", "--count"], ["--guidance"]),
    (["--guidance", "0.5", "--null-text-steps", "-1"], ["--guidance scales must be >= 1 (got 0.5)", "--null-text-steps"],
     ["--steps", "--count"]),
])
def test_bad_job_arguments_are_one_line_naming_the_bad_option(args, named, not_named, capsys):
    """Refused before the model is loaded: exit status 2, one line without the usage, naming only what is wrong."""
    assert cli.main(["digits", *args]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("dpmjax digits: error: ") and "usage" not in err, err
    assert all(n in err for n in named) and not any(n in err for n in not_named), err

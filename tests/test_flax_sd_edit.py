"""Editing real images with a Flax Stable Diffusion pipeline (``dpmjax.models.flax_sd.edit``,
``dpmjax edit``) on a tiny random pipeline of Stable Diffusion's architecture, under diffusers 0.39
and transformers 4.57 (the last releases with Flax classes; installed beside the test environment
and put first on the path of a subprocess, as in test_flax_sd_pipelines.py).

The random UNet checks the plumbing, not the quality of edits: exact inversion must give back the
encoded latents to float32 rounding, so that the edit with the source prompt as target returns the
VAE's own encode/decode round trip of the input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import dpmjax

from test_edit_hardening import fake_pipeline, png
from test_flax_compat import OLD_VERSION, old_diffusers  # noqa: F401  (the fixture)
from test_flax_sd_pipelines import COMPILE_FAST, OLD_TRANSFORMERS, old_transformers  # noqa: F401  (the fixture)

RELATIVE = 1e-5
ROOT = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def old_env(old_diffusers, old_transformers):  # noqa: F811
    path = os.pathsep.join([old_diffusers, old_transformers, str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    flags = " ".join([os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=1", COMPILE_FAST]).strip()
    return dict(os.environ, PYTHONPATH=path, XLA_FLAGS=flags)


def run_check(script: str, env: dict, out: Path) -> dict:
    """The JSON report of ``tests/SCRIPT OUT`` run under the last Flax releases (``env``)."""
    done = subprocess.run([sys.executable, str(Path(__file__).with_name(script)), str(out)], env=env, capture_output=True,
                          text=True, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def checked(old_env, tmp_path_factory):
    out = tmp_path_factory.mktemp("flax_sd_edit")
    return out, run_check("flax_sd_edit_check.py", old_env, out)


@pytest.fixture(scope="module")
def report(checked):
    return checked[1]


def _edit(env, *args):
    return subprocess.run([sys.executable, "-m", "dpmjax", "edit", *map(str, args)], env=env, capture_output=True,
                          text=True, check=False)


@pytest.mark.slow
def test_ran_under_the_last_flax_releases(report):
    assert report["diffusers"] == OLD_VERSION and report["transformers"] == OLD_TRANSFORMERS


@pytest.mark.slow
def test_exact_edit_with_the_source_prompt_gives_back_the_input(report):
    """Measured: round trips 3.4e-6 and 3.9e-6 (order 1, N = 15, w = 3); the decoded image within
    7.6e-6 of the VAE's own round trip of the input."""
    row = report["exact"]
    assert row["shape"] == [3, 16, 16, 3]
    assert row["source_latents_rel_to_encoded"] == 0.0, "the latents are the VAE mean times its scaling factor"
    assert all(row["converged"]) and max(row["round_trip"]) <= RELATIVE, row
    for i in (0, 1):  # rows edited with their own source prompt
        assert row["latents_rel"][i] <= RELATIVE, row
        assert row["image_diff_to_vae_round_trip"][i] <= 1e-4, row
        assert row["image_error"][i] <= report["vae"]["image_error"][i] + 1e-4, (row, report["vae"])
    assert max(row["reconstruction_rel"]) <= RELATIVE, row


@pytest.mark.slow
def test_another_target_prompt_changes_the_image(report):
    row = report["exact"]
    assert row["noise_rel_rows_0_2"] == 0.0, "the same image inverts to the same noise in any row"
    assert row["edit_latent_change_rel"] > 1000 * RELATIVE and row["edit_image_change"] > 0.05, row


@pytest.mark.slow
def test_exact_settings_reach_invert(report):
    """``method=ExactEdit(inversion=...)``: that ExactInversion is what invert gets; ``method="exact"``:
    the defaults; plain inverts plainly."""
    assert report["exact_passed"] == {
        "default": repr(dpmjax.ExactInversion()),
        "given": repr(dpmjax.ExactInversion(tolerance=1e-3, max_sweeps=2)),
        "plain": "False"}


@pytest.mark.slow
@pytest.mark.parametrize("method", ["plain", "null-text"])
def test_plain_and_null_text_run_and_compile_once_per_shape(report, method):
    row = report["methods"][method]
    assert row["finite"] and row["shape"] == [2, 16, 16, 3], row
    assert not row["recompiled_on_second_call"], "other images and prompts of the same shape reuse the program"
    assert row["image_change"] > 0.05, row
    if method == "null-text":
        assert len(row["losses"]) == 15


@pytest.mark.slow
def test_the_command_edits_pngs_of_a_saved_pipeline(checked, old_env, tmp_path):
    folder, _ = checked
    out = tmp_path / "edited.png"
    done = _edit(old_env, "--pipeline", folder / "pipeline", "--image", folder / "a.png", "--image", folder / "b.png",
                 "--prompt", "the cat", "--target-prompt", "a dog", "--out", out, "--method", "plain", "--steps", 5)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"wrote {out}" in done.stdout, done.stdout
    import matplotlib.image

    grid = matplotlib.image.imread(str(out))
    assert grid.shape[:2] == (32, 32), "two rows of original | edited, 16 px each"


@pytest.mark.slow
def test_the_command_fails_cleanly_on_a_missing_image(checked, old_env, tmp_path):
    folder, _ = checked
    done = _edit(old_env, "--pipeline", folder / "pipeline", "--image", tmp_path / "nope.png", "--prompt", "a",
                 "--target-prompt", "b", "--out", tmp_path / "out.png")
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert "no such image file" in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert not (tmp_path / "out.png").exists()


@pytest.mark.slow
def test_the_checks_before_loading_take_a_real_saved_pipeline(checked):
    """The pipeline folder checks read its index and configs: a real saved folder passes them, its
    size rule (sizes are multiples of 4: a 2-block VAE and a 2-block UNet) is what the UNet takes, and
    its scheduler config (saved by diffusers) gives the bound on --steps."""
    from dpmjax.apps import edit

    folder, _ = checked
    assert json.loads((folder / "pipeline" / "scheduler" / "scheduler_config.json").read_text())["num_train_timesteps"] == 1000
    assert edit._pipeline_problems(str(folder / "pipeline")) == ([], edit.Geometry(step=4, default_size=16,
                                                                                   train_steps=1000))


@pytest.mark.slow
def test_a_truncated_unet_weights_file_is_one_line(checked, old_env, tmp_path):
    """The weights are read only when the pipeline loads: a truncated UNet file fails there, and the
    command names the file in one line instead of msgpack's traceback."""
    import shutil

    folder, _ = checked
    pipeline = tmp_path / "pipeline"
    shutil.copytree(folder / "pipeline", pipeline)
    weights = pipeline / "unet" / "diffusion_flax_model.msgpack"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    done = _edit(old_env, "--pipeline", pipeline, "--image", folder / "a.png", "--prompt", "a", "--target-prompt", "b",
                 "--out", tmp_path / "o.png", "--method", "plain", "--steps", 2)
    assert done.returncode == 2, (done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert lines[0].startswith(f"dpmjax edit: error: --pipeline {pipeline}: unet/diffusion_flax_model.msgpack is not a readable "
                               "Flax weights file ("), lines[0]
    assert not (tmp_path / "o.png").exists()


@pytest.mark.parametrize("setting", ["installed", "missing"])
def test_without_diffusers_039_the_command_says_what_to_install(tmp_path, setting):
    """The test environment's diffusers is >= 0.40 (no Flax); "missing" hides it altogether. The
    arguments are valid (a pipeline folder that passes the checks made before loading, an image
    file), so the installation is what is missing."""
    fake_pipeline(tmp_path)
    png(tmp_path / "x.png")
    args = ["edit", "--pipeline", str(tmp_path), "--image", str(tmp_path / "x.png"), "--prompt", "a",
            "--target-prompt", "b", "--out", str(tmp_path / "o.png")]
    hide = "import sys; sys.modules['diffusers'] = None; " if setting == "missing" else ""
    done = subprocess.run([sys.executable, "-c", f"{hide}import sys; from dpmjax.apps.cli import main; sys.exit(main({args!r}))"],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 2, (done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and 'pip install "diffusers<0.40" "transformers<5" flax' in lines[0], done.stderr
    assert "Traceback" not in done.stderr


def test_the_command_reports_wrong_paths_before_it_needs_diffusers(tmp_path):
    """A mistyped path is the user's to fix whatever is installed: it is reported first, in one line."""
    args = ["edit", "--pipeline", str(tmp_path), "--image", "missing.png", "--prompt", "a", "--target-prompt", "b",
            "--out", str(tmp_path / "o.png")]
    done = subprocess.run([sys.executable, "-c", f"import sys; sys.modules['diffusers'] = None; from dpmjax.apps.cli "
                           f"import main; sys.exit(main({args!r}))"], capture_output=True, text=True, check=False)
    assert done.returncode == 2, (done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and f"--pipeline {tmp_path}: not a saved pipeline folder (no model_index.json)" in lines[0], done.stderr
    assert "--image missing.png: no such image file" in lines[0], done.stderr


@pytest.mark.parametrize("out, problem", [
    ("o", "no image extension"),
    ("o.gif", "unknown image extension .gif"),
    ("o.PNGX", "unknown image extension .pngx"),
    ("a-file/o.png", "its folder cannot be created"),
    ("a-folder", "no image extension"),
    ("a-folder.png", "is a folder, not an image file"),
])
def test_the_command_reports_a_bad_out_before_it_needs_diffusers(tmp_path, capsys, out, problem):
    """An --out that cannot be written is reported at once, in the one line of argument problems,
    not after the edit (the installed diffusers >= 0.40 would otherwise be reported first)."""
    from dpmjax.apps import cli

    fake_pipeline(tmp_path)
    png(tmp_path / "x.png")
    (tmp_path / "a-file").write_text("")
    (tmp_path / "a-folder").mkdir()
    (tmp_path / "a-folder.png").mkdir()
    args = ["edit", "--pipeline", str(tmp_path), "--image", str(tmp_path / "x.png"), "--prompt", "a",
            "--target-prompt", "b", "--out", str(tmp_path / out)]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith(f"dpmjax edit: error: --out {tmp_path / out}"), err
    assert problem in err and "pip install" not in err, err


def test_good_out_paths_pass_the_check(tmp_path):
    from dpmjax.apps import edit

    for out in ("o.png", "O.JPG", "o.jpeg", "o.webp", "o.bmp", "o.tif", "o.tiff", "new/sub/o.png"):
        assert edit._out_problems(str(tmp_path / out)) == [], out


@pytest.mark.parametrize("args, named, not_named", [
    (["--steps", "0"], "--steps must be >= 1 (got 0)", "--guidance"),
    (["--guidance", "-1"], "--guidance must be a finite number > 0 (got -1)", "--steps"),
    (["--steps", "0", "--guidance", "0"], "--guidance must be a finite number > 0 (got 0)", "--size"),
])
def test_the_command_names_only_the_bad_option(tmp_path, capsys, args, named, not_named):
    from dpmjax.apps import cli

    assert cli.main(["edit", "--pipeline", str(tmp_path), "--image", "x.png", "--prompt", "a", "--target-prompt", "b",
                     "--out", str(tmp_path / "o.png"), *args]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and named in err and not_named not in err, err

"""DiffEdit (``edit_images(method=DiffEditEdit(...))``) against diffusers' own PyTorch
``StableDiffusionDiffEditPipeline`` on the same tiny components: random PyTorch weights loaded into
the Flax classes with ``from_pt=True`` (tests/flax_sd_diffedit_check.py, run under diffusers 0.39
and transformers 4.57, whose PyTorch DiffEdit pipeline is the installed release's, code for code).

Measured (N = 10, w = 3, DPM-Solver++(2M), diffusers' default grid, mask clamp 2): both masks cover
the same 32 of 64 latent pixels (IoU 1.0); the edited latents within 6.5e-5 of diffusers' (scale
0.88), the decoded images within 7.1e-5. dpmjax's own background (the same noise level) gives the
input's latents back outside the mask exactly, where diffusers' result is 0.077 off them."""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from test_flax_sd_edit import old_env, run_check  # noqa: F401  (old_env: the fixture)
from test_flax_compat import OLD_VERSION, old_diffusers  # noqa: F401  (the fixture)
from test_flax_sd_pipelines import old_transformers  # noqa: F401  (the fixture)

PIPELINE = Path("pipelines", "deprecated", "stable_diffusion_diffedit", "pipeline_stable_diffusion_diffedit.py")


@pytest.fixture(scope="module")
def checked(old_env, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("flax_sd_diffedit")
    return out, run_check("flax_sd_diffedit_check.py", old_env, out)


@pytest.fixture(scope="module")
def report(checked):
    return checked[1]


def _methods(path: Path) -> dict:
    """The DiffEdit pipeline's methods as code (their docstrings dropped)."""
    tree = ast.parse(path.read_text())
    (pipeline,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "StableDiffusionDiffEditPipeline"]
    methods = {}
    for node in pipeline.body:
        if isinstance(node, ast.FunctionDef):
            if ast.get_docstring(node) is not None:
                node.body = node.body[1:]
            methods[node.name] = ast.dump(node)
    return methods


def test_the_compared_pipeline_is_the_installed_release_s(old_diffusers):  # noqa: F811
    """The PyTorch pipeline the check runs (diffusers 0.39's, beside the Flax classes) is the one the
    environment's own diffusers ships: its mask, inversion and sampling are the same code."""
    installed = Path(importlib.util.find_spec("diffusers").origin).parent
    ours, theirs = _methods(Path(old_diffusers, "diffusers") / PIPELINE), _methods(installed / PIPELINE)
    for name in ("generate_mask", "invert", "__call__", "get_timesteps", "get_inverse_timesteps", "prepare_image_latents"):
        assert ours[name] == theirs[name], name


@pytest.mark.slow
def test_the_mask_matches_diffusers(report):
    assert report["diffusers"] == OLD_VERSION
    assert 0.2 < report["mask_fraction_diffusers"] < 0.8, report
    assert report["mask_iou"] >= 0.99, report


@pytest.mark.slow
def test_the_edited_image_matches_diffusers_where_the_masks_agree(report):
    assert report["source_latents_diff"] <= 1e-4, report  # the VAE's mean, PyTorch and Flax
    assert report["noise_diff"] <= 1e-4 * max(1.0, report["latents_scale"]), report
    assert report["latents_diff_where_masks_agree"] <= 1e-3 * max(1.0, report["latents_scale"]), report
    assert report["image_diff_where_masks_agree"] <= 1e-3, report


@pytest.mark.slow
def test_our_background_is_the_input_where_diffusers_is_one_level_off(report):
    """diffusers' generate_mask crashes with a DPMSolverMultistepScheduler (a 0-d timestep to
    add_noise; the check hands it a 1-d one), and its last step leaves the inverted latents of the
    first inversion step outside the mask; dpmjax's default keeps the input there exactly."""
    assert report["diffusers_add_noise_crashes_on_0d_timestep"] is True
    assert report["same_level_mask_equal"] is True
    assert report["same_level_outside_mask_diff_to_source"] == 0.0, report
    assert report["diffusers_outside_mask_diff_to_source"] > 1e-2, report
    assert report["same_level_inside_mask_change"] > 1e-2, report


@pytest.mark.slow
def test_pytorch_weights_converted_once_run_diffedit_from_the_command_line(checked, old_env, tmp_path):  # noqa: F811
    """The weights-to-edit guide's path, its blocks run as written (tests/flax_sd_diffedit_check.py):
    a PyTorch pipeline folder with safetensors weights re-saved with .bin weights, loaded with
    ``FlaxStableDiffusionPipeline.from_pretrained(..., from_pt=True)`` and saved in the Flax layout
    gives the weights the components' own ``from_pt`` gives; the step-by-step blocks edit and write
    an image; and ``dpmjax edit --method diffedit`` runs on the saved folder: rows of original | mask
    | edited, the mask black and white."""
    import matplotlib.image
    import numpy as np

    out_dir, report = checked
    assert report["converted_unet_diff"] == 0.0, report
    # the guide's step-by-step blocks ran as written on the converted folder
    assert report["guide_image_written"] and report["guide_pixels_shape"] == [1, 16, 16, 3], report
    assert report["guide_mask_shape"] == [1, 1, 8, 8] and report["guide_edit_change"] > 1e-2, report
    out = tmp_path / "diffedit.png"
    done = subprocess.run([sys.executable, "-m", "dpmjax", "edit", "--pipeline", str(out_dir / "flax"), "--image",
                           str(out_dir / "image.png"), "--prompt", "the cat", "--target-prompt", "a dog", "--out", str(out),
                           "--method", "diffedit", "--steps", "10", "--mask-threshold", "2"],
                          env=old_env, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "mask " in done.stdout and "original | mask | edited" in done.stdout, done.stdout
    grid = matplotlib.image.imread(str(out))
    assert grid.shape[:2] == (16, 48), grid.shape
    mask = grid[:, 16:32, :3]
    assert set(np.unique(mask)) <= {0.0, 1.0} and 0.0 < mask.mean() < 1.0, np.unique(mask)

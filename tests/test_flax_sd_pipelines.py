"""dpmjax's scheduler inside diffusers 0.39's own Flax Stable Diffusion pipelines (txt2img, img2img,
inpaint, SDXL), against diffusers' own FlaxDPMSolverMultistepScheduler in the same pipelines.

diffusers 0.39 and transformers 4.57 (the last releases with Flax classes) are installed beside the
test environment with ``pip --target`` (by .ci/run, or on first use here), so the checks run in a
subprocess with both first on the path (tests/flax_sd_pipelines_check.py); this file asserts on
what that run measured. The subprocess compiles with XLA's cheap CPU backend settings (both
schedulers alike), which halves its ~2 minutes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from test_flax_compat import OLD_VERSION, old_diffusers  # noqa: F401  (the fixture)

OLD_TRANSFORMERS = "4.57.6"
# transformers 4.57 needs huggingface_hub < 1 (the environment's diffusers brings 1.x or later) and
# tokenizers < 0.23.1; diffusers 0.39's PyTorch pipelines import httpx (with httpcore). All go into the
# folder, which comes first on the subprocess' path.
HTTPX_PINS = ("httpx==0.28.1", "httpcore==1.0.9")
TRANSFORMERS_PINS = (f"transformers=={OLD_TRANSFORMERS}", "huggingface_hub==0.36.2", "tokenizers==0.22.2", *HTTPX_PINS)
COMPILE_FAST = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
RELATIVE = 1e-5


@pytest.fixture(scope="module")
def old_transformers() -> str:
    """A folder holding transformers 4.57 (the last release with Flax), the huggingface_hub and
    tokenizers it needs and the httpx diffusers 0.39 imports, not on this process' path."""
    target = os.environ.get("DPMJAX_OLD_TRANSFORMERS") or str(
        Path.home() / ".cache" / "dpmjax-tests" / f"transformers-{OLD_TRANSFORMERS}")
    if not (Path(target) / "transformers" / "__init__.py").exists():
        # installed beside and moved into place in one rename: parallel test workers may race here
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        staging = tempfile.mkdtemp(prefix="transformers-", dir=Path(target).parent)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", staging, *TRANSFORMERS_PINS],
                       check=True)
        try:
            os.rename(staging, target)
        except OSError:  # another worker got there first
            shutil.rmtree(staging, ignore_errors=True)
    elif not (Path(target) / "httpx" / "__init__.py").exists():  # a folder made before httpx was pinned
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", target, *HTTPX_PINS],
                       check=True)
    return target


@pytest.fixture(scope="module")
def report(old_diffusers, old_transformers, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("flax_sd_pipelines")
    path = os.pathsep.join([old_diffusers, old_transformers] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    flags = " ".join([os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=1", COMPILE_FAST]).strip()
    env = dict(os.environ, PYTHONPATH=path, XLA_FLAGS=flags)
    done = subprocess.run([sys.executable, str(Path(__file__).with_name("flax_sd_pipelines_check.py")), str(out)],
                          env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_ran_under_the_last_flax_releases(report):
    assert report["diffusers"] == OLD_VERSION and report["transformers"] == OLD_TRANSFORMERS
    assert report["devices"] >= 1


@pytest.mark.slow
@pytest.mark.parametrize("pipeline", ["txt2img", "img2img", "inpaint"])
@pytest.mark.parametrize("jit", [False, True])
def test_pipeline_images_equal_those_with_diffusers_own_scheduler(report, pipeline, jit):
    """Measured 1.5e-6 to 3.2e-6 relative; the same pipeline at first order lands 0.13 away."""
    row = report["images"][f"{pipeline} jit={jit}"]
    assert row["finite"] and row["shape"] == [2, 16, 16, 3], row
    assert row["unsaturated"] > 0.5, ("images clipped to [0, 1] would hide differences", row)
    assert row["max_rel_diff"] <= RELATIVE, row


@pytest.mark.slow
@pytest.mark.parametrize("jit", [False, True])
def test_sdxl_pipeline_images_equal_those_with_diffusers_own_scheduler(report, jit):
    """FlaxStableDiffusionXLPipeline (two text encoders, text_time conditioning), loaded from a folder
    with ``scheduler=`` ours: measured 1.4e-6 (jit=False) and 1.3e-6 (jit=True) relative."""
    assert report["sdxl_from_pretrained"] == {"scheduler_is_ours": True, "no_scheduler_state": True,
                                              "prompt_ids_shape": [2, 2, 16]}
    row = report["images"][f"sdxl jit={jit}"]
    assert row["finite"] and row["shape"] == [2, 16, 16, 3], row
    assert row["unsaturated"] > 0.5, ("images clipped to [0, 1] would hide differences", row)
    assert row["max_rel_diff"] <= RELATIVE, row


@pytest.mark.slow
def test_sdxl_saved_folder_reloads_plain_and_with_ours(report):
    row = report["sdxl_reload"]
    assert row["model_index_equal"] and row["scheduler_entry"] == ["diffusers", "FlaxDPMSolverMultistepScheduler"], row
    assert row["plain_module"] == "diffusers.schedulers.scheduling_dpmsolver_multistep_flax", row
    assert row["plain_class"] == "FlaxDPMSolverMultistepScheduler" and row["ours_equal_to_saved"], row
    assert row["max_rel_diff_to_first_run"] <= RELATIVE, row


@pytest.mark.slow
def test_another_scheduler_lands_far_outside_the_band(report):
    assert report["images"]["txt2img jit=False"]["max_rel_diff_to_first_order"] > 1000 * RELATIVE


@pytest.mark.slow
def test_a_grid_held_in_the_config_runs_in_diffusers_pipeline(report):
    """A scheduler whose config holds a grid of N steps (``sigmas``, as ``dpmjax.learn_grid`` saves
    one) runs it inside diffusers 0.39's pipeline, which passes ``num_inference_steps=N``: its
    images are finite and far from those of the default grid."""
    grid = report["config_grid"]
    assert grid["finite"] and grid["state_sigmas_equal"]
    assert grid["max_rel_diff_to_default_grid"] > 1000 * RELATIVE


@pytest.mark.slow
def test_from_pretrained_takes_our_scheduler(report):
    assert report["from_pretrained_scheduler_is_ours"]
    assert report["from_pretrained_no_scheduler_state"], "as with diffusers' class: params['scheduler'] is set by the user"
    assert report["to_diffusers_config_equal"]


@pytest.mark.slow
def test_saved_folder_is_what_diffusers_writes_for_its_own_class(report):
    for name, row in report["saved_files"].items():
        assert row["equal"] and row["text_equal"], (name, row)
    assert report["saved_files"]["model_index.json"]["scheduler_entry"] == ["diffusers", "FlaxDPMSolverMultistepScheduler"]
    assert report["saved_files"]["scheduler/scheduler_config.json"]["_class_name"] == "FlaxDPMSolverMultistepScheduler"


@pytest.mark.slow
def test_saved_folder_reloads_with_plain_diffusers(report):
    row = report["plain_reload"]
    assert row["class"] == "diffusers.schedulers.scheduling_dpmsolver_multistep_flax.FlaxDPMSolverMultistepScheduler"
    assert row["config_equal"] and row["state_timesteps_equal"], row


@pytest.mark.slow
def test_saved_folder_reloads_with_ours_swapped_in(report):
    row = report["dpmjax_reload"]
    assert row["class"] == "dpmjax.models.flax_sd.pipelines" and row["equal_to_saved"], row
    assert row["max_rel_diff_to_first_run"] <= RELATIVE, row


@pytest.mark.slow
def test_dpmjax_settings_diffusers_lacks_survive_a_save(report):
    row = report["dpmjax_settings_round_trip"]
    assert row["written"] == {"use_karras_sigmas": True, "steps_offset": 1}, row
    assert row["reloaded_equal"] and row["diffusers_loads"] == "FlaxDPMSolverMultistepScheduler", row


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, check=False)


def test_dpmjax_never_imports_diffusers():
    done = _run("""
        import sys
        import dpmjax, dpmjax.models.flax_sd
        assert "diffusers" not in sys.modules and "transformers" not in sys.modules, "imported"
    """)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.parametrize("setting", ["missing", "0.40"])
def test_without_diffusers_039_the_error_says_what_to_install(setting):
    fake = "sys.modules['diffusers'] = None" if setting == "missing" else (
        "import types; sys.modules['diffusers'] = types.SimpleNamespace(__version__='0.40.0')")
    done = _run(f"""
        import sys
        {fake}
        from dpmjax.models import flax_sd
        try:
            flax_sd.for_diffusers_pipelines()
        except ImportError as error:
            print(error)
        else:
            raise SystemExit("no ImportError")
    """)
    assert done.returncode == 0, done.stderr[-2000:]
    assert 'pip install "diffusers<0.40" "transformers<5"' in done.stdout, done.stdout

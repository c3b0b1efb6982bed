"""``dpmjax edit`` against hostile input: an --out that is an input or exists, a write that fails
half-way, out-of-range options, broken pipeline folders, huge or wide-range images.

Everything here is checked before the pipeline is loaded, so these tests run without diffusers 0.39:
the pipeline folder is a stand-in with the index, configs and (dummy) weights files of
``flax_sd.testing.tiny_pipeline()``, and where a test needs the whole command to run, loading and editing
are stubbed (the edit returns ``1 - image``) so that what is checked is the command's own handling
of paths and files. tests/test_flax_sd_edit.py runs the command on a real saved pipeline."""

from __future__ import annotations

import errno
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import dpmjax

ROOT = Path(__file__).parent.parent
TINY_INDEX = {
    "_class_name": "FlaxStableDiffusionPipeline", "_diffusers_version": "0.39.0",
    "feature_extractor": [None, None], "safety_checker": [None, None],
    "scheduler": ["diffusers", "FlaxDPMSolverMultistepScheduler"], "text_encoder": ["transformers", "FlaxCLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "FlaxUNet2DConditionModel"],
    "vae": ["diffusers", "FlaxAutoencoderKL"]}
# tiny_pipeline(): a 2-block VAE (factor 2) and a 2-block UNet (factor 2) on 8 px latents: sizes are
# multiples of 4, 16 px by default
SIZE_RULE = "--size must be a multiple of 4 from 4 to 2048 pixels for this pipeline"
# what a loaded tiny pipeline says about its size (the stubbed load returns it)
TINY = SimpleNamespace(unet=SimpleNamespace(config=SimpleNamespace(sample_size=8)), vae_scale_factor=2)


def fake_pipeline(folder: Path) -> Path:
    """A folder with the index, configs and weights files (dummy bytes) of ``flax_sd.testing.tiny_pipeline()``:
    what ``dpmjax edit`` checks before it loads a pipeline."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model_index.json").write_text(json.dumps(TINY_INDEX))
    for component in ("vae", "unet", "text_encoder", "tokenizer", "scheduler"):
        (folder / component).mkdir(exist_ok=True)
    (folder / "vae" / "config.json").write_text(json.dumps({"block_out_channels": [32, 64], "sample_size": 16}))
    (folder / "unet" / "config.json").write_text(json.dumps(
        {"down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"], "sample_size": 8}))
    for weights in ("vae/diffusion_flax_model.msgpack", "unet/diffusion_flax_model.msgpack",
                    "text_encoder/flax_model.msgpack"):
        (folder / weights).write_bytes(b"\x80")
    return folder


def png(path: Path, size: int = 16, seed: int = 0) -> Path:
    """A random RGB PNG (random pixels: its file is about 3 bytes per pixel)."""
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def png_header(path: Path, width: int, height: int) -> Path:
    """A greyscale PNG whose header says ``width`` x ``height`` (its data is a few bytes: only a
    reader that decodes it would notice)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


@pytest.fixture
def setup(tmp_path, monkeypatch):
    """A stand-in pipeline folder, an input image, and the command with loading and editing stubbed:
    ``run(*args)`` returns ``(exit status, stderr, whether the pipeline was loaded)``."""
    from dpmjax.apps import cli, edit

    loads = []

    def from_pretrained(folder, **kwargs):
        loads.append(folder)
        return TINY, {}

    def edit_images(pipeline, params, images, **kwargs):
        return SimpleNamespace(images=1.0 - images, round_trip=None, converged=None, mask=None)

    monkeypatch.setattr(edit, "_old_flax_stack", lambda: SimpleNamespace(from_pretrained=from_pretrained))
    monkeypatch.setattr(edit, "edit_images", edit_images)
    pipeline = fake_pipeline(tmp_path / "pipeline")
    image = png(tmp_path / "in.png")

    def run(*args, capsys=None):
        argv = ["edit", "--pipeline", str(pipeline), "--prompt", "a", "--target-prompt", "b", *map(str, args)]
        if "--image" not in args:
            argv += ["--image", str(image)]
        status = cli.main(argv)
        return status, capsys.readouterr().err if capsys else "", bool(loads)

    return SimpleNamespace(run=run, pipeline=pipeline, image=image, folder=tmp_path)


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _read_png(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


# ----------------------------------------------------------------------------- the call it makes
@pytest.mark.parametrize("flags, method, order", [
    ([], "exact", 2), (["--method", "plain", "--order", "1"], "plain", 1),
    (["--method", "plain", "--steps", "1"], "plain", 2),  # DiffEdit's two-step minimum is DiffEdit's alone
    (["--method", "null-text", "--order", "3"], "null-text", 3), (["--method", "diffedit"], "diffedit", 2)])
def test_the_command_builds_the_method_object_and_passes_the_order_as_a_scheduler_parameter(
        setup, monkeypatch, capsys, flags, method, order):
    """``--method`` becomes the method's settings object (its defaults), ``--order`` the scheduler's
    ``solver_order``; the call binds to edit_images' own signature (no removed keyword)."""
    import inspect

    from dpmjax.apps import edit
    from dpmjax.models.flax_sd import edit_images as real
    from dpmjax.models.flax_sd import edit_method

    calls = []

    def recording(pipeline, params, images, **kwargs):
        inspect.signature(real).bind(pipeline, params, images, **kwargs)
        calls.append(kwargs)
        return SimpleNamespace(images=1.0 - images, round_trip=None, converged=None, mask=None)

    monkeypatch.setattr(edit, "edit_images", recording)
    status, err, _ = setup.run("--out", setup.folder / "o.png", *flags, capsys=capsys)
    assert status == 0, err
    (kwargs,) = calls
    assert kwargs["method"] == edit_method(method) and type(kwargs["method"]) is type(edit_method(method))
    assert kwargs["scheduler_config"] == {"solver_order": order}


@pytest.mark.parametrize("flags, tolerance, budget", [
    ([], 1e-5, None), (["--dtype", "bfloat16"], 2.0 ** -4, None),
    (["--tolerance", "1e-4", "--max-calls-per-step", "60"], 1e-4, 60),
    (["--dtype", "bfloat16", "--tolerance", "1e-3"], 1e-3, None)])
def test_exact_inversion_s_tolerance_follows_the_dtype_and_the_options_reach_the_method(
        setup, monkeypatch, capsys, flags, tolerance, budget):
    """--method exact's tolerance is float32's 1e-5 or bfloat16's 2**-4 unless --tolerance says;
    --max-calls-per-step is the inversion's budget. An image that missed is reported with advice
    that names the budget when one was given."""
    from dpmjax.apps import edit
    from dpmjax.models.flax_sd import ExactEdit

    calls = []

    def recording(pipeline, params, images, **kwargs):
        calls.append(kwargs)
        return SimpleNamespace(images=1.0 - images, round_trip=np.array([0.5]), converged=np.array([False]), mask=None)

    monkeypatch.setattr(edit, "edit_images", recording)
    status, _, _ = setup.run("--out", setup.folder / "o.png", *flags)
    out, err = capsys.readouterr()
    assert status == 0, err
    (kwargs,) = calls
    assert kwargs["method"] == ExactEdit(inversion=dpmjax.ExactInversion(tolerance=tolerance, max_calls_per_step=budget))
    assert "round trip 5.0e-01 (NOT converged: try " in out, out
    assert ("a larger --max-calls-per-step" in out) == (budget is not None), out


def test_diffedit_s_options_reach_the_method_and_its_mask_is_drawn_between_the_images(setup, monkeypatch, capsys):
    """--strength, --mask-threshold and --seed become DiffEditEdit's settings; the output's rows are
    original | mask | edited, the mask white where the image was drawn again."""
    from PIL import Image

    from dpmjax.apps import edit
    from dpmjax.models.flax_sd import DiffEditEdit

    calls = []
    mask = np.zeros((1, 1, 4, 4), np.float32)
    mask[0, 0, :2] = 1.0  # the top half

    def recording(pipeline, params, images, **kwargs):
        calls.append(kwargs)
        return SimpleNamespace(images=1.0 - images, round_trip=None, converged=None, mask=mask)

    monkeypatch.setattr(edit, "edit_images", recording)
    out = setup.folder / "o.png"
    status, _, _ = setup.run("--out", out, "--method", "diffedit", "--strength", "0.6", "--mask-threshold", "2",
                             "--seed", "7")
    printed, err = capsys.readouterr()
    assert status == 0, err
    (kwargs,) = calls
    assert kwargs["method"] == DiffEditEdit(diffedit=dpmjax.DiffEdit(strength=0.6, mask_threshold=2.0), seed=7)
    assert "mask 50% of the image" in printed and "original | mask | edited" in printed, printed
    grid = np.asarray(Image.open(out))
    size = grid.shape[0]
    assert grid.shape[1] == 3 * size
    drawn = grid[:, size:2 * size, 0]
    assert np.all(drawn[: size // 2] == 255) and np.all(drawn[size // 2:] == 0)


@pytest.mark.parametrize("flags, named", [
    (["--method", "exact", "--strength", "0.5"], "--strength is --method diffedit's (got --method exact)"),
    (["--method", "plain", "--seed", "1", "--mask-threshold", "2"], "--mask-threshold and --seed are --method diffedit's"),
    (["--method", "diffedit", "--strength", "0"], "--strength must be a number in (0, 1]"),
    (["--method", "diffedit", "--strength", "nan"], "--strength must be a number in (0, 1]"),
    (["--method", "diffedit", "--mask-threshold", "-2"], "--mask-threshold must be a finite number > 0"),
    (["--method", "diffedit", "--seed", "-1"], "--seed must be an integer from 0 to 4294967295"),
    (["--method", "diffedit", "--strength", "0.01", "--steps", "10"], "--strength 0.01 of --steps 10 runs 0 step(s)"),
    (["--method", "diffedit", "--strength", "0.1", "--steps", "10"], "--strength 0.1 of --steps 10 runs 1 step(s)"),
    (["--method", "diffedit", "--seed", str(2**64)], "--seed must be an integer from 0 to 4294967295"),
    (["--method", "plain", "--tolerance", "1e-3"], "--tolerance is --method exact's (got --method plain)"),
    (["--method", "null-text", "--max-calls-per-step", "9"], "--max-calls-per-step is --method exact's"),
    (["--max-calls-per-step", "1"], "--max-calls-per-step must be an integer >= 2"),
    (["--tolerance", "1"], "--tolerance must be a number in (0, 1)"),
    (["--tolerance", "nan"], "--tolerance must be a number in (0, 1)")])
def test_exact_inversion_options_that_cannot_work_are_refused_before_loading(setup, capsys, flags, named):
    status, err, loaded = setup.run("--out", setup.folder / "o.png", *flags, capsys=capsys)
    assert status == 2 and not loaded
    assert named in _one_line(err), err


# ----------------------------------------------------------------------------- --out and the inputs
@pytest.mark.parametrize("spelling, overwrite", [
    ("the same path", False), ("the same path", True), ("another spelling", True),
    ("a symbolic link", True), ("a hard link", True)])
def test_an_out_that_is_an_input_is_refused_before_loading(setup, capsys, spelling, overwrite):
    image = setup.image
    before = image.read_bytes()
    out = {"the same path": image, "another spelling": setup.folder / "pipeline" / ".." / "in.png",
           "a symbolic link": setup.folder / "link.png", "a hard link": setup.folder / "hard.png"}[spelling]
    if spelling == "a symbolic link":
        out.symlink_to(image)
    if spelling == "a hard link":
        os.link(image, out)
    status, err, loaded = setup.run("--out", out, "--edited-only", *(["--overwrite"] if overwrite else []), capsys=capsys)
    line = _one_line(err)
    assert status == 2 and not loaded
    assert line == (f"dpmjax edit: error: --out {out} is the input image {image} "
                    "(edit never writes over an input; choose another --out)"), line
    assert image.read_bytes() == before


def test_an_out_that_is_one_of_several_inputs_is_refused(setup, capsys):
    other = png(setup.folder / "other.png", seed=1)
    status, err, loaded = setup.run("--image", setup.image, "--image", other, "--out", other, "--overwrite", capsys=capsys)
    assert status == 2 and not loaded and f"--out {other} is the input image {other}" in _one_line(err)


def test_an_existing_out_is_replaced_only_with_overwrite(setup, capsys):
    out = png(setup.folder / "out.png", seed=2)
    before = out.read_bytes()
    status, err, loaded = setup.run("--out", out, capsys=capsys)
    assert status == 2 and not loaded
    assert _one_line(err) == f"dpmjax edit: error: --out {out} exists (pass --overwrite to replace it)"
    assert out.read_bytes() == before

    status, err, loaded = setup.run("--out", out, "--overwrite", "--edited-only", capsys=capsys)
    assert status == 0 and loaded, err
    assert np.array_equal(_read_png(out), 255 - _read_png(setup.image)), "the stubbed edit (1 - image) was written"
    assert sorted(p.name for p in setup.folder.iterdir()) == ["in.png", "out.png", "pipeline"], "no temporary file left"


def test_a_new_out_is_written_and_a_link_at_out_is_followed(setup, capsys):
    target = png(setup.folder / "target.png", seed=3)
    link = setup.folder / "sub" / "link.png"
    link.parent.mkdir()
    link.symlink_to(target)
    status, err, _ = setup.run("--out", link, "--overwrite", "--edited-only", capsys=capsys)
    assert status == 0, err
    assert link.is_symlink() and os.readlink(link) == str(target), "the link is kept"
    assert np.array_equal(_read_png(target), 255 - _read_png(setup.image)), "the file it points at is replaced"

    fresh = setup.folder / "new" / "deeper" / "fresh.png"
    status, err, _ = setup.run("--out", fresh, capsys=capsys)
    assert status == 0 and _read_png(fresh).shape == (16, 32, 3), err
    assert os.stat(fresh).st_mode & 0o777 == 0o666 & ~_umask(), "a new file gets the usual permissions"


# ----------------------------------------------------------------------------- --out changing after the check
def _link_input(kind, out, image, other):
    """Make ``out`` name another file: a symbolic or hard link to the input ``image``, a symbolic link
    to ``other`` (not an input), or its folder replaced by a link to the input's folder."""
    if kind == "a symbolic link to the input":
        out.symlink_to(image)
    elif kind == "a hard link of the input":
        os.link(image, out)
    elif kind == "a symbolic link elsewhere":
        out.symlink_to(other)
    else:  # its folder, replaced by a link to the input's folder (where a file of --out's name is the input)
        out.parent.rename(out.parent.with_name("moved"))
        out.parent.symlink_to(image.parent, target_is_directory=True)


RACES = ["a symbolic link to the input", "a hard link of the input", "a symbolic link elsewhere",
         "its folder replaced by a link to the input's folder"]


@pytest.mark.parametrize("when", ["while editing", "while writing"])
@pytest.mark.parametrize("kind", RACES)
def test_an_out_that_changes_after_the_check_is_not_written(setup, capsys, monkeypatch, kind, when):
    """--out is checked before the edit and written after it: whatever it turned into meanwhile (here
    made while the stubbed edit runs, or while the image is being encoded, just before the rename),
    nothing is written through it, --overwrite or not. (This once wrote through the new link: the
    input was replaced and the command said it wrote --out.)"""
    from PIL import Image

    from dpmjax.apps import edit

    inputs = setup.folder / "inputs"
    inputs.mkdir()
    image = png(inputs / "victim.png", seed=6)
    other = png(setup.folder / "other.png", seed=7)
    (setup.folder / "sub").mkdir()
    out = setup.folder / "sub" / "victim.png" if kind.startswith("its folder") else setup.folder / "race.png"
    before = {path: path.read_bytes() for path in (image, other)}
    make = lambda: _link_input(kind, out, image, other)  # noqa: E731
    if when == "while editing":
        def edit_images(pipeline, params, images, **kwargs):
            make()
            return SimpleNamespace(images=1.0 - images, round_trip=None, converged=None, mask=None)

        monkeypatch.setattr(edit, "edit_images", edit_images)
    else:
        save = Image.Image.save

        def save_then_link(picture, fp, *args, **kwargs):
            result = save(picture, fp, *args, **kwargs)
            make()
            return result

        monkeypatch.setattr(Image.Image, "save", save_then_link)
    status, err, loaded = setup.run("--image", image, "--out", out, "--overwrite", capsys=capsys)
    line = _one_line(err)
    assert status == 2 and loaded, (status, err)
    assert line.startswith(f"dpmjax edit: error: --out {out} "), line
    assert line.endswith("(it changed after it was checked; edit never writes over an input and never follows a link "
                         "that appears later); nothing was written"), line
    if kind != "a symbolic link elsewhere":
        assert f"is now the input image {image}" in line, line
    assert {path: path.read_bytes() for path in (image, other)} == before, "no file was written over"
    assert not [p for p in setup.folder.rglob(".*.tmp")], "no temporary file left"
    if "symbolic" in kind:
        assert out.is_symlink(), "the link that appeared is left as it is"


def test_write_images_refuses_a_folder_replaced_before_the_rename(tmp_path, monkeypatch):
    """The folder --out resolves to is replaced by another folder of the same path while the image is
    encoded: the rename would land in a folder that was never checked; it is refused instead."""
    from PIL import Image

    from dpmjax.apps.images import PathChangedError, write_images

    folder = tmp_path / "out"
    folder.mkdir()
    out = folder / "grid.png"
    save = Image.Image.save

    def save_then_swap(picture, fp, *args, **kwargs):
        result = save(picture, fp, *args, **kwargs)
        folder.rename(tmp_path / "checked")
        folder.mkdir()
        return result

    monkeypatch.setattr(Image.Image, "save", save_then_swap)
    with pytest.raises(PathChangedError, match=f"is in a folder {folder} that was replaced by another"):
        write_images(str(out), [[np.zeros((4, 4, 3), np.float32)]], resolved=str(out), keep=())
    assert list(folder.iterdir()) == [] and list((tmp_path / "checked").iterdir()) == []


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ----------------------------------------------------------------------------- failed writes
@pytest.mark.parametrize("existing", [True, False])
def test_a_full_disk_leaves_the_old_out_and_no_temporary_file(setup, capsys, monkeypatch, existing):
    """The disk fills half-way through the PNG: the old file is untouched, no partial file is left
    (an in-place write would have truncated the old file, or left a new one with a few bytes)."""
    from PIL import Image

    def full_disk(image, fp, format=None, **params):
        if isinstance(fp, (str, os.PathLike)):  # what Pillow does with a path: it opens (truncates) the file
            fp = open(fp, "wb")  # noqa: SIM115
        fp.write(b"\x89PNG\r\n\x1a\n partial")
        fp.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    out = setup.folder / "out.png"
    if existing:
        png(out, seed=4)
    before = out.read_bytes() if existing else None
    listing = sorted(p.name for p in setup.folder.iterdir())
    monkeypatch.setattr(Image.Image, "save", full_disk)
    status, err, _ = setup.run("--out", out, "--overwrite", capsys=capsys)
    kept = "the existing file is unchanged" if existing else "nothing was written"
    assert status == 2
    assert _one_line(err) == f"dpmjax edit: error: --out {out}: cannot write it (no space left on device); {kept}"
    assert sorted(p.name for p in setup.folder.iterdir()) == listing, "no temporary or partial file left"
    if existing:
        assert out.read_bytes() == before


def test_a_file_size_limit_leaves_the_old_out_and_no_temporary_file(tmp_path):
    """A real failing write: the command runs under RLIMIT_FSIZE (SIGXFSZ ignored, so writes past the
    limit fail with EFBIG) with loading and editing stubbed; its 64 px output does not fit."""
    pipeline = fake_pipeline(tmp_path / "pipeline")
    image = png(tmp_path / "in.png")
    out = png(tmp_path / "out.png", size=24, seed=5)  # ~1.8 kB: below the limit, a valid PNG to keep
    before = out.read_bytes()
    args = ["edit", "--pipeline", str(pipeline), "--image", str(image), "--prompt", "a", "--target-prompt", "b",
            "--out", str(out), "--overwrite", "--size", "64"]
    script = f"""
import resource, signal, sys, types
from dpmjax.apps import cli, edit
tiny = types.SimpleNamespace(unet=types.SimpleNamespace(config=types.SimpleNamespace(sample_size=8)), vae_scale_factor=2)
edit._old_flax_stack = lambda: types.SimpleNamespace(from_pretrained=lambda folder, **kwargs: (tiny, {{}}))
edit.edit_images = lambda pipeline, params, images, **kwargs: types.SimpleNamespace(
    images=1.0 - images, round_trip=None, converged=None, mask=None)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (4000, 4000))
sys.exit(cli.main({args!r}))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False,
                          env=dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])))
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert _one_line(done.stderr) == f"dpmjax edit: error: --out {out}: cannot write it (file too large); the existing file is unchanged"
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.png", "out.png", "pipeline"]


def test_write_images_replaces_atomically_and_refuses_to_clobber(tmp_path):
    from dpmjax.apps.images import write_images

    out = tmp_path / "grid.png"
    white, black = np.ones((4, 4, 3), np.float32), np.zeros((4, 4, 3), np.float32)
    write_images(str(out), [[white, black]])
    first = out.read_bytes()
    with pytest.raises(FileExistsError):
        write_images(str(out), [[black]], overwrite=False)
    assert out.read_bytes() == first
    write_images(str(out), [[black], [white]])
    assert _read_png(out).shape == (8, 4, 3) and [p.name for p in tmp_path.iterdir()] == ["grid.png"]


# ----------------------------------------------------------------------------- options
@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "0"])
def test_guidance_must_be_finite_and_positive(setup, capsys, value):
    status, err, loaded = setup.run("--out", setup.folder / "o.png", f"--guidance={value}", capsys=capsys)
    assert status == 2 and not loaded
    assert _one_line(err) == f"dpmjax edit: error: --guidance must be a finite number > 0 (got {float(value):g})"


@pytest.mark.parametrize("train_steps, steps, ok", [
    (None, 100_000_000, False), (None, 1001, False), (None, 1000, True), (100, 101, False), (100, 100, True)])
def test_steps_are_bounded_by_the_training_timesteps_before_loading(setup, capsys, train_steps, steps, ok):
    """The sampler takes at most the scheduler's num_train_timesteps steps (1000 where its config does
    not say): more is refused from the config, not after loading the weights."""
    if train_steps is not None:
        (setup.pipeline / "scheduler" / "scheduler_config.json").write_text(json.dumps(
            {"_class_name": "FlaxDPMSolverMultistepScheduler", "num_train_timesteps": train_steps}))
    status, err, loaded = setup.run("--out", setup.folder / "o.png", "--steps", steps, capsys=capsys)
    if ok:
        assert status == 0 and loaded, err
        return
    assert status == 2 and not loaded
    assert _one_line(err) == (f"dpmjax edit: error: --steps must be at most the scheduler's {train_steps or 1000} "
                              f"training timesteps (num_train_timesteps; got {steps})")


# (a bound that is not enforced reads the image at that size: 8192 px is 0.8 GB, not the 120 GB of
# the 100000 px that once ran out of memory)
@pytest.mark.parametrize("size", [7, 6, 0, -4, 2052, 8192])
def test_a_size_off_the_grid_or_too_large_is_refused_before_loading(setup, capsys, size):
    status, err, loaded = setup.run("--out", setup.folder / "o.png", f"--size={size}", capsys=capsys)
    assert status == 2 and not loaded
    assert _one_line(err) == f"dpmjax edit: error: {SIZE_RULE} (got {size})"


@pytest.mark.parametrize("size", [4, 24, 2048])
def test_sizes_on_the_grid_are_taken(setup, capsys, size):
    status, err, loaded = setup.run("--out", setup.folder / "o.png", "--size", size, "--edited-only", capsys=capsys)
    assert status == 0 and loaded, err
    assert _read_png(setup.folder / "o.png").shape == (size, size, 3)


def test_a_size_is_bounded_even_when_the_pipeline_folder_is_broken(setup, capsys):
    (setup.pipeline / "model_index.json").write_text("[")
    status, err, _ = setup.run("--out", setup.folder / "o.png", "--size", 5000, capsys=capsys)
    assert status == 2 and "--size must be from 1 to 2048 pixels (got 5000)" in _one_line(err)


@pytest.fixture
def bounded_reads(monkeypatch):
    """``read_image`` refusing to read at more than 4096 px per side (0.2 GB of float32 RGB): a size
    bound that is not enforced fails the test instead of running out of memory."""
    from dpmjax.apps import edit

    read = edit.read_image

    def bounded(path, height, width):
        assert height * width <= 4096 ** 2, f"read at {height} x {width} pixels"
        return read(path, height, width)

    monkeypatch.setattr(edit, "read_image", bounded)


@pytest.mark.parametrize("sample_size, default", [(1_000_000, "2,000,000"), (1025, "2,050")])
def test_a_pipeline_size_beyond_the_limit_is_refused_before_reading_images(setup, capsys, bounded_reads,
                                                                           sample_size, default):
    """The pipeline's own size (its UNet's sample_size times the VAE's factor), used without --size,
    has the bound of --size (it was unbounded: 2,000,000 px images were read until killed for memory);
    a --size within the bound is taken."""
    config = json.loads((setup.pipeline / "unet" / "config.json").read_text())
    (setup.pipeline / "unet" / "config.json").write_text(json.dumps({**config, "sample_size": sample_size}))
    status, err, loaded = setup.run("--out", setup.folder / "o.png", capsys=capsys)
    assert status == 2 and not loaded and not (setup.folder / "o.png").exists()
    assert _one_line(err) == (f"dpmjax edit: error: --pipeline {setup.pipeline}: unet/config.json's sample_size "
                              f"{sample_size:,} (times the VAE's factor 2) gives a default size of {default} pixels, more "
                              "than the 2048 an image may have per side; pass a --size (a multiple of 4 from 4 to 2048)")
    status, err, loaded = setup.run("--out", setup.folder / "o.png", "--size", 16, capsys=capsys)
    assert status == 0 and loaded, err


# ----------------------------------------------------------------------------- pipeline folders
def _rewrite(name, text):
    return lambda folder: (folder / name).write_text(text)


def _remove(name):
    def remove(folder):
        import shutil

        path = folder / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return remove


def _both(first, second):
    return lambda folder: (first(folder), second(folder))


def _drop_from_index(component):
    def drop(folder):
        index = dict(TINY_INDEX)
        del index[component]
        (folder / "model_index.json").write_text(json.dumps(index))
    return drop


@pytest.mark.parametrize("damage, problem", [
    (_rewrite("model_index.json", '{"_class_name": '), "model_index.json is not valid JSON (Expecting value: line 1 column 17"),
    (_rewrite("model_index.json", "[]"), "model_index.json is not a JSON object (it holds a list)"),
    (_drop_from_index("unet"), "model_index.json names no unet"),
    (_remove("vae"), "no vae/ folder (a saved pipeline has vae/, unet/, text_encoder/, tokenizer/, scheduler/)"),
    (_rewrite("vae/config.json", "{"), "vae/config.json is not valid JSON"),
    (_rewrite("unet/config.json", "{}"), "unet/config.json has no down_block_types list"),
    (_rewrite("unet/config.json", '{"down_block_types": ["A", "B"], "sample_size": "big"}'),
     "unet/config.json has no sample_size (a positive integer; got 'big')"),
    (_remove("unet/diffusion_flax_model.msgpack"), "no Flax weights in unet/ (diffusion_flax_model.msgpack)"),
    (_rewrite("unet/diffusion_flax_model.msgpack", ""), "unet/diffusion_flax_model.msgpack is empty"),
    # configs that cannot be read or make no sense (these were tracebacks: RecursionError, OverflowError)
    (_rewrite("vae/config.json", "[" * 100_000 + "]" * 100_000), "vae/config.json is not valid JSON (nested too deeply to read)"),
    (_rewrite("model_index.json", '{"a":' * 100_000 + "1" + "}" * 100_000), "model_index.json is not valid JSON (nested too deeply to read)"),
    (_rewrite("vae/config.json", json.dumps({"block_out_channels": [1] * 5000})),
     "vae/config.json: block_out_channels has 5,000 entries, a downsampling factor of 2**4999, more than the 2048 pixels "
     "an image may have per side"),
    (_rewrite("unet/config.json", json.dumps({"down_block_types": ["D"] * 5000, "sample_size": 8})),
     "unet/config.json: down_block_types has 5,000 entries, a downsampling factor of 2**4999, more than the 2048 pixels "
     "an image may have per side"),
    (_both(_rewrite("vae/config.json", json.dumps({"block_out_channels": [1] * 7})),
           _rewrite("unet/config.json", json.dumps({"down_block_types": ["D"] * 7, "sample_size": 8}))),
     "vae/config.json and unet/config.json give a size step of 4096 pixels (the VAE's factor 64 times the UNet's 64), "
     "more than the 2048 pixels an image may have per side"),
    (_rewrite("unet/config.json", json.dumps({"down_block_types": ["D"] * 2, "sample_size": 10 ** 100})),
     "unet/config.json's sample_size about 10**100 (times the VAE's factor 2) gives a default size of about 10**100 "
     "pixels, more than the 2048"),
    (_rewrite("vae/config.json", json.dumps({"block_out_channels": [1, 2], "pad": "x" * (1 << 20)})),
     "vae/config.json is larger than the 1 MiB a config may have"),
    (_rewrite("scheduler/scheduler_config.json", "{"), "scheduler/scheduler_config.json is not valid JSON"),
    (_rewrite("scheduler/scheduler_config.json", '{"num_train_timesteps": 1000000000}'),
     "scheduler/scheduler_config.json: num_train_timesteps must be an integer from 1 to 100,000 (got 1,000,000,000)"),
    (_rewrite("scheduler/scheduler_config.json", '{"num_train_timesteps": "many"}'),
     "scheduler/scheduler_config.json: num_train_timesteps must be an integer from 1 to 100,000 (got 'many')"),
])
def test_a_broken_pipeline_folder_is_one_line_before_loading(setup, capsys, damage, problem):
    damage(setup.pipeline)
    status, err, loaded = setup.run("--out", setup.folder / "o.png", capsys=capsys)
    line = _one_line(err)
    assert status == 2 and not loaded
    assert line.startswith(f"dpmjax edit: error: --pipeline {setup.pipeline}: {problem}"), line


def test_a_config_that_is_a_named_pipe_is_not_opened(setup, capsys):
    """Opening a named pipe waits for a writer: the config is refused from its type instead (a
    watchdog writes nothing to it after 5 s, so that a reader that did open it gets an empty file
    and fails the test instead of hanging it)."""
    import threading

    fifo = setup.pipeline / "unet" / "config.json"
    fifo.unlink()
    os.mkfifo(fifo)

    def unblock():
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:  # no reader waiting
            pass

    watchdog = threading.Timer(5.0, unblock)
    watchdog.start()
    try:
        status, err, loaded = setup.run("--out", setup.folder / "o.png", capsys=capsys)
    finally:
        watchdog.cancel()
    assert status == 2 and not loaded
    assert _one_line(err) == f"dpmjax edit: error: --pipeline {setup.pipeline}: unet/config.json is not a regular file"


# ----------------------------------------------------------------------------- images
@pytest.mark.parametrize("width, height, count", [(20000, 20000, "400,000,000 pixels"),
                                                  (10000, 9000, "10000x9000 = 90,000,000 pixels")])
def test_a_huge_image_is_refused_from_its_header(setup, capsys, width, height, count):
    """Pillow's decompression-bomb limit (89,478,485 pixels): beyond twice it Pillow refuses to open the
    file, between once and twice it warns; both are one line here, before anything is decoded."""
    bomb = png_header(setup.folder / "bomb.png", width, height)
    status, err, loaded = setup.run("--image", bomb, "--out", setup.folder / "o.png", capsys=capsys)
    assert status == 2 and not loaded
    assert _one_line(err) == (f"dpmjax edit: error: --image {bomb}: {count}, more than the 89,478,485 an image may have "
                              "(PIL.Image.MAX_IMAGE_PIXELS); downscale it first")


@pytest.mark.parametrize("content, problem", [(b"hello", "not an image file Pillow can read"),
                                              ("truncated", "cannot read it (image file is truncated)")])
def test_an_unreadable_image_is_one_line_before_loading(setup, capsys, content, problem):
    bad = setup.folder / "bad.png"
    if content == "truncated":
        data = png(bad, size=64).read_bytes()
        bad.write_bytes(data[:len(data) // 2])
    else:
        bad.write_bytes(content)
    status, err, loaded = setup.run("--image", bad, "--out", setup.folder / "o.png", capsys=capsys)
    assert status == 2 and not loaded
    assert _one_line(err).startswith(f"dpmjax edit: error: --image {bad}: {problem}"), err


@pytest.mark.parametrize("kind, problem", [
    ("/dev/null", "not a regular file (a character device), not an image file"),
    ("a named pipe", "not a regular file (a named pipe), not an image file"),
    ("an empty file", "an empty file (0 bytes), not an image file"),
    ("a folder", "a folder, not an image file"),
    ("a broken link", "a symbolic link to a missing file"),
    ("a missing file", "no such image file")])
def test_an_image_that_is_no_regular_file_is_named_for_what_it_is(setup, capsys, kind, problem):
    """(/dev/null, an empty file and a folder were all reported as missing or unreadable; a named pipe
    must not be opened: reading it would wait for a writer.)"""
    path = {"/dev/null": Path("/dev/null"), "a named pipe": setup.folder / "pipe.png"}.get(kind, setup.folder / "x.png")
    if kind == "a named pipe":
        os.mkfifo(path)
    elif kind == "an empty file":
        path.write_bytes(b"")
    elif kind == "a folder":
        path.mkdir()
    elif kind == "a broken link":
        path.symlink_to(setup.folder / "gone.png")
    status, err, loaded = setup.run("--image", path, "--out", setup.folder / "o.png", capsys=capsys)
    assert status == 2 and not loaded
    assert _one_line(err) == f"dpmjax edit: error: --image {path}: {problem}"


def _ramp(tmp_path, name, values, **save):
    from PIL import Image

    path = tmp_path / name
    Image.fromarray(values).save(path, **save)
    return path


def test_a_16_bit_png_is_scaled_by_its_range_not_clipped(tmp_path):
    """A 0..65535 ramp written by Pillow as a 16-bit greyscale PNG reads as 0..1 (converting to 8-bit
    RGB first would clip everything above 255 to white)."""
    from PIL import Image

    from dpmjax.apps.images import read_image

    ramp = np.round(np.linspace(0, 65535, 64 * 64)).astype(np.uint16).reshape(64, 64)
    path = _ramp(tmp_path, "ramp16.png", ramp)
    with Image.open(path) as image:
        assert image.mode.startswith("I") and image.getextrema() == (0, 65535), "a real 16-bit PNG"
    read = read_image(str(path), 64, 64)
    assert read.shape == (64, 64, 3) and read.dtype == np.float32
    np.testing.assert_allclose(read, np.repeat((ramp / 65535.0)[..., None], 3, axis=2), atol=1e-6)
    assert np.mean(read == 1.0) <= 1 / ramp.size
    half = read_image(str(path), 32, 32)
    assert 0.0 <= half.min() and half.max() <= 1.0 and abs(float(half.mean()) - 0.5) < 0.01


def test_a_16_bit_pgm_opened_as_32_bit_is_scaled_by_its_stored_depth(tmp_path):
    from PIL import Image

    from dpmjax.apps.images import read_image

    ramp = np.round(np.linspace(0, 65535, 32 * 32)).astype(np.uint16).reshape(32, 32)
    path = _ramp(tmp_path, "ramp16.pgm", ramp)
    with Image.open(path) as image:
        assert image.mode in ("I", "I;16", "I;16B"), image.mode
    np.testing.assert_allclose(read_image(str(path), 32, 32)[..., 0], ramp / 65535.0, atol=1e-6)


def test_a_32_bit_integer_tiff_is_scaled_by_its_bit_depth(tmp_path):
    from dpmjax.apps.images import read_image

    values = np.linspace(0, 2 ** 31 - 1, 32 * 32).astype(np.int32).reshape(32, 32)
    read = read_image(str(_ramp(tmp_path, "ramp32.tif", values)), 32, 32)[..., 0]
    np.testing.assert_allclose(read, values / (2.0 ** 31 - 1), atol=1e-6)


def test_a_32_bit_integer_image_with_negative_values_is_refused_not_clipped(setup, capsys):
    """Pillow holds 32-bit integers as signed; a negative value has no place on the [0, 2**31 - 1]
    scale (it used to read as 0, silently)."""
    from dpmjax.apps.images import read_image

    values = np.linspace(-2 ** 30, 2 ** 31 - 1, 32 * 32).astype(np.int32).reshape(32, 32)
    path = _ramp(setup.folder, "signed32.tif", values)
    with pytest.raises(ValueError, match="must hold values from 0 to 2,147,483,647, this one holds values down to "
                                         "-1,073,741,824"):
        read_image(str(path), 32, 32)
    status, err, loaded = setup.run("--image", path, "--out", setup.folder / "o.png", capsys=capsys)
    assert status == 2 and not loaded and not (setup.folder / "o.png").exists()
    assert _one_line(err) == (f"dpmjax edit: error: --image {path}: cannot read it (a 32-bit integer image must hold "
                              "values from 0 to 2,147,483,647, this one holds values down to -1,073,741,824)")


def test_a_float_tiff_must_hold_unit_values(tmp_path):
    from dpmjax.apps.images import read_image

    values = np.linspace(0, 1, 32 * 32, dtype=np.float32).reshape(32, 32)
    np.testing.assert_allclose(read_image(str(_ramp(tmp_path, "unit.tif", values)), 32, 32)[..., 0], values, atol=1e-6)
    with pytest.raises(ValueError, match=r"must hold values in \[0, 1\], this one holds \[0, 255\]"):
        read_image(str(_ramp(tmp_path, "wide.tif", values * 255)), 32, 32)


@pytest.mark.parametrize("mode", ["P", "LA", "RGBA", "CMYK", "L"])
def test_8_bit_images_are_converted_to_rgb_as_before(tmp_path, mode):
    from PIL import Image

    from dpmjax.apps.images import read_image

    image = Image.open(png(tmp_path / "rgb.png")).convert(mode)
    path = tmp_path / ("x.tif" if mode == "CMYK" else "x.png")
    image.save(path)
    with Image.open(path) as saved:
        expected = np.asarray(saved.convert("RGB"), np.float32) / 255.0
    np.testing.assert_array_equal(read_image(str(path), 16, 16), expected)


# ----------------------------------------------------------------------------- help
def test_the_help_states_the_guarantees(capsys):
    from dpmjax.apps import cli

    with pytest.raises(SystemExit) as exit_:
        cli.main(["edit", "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for promise in ("it never writes over an input", "an existing --out is replaced only with --overwrite",
                    "--out is written atomically", "an existing --out is left as it was", "exit status 2",
                    "up to 2048", "PIL.Image.MAX_IMAGE_PIXELS", "16-bit greyscale is divided by 65535",
                    "--out is checked again right before it is written", "nothing is written",
                    "without --size the pipeline's own size is used, and it must be at most 2048 too",
                    "--steps from 1 to the scheduler's num_train_timesteps", "a regular, non-empty file",
                    "(negative values are refused)", "JSON objects in regular files of at most 1 MiB"):
        assert promise in text, promise

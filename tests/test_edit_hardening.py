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
        return SimpleNamespace(images=1.0 - images, round_trip=None, converged=None)

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
    images=1.0 - images, round_trip=None, converged=None)
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


# ----------------------------------------------------------------------------- pipeline folders
def _rewrite(name, text):
    return lambda folder: (folder / name).write_text(text)


def _remove(name):
    def remove(folder):
        import shutil

        path = folder / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return remove


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
])
def test_a_broken_pipeline_folder_is_one_line_before_loading(setup, capsys, damage, problem):
    damage(setup.pipeline)
    status, err, loaded = setup.run("--out", setup.folder / "o.png", capsys=capsys)
    line = _one_line(err)
    assert status == 2 and not loaded
    assert line.startswith(f"dpmjax edit: error: --pipeline {setup.pipeline}: {problem}"), line


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


@pytest.mark.parametrize("content, problem", [(b"", "not an image file Pillow can read"),
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

    values = np.linspace(-2 ** 30, 2 ** 31 - 1, 32 * 32).astype(np.int32).reshape(32, 32)
    read = read_image(str(_ramp(tmp_path, "ramp32.tif", values)), 32, 32)[..., 0]
    np.testing.assert_allclose(read, np.clip(values / (2.0 ** 31 - 1), 0, 1), atol=1e-6)


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
                    "up to 2048", "PIL.Image.MAX_IMAGE_PIXELS", "16-bit greyscale is divided by 65535"):
        assert promise in text, promise

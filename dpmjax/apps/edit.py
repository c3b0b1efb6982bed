"""``dpmjax edit``: edit images with a saved diffusers 0.39 Flax Stable Diffusion pipeline.

Encodes the images, inverts them with the source prompt (exact, plain, null-text or DiffEdit),
samples with the target prompt, decodes, and writes one PNG with a row per image (original |
edited; DiffEdit: original | mask | edited); see
:func:`dpmjax.models.flax_sd.edit.edit_images` for the library call it makes, and
:mod:`dpmjax.apps.images` for the image files it reads and writes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import stat
from typing import NamedTuple, Optional, Sequence, Tuple

import jax.numpy as jnp
import numpy as np

from ..models.flax_sd.edit import edit_images
from ..models.flax_sd.edit_methods import MAX_SEED, METHODS, DiffEditEdit, ExactEdit, edit_method
from ..models.flax_sd.requirements import old_diffusers
from ..models.flax_sd.unet import cast_floating
from ..trajectories.diffedit import DiffEdit
from ..trajectories.exact_options import ExactInversion
from . import options
from .images import PathChangedError, check_image, read_image, same_file, write_images
from .messages import fail

PROG = "dpmjax edit"
# what --out may end with (the ones this Pillow writes are accepted)
OUT_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
# the largest image size (pixels per side), --size or the pipeline's own: a 2048 px image is 16 times
# Stable Diffusion 1.x's 512 px, and the VAE's and UNet's memory grows with the pixel count (their
# attention layers with its square)
MAX_SIZE = 2048
# the largest pipeline config file read before loading (Stable Diffusion's are about 1 kB)
MAX_CONFIG_BYTES = 1 << 20
# the largest number of training timesteps a scheduler config may give (Stable Diffusion's: 1000);
# the default where its config does not say, as in diffusers
MAX_TRAIN_STEPS = 100_000
DEFAULT_TRAIN_STEPS = 1000
# --method exact's default tolerance per --dtype: the round trip (max |sample(noise) - latents| /
# max(1, max|latents|)) that counts as converged. float32: ExactInversion's default. bfloat16 (8-bit
# significand, eps = 2**-7) rounds every UNet output at ~4e-3 relative, so the sampler that the noise
# must reproduce is itself only that exact: 8 eps = 2**-4 is asked (measured: see the guide)
EXACT_TOLERANCE = {"float32": 1e-5, "bfloat16": 2.0 ** -4}
# the folders of a saved pipeline the edit loads, and the Flax weights files they must hold
COMPONENTS = ("vae", "unet", "text_encoder", "tokenizer", "scheduler")
WEIGHTS = {"vae": ("diffusion_flax_model.msgpack",), "unet": ("diffusion_flax_model.msgpack",),
           "text_encoder": ("flax_model.msgpack", "flax_model.msgpack.index.json")}

GUARANTEES = """\
what edit guarantees:
  * it never writes over an input: an --out that is any --image (the same file by another
    path, through a symbolic link or a hard link) is refused, --overwrite or not; --out is
    checked again right before it is written: if it has changed since (a link to an input
    or elsewhere appeared, a folder on the way was replaced), nothing is written;
  * an existing --out is replaced only with --overwrite (a link at --out when it is checked
    is followed: the file it points at is replaced);
  * --out is written atomically: to a temporary file in its folder, synced to disk, then
    renamed over --out; on any failure (a full disk, a file size limit) the temporary file
    is removed, an existing --out is left as it was, and one line names the file and the cause;
  * the paths, the pipeline folder's index and configs, the image headers and the options are
    checked before the pipeline is loaded or any image decoded; any problem is one line on
    stderr and exit status 2 (as is a pipeline that fails to load, an image that fails to
    decode, or a failed write).

limits:
  --size     a multiple of the pipeline's step (the VAE's downsampling times the UNet's:
             64 for Stable Diffusion 1.x and 2.x) from one step up to {max_size}; without
             --size the pipeline's own size is used, and it must be at most {max_size} too;
             memory grows with the pixel count and the number of images
  --steps    from 1 to the scheduler's num_train_timesteps (1000 for Stable Diffusion)
  --image    a regular, non-empty file of at most PIL.Image.MAX_IMAGE_PIXELS pixels
             (89,478,485 by default), checked from the header before decoding; 16-bit
             greyscale is divided by 65535, 32-bit integer greyscale by the largest value
             of its stored bit depth (negative values are refused), float greyscale must
             hold [0, 1]; other images are converted to RGB (alpha dropped)
  --guidance a finite number > 0
  --pipeline its model_index.json and vae/, unet/ and scheduler/ configs must be JSON
             objects in regular files of at most 1 MiB, with values that make sense (a
             size step of at most {max_size} pixels, at most {max_train:,} training timesteps)
"""


class Geometry(NamedTuple):
    """What a pipeline folder's configs say about image sizes and steps.

    Attributes:
        step: The image side must be a multiple of this many pixels: the VAE's downsampling
            factor times the UNet's (2 ** (number of down blocks - 1) each).
        default_size: The pipeline's own image size (UNet sample size times the VAE's factor).
        train_steps: The scheduler's ``num_train_timesteps`` (1000 where its config does not
            say): the most sampler steps the edit can take.
    """

    step: int
    default_size: int
    train_steps: int = DEFAULT_TRAIN_STEPS


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dpmjax edit", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Edit images with a saved diffusers 0.39 Flax Stable Diffusion pipeline: encode, invert with\n"
                    "the source prompt, sample with the target prompt, decode. Writes one row per image:\n"
                    "original | edited (DiffEdit: original | mask | edited).",
        epilog=GUARANTEES.format(max_size=MAX_SIZE, max_train=MAX_TRAIN_STEPS))
    parser.add_argument("--pipeline", required=True, help="folder of a FlaxStableDiffusionPipeline (save_pretrained layout)")
    parser.add_argument("--image", required=True, action="append", help="input PNG/JPEG/TIFF/... (repeat for a batch); "
                        "centre-cropped and resized to --size")
    parser.add_argument("--prompt", required=True, help="what the images show (the source prompt)")
    parser.add_argument("--target-prompt", required=True, help="what they should show")
    parser.add_argument("--out", required=True, help="output image (.png, .jpg, .webp, .bmp or .tif; its folder is created); "
                        "never an --image; an existing file only with --overwrite")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out (never an --image)")
    parser.add_argument("--method", choices=METHODS, default="exact")
    parser.add_argument("--steps", type=int, default=50, help="sampler steps, at most the scheduler's training timesteps "
                        "(default 50)")
    parser.add_argument("--guidance", type=float, default=3.0,
                        help="classifier-free guidance scale, finite and > 0 (default 3)")
    parser.add_argument("--order", type=int, choices=(1, 2, 3), default=2, help="DPM-Solver++ order (default 2)")
    parser.add_argument("--size", type=int, default=None,
                        help=f"image size in pixels (default: the pipeline's): a multiple of the pipeline's step "
                             f"(64 for Stable Diffusion), at most {MAX_SIZE}")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="weights and compute dtype")
    parser.add_argument("--edited-only", action="store_true", help="write the edited images only (no original column)")
    parser.add_argument("--tolerance", type=float, default=None,
                        help="--method exact: the round trip an image's latents must reach, relative to max(1, max|latents|) "
                             "(default: " + ", ".join(f"{tol:g} in {name}" for name, tol in EXACT_TOLERANCE.items()) + ")")
    parser.add_argument("--max-calls-per-step", type=int, default=None,
                        help="--method exact: at most this many UNet calls per sampler step (>= 2); images still open "
                             "when it runs out keep their best latents and are reported (default: no limit)")
    parser.add_argument("--strength", type=float, default=None,
                        help="--method diffedit: the fraction of the steps drawn again inside the mask, in (0, 1] "
                             f"(default {DiffEdit().strength:g})")
    parser.add_argument("--mask-threshold", type=float, default=None,
                        help="--method diffedit: the mask's clamp in units of the mean difference between the two "
                             f"prompts' predictions, > 0; lower gives a larger mask (default {DiffEdit().mask_threshold:g})")
    parser.add_argument("--seed", type=int, default=None, help="--method diffedit: the seed of the mask's noise (default 0)")
    return parser


def _exact_problems(args) -> list:
    """What is wrong with --tolerance and --max-calls-per-step (exact inversion's options)."""
    named = options.given(args, options.EXACT_OPTIONS)
    if named and args.method != "exact":
        return [options.not_yours(named, "--method exact") + f" (got --method {args.method})"]
    try:
        _exact(args)
    except ValueError as error:
        return [str(error)]
    return []


def _exact(args) -> ExactInversion:
    return options.exact_inversion(args, default_tolerance=EXACT_TOLERANCE[args.dtype])


DIFFEDIT_OPTIONS = (("--strength", "strength"), ("--mask-threshold", "mask_threshold"), ("--seed", "seed"))


def _diffedit_problems(args) -> list:
    """What is wrong with --strength, --mask-threshold and --seed (DiffEdit's options)."""
    named = options.given(args, DIFFEDIT_OPTIONS)
    if args.method != "diffedit":
        return [options.not_yours(named, "--method diffedit") + f" (got --method {args.method})"] if named else []
    if args.seed is not None and not 0 <= args.seed <= MAX_SEED:
        return [f"--seed must be an integer from 0 to {MAX_SEED} (got {args.seed})"]
    try:
        settings = _diffedit(args)
    except ValueError as error:
        return [str(error)]
    # the edit's grid ends at sigma_min with a zero-length step: DiffEdit needs two steps to span any noise
    if args.steps >= 1 and settings.steps(args.steps) < 2:
        return [f"--strength {settings.strength:g} of --steps {args.steps} runs {settings.steps(args.steps)} step(s) "
                f"(floor(steps * strength)); the edit needs at least 2 (its last step has zero length): give at least "
                f"{2 / args.steps:.3g} or more --steps"]
    return []


def _diffedit(args) -> DiffEdit:
    fields = DIFFEDIT_OPTIONS[:2]  # --seed belongs to the edit method, not to DiffEdit's settings
    return options.build(DiffEdit, fields, {field: getattr(args, field) for _, field in fields
                                            if getattr(args, field) is not None})


def _method(args):
    """The edit method's settings from --method, --dtype, --tolerance, --max-calls-per-step and
    DiffEdit's options."""
    if args.method == "diffedit":
        return DiffEditEdit(diffedit=_diffedit(args), seed=args.seed or 0)
    if args.method != "exact":
        return edit_method(args.method)
    return ExactEdit(inversion=_exact(args))


def _mask_images(mask, size: int) -> list:
    """DiffEdit's latent masks ``[B, 1, h, w]`` as ``size`` px grey images (white: drawn again)."""
    mask = np.asarray(mask, np.float32)[:, 0]
    factor = size // mask.shape[-1]
    big = np.repeat(np.repeat(mask, factor, axis=1), factor, axis=2)
    return [np.repeat(m[..., None], 3, axis=-1) for m in big]


def _advice(args) -> str:
    """What may help an image whose exact inversion missed its tolerance."""
    hints = ["more --steps", "a lower --guidance"]
    if args.max_calls_per_step is not None:
        hints.insert(0, "a larger --max-calls-per-step (the budget may have run out)")
    return ("try " + ", ".join(hints[:-1]) + " or " + hints[-1]
            + " (the exact-inversion guide: when rows come back converged=False)")


def _reason(error: BaseException) -> str:
    """The cause of an error in a few words: the system's words for an errno (``no space left on
    device``), else the first line of its message."""
    from PIL import UnidentifiedImageError

    if isinstance(error, UnidentifiedImageError):
        return "not an image file Pillow can read"
    number = getattr(error, "errno", None)
    if isinstance(error, OSError) and number:
        return os.strerror(number).lower()
    text = str(error).strip().splitlines()
    line = text[0] if text else type(error).__name__
    return line if len(line) <= 300 else line[:297] + "..."


def _out_problems(out: str, images: Sequence[str] = (), overwrite: bool = False) -> list:
    """What is wrong with ``--out`` (checked before any work): an image extension Pillow writes,
    not a folder, not any of ``images``, not an existing file unless ``overwrite``, and a folder
    that exists or can be created (the nearest existing one writable). Links are followed."""
    from PIL import Image

    Image.init()
    extension = os.path.splitext(out)[1].lower()
    writable = [e for e in OUT_EXTENSIONS if Image.registered_extensions().get(e) in Image.SAVE]
    if extension not in writable:
        found = f"unknown image extension {extension}" if extension else "no image extension"
        return [f"--out {out}: {found} (use one of {', '.join(writable)})"]
    if os.path.isdir(out):
        return [f"--out {out} is a folder, not an image file"]
    for image in images:
        if os.path.exists(image) and same_file(out, image):
            return [f"--out {out} is the input image {image} (edit never writes over an input; choose another --out)"]
    if os.path.exists(out) and not overwrite:
        return [f"--out {out} exists (pass --overwrite to replace it)"]
    folder = os.path.dirname(os.path.realpath(out))
    existing = folder
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return [f"--out {out}: its folder cannot be created ({existing} is not a folder)"]
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "is not writable" if existing == folder else f"cannot be created ({existing} is not writable)"
        return [f"--out {out}: its folder {what}"]
    return []


def _json_object(path: str) -> dict:
    """The JSON object in a file of at most :data:`MAX_CONFIG_BYTES`, or ``ValueError`` saying in a
    few words what is wrong with it."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # a named pipe would wait for a writer
            raise ValueError("is not a regular file")
        with open(path, "rb") as f:
            text = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as error:
        raise ValueError(f"cannot be read ({_reason(error)})") from None
    if len(text) > MAX_CONFIG_BYTES:
        raise ValueError(f"is larger than the {MAX_CONFIG_BYTES >> 20} MiB a config may have")
    try:
        value = json.loads(text)
    except RecursionError:
        raise ValueError("is not valid JSON (nested too deeply to read)") from None
    except ValueError as error:  # JSONDecodeError, UnicodeDecodeError, a too long integer
        raise ValueError(f"is not valid JSON ({_reason(error)})") from None
    if not isinstance(value, dict):
        raise ValueError(f"is not a JSON object (it holds a {type(value).__name__})")
    return value


def _factor(config: dict, key: str, name: str) -> int:
    """The downsampling factor of a VAE's or UNet's config: 2 ** (number of ``key`` blocks - 1), at
    most :data:`MAX_SIZE`."""
    blocks = config.get(key)
    if not isinstance(blocks, list) or not blocks:
        raise ValueError(f"{name} has no {key} list")
    if 2 ** (len(blocks) - 1) > MAX_SIZE:
        raise ValueError(f"{name}: {key} has {len(blocks):,} entries, a downsampling factor of 2**{len(blocks) - 1}, "
                         f"more than the {MAX_SIZE} pixels an image may have per side")
    return 2 ** (len(blocks) - 1)


def _train_steps(folder: str) -> int:
    """The scheduler's ``num_train_timesteps`` from ``scheduler/scheduler_config.json`` (1000 where
    the file or the key is absent, as in diffusers), or ``ValueError`` naming the file."""
    name = "scheduler/scheduler_config.json"
    path = os.path.join(folder, name)
    if not os.path.lexists(path):
        return DEFAULT_TRAIN_STEPS
    try:
        config = _json_object(path)
    except ValueError as error:
        raise ValueError(f"{name} {error}") from None
    steps = config.get("num_train_timesteps", DEFAULT_TRAIN_STEPS)
    if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= MAX_TRAIN_STEPS:
        raise ValueError(f"{name}: num_train_timesteps must be an integer from 1 to {MAX_TRAIN_STEPS:,} "
                         f"(got {_short(steps)})")
    return steps


def _short(value) -> str:
    """A config value in a message: an integer with thousands separators (``about 10**N`` from 19
    digits on), anything else as its ``repr`` cut to 60 characters."""
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}" if abs(value) < 10 ** 18 else f"{'-' if value < 0 else ''}about 10**{len(str(abs(value))) - 1}"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _pipeline_problems(folder: str, size: Optional[int] = None) -> Tuple[list, Optional[Geometry]]:
    """What is wrong with ``--pipeline`` (checked before it is loaded, from its index and configs),
    and its :class:`Geometry` when nothing is. ``size``: the ``--size`` given; without one the
    pipeline's own size must be at most :data:`MAX_SIZE`."""
    where = f"--pipeline {folder}"
    if not os.path.isfile(os.path.join(folder, "model_index.json")):
        return [f"{where}: not a saved pipeline folder (no model_index.json)"], None
    try:
        index = _json_object(os.path.join(folder, "model_index.json"))
    except ValueError as error:
        return [f"{where}: model_index.json {error}"], None
    unnamed = [c for c in COMPONENTS if not isinstance(index.get(c), list) or None in index.get(c)]
    if unnamed:
        return [f"{where}: model_index.json names no {', '.join(unnamed)} (a Stable Diffusion pipeline has "
                f"{', '.join(COMPONENTS)})"], None
    absent = [c + "/" for c in COMPONENTS if not os.path.isdir(os.path.join(folder, c))]
    if absent:
        return [f"{where}: no {', '.join(absent)} folder{'s' if len(absent) > 1 else ''} (a saved pipeline has "
                f"{', '.join(c + '/' for c in COMPONENTS)})"], None
    for component, names in WEIGHTS.items():
        found = [n for n in names if os.path.isfile(os.path.join(folder, component, n))]
        if not found:
            return [f"{where}: no Flax weights in {component}/ ({' or '.join(names)})"], None
        if os.path.getsize(os.path.join(folder, component, found[0])) == 0:
            return [f"{where}: {component}/{found[0]} is empty"], None
    try:
        name = "vae/config.json"
        vae = _json_object(os.path.join(folder, name))
        vae_factor = _factor(vae, "block_out_channels", name)
        name = "unet/config.json"
        unet = _json_object(os.path.join(folder, name))
        unet_factor = _factor(unet, "down_block_types", name)
        train_steps = _train_steps(folder)
    except ValueError as error:
        text = str(error)
        return [f"{where}: {text if text.startswith(('vae/', 'unet/', 'scheduler/')) else f'{name} {text}'}"], None
    step = vae_factor * unet_factor
    if step > MAX_SIZE:
        return [f"{where}: vae/config.json and unet/config.json give a size step of {step} pixels (the VAE's factor "
                f"{vae_factor} times the UNet's {unet_factor}), more than the {MAX_SIZE} pixels an image may have "
                "per side"], None
    sample_size = unet.get("sample_size")
    if not isinstance(sample_size, int) or isinstance(sample_size, bool) or sample_size < 1:
        return [f"{where}: unet/config.json has no sample_size (a positive integer; got {_short(sample_size)})"], None
    default_size = sample_size * vae_factor
    if size is None and default_size > MAX_SIZE:
        top = MAX_SIZE // step * step
        return [f"{where}: unet/config.json's sample_size {_short(sample_size)} (times the VAE's factor {vae_factor}) "
                f"gives a default size of {_short(default_size)} pixels, more than the {MAX_SIZE} an image may have per "
                f"side; pass a --size (a multiple of {step} from {step} to {top})"], None
    return [], Geometry(step=step, default_size=default_size, train_steps=train_steps)


def _size_problems(size: Optional[int], geometry: Optional[Geometry]) -> list:
    """What is wrong with ``--size``: a multiple of the pipeline's step, from one step to
    :data:`MAX_SIZE` (the pipeline's own size, used without ``--size``, is checked with the
    pipeline: :func:`_pipeline_problems`)."""
    if size is None:
        return []
    if geometry is None:  # the pipeline folder is reported; check the bounds alone
        return [] if 1 <= size <= MAX_SIZE else [f"--size must be from 1 to {MAX_SIZE} pixels (got {size})"]
    step = geometry.step
    top = MAX_SIZE // step * step
    if size < step or size > top or size % step:
        return [f"--size must be a multiple of {step} from {step} to {top} pixels for this pipeline (got {size})"]
    return []


def _not_a_file(path: str) -> Optional[str]:
    """Why ``path`` is no image file to read, in a few words (``None`` when it is a regular,
    non-empty file): missing, a folder, a device or other special file, empty."""
    try:
        info = os.stat(path)
    except OSError as error:
        if os.path.islink(path):
            return "a symbolic link to a missing file"
        return "no such image file" if isinstance(error, FileNotFoundError) else f"cannot be read ({_reason(error)})"
    if stat.S_ISDIR(info.st_mode):
        return "a folder, not an image file"
    if not stat.S_ISREG(info.st_mode):
        kinds = ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a named pipe"),
                 (stat.S_ISSOCK, "a socket"))
        kind = next((name for test, name in kinds if test(info.st_mode)), "a special file")
        return f"not a regular file ({kind}), not an image file"
    if info.st_size == 0:
        return "an empty file (0 bytes), not an image file"
    return None


def _image_problems(paths: Sequence[str]) -> list:
    """What is wrong with the ``--image`` files, from their headers (the pixels are not decoded)."""
    problems = []
    for path in paths:
        what = _not_a_file(path)
        if what:
            problems.append(f"--image {path}: {what}")
            continue
        try:
            check_image(path)
        except (OSError, ValueError) as error:
            problems.append(f"--image {path}: {_reason(error)}")
    return problems


def _weights_problem(folder: str) -> Optional[str]:
    """Which Flax weights file of a pipeline that failed to load is unreadable, if one is (read
    only after a failure: the files can be gigabytes)."""
    try:
        from flax.serialization import msgpack_restore
    except Exception:  # noqa: BLE001 - flax missing: the load error says so
        return None
    for component, names in WEIGHTS.items():
        path = os.path.join(folder, component, names[0])
        if not os.path.isfile(path):
            continue
        try:
            with open(path, "rb") as f:
                msgpack_restore(f.read())
        except Exception as error:  # noqa: BLE001 - truncated, corrupt, unreadable
            return f"{component}/{names[0]} is not a readable Flax weights file ({_reason(error)})"
    return None


def _old_flax_stack():
    """``FlaxStableDiffusionPipeline`` of diffusers < 0.40 (with transformers < 5), or an ImportError
    saying what is missing and what to install (:func:`dpmjax.models.flax_sd.requirements.old_diffusers`)."""
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    return old_diffusers(transformers=True).FlaxStableDiffusionPipeline


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``dpmjax edit`` (options and guarantees: ``dpmjax edit --help``).

    Encodes the images, inverts them with the source prompt, samples with the target prompt,
    decodes, and writes one image with one row per image (original | edited), atomically, never
    over an input and over an existing file only with ``--overwrite``.

    Args:
        argv: The command-line arguments; ``None`` (default) reads ``sys.argv``.

    Returns:
        The exit status: 0 on success; 2, with one line on stderr naming the option and what is
        wrong, when the pipeline folder is missing, incomplete or fails to load (a corrupt
        ``model_index.json`` or config, one that makes no sense, a missing component folder,
        unreadable weights), an image is missing, no regular non-empty file, unreadable or larger
        than ``PIL.Image.MAX_IMAGE_PIXELS``, ``--out`` is no image path that can be written (or
        is an input, or exists without ``--overwrite``), ``--steps`` / ``--guidance`` /
        ``--size`` (or the pipeline's own size, without ``--size``) is out of range, diffusers <
        0.40 / transformers < 5 are missing, ``--out`` changed after it was checked (nothing is
        written), or the output cannot be written (e.g. a full disk; any existing ``--out`` is
        left as it was).
    """
    args = _parser().parse_args(argv)
    problems, geometry = _pipeline_problems(args.pipeline, args.size)
    problems += _image_problems(args.image)
    resolved_out = os.path.realpath(args.out)  # what --out is when checked: the write refuses any other
    problems += _out_problems(args.out, args.image, overwrite=args.overwrite)
    if args.steps < 1:
        problems.append(f"--steps must be >= 1 (got {args.steps})")
    elif geometry is not None and args.steps > geometry.train_steps:
        problems.append(f"--steps must be at most the scheduler's {geometry.train_steps} training timesteps "
                        f"(num_train_timesteps; got {args.steps})")
    if not (math.isfinite(args.guidance) and args.guidance > 0):
        problems.append(f"--guidance must be a finite number > 0 (got {args.guidance:g})")
    problems += _exact_problems(args)
    problems += _diffedit_problems(args)
    problems += _size_problems(args.size, geometry)
    if problems:
        return fail(PROG, "; ".join(problems))
    size = args.size or geometry.default_size
    images = []
    for path in args.image:
        try:
            images.append(read_image(path, size, size))
        except (OSError, ValueError) as error:
            return fail(PROG, f"--image {path}: cannot read it ({_reason(error)})")
    images = np.stack(images)
    try:
        Pipeline = _old_flax_stack()
    except ImportError as error:
        return fail(PROG, str(error))
    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    try:
        pipeline, params = Pipeline.from_pretrained(args.pipeline, dtype=dtype, safety_checker=None, feature_extractor=None)
    except Exception as error:  # noqa: BLE001 - whatever the loaders raise, one line naming the folder
        cause = _weights_problem(args.pipeline) or f"cannot load it ({type(error).__name__}: {_reason(error)})"
        return fail(PROG, f"--pipeline {args.pipeline}: {cause}")
    if dtype != jnp.float32:
        params = {k: cast_floating(v, dtype) if k in ("unet", "vae", "text_encoder") else v for k, v in params.items()}
    result = edit_images(pipeline, params, images, source_prompt=args.prompt, target_prompt=args.target_prompt,
                         method=_method(args), num_inference_steps=args.steps, guidance_scale=args.guidance,
                         scheduler_config={"solver_order": args.order}, progress=True)
    masks = [None] * len(images) if result.mask is None else _mask_images(result.mask, size)
    rows = [[edited] if args.edited_only else [original] + ([] if mask is None else [mask]) + [edited]
            for original, mask, edited in zip(images, masks, result.images)]
    existed = os.path.exists(args.out)
    try:
        write_images(args.out, rows, overwrite=args.overwrite, resolved=resolved_out, keep=args.image)
    except PathChangedError as error:
        return fail(PROG, f"--out {args.out} {error} (it changed after it was checked; edit never writes over an "
                          "input and never follows a link that appears later); nothing was written")
    except FileExistsError:
        return fail(PROG, f"--out {args.out} appeared while editing (pass --overwrite to replace it); nothing was written")
    except OSError as error:
        kept = "the existing file is unchanged" if existed else "nothing was written"
        return fail(PROG, f"--out {args.out}: cannot write it ({_reason(error)}); {kept}")
    for i, path in enumerate(args.image):
        line = f"{path}: edited"
        if result.mask is not None:
            line += f", mask {float(np.mean(np.asarray(result.mask[i]))):.0%} of the image"
        if result.round_trip is not None:
            line += (f", exact inversion round trip {float(result.round_trip[i]):.1e} "
                     f"({'converged' if bool(result.converged[i]) else 'NOT converged: ' + _advice(args)})")
        print(line)
    columns = "edited" if args.edited_only else "original | mask | edited" if result.mask is not None else "original | edited"
    print(f"wrote {args.out} ({len(rows)} row(s): {columns})")
    return 0

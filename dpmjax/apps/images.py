"""Image files for ``dpmjax edit`` (Pillow): :func:`check_image` reads a header before any work,
:func:`read_image` reads an image as ``[H, W, 3]`` floats in [0, 1] (centre-cropped and resized, scaled
by the range of the file's own type), :func:`write_images` writes a grid of images atomically.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import stat
import tempfile
import warnings
from typing import Sequence

import numpy as np

# Pillow modes read at more than 8 bits: scaled by their own range, not clipped to 0-255 (see read_image)
_WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def _open_image(path: str):
    """The image opened by Pillow (its header read, its pixels not decoded yet), or an error:
    ``OSError`` when Pillow cannot read it, ``ValueError`` when it has more pixels than
    ``PIL.Image.MAX_IMAGE_PIXELS`` (Pillow's decompression-bomb limit, 89,478,485 by default; ``None``
    lifts it) or none."""
    from PIL import Image

    limit = Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # checked below, with the size
        try:
            image = Image.open(path)
        except Image.DecompressionBombError as error:  # more than twice the limit: Pillow refuses it
            found = re.search(r"\((\d+) pixels\)", str(error))
            count = f"{int(found.group(1)):,} pixels" if found else "too many pixels"
            raise ValueError(f"{count}, more than the {limit:,} an image may have "
                             "(PIL.Image.MAX_IMAGE_PIXELS); downscale it first") from None
    width, height = image.size
    if limit is not None and width * height > limit:
        image.close()
        raise ValueError(f"{width}x{height} = {width * height:,} pixels, more than the {limit:,} an image may have "
                         "(PIL.Image.MAX_IMAGE_PIXELS); downscale it first")
    if width < 1 or height < 1:
        image.close()
        raise ValueError(f"it has no pixels ({width}x{height})")
    return image


def check_image(path: str) -> tuple:
    """``(width, height)`` of an image file, read from its header without decoding its pixels:
    whether :func:`read_image` can take it, checked before any work.

    Args:
        path: The image file.

    Returns:
        ``(width, height)`` in pixels.

    Raises:
        OSError: The file cannot be read, or is no image Pillow reads.
        ValueError: The image has more pixels than ``PIL.Image.MAX_IMAGE_PIXELS`` (Pillow's
            decompression-bomb limit: 89,478,485 by default, ``None`` lifts it), or none.
    """
    with _open_image(path) as image:
        return image.size


def _stored_bits(image) -> int:
    """Bits per value a mode ``I`` image was stored with, from the raw mode of its first tile
    (``I;16B`` from a 16-bit PNG or PGM: 16); 32 when the file does not say."""
    for tile in getattr(image, "tile", None) or ():
        args = tile[3]
        rawmode = args[0] if isinstance(args, tuple) and args else args
        found = re.match(r"I;(\d+)", rawmode) if isinstance(rawmode, str) else None
        if found and 1 <= int(found.group(1)) <= 32:
            return int(found.group(1))
        break
    return 32


def _wide_grey(image, bits: int) -> np.ndarray:
    """``[H, W]`` float32 in [0, 1] of a 16-bit, 32-bit integer or float greyscale image."""
    values = np.asarray(image)
    if image.mode.startswith("I;16"):
        return (values.astype(np.float32) / 65535.0).astype(np.float32)
    if image.mode == "I":
        top = 2.0 ** 31 - 1 if bits >= 32 else 2.0 ** bits - 1
        return np.clip(values.astype(np.float64) / top, 0.0, 1.0).astype(np.float32)
    values = values.astype(np.float32)  # "F"
    if values.size and not np.all(np.isfinite(values)):
        raise ValueError("a float image with values that are not finite (NaN or infinity)")
    low, high = (float(np.min(values)), float(np.max(values))) if values.size else (0.0, 0.0)
    if low < -1e-3 or high > 1 + 1e-3:
        raise ValueError(f"a float image must hold values in [0, 1], this one holds [{low:.4g}, {high:.4g}]")
    return np.clip(values, 0.0, 1.0)


def read_image(path: str, height: int, width: int) -> np.ndarray:
    """``[height, width, 3]`` float32 in [0, 1]: the image centre-cropped to the aspect ratio and resized.

    The size is checked from the header before the pixels are decoded (see :func:`check_image`).
    Values are scaled by the range of the file's own type:

    * 8-bit images, whatever their layout (greyscale, palette, greyscale or RGB with alpha, CMYK,
      ...), are converted to RGB by Pillow (alpha is dropped) and divided by 255; 16-bit RGB(A)
      PNGs are read by Pillow at 8 bits per channel;
    * 16-bit greyscale (Pillow modes ``I;16``, ``I;16B``, ...) is divided by 65535;
    * 32-bit integer greyscale (mode ``I``) is divided by the largest value of the bit depth it
      was stored with: 65535 when the file holds 16-bit values (16-bit PNG, PGM or TIFF opened as
      ``I``), ``2**31 - 1`` for 32-bit values (Pillow holds them as signed integers); negative values
      read as 0;
    * float greyscale (mode ``F``, e.g. a float TIFF) must hold values in [0, 1] and is taken as
      it is (anything else is refused, not clipped).

    Greyscale images become grey RGB. 16-bit, integer and float images are resized at float
    precision.

    Args:
        path: The image file (PNG, JPEG, TIFF, ... : what Pillow reads).
        height: The height of the result in pixels.
        width: The width of the result in pixels.

    Returns:
        ``[height, width, 3]`` float32 in [0, 1].

    Raises:
        OSError: The file cannot be read or decoded as an image.
        ValueError: The image has more pixels than ``PIL.Image.MAX_IMAGE_PIXELS`` or none, or
            is a float image with values outside [0, 1].
    """
    from PIL import Image

    with _open_image(path) as opened:
        if opened.mode in _WIDE_MODES:
            image = Image.fromarray(_wide_grey(opened, _stored_bits(opened)))  # mode F
        else:
            image = opened.convert("RGB")
        w, h = image.size
        scale = min(w / width, h / height)
        cw, ch = max(1, round(width * scale)), max(1, round(height * scale))
        left, top = (w - cw) // 2, (h - ch) // 2
        image = image.crop((left, top, left + cw, top + ch)).resize((width, height), Image.Resampling.LANCZOS)
        if image.mode == "F":  # LANCZOS overshoots a little at edges
            grey = np.clip(np.asarray(image, np.float32), 0.0, 1.0)
            return np.repeat(grey[:, :, None], 3, axis=2)
        return np.asarray(image, np.float32) / 255.0


def _new_file_mode(path: str) -> int:
    """The permission bits the written file gets: those of the file it replaces, else what a new
    file gets under the process's umask."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        mask = os.umask(0)
        os.umask(mask)
        return 0o666 & ~mask


def _sync_folder(folder: str) -> None:
    """Flush a folder's entries to disk (where the file system can; some cannot sync a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_images(path: str, rows: Sequence[Sequence[np.ndarray]], *, overwrite: bool = True) -> None:
    """One image file: each row the given images ([H, W, 3] in [0, 1]) side by side; written atomically.

    The image is written to a temporary file in the destination's folder, flushed and synced to
    disk, then renamed over ``path`` (and the folder synced): ``path`` holds either its old
    content or the whole new image, never a part. On any failure (a full disk, a file size limit,
    ...) the temporary file is removed and an existing ``path`` is left as it was. A symbolic link
    at ``path`` is followed: the file it points at is replaced, the link kept.

    Args:
        path: The file to write (its extension picks the format: .png, .jpg, .webp, .bmp, .tif,
            ...); its folder is created if missing.
        rows: The rows of the grid, each a sequence of ``[H, W, 3]`` images in [0, 1] (values
            outside are clipped).
        overwrite: Replace an existing ``path`` (default); ``False`` raises ``FileExistsError``
            instead, also when the file appears while this writes.

    Raises:
        ValueError: ``path`` has no extension Pillow writes.
        FileExistsError: ``path`` exists and ``overwrite`` is False.
        OSError: The file cannot be written (the error of the write, the sync or the rename).
    """
    from PIL import Image

    Image.init()
    extension = os.path.splitext(path)[1].lower()
    image_format = Image.registered_extensions().get(extension)
    if image_format is None or image_format not in Image.SAVE:
        raise ValueError(f"cannot write {path}: no image format Pillow writes has the extension {extension!r}.")
    grid = np.concatenate([np.concatenate(list(row), axis=1) for row in rows], axis=0)
    picture = Image.fromarray(np.round(np.clip(grid, 0, 1) * 255).astype(np.uint8))
    target = os.path.realpath(path)
    folder = os.path.dirname(target)
    os.makedirs(folder, exist_ok=True)
    if not overwrite and os.path.lexists(target):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), path)
    mode = _new_file_mode(target)
    fd, temp = tempfile.mkstemp(prefix=f".{os.path.basename(target)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            if hasattr(os, "fchmod"):  # POSIX: the permissions of the file it replaces (mkstemp's are 0600)
                os.fchmod(f.fileno(), mode)
            picture.save(f, format=image_format)
            f.flush()
            os.fsync(f.fileno())
        if overwrite:
            os.replace(temp, target)
        else:
            _place_new(temp, target, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    _sync_folder(folder)


def _place_new(temp: str, target: str, path: str) -> None:
    """Rename ``temp`` to ``target`` unless ``target`` exists (then ``FileExistsError``): a hard link,
    which fails if the name is taken, where the file system has them."""
    try:
        os.link(temp, target)
    except FileExistsError:
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), path) from None
    except OSError:  # no hard links on this file system: check, then rename
        if os.path.lexists(target):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), path) from None
        os.replace(temp, target)
        return
    os.unlink(temp)

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
from typing import Optional, Sequence

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
        low = int(np.min(values)) if values.size else 0
        if low < 0:
            raise ValueError(f"a 32-bit integer image must hold values from 0 to 2,147,483,647, "
                             f"this one holds values down to {low:,}")
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
      ``I``), ``2**31 - 1`` for 32-bit values (Pillow holds them as signed integers); an image with
      negative values is refused (not clipped);
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
        ValueError: The image has more pixels than ``PIL.Image.MAX_IMAGE_PIXELS`` or none, is a
            float image with values outside [0, 1], or a 32-bit integer image with negative values.
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


class PathChangedError(Exception):
    """The path :func:`write_images` was to write changed after it was checked: it now resolves
    elsewhere (a symbolic link appeared, or a folder on the way was replaced), or it is now one of
    the files it must not replace. Nothing was written; the message says what it is now."""


def same_file(a: str, b: str) -> bool:
    """Whether two paths name the same file: the same path with symbolic links followed, or the same
    file on disk (a hard link, another spelling on a case-insensitive file system)."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _check_target(path: str, target: str, keep: Sequence[str]) -> None:
    """Raise :class:`PathChangedError` unless ``path`` still resolves to ``target`` and ``target``
    is none of the files in ``keep``."""
    now = os.path.realpath(path)
    for other in keep:
        if same_file(now, other):
            raise PathChangedError(f"is now the input image {other}")
    if now != target:
        raise PathChangedError(f"now resolves to {now}, not to {target}")


def write_images(path: str, rows: Sequence[Sequence[np.ndarray]], *, overwrite: bool = True,
                 resolved: Optional[str] = None, keep: Sequence[str] = ()) -> None:
    """One image file: each row the given images ([H, W, 3] in [0, 1]) side by side; written atomically.

    The image is written to a temporary file in the destination's folder, flushed and synced to
    disk, then renamed over ``path`` (and the folder synced): ``path`` holds either its old
    content or the whole new image, never a part. On any failure (a full disk, a file size limit,
    ...) the temporary file is removed and an existing ``path`` is left as it was. A symbolic link
    at ``path`` is followed: the file it points at is replaced, the link kept.

    ``resolved`` and ``keep`` guard against ``path`` changing after a caller checked it: ``path``
    must still resolve (symbolic links followed) to ``resolved``, and name none of the files in
    ``keep``; both are checked when the write starts and again right before the rename, which goes
    into the folder checked (held open) and replaces the name itself, never following a link that
    appears there later.

    Args:
        path: The file to write (its extension picks the format: .png, .jpg, .webp, .bmp, .tif,
            ...); its folder is created if missing.
        rows: The rows of the grid, each a sequence of ``[H, W, 3]`` images in [0, 1] (values
            outside are clipped).
        overwrite: Replace an existing ``path`` (default); ``False`` raises ``FileExistsError``
            instead, also when the file appears while this writes.
        resolved: What ``path`` resolved to (``os.path.realpath``) when it was checked; ``None``
            (default): what it resolves to when the write starts.
        keep: Files never to replace (e.g. the inputs the image was made from).

    Raises:
        ValueError: ``path`` has no extension Pillow writes.
        FileExistsError: ``path`` exists and ``overwrite`` is False.
        PathChangedError: ``path`` no longer resolves to ``resolved``, or is now one of ``keep``.
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
    target = os.path.realpath(path) if resolved is None else resolved
    _check_target(path, target, keep)
    folder, name = os.path.split(target)
    os.makedirs(folder, exist_ok=True)
    if not overwrite and os.path.lexists(target):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), path)
    mode = _new_file_mode(target)
    with _open_folder(folder) as folder_fd:
        fd, temp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
        try:
            with os.fdopen(fd, "wb") as f:
                if hasattr(os, "fchmod"):  # POSIX: the permissions of the file it replaces (mkstemp's are 0600)
                    os.fchmod(f.fileno(), mode)
                picture.save(f, format=image_format)
                f.flush()
                os.fsync(f.fileno())
            _check_target(path, target, keep)
            if folder_fd is not None and os.path.samestat(os.fstat(folder_fd), os.stat(folder)):
                # names inside the folder checked: a folder swapped in since is not written into
                # (the temporary file, made by name, is then not found there), and a link now at
                # `name` is replaced, not followed
                where = {"src_dir_fd": folder_fd, "dst_dir_fd": folder_fd}
                temp_name = os.path.basename(temp)
            elif folder_fd is not None:
                raise PathChangedError(f"is in a folder {folder} that was replaced by another")
            else:
                where, temp_name, name = {}, temp, target
            if overwrite:
                os.replace(temp_name, name, **where)
            else:
                _place_new(temp_name, name, path=path, where=where)
        except BaseException:
            with contextlib.suppress(OSError):  # in the folder held open, wherever it is now
                os.unlink(temp if folder_fd is None else os.path.basename(temp), dir_fd=folder_fd)
            raise
    _sync_folder(folder)


@contextlib.contextmanager
def _open_folder(folder: str):
    """A file descriptor of ``folder`` where renames can be made relative to one (POSIX), else ``None``."""
    if os.rename not in os.supports_dir_fd or not hasattr(os, "O_DIRECTORY"):
        yield None
        return
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield fd
    finally:
        os.close(fd)


def _place_new(temp: str, target: str, *, path: str, where: dict) -> None:
    """Rename ``temp`` to ``target`` unless ``target`` exists (then ``FileExistsError``): a hard link,
    which fails if the name is taken, where the file system has them. ``where``: the folder
    descriptors both names are relative to (``src_dir_fd``, ``dst_dir_fd``), or none."""
    folder_fd = where.get("dst_dir_fd")
    try:
        os.link(temp, target, **where)
    except FileExistsError:
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), path) from None
    except OSError:  # no hard links on this file system: check, then rename
        exists = os.path.lexists(target) if folder_fd is None else _exists_in(folder_fd, target)
        if exists:
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), path) from None
        os.replace(temp, target, **where)
        return
    os.unlink(temp, dir_fd=folder_fd)


def _exists_in(folder_fd: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=folder_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True

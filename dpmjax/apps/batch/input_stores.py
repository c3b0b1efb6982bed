"""Where the batch job reads its latents: established array stores, no format of our own.

* a folder of ``.npy`` shards, each one chunk ``[rows, *row_shape]`` — every ``*.npy`` of the folder
  sorted by name, or exactly the files listed in ``manifest.json`` (``{"shards": [...],
  "row_shape": [...]}``; paths relative to the folder, subfolders kept, none leaving it);
* a zarr array (v2 ``.zarray`` or v3 ``zarr.json``, read with tensorstore) ``[rows, *row_shape]``,
  cut into chunks of the array's own chunk length along the rows (its unit of I/O), named
  ``rows-BEGIN-END.npy`` after the half-open row range. A chunk file that is missing is reported
  (its rows would read as the fill value) unless ``fill_value_is_data``.

Every shard is read through its resolved path (symlinks followed), which must stay inside the
input folder: a symlink or manifest entry that leads elsewhere is refused before anything is
written, and checked again as the shard is read. A chunk is read whole, so its size is checked
against the host's memory (from the ``.npy`` header or the zarr metadata) before it is read.

A store lists its chunk names in job order, their shapes from metadata alone (no data read), a
fingerprint of each chunk's stored bytes (to recognise the same input on a resume), and reads one
chunk, raising :class:`ChunkError` for a chunk that cannot be used. Stores are only ever read.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import stat
from collections import Counter
from itertools import product
from pathlib import Path, PurePosixPath
from typing import Optional

import numpy as np

from ..messages import first_line, shown
from .memory import array_bytes, host_memory, in_words

NPY_MAGIC = b"\x93NUMPY"
WHOLE_FILE_HASH_BYTES = 1 << 20  # files up to this size are hashed whole; larger ones by their first and last MiB
FLOAT32_MAX = float(np.finfo(np.float32).max)
# a chunk is read whole, copied to float32 and its noise gathered beside it: about this many float32
# copies of it are in host memory at once (with ``copies_per_row`` more for a saved trajectory)
CHUNK_COPIES = 3


class ChunkError(ValueError):
    """A chunk that cannot be inverted (unreadable, wrong shape, non-finite input or output)."""


def read_json(path: Path, what: str):
    """The JSON in ``path``; a file that is not JSON is a ``ValueError`` naming it."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise ValueError(f"{what} {path} cannot be read as JSON ({type(error).__name__}: {error}).") from None


def resolved(path: Path, what: str) -> Path:
    """``path`` with every symlink followed; a symlink loop is a ``ValueError`` naming ``what``."""
    try:
        return Path(path).resolve()
    except (RuntimeError, OSError) as error:  # RuntimeError: Python < 3.13's "Symlink loop"
        raise ValueError(f"{what} {shown(str(path))} cannot be resolved: it is a symlink loop or leads through one "
                         f"({first_line(error)}).") from None


def inside(path: Path, root: Path) -> bool:
    """Whether the resolved ``path`` is the resolved ``root`` or lies below it (a loop is outside)."""
    try:
        target = Path(path).resolve()
    except (RuntimeError, OSError):
        return False
    return target == root or target.is_relative_to(root)


def _not_regular(mode: int) -> str:
    """Why a file of ``mode`` is not read (a FIFO would block the job until someone writes it)."""
    kind = ("a folder" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
            else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a regular file")
    return f"not a regular file ({kind}): only regular .npy files are read"


def regular(path: Path) -> bool:
    """Whether ``path`` (symlinks followed) is a regular file: the only kind a shard is read from."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except (OSError, ValueError):
        return False


def check_chunk_memory(shape: tuple, itemsize: int, copies: int = CHUNK_COPIES) -> None:
    """A chunk of ``shape`` (stored with ``itemsize`` bytes per value) is read whole and held as
    about ``copies`` float32 copies: refuse it (:class:`ChunkError`) when that needs more than half
    of the host's memory, before any of it is read."""
    limit = host_memory()
    if limit is None or len(shape) < 1:
        return
    need = array_bytes(shape, itemsize) + copies * array_bytes(shape, 4)
    if need > limit // 2:
        raise ChunkError(f"shape {tuple(shape)} is too large to read whole: about {in_words(need)} of host memory "
                         f"(the chunk and {copies} float32 copies), more than half of this machine's "
                         f"{in_words(limit)}; cut it into smaller shards")


def file_fingerprint(path: Path) -> dict:
    """``{"size", "sha256"}`` of a file's bytes: the whole file up to :data:`WHOLE_FILE_HASH_BYTES`,
    else its size with its first and last MiB (``"hashed": "ends"``). An unreadable file gets
    ``{"error": ...}`` (it is quarantined when its turn comes)."""
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):
            return {"error": _not_regular(info.st_mode)}
        size = info.st_size
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            if size <= WHOLE_FILE_HASH_BYTES:
                digest.update(f.read())
                return {"size": size, "sha256": digest.hexdigest()}
            digest.update(f.read(WHOLE_FILE_HASH_BYTES))
            f.seek(size - WHOLE_FILE_HASH_BYTES)
            digest.update(f.read(WHOLE_FILE_HASH_BYTES))
        return {"size": size, "sha256": digest.hexdigest(), "hashed": "ends"}
    except OSError as error:
        return {"error": f"{type(error).__name__}: {error.strerror or error}"}


def checked(x: np.ndarray, row_shape: Optional[tuple]) -> np.ndarray:
    """``x`` as float32 once it is ``[rows, *row_shape]`` with at least one row, floating point,
    finite and within float32's range."""
    if x.ndim >= 2 and x.shape[0] > 0 and x.size == 0:
        raise ChunkError(f"rows of shape {tuple(x.shape[1:])} hold no values: nothing to invert")
    if x.ndim < 2 or (row_shape is not None and tuple(x.shape[1:]) != tuple(row_shape)):
        raise ChunkError(f"shape {tuple(x.shape)} is not [rows, *{list(row_shape) if row_shape else 'row_shape'}]")
    if x.shape[0] == 0:
        raise ChunkError(f"no rows (shape {tuple(x.shape)}): nothing to invert")
    if not np.issubdtype(x.dtype, np.floating):
        raise ChunkError(f"dtype {x.dtype} is not floating point")
    if not np.all(np.isfinite(x)):
        raise ChunkError(f"{int(np.sum(~np.isfinite(x)))} non-finite input values")
    too_large = np.abs(x) > FLOAT32_MAX if float(np.finfo(x.dtype).max) > FLOAT32_MAX else None  # float16 cannot overflow
    if too_large is not None and np.any(too_large):
        raise ChunkError(f"{int(np.sum(too_large))} {x.dtype} values overflow float32, the precision the job computes in "
                         f"(largest magnitude {float(np.max(np.abs(x))):.3g})")
    return x.astype(np.float32)


def shard_name(entry, manifest: Path) -> str:
    """A manifest entry as a normalised path relative to the input folder (``a/./b.npy`` ->
    ``a/b.npy``); absolute paths, ``..`` and names that are not ``.npy`` files are refused."""
    if not isinstance(entry, str) or not entry.strip():
        raise ValueError(f"input manifest {manifest} lists {entry!r} as a shard: each shard must be a file name.")
    if "\x00" in entry:
        raise ValueError(f"input manifest {manifest} lists {entry!r}, which holds a NUL byte: no file can have that name.")
    path = PurePosixPath(entry)
    if path.is_absolute() or ".." in path.parts:
        raise ValueError(f"input manifest {manifest} lists {entry!r}, which leaves the input folder: "
                         f"shards are named relative to it, without '..'.")
    if not path.name.endswith(".npy") or path.name == ".npy":
        raise ValueError(f"input manifest {manifest} lists {entry!r}, which is not a .npy file name.")
    return str(path)


def manifest_row_shape(value, manifest: Path) -> Optional[tuple]:
    """The manifest's ``row_shape`` (a list of positive integers, or absent/null)."""
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in value):
        raise ValueError(f"input manifest {manifest} has row_shape {value!r}: it must be a list of positive integers.")
    return tuple(value)


class NpyShards:
    """A folder of ``.npy`` shards (optionally listed by ``manifest.json``)."""

    def __init__(self, folder: Path, copies: int = CHUNK_COPIES):
        self.folder = Path(folder)
        self.real = resolved(self.folder, "input")
        self.copies = copies
        manifest = self.folder / "manifest.json"
        if manifest.exists():
            self.names, self.row_shape = self._from_manifest(manifest)
        else:
            self.names = sorted(p.name for p in self.folder.glob("*.npy"))
            self.row_shape = None
            if not self.names:
                raise ValueError(f"input {self.folder} has no manifest.json, no .npy files and is no zarr array.")
        self._check_inside()

    def _check_inside(self) -> None:
        """Every shard, its symlinks followed, must lie inside the input folder (a missing shard
        is reported when its turn comes)."""
        leaving = [name for name in self.names
                   if os.path.exists(self.folder / name) and not inside(self.folder / name, self.real)]
        if leaving:
            more = f" (and {len(leaving) - 1} more shards)" if len(leaving) > 1 else ""
            raise ValueError(f"input shard {shown(leaving[0])} leads outside the input folder {shown(str(self.folder))} "
                             f"(through a symlink, to {shown(str(resolved(self.folder / leaving[0], 'input shard')))}){more}: "
                             f"the job reads only files inside its input; copy the shard in or list files inside it.")

    @staticmethod
    def _from_manifest(manifest: Path) -> tuple:
        """``(names, row_shape)`` from ``manifest.json``, every entry checked."""
        meta = read_json(manifest, "input manifest")
        shards = meta.get("shards") if isinstance(meta, dict) else None
        if not isinstance(shards, list) or not shards:
            raise ValueError(f'input manifest {manifest} must be a JSON object listing its shards as "shards": '
                             f'["NAME.npy", ...], got {json.dumps(meta)[:80]}.')
        names = [shard_name(entry, manifest) for entry in shards]
        repeated = sorted(name for name, count in Counter(names).items() if count > 1)
        if repeated:
            raise ValueError(f"input manifest {manifest} lists {repeated[0]!r} more than once.")
        listed = set(names)
        for name in names:
            folder = next((str(p) for p in PurePosixPath(name).parents if str(p) in listed), None)
            if folder is not None:
                raise ValueError(f"input manifest {manifest} lists both {folder!r} and {name!r}: "
                                 f"a shard cannot also be the folder of another.")
        return names, manifest_row_shape(meta.get("row_shape"), manifest)

    def describe(self) -> dict:
        """What identifies the store as a whole (its kind and folder)."""
        return {"kind": "npy", "path": str(self.folder.resolve())}

    def shapes(self) -> dict:
        """``name -> shape`` from the .npy headers (unreadable shards are left out: they are reported
        when their turn comes)."""
        shapes = {}
        for name in self.names:
            if not regular(self.folder / name):  # a FIFO would block: only regular files are opened
                continue
            try:
                shapes[name] = tuple(np.load(self.folder / name, mmap_mode="r").shape)
            except Exception:
                continue
        return shapes

    def fingerprint(self, name: str) -> dict:
        """Size and hash of the shard's bytes (see :func:`file_fingerprint`)."""
        return file_fingerprint(self.folder / name)

    def read(self, name: str, row_shape: Optional[tuple]) -> np.ndarray:
        path = self.folder / name
        try:
            if os.path.exists(path) and not inside(path, self.real):  # a symlink changed since the job started
                raise ChunkError("it leads outside the input folder (through a symlink): the job reads only files inside its input")
            if os.path.exists(path) and not regular(path):
                raise ChunkError(_not_regular(os.stat(path).st_mode))
            with open(path, "rb") as f:
                head = f.read(len(NPY_MAGIC))
                if head != NPY_MAGIC:
                    raise ChunkError(_not_npy(head))
                f.seek(0)
                shape, dtype = _npy_header(f)
            check_chunk_memory(shape, dtype.itemsize, copies=self.copies)  # before any data is read
            x = np.load(path, allow_pickle=False)
        except ChunkError:
            raise
        except Exception as error:  # truncated, a folder, permissions
            raise ChunkError(f"unreadable ({type(error).__name__}: {error})") from error
        return checked(x, row_shape)


def _npy_header(f) -> tuple:
    """``(shape, dtype)`` from the header of the .npy file ``f`` (positioned at its start); nothing
    else is read."""
    version = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, _, dtype = read(f)
    return tuple(shape), dtype


def _not_npy(head: bytes) -> str:
    """Why a file whose first bytes are ``head`` is no .npy file."""
    if not head:
        return "an empty file, not a .npy array"
    if head.startswith(b"PK"):
        return "a zip archive (.npz?), not a .npy array"
    return f"not a .npy array (it begins with {head!r}, not the .npy magic {NPY_MAGIC!r})"


class ZarrArray:
    """A zarr array ``[rows, *row_shape]``, read with tensorstore, in chunks of its own row chunking."""

    def __init__(self, folder: Path, fill_value_is_data: bool = False, copies: int = CHUNK_COPIES):
        try:
            import tensorstore as ts
        except ImportError as error:  # pragma: no cover - depends on the environment
            raise ImportError('reading a zarr array needs tensorstore: pip install "dpmjax[zarr]"') from error

        self.folder = Path(folder)
        self.copies = copies
        self.version = 3 if (self.folder / "zarr.json").exists() else 2
        self.metadata_file = self.folder / ("zarr.json" if self.version == 3 else ".zarray")
        spec = {"driver": "zarr3" if self.version == 3 else "zarr", "kvstore": {"driver": "file", "path": str(self.folder)},
                "fill_missing_data_reads": bool(fill_value_is_data)}
        try:
            self.array = ts.open(spec, open=True, read=True).result()
        except Exception as error:
            raise ValueError(f"input {self.folder} is not a readable zarr array: {error}") from error
        self.metadata = read_json(self.metadata_file, "zarr metadata")
        shape = tuple(self.array.shape)
        if len(shape) < 2:
            raise ValueError(f"input {self.folder} is a zarr array of shape {shape}: it must be [rows, *row_shape].")
        if shape[0] == 0:
            raise ValueError(f"input {self.folder} is a zarr array of shape {shape} with no rows: nothing to invert.")
        if 0 in shape[1:]:
            raise ValueError(f"input {self.folder} is a zarr array of shape {shape}: its rows hold no values, nothing to invert.")
        self.row_shape = shape[1:]
        self.file_chunk = tuple(int(n or s) for n, s in zip(self.array.chunk_layout.write_chunk.shape, shape))
        step = int(self.array.chunk_layout.read_chunk.shape[0] or shape[0])
        width = len(str(shape[0]))
        self.ranges = {f"rows-{b:0{width}d}-{min(b + step, shape[0]):0{width}d}.npy": (b, min(b + step, shape[0]))
                       for b in range(0, shape[0], step)}
        self.names = list(self.ranges)

    def describe(self) -> dict:
        """What identifies the array as a whole: its folder and a hash of its metadata (without
        user attributes)."""
        meta = {k: v for k, v in self.metadata.items() if k != "attributes"} if isinstance(self.metadata, dict) else self.metadata
        return {"kind": f"zarr v{self.version}", "path": str(self.folder.resolve()),
                "metadata_sha256": hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()}

    def shapes(self) -> dict:
        return {name: (end - begin,) + self.row_shape for name, (begin, end) in self.ranges.items()}

    def chunk_files(self, name: str) -> list:
        """The keys (paths relative to the array) of the stored files that hold rows of chunk ``name``."""
        begin, end = self.ranges[name]
        counts = [range(math.ceil(s / c)) for s, c in zip(self.array.shape[1:], self.file_chunk[1:])]
        rows = range(begin // self.file_chunk[0], (end - 1) // self.file_chunk[0] + 1)
        return [self._key(index) for index in product(rows, *counts)]

    def _key(self, index: tuple) -> str:
        """A chunk's storage key: zarr v2 ``i.j`` (or ``dimension_separator``), v3 ``c/i/j`` (the
        default encoding) or ``i.j`` (the ``v2`` encoding)."""
        if self.version == 2:
            return str(self.metadata.get("dimension_separator") or ".").join(map(str, index))
        encoding = self.metadata.get("chunk_key_encoding") or {"name": "default"}
        default = encoding.get("name", "default") == "default"
        separator = (encoding.get("configuration") or {}).get("separator", "/" if default else ".")
        return separator.join((["c"] if default else []) + list(map(str, index)))

    def fingerprint(self, name: str) -> dict:
        """The array's metadata hash and, per stored file holding these rows, its size and hash
        (``None`` for a file that is missing)."""
        files = {}
        for key in self.chunk_files(name):
            path = self.folder / key
            files[key] = file_fingerprint(path) if path.exists() else None
        return {"metadata_sha256": self.describe()["metadata_sha256"], "files": files}

    def read(self, name: str, row_shape: Optional[tuple]) -> np.ndarray:
        begin, end = self.ranges[name]
        check_chunk_memory((end - begin, *self.row_shape), self.array.dtype.numpy_dtype.itemsize, copies=self.copies)
        try:
            x = np.asarray(self.array[begin:end].read().result())
        except Exception as error:  # a corrupt, unreadable or missing chunk file
            if "NOT_FOUND" in str(error) or "is missing" in str(error):
                raise ChunkError(self._missing(name, error)) from error
            raise ChunkError(f"unreadable ({type(error).__name__}: {error})") from error
        return checked(x, row_shape)

    def _missing(self, name: str, error: Exception) -> str:
        """The report for rows whose stored chunk files are missing."""
        begin, end = self.ranges[name]
        missing = [key for key in self.chunk_files(name) if not (self.folder / key).exists()]
        what = (f"chunk file{'s' if len(missing) > 1 else ''} {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''} "
                f"{'are' if len(missing) > 1 else 'is'} missing" if missing else f"a chunk is missing ({error})")
        fill = self.array.fill_value
        return (f"rows {begin}-{end}: {what}, so they would read as the fill value "
                f"{0 if fill is None else np.asarray(fill).item()}; pass --fill-value-is-data if missing chunks mean the fill value")


def open_store(folder, fill_value_is_data: bool = False, copies: int = CHUNK_COPIES) -> "NpyShards | ZarrArray":
    """The input store at ``folder``: a zarr array if it has zarr metadata, else ``.npy`` shards.
    ``copies``: how many float32 copies of a chunk the job holds (see :func:`check_chunk_memory`)."""
    folder = Path(folder)
    resolved(folder, "input")
    if not folder.is_dir():
        if folder.is_symlink():
            raise ValueError(f"input {shown(str(folder))} is a symlink to {shown(os.readlink(folder))}, which does not exist.")
        raise ValueError(f"input {shown(str(folder))} is not a directory.")
    if (folder / ".zarray").exists() or (folder / "zarr.json").exists():
        return ZarrArray(folder, fill_value_is_data=fill_value_is_data, copies=copies)
    return NpyShards(folder, copies=copies)


def majority_row_shape(shapes: dict) -> Optional[tuple]:
    """The row shape most chunks have: without a manifest, a malformed first chunk must not decide
    what every other chunk is checked against. Chunks without a row axis do not vote."""
    counts: dict = {}
    for shape in shapes.values():
        if len(shape) >= 2 and 0 not in shape[1:]:  # rows without values do not vote (they are quarantined)
            counts[shape[1:]] = counts.get(shape[1:], 0) + 1
    return max(counts, key=counts.get) if counts else None

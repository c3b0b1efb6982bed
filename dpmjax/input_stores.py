"""Where the batch job reads its latents: established array stores, no format of our own.

* a folder of ``.npy`` shards, each one chunk ``[rows, *row_shape]`` — every ``*.npy`` sorted by
  name, or the list in ``manifest.json`` (``{"shards": [...], "row_shape": [...]}``);
* a zarr array (v2 ``.zarray`` or v3 ``zarr.json``, read with tensorstore) ``[rows, *row_shape]``,
  cut into chunks of the array's own chunk length along the rows (its unit of I/O), named
  ``rows-BEGIN-END.npy`` after the half-open row range.

A store lists its chunk names in job order, their shapes from metadata alone (no data read), and
reads one chunk, raising :class:`ChunkError` for a chunk that cannot be used.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np


class ChunkError(ValueError):
    """A chunk that cannot be inverted (unreadable, wrong shape, non-finite input or output)."""


def checked(x: np.ndarray, row_shape: Optional[tuple]) -> np.ndarray:
    """``x`` as float32 once it is ``[rows, *row_shape]``, floating point and finite."""
    if x.ndim < 2 or (row_shape is not None and tuple(x.shape[1:]) != tuple(row_shape)):
        raise ChunkError(f"shape {tuple(x.shape)} is not [rows, *{list(row_shape) if row_shape else 'row_shape'}]")
    if not np.issubdtype(x.dtype, np.floating):
        raise ChunkError(f"dtype {x.dtype} is not floating point")
    if not np.all(np.isfinite(x)):
        raise ChunkError(f"{int(np.sum(~np.isfinite(x)))} non-finite input values")
    return x.astype(np.float32)


class NpyShards:
    """A folder of ``.npy`` shards (optionally listed by ``manifest.json``)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        manifest = self.folder / "manifest.json"
        if manifest.exists():
            meta = json.loads(manifest.read_text())
            self.names = [str(Path(f).name) for f in meta["shards"]]
            self.row_shape = tuple(meta["row_shape"]) if meta.get("row_shape") is not None else None
        else:
            self.names = sorted(p.name for p in self.folder.glob("*.npy"))
            self.row_shape = None
            if not self.names:
                raise ValueError(f"input {self.folder} has no manifest.json, no .npy files and is no zarr array.")

    def shapes(self) -> dict:
        """``name -> shape`` from the .npy headers (unreadable shards are left out: they are reported
        when their turn comes)."""
        shapes = {}
        for name in self.names:
            try:
                shapes[name] = tuple(np.load(self.folder / name, mmap_mode="r").shape)
            except Exception:
                continue
        return shapes

    def read(self, name: str, row_shape: Optional[tuple]) -> np.ndarray:
        try:
            x = np.load(self.folder / name, allow_pickle=False)
        except Exception as error:  # truncated, not .npy, unreadable
            raise ChunkError(f"unreadable ({type(error).__name__}: {error})") from error
        return checked(x, row_shape)


class ZarrArray:
    """A zarr array ``[rows, *row_shape]``, read with tensorstore, in chunks of its own row chunking."""

    def __init__(self, folder: Path):
        try:
            import tensorstore as ts
        except ImportError as error:  # pragma: no cover - depends on the environment
            raise ImportError('reading a zarr array needs tensorstore: pip install "dpmjax[zarr]"') from error

        self.folder = Path(folder)
        driver = "zarr3" if (self.folder / "zarr.json").exists() else "zarr"
        try:
            self.array = ts.open({"driver": driver, "kvstore": {"driver": "file", "path": str(self.folder)}},
                                 open=True, read=True).result()
        except Exception as error:
            raise ValueError(f"input {self.folder} is not a readable zarr array: {error}") from error
        shape = tuple(self.array.shape)
        if len(shape) < 2:
            raise ValueError(f"input {self.folder} is a zarr array of shape {shape}: it must be [rows, *row_shape].")
        self.row_shape = shape[1:]
        step = int(self.array.chunk_layout.read_chunk.shape[0] or shape[0])
        width = len(str(shape[0]))
        self.ranges = {f"rows-{b:0{width}d}-{min(b + step, shape[0]):0{width}d}.npy": (b, min(b + step, shape[0]))
                       for b in range(0, shape[0], step)}
        self.names = list(self.ranges)

    def shapes(self) -> dict:
        return {name: (end - begin,) + self.row_shape for name, (begin, end) in self.ranges.items()}

    def read(self, name: str, row_shape: Optional[tuple]) -> np.ndarray:
        begin, end = self.ranges[name]
        try:
            x = np.asarray(self.array[begin:end].read().result())
        except Exception as error:  # a corrupt or unreadable chunk file
            raise ChunkError(f"unreadable ({type(error).__name__}: {error})") from error
        return checked(x, row_shape)


def open_store(folder) -> "NpyShards | ZarrArray":
    """The input store at ``folder``: a zarr array if it has zarr metadata, else ``.npy`` shards."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"input {folder} is not a directory.")
    if (folder / ".zarray").exists() or (folder / "zarr.json").exists():
        return ZarrArray(folder)
    return NpyShards(folder)


def majority_row_shape(shapes: dict) -> Optional[tuple]:
    """The row shape most chunks have: without a manifest, a malformed first chunk must not decide
    what every other chunk is checked against."""
    counts: dict = {}
    for shape in shapes.values():
        counts[shape[1:]] = counts.get(shape[1:], 0) + 1
    return max(counts, key=counts.get) if counts else None

"""A resumable batch inversion job: ``.npy`` shards in, noise shards out; a killed run restarts
where it stopped, a rerun is idempotent, a bad chunk is reported and the rest is done.

Store layout (plain NumPy ``.npy`` files and JSON, no format of our own):

    INPUT/manifest.json      optional: {"shards": ["a.npy", ...], "row_shape": [1, 8, 8]}
    INPUT/*.npy              otherwise every .npy file, sorted by name; each is one chunk [rows, *row_shape]
    OUTPUT/chunks/NAME.npy   the noise of chunk NAME (float32), written to a temporary file, fsynced
                             and renamed into place: it exists whole or not at all
    OUTPUT/trajectories/NAME.npy   with save_trajectory: [rows, N, *row_shape], the path noise-ward
    OUTPUT/failed/NAME.json  a quarantined chunk and why (a rerun tries it again)
    OUTPUT/events.jsonl      one line per chunk started / recorded / failed, for audits
    OUTPUT/manifest.json     at the end: the output shards and the job's settings

A run killed while writing leaves a hidden ``.NAME.HOST.PID.*.tmp`` file; the next run on that host
removes those whose process is gone.

A chunk counts as recorded once its output file exists; a restarted job skips it (and never
recomputes it). Each chunk is checked before and after: readable, ``[rows, *row_shape]`` (the
manifest's ``row_shape``, else the shape most chunks have), finite input, finite noise. The model comes from ``module:function`` (called once with no arguments,
returning ``model_fn(x, t)``); the built-in default is the shipped digits model without guidance.

Many devices: each chunk is split over the local devices (a 1-D ``data`` mesh) when its rows
divide evenly. Many processes (``jax.distributed``): process ``p`` of ``P`` takes chunks
``p, p + P, ...`` of the same sorted list, writing into the same output store.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import jax
import numpy as np

from .scheduler import DPMSolverMultistepScheduler
from .trajectory import invert

DEFAULT_MODEL = "dpmjax.models.digits:unguided_model"


@dataclasses.dataclass(frozen=True)
class Summary:
    recorded: list  # chunks computed by this run
    skipped: list  # chunks already recorded before this run
    failed: dict  # chunk -> reason
    rows: int  # rows computed by this run
    seconds: float

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0


class ChunkError(ValueError):
    """A chunk that cannot be inverted (unreadable, wrong shape, non-finite input or output)."""


def load_model(spec: str) -> Callable:
    """``module:function`` -> ``function()``, the model_fn(x, t)."""
    module, sep, name = spec.partition(":")
    if not sep or not module or not name:
        raise ValueError(f"model must be 'module:function', got {spec!r}.")
    try:
        factory = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"model {spec!r} cannot be imported: {error}") from error
    return factory()


def list_chunks(input_dir: Path) -> tuple:
    """``(names, row_shape or None)`` of the input store, in job order."""
    manifest = input_dir / "manifest.json"
    if manifest.exists():
        meta = json.loads(manifest.read_text())
        names = [str(Path(f).name) for f in meta["shards"]]
        return names, tuple(meta["row_shape"]) if meta.get("row_shape") is not None else None
    names = sorted(p.name for p in input_dir.glob("*.npy"))
    if not names:
        raise ValueError(f"input {input_dir} has no manifest.json and no .npy files.")
    return names, None


def majority_row_shape(input_dir: Path, names: Sequence[str]) -> Optional[tuple]:
    """The row shape most chunks have (read from the .npy headers only): without a manifest, a
    malformed first chunk must not decide what every other chunk is checked against."""
    counts: dict = {}
    for name in names:
        try:
            shape = tuple(np.load(input_dir / name, mmap_mode="r").shape[1:])
        except Exception:  # unreadable chunks are reported when their turn comes
            continue
        counts[shape] = counts.get(shape, 0) + 1
    return max(counts, key=counts.get) if counts else None


def _atomic_write(path: Path, write) -> None:
    """``write(file)`` into a temporary file beside ``path``, fsync, rename into place, fsync the
    folder: ``path`` then exists whole or not at all, also across a crash."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{_WRITER}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


_WRITER = f"{socket.gethostname()}.{os.getpid()}"  # in temporary names: whose they are


def _remove_dead_writers_files(output_dir: Path) -> None:
    """Temporary files left by a killed run of this host (its pid no longer alive). Other hosts'
    and live processes' files are left alone: they may still be writing them."""
    host = socket.gethostname()
    for tmp in output_dir.glob("*/.*.tmp"):
        parts = tmp.name.split(".")  # "", name..., host..., pid, random, "tmp"
        try:
            pid = int(parts[-3])
        except (ValueError, IndexError):
            continue
        if f".{host}.{pid}." not in tmp.name or pid == os.getpid():
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            tmp.unlink(missing_ok=True)
        except PermissionError:  # alive, someone else's
            pass


def _atomic_save(path: Path, array: np.ndarray) -> None:
    _atomic_write(path, lambda f: np.save(f, array))


def _atomic_write_text(path: Path, text: str) -> None:
    _atomic_write(path, lambda f: f.write(text.encode()))


def _append_event(path: Path, **event) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(dict(event, time=time.time(), pid=os.getpid())) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _read_chunk(path: Path, row_shape: Optional[tuple]) -> np.ndarray:
    try:
        x = np.load(path, allow_pickle=False)
    except Exception as error:  # truncated, not .npy, unreadable
        raise ChunkError(f"unreadable ({type(error).__name__}: {error})") from error
    if x.ndim < 2 or (row_shape is not None and tuple(x.shape[1:]) != tuple(row_shape)):
        raise ChunkError(f"shape {tuple(x.shape)} is not [rows, *{list(row_shape) if row_shape else 'row_shape'}]")
    if not np.issubdtype(x.dtype, np.floating):
        raise ChunkError(f"dtype {x.dtype} is not floating point")
    if not np.all(np.isfinite(x)):
        raise ChunkError(f"{int(np.sum(~np.isfinite(x)))} non-finite input values")
    return x.astype(np.float32)


def _placed(x: np.ndarray):
    """``x`` split over the local devices along rows when they divide evenly."""
    devices = jax.local_devices()
    if len(devices) == 1 or x.shape[0] % len(devices):
        return jax.numpy.asarray(x)
    mesh = jax.sharding.Mesh(np.array(devices), ("data",))
    return jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))


def run(
    input_dir,
    output_dir,
    model: str = DEFAULT_MODEL,
    num_inference_steps: int = 25,
    scheduler: Optional[DPMSolverMultistepScheduler] = None,
    exact: bool = False,
    save_trajectory: bool = False,
    progress: bool = True,
) -> Summary:
    """Invert every chunk of ``input_dir`` not yet recorded in ``output_dir``; see the module docstring."""
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}.")
    if not input_dir.is_dir():
        raise ValueError(f"input {input_dir} is not a directory.")
    scheduler = scheduler or DPMSolverMultistepScheduler(final_sigmas_type="sigma_min")
    names, row_shape = list_chunks(input_dir)
    row_shape = row_shape or majority_row_shape(input_dir, names)
    mine = names[jax.process_index():: jax.process_count()]
    model_fn = load_model(model)
    (output_dir / "chunks").mkdir(parents=True, exist_ok=True)
    _remove_dead_writers_files(output_dir)
    events = output_dir / "events.jsonl"

    recorded, skipped, failed, rows = [], [], {}, 0
    start = time.perf_counter()
    for position, name in enumerate(mine):
        target = output_dir / "chunks" / name
        if target.exists():
            skipped.append(name)
            continue
        _append_event(events, chunk=name, event="started")
        try:
            x = _read_chunk(input_dir / name, row_shape)
            row_shape = row_shape or tuple(x.shape[1:])
            result = invert(model_fn, _placed(x), scheduler, num_inference_steps, exact=exact, return_samples=save_trajectory)
            noise = np.asarray(result.sample, np.float32)
            if not np.all(np.isfinite(noise)):
                raise ChunkError("the inversion produced non-finite noise")
        except ChunkError as error:
            failed[name] = str(error)
            _atomic_write_text(output_dir / "failed" / f"{Path(name).stem}.json", json.dumps({"chunk": name, "reason": str(error)}))
            _append_event(events, chunk=name, event="failed", reason=str(error))
            continue
        if save_trajectory:
            _atomic_save(output_dir / "trajectories" / name, np.moveaxis(np.asarray(result.samples, np.float32), 0, 1))
        _atomic_save(target, noise)  # the record: from here on the chunk is done
        stale = output_dir / "failed" / f"{Path(name).stem}.json"
        if stale.exists():
            stale.unlink()
        _append_event(events, chunk=name, event="recorded", rows=int(x.shape[0]))
        recorded.append(name)
        rows += int(x.shape[0])
        if progress:
            elapsed = time.perf_counter() - start
            sys.stderr.write(f"\rinvert-batch [{position + 1}/{len(mine)} chunks] {rows} rows, "
                             f"{rows / max(elapsed, 1e-9):.0f} rows/s, {len(failed)} failed")
            sys.stderr.flush()
    if progress:
        sys.stderr.write("\n")
    summary = Summary(recorded, skipped, failed, rows, time.perf_counter() - start)
    if jax.process_index() == 0:
        done = sorted(p.name for p in (output_dir / "chunks").glob("*.npy"))
        if row_shape is None and done:  # nothing read by this run: the recorded outputs say it
            row_shape = tuple(np.load(output_dir / "chunks" / done[0], mmap_mode="r").shape[1:])
        _atomic_write_text(output_dir / "manifest.json", json.dumps({
            "shards": done, "row_shape": list(row_shape) if row_shape else None, "of": "noise",
            "input": str(input_dir), "model": model, "num_inference_steps": num_inference_steps, "exact": exact,
            "scheduler": scheduler.config.to_dict(),
            "missing": [n for n in names if n not in done]}, indent=1))
    return summary



def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="dpmjax invert-batch", description=__doc__.splitlines()[0])
    parser.add_argument("input", help="directory of .npy shards (optionally with manifest.json)")
    parser.add_argument("output", help="output directory (created; reruns resume)")
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"module:function returning model_fn(x, t) (default: {DEFAULT_MODEL})")
    parser.add_argument("--steps", type=int, default=25, help="inference steps (default: 25)")
    parser.add_argument("--config", help="a diffusers scheduler_config.json (default: DPM-Solver++ order 2, ending at sigma_min)")
    parser.add_argument("--order", type=int, choices=(1, 2, 3), help="solver order (overrides the config)")
    parser.add_argument("--exact", action="store_true", help="exact inversion (sampling the noise gives the input back)")
    parser.add_argument("--save-trajectory", action="store_true", help="also write every intermediate sample")
    parser.add_argument("--distributed", action="store_true", help="call jax.distributed.initialize() first (multi-host)")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be positive")
    if args.distributed:
        jax.distributed.initialize()
    scheduler = (DPMSolverMultistepScheduler.from_pretrained(args.config) if args.config
                 else DPMSolverMultistepScheduler(final_sigmas_type="sigma_min"))
    if args.order:
        scheduler = DPMSolverMultistepScheduler(scheduler.config.replace(solver_order=args.order))
    try:
        summary = run(args.input, args.output, args.model, args.steps, scheduler, args.exact, args.save_trajectory)
    except ValueError as error:
        parser.error(str(error))
    print(f"invert-batch: {len(summary.recorded)} chunks inverted ({summary.rows} rows, {summary.rows_per_second:.0f} rows/s), "
          f"{len(summary.skipped)} already done, {len(summary.failed)} failed")
    for name, reason in summary.failed.items():
        print(f"  FAILED {name}: {reason}")
    return 1 if summary.failed else 0

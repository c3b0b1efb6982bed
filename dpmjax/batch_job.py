"""A resumable batch inversion job: an array store in, noise shards out; a killed run restarts
where it stopped, a rerun is idempotent, a bad chunk is reported and the rest is done.

Input (:mod:`dpmjax.input_stores`): a folder of ``.npy`` shards, one chunk each (every ``*.npy``
sorted by name, or the list in ``INPUT/manifest.json``: ``{"shards": [...], "row_shape": [...]}``),
or a zarr array ``[rows, *row_shape]`` (v2 or v3, read with tensorstore) cut into chunks of its own
row chunking, named ``rows-BEGIN-END.npy``. Output (plain ``.npy`` files and JSON, no format of
our own):

    OUTPUT/chunks/NAME.npy   the noise of chunk NAME (float32), written to a temporary file, fsynced
                             and renamed into place: it exists whole or not at all
    OUTPUT/trajectories/NAME.npy   with save_trajectory: [rows, N, *row_shape], the path noise-ward
    OUTPUT/failed/NAME.json  a quarantined chunk and why (a rerun tries it again)
    OUTPUT/settings.json     the job's settings, written by the first run; a rerun with others is refused
    OUTPUT/events.jsonl      one line per chunk started / recorded / failed, for audits
    OUTPUT/manifest.json     at the end: the output shards and the job's settings

A run killed while writing leaves a hidden ``.NAME.HOST.PID.*.tmp`` file; the next run on that host
removes those whose process is gone.

A chunk counts as recorded once its output file exists; a restarted job skips it (and never
recomputes it). Each chunk is checked before and after: readable, ``[rows, *row_shape]`` (the
manifest's or the zarr array's ``row_shape``, else the shape most chunks have), finite input,
finite noise. The model comes from ``module:function`` (called once with no arguments, returning
``model_fn(x, t)``); the built-in default is the shipped digits model without guidance.

Rows per model call: every chunk is inverted in pieces of exactly ``batch_rows`` rows (the last
piece padded by repeating its last row; the padding is dropped), so one compiled program serves
chunks of any size and memory stays bounded however large a shard is.

Many devices: one worker thread per local device, each inverting whole chunks with the same
single-device program; many processes (``jax.distributed``): process ``p`` of ``P`` takes chunks
``p, p + P, ...`` of the same sorted list, writing into the same output store. A chunk's noise
therefore depends on the chunk and ``batch_rows``, not on the number of devices or hosts: a run on
one CPU, on 8 devices and on 2 hosts x 4 devices writes the same bits.
(Splitting rows over the devices would not: XLA's CPU matmul rounds 1, 2-48 and 64 rows
differently, ~1e-6 per layer.)
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
import threading
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import jax
import numpy as np

from .input_stores import ChunkError, majority_row_shape, open_store
from .scheduler import DPMSolverMultistepScheduler
from .trajectory import invert

# exact inversion: a row whose measured round trip max|sample(noise) - x| / max(1, max|x|) exceeds this
# is reported (events.jsonl, the summary); every row's round trip is kept in round_trips/
EXACT_TOLERANCE = 1e-5

DEFAULT_MODEL = "dpmjax.models.digits:unguided_model"
MAX_DEFAULT_BATCH_ROWS = 256  # rows per model call when the job is not told: memory stays bounded


@dataclasses.dataclass(frozen=True)
class Summary:
    recorded: list  # chunks computed by this run
    skipped: list  # chunks already recorded before this run
    failed: dict  # chunk -> reason
    rows: int  # rows computed by this run
    seconds: float
    not_converged: dict = dataclasses.field(default_factory=dict)  # exact inversion: chunk -> rows whose round trip missed


    @property
    def rows_per_second(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0


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


def default_batch_rows(shapes: dict, row_shape: Optional[tuple]) -> int:
    """The largest well-shaped chunk's rows (1 if none), at most :data:`MAX_DEFAULT_BATCH_ROWS`."""
    rows = [shape[0] for shape in shapes.values() if len(shape) >= 2 and (row_shape is None or shape[1:] == tuple(row_shape))]
    return max(1, min(max(rows, default=1), MAX_DEFAULT_BATCH_ROWS))


def _in_batches(invert_rows: Callable, x: np.ndarray, batch_rows: int):
    """``invert_rows`` on pieces of exactly ``batch_rows`` rows (the last one padded by repeating its
    last row, the padding dropped after): one compiled program for every chunk, and a row's noise
    depends on the row and ``batch_rows`` alone (XLA's CPU matmul rounds differently for different
    row counts). Returns ``(noise [rows, ...], samples [N, rows, ...] or None, round_trip [rows] or None)``."""
    noises, paths, round_trips = [], [], []
    for begin in range(0, x.shape[0], batch_rows):
        piece = x[begin: begin + batch_rows]
        rows = piece.shape[0]
        if rows < batch_rows:
            piece = np.concatenate([piece, np.repeat(piece[-1:], batch_rows - rows, axis=0)])
        noise, samples, round_trip = invert_rows(piece)
        noises.append(np.asarray(noise, np.float32)[:rows])
        if samples is not None:
            paths.append(np.asarray(samples, np.float32)[:, :rows])
        if round_trip is not None:
            round_trips.append(np.asarray(round_trip, np.float32)[:rows])
    return (np.concatenate(noises), np.concatenate(paths, axis=1) if paths else None,
            np.concatenate(round_trips) if round_trips else None)


def _check_same_settings(path: Path, settings: dict) -> None:
    """A resumed job must compute what the interrupted one did: an output store holding one
    setting's noise is never topped up with another's."""
    if not path.exists():
        return
    before = json.loads(path.read_text())
    changed = [key for key in settings if before.get(key) != settings[key]]
    if changed:
        detail = "; ".join(f"{key}: was {before.get(key)!r}, now {settings[key]!r}" for key in changed if key != "scheduler")
        if "scheduler" in changed:
            keys = sorted(k for k in set(before.get("scheduler") or {}) | set(settings["scheduler"])
                          if (before.get("scheduler") or {}).get(k) != settings["scheduler"].get(k))
            detail = "; ".join(filter(None, [detail, f"scheduler config differs in {', '.join(keys)}"]))
        raise ValueError(f"output {path.parent} was started with other settings ({detail}): "
                         f"rerun with the same settings or write to a new output folder.")


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


def _log_unlogged_records(events: Path, chunks: Path, done: Sequence[str]) -> None:
    """A run killed between writing a chunk's output (the record) and logging it leaves the chunk
    done but unlogged: log it now (``"found": true``), so the audit has one "recorded" per chunk.
    A line cut short by the kill is ended first, so the next event starts on a line of its own."""
    if events.exists() and events.stat().st_size:
        with open(events, "rb+") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.write(b"\n")
    logged = set()
    if done and events.exists():  # one pass over the log, only when a rerun finds finished chunks
        with open(events) as f:
            for line in f:
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                if event.get("event") == "recorded":
                    logged.add(event.get("chunk"))
    for name in done:
        if name not in logged:
            rows = int(np.load(chunks / name, mmap_mode="r").shape[0])
            _append_event(events, chunk=name, event="recorded", rows=rows, found=True)


def run(
    input_dir,
    output_dir,
    model: str = DEFAULT_MODEL,
    num_inference_steps: int = 25,
    scheduler: Optional[DPMSolverMultistepScheduler] = None,
    exact: bool = False,
    save_trajectory: bool = False,
    progress: bool = True,
    batch_rows: Optional[int] = None,
) -> Summary:
    """Invert every chunk of ``input_dir`` not yet recorded in ``output_dir``; see the module docstring."""
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}.")
    scheduler = scheduler or DPMSolverMultistepScheduler(final_sigmas_type="sigma_min")
    if batch_rows is not None and (isinstance(batch_rows, bool) or not isinstance(batch_rows, int) or batch_rows < 1):
        raise ValueError(f"batch_rows must be a positive integer (rows per model call) or None, got {batch_rows!r}.")
    store = open_store(input_dir)
    names = store.names
    shapes = store.shapes()
    row_shape = store.row_shape or majority_row_shape(shapes)
    batch_rows = batch_rows or default_batch_rows(shapes, row_shape)
    mine = names[jax.process_index():: jax.process_count()]
    settings = {"model": model, "num_inference_steps": num_inference_steps, "exact": exact, "batch_rows": batch_rows,
                "scheduler": json.loads(json.dumps(scheduler.config.to_dict()))}
    _check_same_settings(output_dir / "settings.json", settings)
    model_fn = load_model(model)
    (output_dir / "chunks").mkdir(parents=True, exist_ok=True)
    _remove_dead_writers_files(output_dir)
    if jax.process_index() == 0 and not (output_dir / "settings.json").exists():
        _atomic_write_text(output_dir / "settings.json", json.dumps(settings, indent=1))
    events = output_dir / "events.jsonl"

    recorded, skipped, failed, not_converged = [], [], {}, {}
    todo = []
    for name in mine:
        (skipped if (output_dir / "chunks" / name).exists() else todo).append(name)
    _log_unlogged_records(events, output_dir / "chunks", skipped)
    lock = threading.Lock()  # guards the queue, the lists above, events.jsonl and the progress line
    counts = {"rows": 0, "done": len(skipped)}
    errors: list = []
    start = time.perf_counter()

    def invert_chunk(name: str, device) -> None:
        target = output_dir / "chunks" / name
        with lock:
            _append_event(events, chunk=name, event="started", device=device.id)
        try:
            x = store.read(name, row_shape)

            def invert_rows(piece):
                result = invert(model_fn, jax.device_put(piece, device), scheduler, num_inference_steps, exact=exact,
                                return_samples=save_trajectory, **({"tolerance": EXACT_TOLERANCE} if exact else {}))
                return result.sample, result.samples if save_trajectory else None, result.round_trip

            noise, samples, round_trip = _in_batches(invert_rows, x, batch_rows)
            if not np.all(np.isfinite(noise)):
                raise ChunkError("the inversion produced non-finite noise")
        except ChunkError as error:
            _atomic_write_text(output_dir / "failed" / f"{Path(name).stem}.json", json.dumps({"chunk": name, "reason": str(error)}))
            with lock:
                failed[name] = str(error)
                _append_event(events, chunk=name, event="failed", device=device.id, reason=str(error))
            return
        if save_trajectory:
            _atomic_save(output_dir / "trajectories" / name, np.moveaxis(samples, 0, 1))
        missed = []
        if round_trip is not None:  # exact inversion: every row's measured round trip, and the rows that missed
            _atomic_save(output_dir / "round_trips" / name, round_trip)
            missed = np.flatnonzero(~(round_trip <= EXACT_TOLERANCE)).tolist()
        _atomic_save(target, noise)  # the record: from here on the chunk is done
        (output_dir / "failed" / f"{Path(name).stem}.json").unlink(missing_ok=True)
        with lock:
            _append_event(events, chunk=name, event="recorded", device=device.id, rows=int(x.shape[0]),
                          **({"rows_not_converged": missed} if round_trip is not None else {}))
            recorded.append(name)
            if missed:
                not_converged[name] = missed
            counts["rows"] += int(x.shape[0])
            counts["done"] += 1
            if progress:
                elapsed = time.perf_counter() - start
                sys.stderr.write(f"\rinvert-batch [{counts['done']}/{len(mine)} chunks] {counts['rows']} rows, "
                                 f"{counts['rows'] / max(elapsed, 1e-9):.0f} rows/s, {len(failed)} failed")
                sys.stderr.flush()

    def worker(device) -> None:  # one per local device: whole chunks, the same single-device program
        while True:
            with lock:
                if errors or not todo:
                    return
                name = todo.pop(0)
            try:
                invert_chunk(name, device)
            except BaseException as error:  # not the chunk's fault (the model, the disk): stop the job
                with lock:
                    errors.append(error)
                return

    threads = [threading.Thread(target=worker, args=(device,), daemon=True) for device in jax.local_devices()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    if progress:
        sys.stderr.write("\n")
    if jax.process_count() > 1:  # the manifest is written once every process has finished its chunks
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("dpmjax invert-batch: all chunks done")
    summary = Summary(recorded=recorded, skipped=skipped, failed=failed, rows=counts["rows"],
                      seconds=time.perf_counter() - start, not_converged=not_converged)
    if jax.process_index() == 0:
        done = sorted(p.name for p in (output_dir / "chunks").glob("*.npy"))
        if row_shape is None and done:  # nothing read by this run: the recorded outputs say it
            row_shape = tuple(np.load(output_dir / "chunks" / done[0], mmap_mode="r").shape[1:])
        _atomic_write_text(output_dir / "manifest.json", json.dumps({
            "shards": done, "row_shape": list(row_shape) if row_shape else None, "of": "noise",
            "input": str(input_dir), **settings, "missing": [n for n in names if n not in done]}, indent=1))
    return summary



def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="dpmjax invert-batch", description=__doc__.splitlines()[0])
    parser.add_argument("input", help="a directory of .npy shards (optionally with manifest.json) or a zarr array")
    parser.add_argument("output", help="output directory (created; reruns resume)")
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"module:function returning model_fn(x, t) (default: {DEFAULT_MODEL})")
    parser.add_argument("--steps", type=int, default=25, help="inference steps (default: 25)")
    parser.add_argument("--config", help="a diffusers scheduler_config.json (default: DPM-Solver++ order 2, ending at sigma_min)")
    parser.add_argument("--order", type=int, choices=(1, 2, 3), help="solver order (overrides the config)")
    parser.add_argument("--exact", action="store_true", help="exact inversion (sampling the noise gives the input back)")
    parser.add_argument("--save-trajectory", action="store_true", help="also write every intermediate sample")
    parser.add_argument("--batch-rows", type=int,
                        help=f"rows per model call: chunks are inverted in pieces of exactly this many rows, the last padded "
                             f"(default: the largest chunk's rows, at most {MAX_DEFAULT_BATCH_ROWS})")
    parser.add_argument("--distributed", action="store_true",
                        help="call jax.distributed.initialize() first (multi-host; on TPU and SLURM it reads the cluster from the environment)")
    parser.add_argument("--coordinator-address", help="with --distributed: HOST:PORT of process 0 (elsewhere than TPU/SLURM)")
    parser.add_argument("--num-processes", type=int, help="with --distributed: how many processes")
    parser.add_argument("--process-id", type=int, help="with --distributed: this process' index")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be positive")
    cluster = {k: v for k, v in (("coordinator_address", args.coordinator_address), ("num_processes", args.num_processes),
                                 ("process_id", args.process_id)) if v is not None}
    if cluster and not args.distributed:
        parser.error("--coordinator-address, --num-processes and --process-id need --distributed")
    if args.distributed:
        jax.distributed.initialize(**cluster)
    # without a config: diffusers' default grid, but uniform in log-SNR for exact inversion, where every
    # step of the shipped model's sampler inverts (the default grid's last step folds)
    scheduler = (DPMSolverMultistepScheduler.from_pretrained(args.config) if args.config
                 else DPMSolverMultistepScheduler(final_sigmas_type="sigma_min", use_lu_lambdas=args.exact))
    if args.order:
        scheduler = DPMSolverMultistepScheduler(scheduler.config.replace(solver_order=args.order))
    try:
        summary = run(args.input, args.output, model=args.model, num_inference_steps=args.steps, scheduler=scheduler,
                      exact=args.exact, save_trajectory=args.save_trajectory, batch_rows=args.batch_rows)
    except ValueError as error:
        parser.error(str(error))
    print(f"invert-batch: {len(summary.recorded)} chunks inverted ({summary.rows} rows, {summary.rows_per_second:.0f} rows/s), "
          f"{len(summary.skipped)} already done, {len(summary.failed)} failed")
    for name, reason in summary.failed.items():
        print(f"  FAILED {name}: {reason}")
    if args.exact:
        missed = sum(len(rows) for rows in summary.not_converged.values())
        print(f"exact inversion: {summary.rows - missed} of {summary.rows} rows within round trip {EXACT_TOLERANCE:g}"
              + (f"; not converged (rows by chunk, round trips in round_trips/): {summary.not_converged}" if missed else ""))
    return 1 if summary.failed else 0

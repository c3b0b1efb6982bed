"""A resumable batch inversion job: an array store in, noise shards out; a killed run restarts
where it stopped, a rerun is idempotent, a bad chunk is reported and the rest is done.

Input (:mod:`dpmjax.input_stores`, only ever read): a folder of ``.npy`` shards, one chunk each
(every ``*.npy`` sorted by name, or exactly the files listed in ``INPUT/manifest.json``:
``{"shards": [...], "row_shape": [...]}``, relative paths, subfolders kept), or a zarr array
``[rows, *row_shape]`` (v2 or v3, read with tensorstore) cut into chunks of its own row chunking,
named ``rows-BEGIN-END.npy``. Output (plain ``.npy`` files and JSON, no format of our own):

    OUTPUT/settings.json     the job's settings, the input's resolved path and its shards, created
                             atomically by the first run (O_EXCL): the output belongs to that job; a
                             run with others (another input path included) is refused
    OUTPUT/inputs/NAME.json  the fingerprint (size + SHA-256) of input shard NAME the job started on;
                             a resume on a changed shard is refused (a quarantined shard may be fixed)
    OUTPUT/chunks/NAME.npy   the noise of chunk NAME (float32), written to a temporary file, fsynced
                             and renamed into place: it exists whole or not at all
    OUTPUT/trajectories/NAME.npy   with save_trajectory: [rows, N, *row_shape], the path noise-ward
    OUTPUT/failed/NAME.json  a quarantined chunk and why (a rerun tries it again)
    OUTPUT/claims/HASH       a chunk being computed, locked (flock) by its process while it works
    OUTPUT/events.jsonl      one line per chunk started / recorded / failed, for audits
    OUTPUT/manifest.json     at the end: the output shards, the settings and the inputs' fingerprints

Nothing is written before every setting is checked: the paths (OUTPUT neither is, nor lies inside,
nor contains INPUT; an existing OUTPUT is empty or this job's), the input (its manifest), the
scheduler and steps, and the model on one batch of the rows' shape (traced, not run).

A run killed while writing leaves a hidden ``.HASH.HOST.PID.RANDOM.tmp`` file; the next run removes
those of dead processes of its host, and any untouched for an hour before it started: only names of
exactly that form, only at the output root and in the folders the job writes (chunks/, ...).

A chunk counts as recorded once its output file exists; a restarted job skips it (and never
recomputes it). Each chunk is checked before and after: readable .npy, ``[rows, *row_shape]`` (the
manifest's or the zarr array's ``row_shape``, else the shape most chunks have) with at least one
row, finite input within float32's range, every zarr chunk file present, finite noise. The model
comes from ``module:function`` (called once with no arguments, returning ``model_fn(x, t)``); the
built-in default is the shipped digits model without guidance.

Concurrent runs with the same settings share the output: a process takes a chunk only under its
claim (an flock on ``claims/HASH``, released by the kernel when the process dies), so no chunk is
computed twice; a chunk another process is computing is left to it and waited for at the end.

Rows per model call: every chunk is inverted in pieces of exactly ``batch_rows`` rows (the last
piece padded by repeating its last row; the padding is dropped), so one compiled program serves
chunks of any size and the model's working memory does not grow with a shard. The shard itself is
read whole, with a float32 copy and its noise (and trajectory), so host memory holds a few times a
shard per device. Without ``batch_rows`` a job derives it once (the largest chunk's rows) and a
resume keeps it.

Many devices: one worker thread per local device, each inverting whole chunks with the same
single-device program; many processes (``jax.distributed``): process ``p`` of ``P`` takes chunks
``p, p + P, ...`` of the same sorted list, writing into the same output store. A chunk's noise
therefore depends on the chunk and ``batch_rows``, not on the number of devices or hosts: a run on
one CPU, on 8 devices and on 2 hosts x 4 devices writes the same bits.
(Splitting rows over the devices would not: XLA's CPU matmul rounds 1, 2-48 and 64 rows
differently, ~1e-6 per layer.)

Stopping: ``stop`` (an event; the CLI sets it on SIGINT and SIGTERM) makes every worker finish the
write it is in and leave its chunk at the next piece boundary; the store stays resumable.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib
import json
import os
import re
import signal
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .input_stores import ChunkError, majority_row_shape, open_store, read_json
from .. import checks
from ..scheduler import DPMSolverMultistepScheduler
from ..trajectories import progress as progress_line
from ..trajectories.inversion import invert

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: chunks are not claimed
    fcntl = None

# exact inversion: a row whose measured round trip max|sample(noise) - x| / max(1, max|x|) exceeds this
# is reported (events.jsonl, the summary); every row's round trip is kept in round_trips/
EXACT_TOLERANCE = 1e-5

DEFAULT_MODEL = "dpmjax.models.digits:unguided_model"
MAX_DEFAULT_BATCH_ROWS = 256  # rows per model call when the job is not told: memory stays bounded
STALE_TEMP_SECONDS = 3600  # a temporary file untouched this long before a run starts is a dead writer's
MAX_NAME_BYTES = 255  # the longest file name most file systems take
CLAIM_POLL_SECONDS = 0.05  # how often a run looks again at chunks other processes are computing

# settings added after outputs were first written: an older settings.json without them is not refused
LATER_SETTINGS = ("fill_value_is_data", "input_shards", "input", "save_trajectory")
# the folders the job writes files into (with subfolders: chunk names may have them); the root too, not below it
JOB_FOLDERS = ("chunks", "trajectories", "round_trips", "failed", "inputs")
# the job's temporary files, exactly: ".HASH.HOST.PID.RANDOM.tmp" (see _temp_prefix; RANDOM from tempfile.mkstemp)
TEMP_NAME = re.compile(r"\.[0-9a-f]{10}\.(?P<host>[0-9a-f]{8})\.(?P<pid>[0-9]+)\.[a-z0-9_]{8}\.tmp")


@dataclasses.dataclass(frozen=True)
class Summary:
    recorded: list  # chunks computed by this run
    skipped: list  # chunks already recorded before this run (or meanwhile by a concurrent process)
    failed: dict  # chunk -> reason
    rows: int  # rows computed by this run
    seconds: float
    not_converged: dict = dataclasses.field(default_factory=dict)  # exact inversion: chunk -> rows whose round trip missed
    stopped: bool = False  # stopped by ``stop`` (a signal) before every chunk was done


    @property
    def rows_per_second(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0


class _Stopped(Exception):
    """Raised inside a chunk when the job is asked to stop: the chunk is left for the next run."""


class ModelError(ValueError):
    """A ``--model`` that gives no model: ``spec`` and ``reason`` (the CLI names the option)."""

    def __init__(self, spec: str, reason: str):
        super().__init__(f"model {spec!r}: {reason}")
        self.spec, self.reason = spec, reason


def load_model(spec: str) -> Callable:
    """``module:function`` -> ``function()``, the model_fn(x, t); a spec that gives no callable
    model is a :class:`ModelError` saying why."""
    module, sep, name = spec.partition(":")
    if not sep or not module or not name:
        raise ModelError(spec, "model must be 'module:function' (a factory called with no arguments).")
    try:
        factory = getattr(importlib.import_module(module), name)
    except Exception as error:  # ImportError, AttributeError, or the module failing as it is imported
        raise ModelError(spec, f"cannot be imported ({type(error).__name__}: {_first_line(error)}).") from None
    if not callable(factory):
        raise ModelError(spec, f"{module}.{name} is a {type(factory).__name__}, not a function returning model_fn(x, t).")
    try:
        model_fn = factory()
    except Exception as error:
        raise ModelError(spec, f"calling {name}() with no arguments failed ({type(error).__name__}: {_first_line(error)}); "
                               f"name a factory that takes none and returns model_fn(x, t).") from None
    if not callable(model_fn):
        raise ModelError(spec, f"{name}() returned {type(model_fn).__name__}, not a function model_fn(x, t).")
    return model_fn


def default_batch_rows(shapes: dict, row_shape: Optional[tuple]) -> int:
    """The largest well-shaped chunk's rows (1 if none), at most :data:`MAX_DEFAULT_BATCH_ROWS`."""
    rows = [shape[0] for shape in shapes.values() if len(shape) >= 2 and (row_shape is None or shape[1:] == tuple(row_shape))]
    return max(1, min(max(rows, default=1), MAX_DEFAULT_BATCH_ROWS))


def _in_batches(invert_rows: Callable, x: np.ndarray, batch_rows: int, stop: Optional[threading.Event] = None):
    """``invert_rows`` on pieces of exactly ``batch_rows`` rows (the last one padded by repeating its
    last row, the padding dropped after): one compiled program for every chunk, and a row's noise
    depends on the row and ``batch_rows`` alone (XLA's CPU matmul rounds differently for different
    row counts). Raises :class:`_Stopped` between pieces once ``stop`` is set.
    Returns ``(noise [rows, ...], samples [N, rows, ...] or None, round_trip [rows] or None)``."""
    noises, paths, round_trips = [], [], []
    for begin in range(0, x.shape[0], batch_rows):
        if stop is not None and stop.is_set():
            raise _Stopped()
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


# ----------------------------------------------------------------------------- checks before writing
def _positive_int(name: str, value, optional: bool = False) -> None:
    """Refuse anything but a positive int (``None`` too, when ``optional``)."""
    if optional and value is None:
        return
    checks.integer(name, value, 1, note=" (rows per model call) or None" if optional else "")


def _check_paths(input_dir: Path, output_dir: Path) -> None:
    """OUTPUT must be a folder (or not exist yet) apart from INPUT: the job never writes into its input."""
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"output {output_dir} is a file, not a folder: name a folder (it is created if missing).")
    above = next((p for p in output_dir.absolute().parents if p.exists() or p.is_symlink()), None)
    if above is not None and not above.is_dir():
        raise ValueError(f"output {output_dir} cannot be created: {above} is a file, not a folder.")
    source, target = input_dir.resolve(), output_dir.resolve()
    if source == target:
        relation = "is the input"
    elif target.is_relative_to(source):
        relation = "lies inside the input"
    elif source.is_relative_to(target):
        relation = "contains the input"
    else:
        return
    raise ValueError(f"output {output_dir} {relation} {input_dir}: the job never writes into its input, "
                     f"so name an output folder outside it.")


def _check_output_is_the_jobs(output_dir: Path) -> None:
    """OUTPUT must be missing, empty or an output of this job (it has ``settings.json``): the job
    never writes into, nor cleans, a folder of someone else's files."""
    try:
        entries = [entry for entry in os.listdir(output_dir) if not TEMP_NAME.fullmatch(entry)]
    except FileNotFoundError:
        return
    if not entries or "settings.json" in entries or (output_dir / "settings.json").exists():  # (a run creating it now)
        return
    raise ValueError(f"output {output_dir} is a folder of other files ({len(entries)} entries, no settings.json), not an "
                     f"output of this job: name a new or empty folder.")


def _first_line(error: BaseException, limit: int = 300) -> str:
    """An exception's message, first line, at most ``limit`` characters."""
    text = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_scheduler(scheduler, num_inference_steps: int, batch_rows: int, row_shape: Optional[tuple]):
    """The scheduler must be deterministic and take this many steps; returns its state for them."""
    if scheduler.config.is_sde:
        raise ValueError(f"algorithm_type={scheduler.config.algorithm_type!r} is a stochastic sampler: the batch job "
                         f"inverts deterministic ones ('dpmsolver++', 'dpmsolver').")
    shape = (batch_rows, *(row_shape or (1,)))
    return scheduler.set_timesteps(scheduler.create_state(), num_inference_steps, shape)  # a bad step count: ValueError


def _check_model(model_fn: Callable, model: str, scheduler, num_inference_steps: int, batch_rows: int,
                 row_shape: Optional[tuple]) -> None:
    """The model on ``[batch_rows, *row_shape]`` rows, traced (``jax.eval_shape``: nothing is
    compiled or run), so a job whose model cannot take the rows writes nothing."""
    if row_shape is None:
        return  # no readable chunk: nothing to try the model on (every chunk will be reported)
    state = _check_scheduler(scheduler=scheduler, num_inference_steps=num_inference_steps, batch_rows=batch_rows,
                             row_shape=row_shape)
    shape = (batch_rows, *row_shape)
    rows = jax.ShapeDtypeStruct(shape, jnp.float32)
    try:
        out = jax.eval_shape(model_fn, rows, state.timesteps[0])
    except Exception as error:
        raise ValueError(f"model {model} cannot take rows of shape {tuple(row_shape)} "
                         f"({type(error).__name__}: {_first_line(error)}).") from None
    if getattr(out, "shape", None) != shape:
        raise ValueError(f"model {model} returns {getattr(out, 'shape', type(out).__name__)} for input of shape {shape}: "
                         f"it must return one value per input value.")


# ----------------------------------------------------------------------------- claiming the output
def _create_exclusive(path: Path, text: str, durable: bool = True) -> bool:
    """Create ``path`` holding ``text`` if it does not exist, atomically: a temporary file (fsynced
    if ``durable``), hard-linked into place (the link fails if ``path`` exists), so ``path`` is never
    seen half written. Returns whether this call created it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(text.encode())
            if durable:
                f.flush()
                os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        except OSError:  # no hard links on this file system: an exclusive create, written in place
            try:
                with open(path, "xb") as f:
                    f.write(text.encode())
            except FileExistsError:
                return False
        if durable:
            _fsync_folder(path.parent)
        return True
    finally:
        os.unlink(tmp)


def _read_settings(path: Path) -> dict:
    """An existing ``settings.json``: a JSON object, or a ``ValueError`` naming the file. A file
    another process is creating right now (the no-hard-link fallback) is given a moment."""
    for _ in range(20):
        try:
            before = json.loads(path.read_text())
            break
        except (OSError, ValueError):
            if time.time() - path.stat().st_mtime > 2:
                before = read_json(path, "output settings")  # the reason, with the file named
            time.sleep(0.1)
    else:
        before = read_json(path, "output settings")
    if not isinstance(before, dict):
        raise ValueError(f"output settings {path} is not a JSON object: this folder was not written by this job, "
                         f"so write to a new output folder.")
    return before


def _check_same_settings(before: dict, settings: dict, output_dir: Path) -> None:
    """A resumed job must compute what the interrupted one did: an output store holding one
    setting's noise is never topped up with another's (nor with another input's shards). The
    input is known by its resolved path (and, for zarr, its metadata): a moved input is another job."""
    compared = [key for key in settings if key != "input_shards" and not (key in LATER_SETTINGS and key not in before)]
    changed = [key for key in compared if before.get(key) != settings[key]]
    if "input" not in changed:
        _check_same_shards(before, settings, output_dir)
    if changed:
        detail = "; ".join(f"{key}: was {before.get(key)!r}, now {settings[key]!r}" for key in changed
                           if key not in ("scheduler", "input"))
        if "input" in changed:
            detail = "; ".join(filter(None, [_input_change(before.get("input"), settings["input"]), detail]))
        if "scheduler" in changed:
            was = before.get("scheduler") if isinstance(before.get("scheduler"), dict) else {}
            keys = sorted(k for k in set(was) | set(settings["scheduler"]) if was.get(k) != settings["scheduler"].get(k))
            detail = "; ".join(filter(None, [detail, f"scheduler config differs in {', '.join(keys)}"]))
        raise ValueError(f"output {output_dir} was started with other settings ({detail}): "
                         f"rerun with the same settings or write to a new output folder.")


def _input_change(was, now: dict) -> str:
    """How the input differs from the one a job started on, in a few words."""
    was_path = was.get("path") if isinstance(was, dict) else None
    if was_path == now.get("path"):
        return f"input {now.get('path')}: its {'zarr metadata' if 'metadata_sha256' in now else 'kind'} changed"
    return (f"input: was {was_path if isinstance(was_path, str) else json.dumps(was)[:120]}, now {now.get('path')} "
            f"(the input's path is part of the job: an input moved or copied elsewhere is another job's)")


def _check_same_shards(before: dict, settings: dict, output_dir: Path) -> None:
    """The input's shard names must be those the output was started on."""
    if "input_shards" not in before:
        return
    listed = before["input_shards"] if isinstance(before["input_shards"], list) else []
    was, now = {name for name in listed if isinstance(name, str)}, set(settings["input_shards"])
    added, gone = sorted(now - was), sorted(was - now)
    if added or gone:
        name, what = (added[0], "is new") if added else (gone[0], "is gone")
        more = len(added) + len(gone) - 1
        raise ValueError(f"the input is not the one output {output_dir} was started on: its shard {name} {what}"
                         f"{f' (and {more} more shards differ)' if more else ''}; restore that input or write to a new output folder.")


def _claim_output(output_dir: Path, settings: dict) -> None:
    """Make ``output_dir`` this job's: create ``settings.json`` exclusively, or, if some run created
    it first, require the same settings (processes of one job share the output; two jobs never do)."""
    path = output_dir / "settings.json"
    if not _create_exclusive(path, json.dumps(settings, indent=1)):
        _check_same_settings(_read_settings(path), settings, output_dir)


def _input_changes(fingerprints: dict, output_dir: Path) -> tuple:
    """Each shard's bytes (``fingerprints``: name -> the store's fingerprint now) must be those the
    job started on (``inputs/NAME.json``); a shard not yet recorded whose earlier version was
    quarantined or unreadable may have been fixed. Reads only; returns ``(new, fixed)``, the
    fingerprint records to write (``path -> record``) once the output is claimed."""
    new, fixed = {}, {}
    for name, now in fingerprints.items():
        path = _side_path(output_dir / "inputs", name)
        before = _fingerprint_record(path)
        if before is None:
            (fixed if path.exists() else new)[path] = {"chunk": name, "fingerprint": now}  # a record lost to a crash: anew
            continue
        if before.get("fingerprint") == now:
            continue
        if _may_be_fixed(output_dir, name, before.get("fingerprint")):
            fixed[path] = {"chunk": name, "fingerprint": now}
            continue
        raise ValueError(f"input shard {name} is not the one output {output_dir} was started on (its bytes changed: "
                         f"was {_short(before.get('fingerprint'))}, now {_short(now)}); restore it or write to a new output folder.")
    return new, fixed


def _write_fingerprints(new: dict, fixed: dict, output_dir: Path) -> None:
    """Record the fingerprints of shards seen for the first time (``new``) and of fixed ones, once
    the output is claimed. A record another run wrote meanwhile must hold the same fingerprint:
    else the two runs read other bytes under one shard name, and this one is refused."""
    for path, record in new.items():  # one small file per shard: not fsynced (a record lost to a crash is made anew)
        if _create_exclusive(path, json.dumps(record), durable=False):
            continue
        before = _fingerprint_record(path)
        if before is not None and before.get("fingerprint") != record["fingerprint"]:
            raise ValueError(f"input shard {record['chunk']} is not the one output {output_dir} was started on (another "
                             f"run recorded it as {_short(before.get('fingerprint'))}, this run read "
                             f"{_short(record['fingerprint'])}); restore it or write to a new output folder.")
    for path, record in fixed.items():
        _atomic_write_text(path, json.dumps(record))


def _fingerprint_record(path: Path) -> Optional[dict]:
    """``inputs/NAME.json`` as written, or ``None`` if it is missing or unreadable."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and "fingerprint" in record else None


def _may_be_fixed(output_dir: Path, name: str, before) -> bool:
    """A shard may change under a resumed job only while its chunk is not recorded and it was
    quarantined (or unreadable when the job started): that change is its fix."""
    if (output_dir / "chunks" / name).is_file():
        return False
    return _side_path(output_dir / "failed", name).exists() or (isinstance(before, dict) and "error" in before)


def _short(fingerprint) -> str:
    """A fingerprint in a few words, for messages."""
    if isinstance(fingerprint, dict) and "sha256" in fingerprint:
        return f"{fingerprint['size']} bytes, sha256 {fingerprint['sha256'][:12]}"
    return json.dumps(fingerprint)[:120]


# ----------------------------------------------------------------------------- files, atomically
def _short_hash(text: str, length: int = 16) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:length]


_HOST_TAG = _short_hash(socket.gethostname(), 8)  # in temporary names: whose host they are


def _temp_prefix(path: Path) -> str:
    """A short temporary name beside ``path``: ``.HASH.HOST.PID.`` (a 255-byte shard name must not
    make its temporary name too long)."""
    return f".{_short_hash(path.name, 10)}.{_HOST_TAG}.{os.getpid()}."


def _side_path(folder: Path, name: str) -> Path:
    """``folder/NAME.json`` for chunk ``NAME.npy`` (subfolders kept); a name too long for that gets
    a hash instead (the JSON inside names the chunk)."""
    base = name[:-len(".npy")] if name.endswith(".npy") else name
    path = folder / f"{base}.json"
    return path if len(path.name.encode()) <= MAX_NAME_BYTES else path.parent / f"{_short_hash(name)}.json"


def _fsync_folder(folder: Path) -> None:
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _atomic_write(path: Path, write) -> None:
    """``write(file)`` into a temporary file beside ``path``, fsync, rename into place, fsync the
    folder: ``path`` then exists whole or not at all, also across a crash."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent)
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
    _fsync_folder(path.parent)


def _pid_is_dead(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, someone else's
        return False
    return False


def _is_dead_writers(tmp: Path, started: float) -> bool:
    """Whether ``tmp`` is a temporary file of this job (its name matches :data:`TEMP_NAME` exactly)
    that is left over: written by a process of this host that is gone, or untouched for
    :data:`STALE_TEMP_SECONDS` before this run started (any host). A live process' file, here or
    elsewhere, is left alone: it may be writing it."""
    match = TEMP_NAME.fullmatch(tmp.name)
    if match is None:
        return False
    pid = int(match["pid"])
    if pid == os.getpid():
        return False
    if match["host"] == _HOST_TAG and _pid_is_dead(pid):
        return True
    try:
        return tmp.stat().st_mtime < started - STALE_TEMP_SECONDS
    except FileNotFoundError:
        return False


def _remove_dead_writers_files(output_dir: Path, started: float) -> None:
    """Temporary files left by killed runs where the job writes: the output root (not below it) and
    the folders of :data:`JOB_FOLDERS` with theirs; see :func:`_is_dead_writers`."""
    places = [(output_dir, [entry.name for entry in os.scandir(output_dir) if entry.is_file(follow_symlinks=False)])]
    for job_folder in JOB_FOLDERS:
        places += [(Path(folder), files) for folder, _, files in os.walk(output_dir / job_folder)]
    for folder, files in places:
        for file in files:
            if _is_dead_writers(folder / file, started):
                (folder / file).unlink(missing_ok=True)


def _atomic_save(path: Path, array: np.ndarray) -> None:
    _atomic_write(path, lambda f: np.save(f, array))


def _atomic_write_text(path: Path, text: str) -> None:
    _atomic_write(path, lambda f: f.write(text.encode()))


def _append_event(path: Path, **event) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(dict(event, time=time.time(), pid=os.getpid())) + "\n")
        f.flush()
        os.fsync(f.fileno())


# ----------------------------------------------------------------------------- chunk claims
def _claim_chunk(output_dir: Path, name: str) -> Optional[int]:
    """Try to take chunk ``name`` for this process: an exclusive, non-blocking flock on
    ``claims/HASH`` (the kernel drops it when the process dies, so a killed run's claims are never
    stale). Returns the open descriptor, or ``None`` when another process holds the chunk. Where the
    file system has no locks the chunk is taken unclaimed."""
    path = output_dir / "claims" / _short_hash(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    if fcntl is None:
        return fd
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except OSError:  # no locks here (some network file systems): unclaimed
        return fd
    os.ftruncate(fd, 0)
    os.write(fd, f"{name}\n{socket.gethostname()} {os.getpid()}\n".encode())
    return fd


def _release_chunk(output_dir: Path, name: str, fd: int, done: bool) -> None:
    """Give a chunk's claim back; a recorded chunk's claim file is removed (whoever takes the
    file later finds the chunk recorded and leaves it)."""
    if done:
        (output_dir / "claims" / _short_hash(name)).unlink(missing_ok=True)
    os.close(fd)


def _remove_recorded_claims(output_dir: Path, done: Sequence[str]) -> None:
    """A run killed between recording a chunk and giving its claim back leaves ``claims/HASH``:
    remove those of recorded chunks nobody holds (whoever opened one finds its chunk recorded)."""
    for name in done:
        if not (output_dir / "claims" / _short_hash(name)).exists():
            continue
        fd = _claim_chunk(output_dir, name)
        if fd is not None:
            _release_chunk(output_dir, name, fd, done=True)


def _log_unlogged_records(events: Path, output_dir: Path, done: Sequence[str]) -> None:
    """A run killed between writing a chunk's output (the record) and logging it leaves the chunk
    done but unlogged: log it now (``"found": true``), so the audit has one "recorded" per chunk.
    A chunk still claimed is being logged by its live process and is left to it.
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
                if isinstance(event, dict) and event.get("event") == "recorded":
                    logged.add(event.get("chunk"))
    for name in done:
        if name in logged:
            continue
        fd = _claim_chunk(output_dir, name)
        if fd is None:
            continue
        try:
            rows = int(np.load(output_dir / "chunks" / name, mmap_mode="r").shape[0])
            _append_event(events, chunk=name, event="recorded", rows=rows, found=True)
        finally:
            _release_chunk(output_dir, name, fd, done=True)


# ----------------------------------------------------------------------------- the job
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
    fill_value_is_data: bool = False,
    stop: Optional[threading.Event] = None,
) -> Summary:
    """Invert every chunk of ``input_dir`` not yet recorded in ``output_dir``; see the module docstring.
    Every argument, the input and the model are checked before anything is written."""
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    started = time.time()
    _positive_int("num_inference_steps", num_inference_steps)
    _positive_int("batch_rows", batch_rows, optional=True)
    _check_paths(input_dir, output_dir)
    _check_output_is_the_jobs(output_dir)
    scheduler = scheduler or DPMSolverMultistepScheduler(final_sigmas_type="sigma_min")
    store = open_store(input_dir, fill_value_is_data=fill_value_is_data)
    names = store.names
    shapes = store.shapes()
    row_shape = store.row_shape or majority_row_shape(shapes)
    before = _read_settings(output_dir / "settings.json") if (output_dir / "settings.json").exists() else None
    if batch_rows is None:  # a resume keeps the job's rows per call (a fixed shard must not change them)
        recorded = before.get("batch_rows") if before else None
        valid = isinstance(recorded, int) and not isinstance(recorded, bool) and recorded >= 1
        batch_rows = recorded if valid else default_batch_rows(shapes, row_shape)
    _check_scheduler(scheduler=scheduler, num_inference_steps=num_inference_steps, batch_rows=batch_rows, row_shape=row_shape)
    settings = {"model": model, "num_inference_steps": num_inference_steps, "exact": exact, "batch_rows": batch_rows,
                "scheduler": json.loads(json.dumps(scheduler.config.to_dict())), "fill_value_is_data": fill_value_is_data,
                "save_trajectory": bool(save_trajectory), "input": store.describe(), "input_shards": list(names)}
    if before is not None:  # a resume: a mismatch is refused before the model is loaded
        _check_same_settings(before, settings, output_dir)
    mine = names[jax.process_index():: jax.process_count()]
    fingerprints = {name: store.fingerprint(name) for name in mine}
    _input_changes(fingerprints, output_dir)  # a changed shard is refused before the model is loaded, too
    model_fn = load_model(model)
    _check_model(model_fn=model_fn, model=model, scheduler=scheduler, num_inference_steps=num_inference_steps,
                 batch_rows=batch_rows, row_shape=row_shape)

    _claim_output(output_dir, settings)  # the first write
    # once the output is this job's: the records as they are now (another run may have written some meanwhile)
    _write_fingerprints(*_input_changes(fingerprints, output_dir), output_dir=output_dir)
    (output_dir / "chunks").mkdir(parents=True, exist_ok=True)
    _remove_dead_writers_files(output_dir, started)
    job = _Job(store=store, output_dir=output_dir, model_fn=model_fn, scheduler=scheduler,
               num_inference_steps=num_inference_steps, exact=exact, save_trajectory=save_trajectory,
               progress=progress, batch_rows=batch_rows, row_shape=row_shape, stop=stop or threading.Event(), mine=mine)
    summary = job.run()
    if summary.stopped:
        return summary  # no barrier, no manifest: the other processes may still be working
    if jax.process_count() > 1:  # the manifest is written once every process has finished its chunks
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("dpmjax invert-batch: all chunks done")
    if jax.process_index() == 0:
        _write_manifest(output_dir=output_dir, names=names, row_shape=row_shape, settings=settings)
    return summary


def _write_manifest(output_dir: Path, names: Sequence[str], row_shape: Optional[tuple], settings: dict) -> None:
    """``manifest.json``: the recorded shards in job order, the settings, each recorded shard's input
    fingerprint, and the shards still missing."""
    done = [name for name in names if (output_dir / "chunks" / name).is_file()]
    if row_shape is None and done:  # nothing read by this run: the recorded outputs say it
        row_shape = tuple(np.load(output_dir / "chunks" / done[0], mmap_mode="r").shape[1:])
    fingerprints = {}
    for name in done:
        record = _fingerprint_record(_side_path(output_dir / "inputs", name))
        fingerprints[name] = record["fingerprint"] if record else None
    job_settings = {key: value for key, value in settings.items() if key != "input_shards"}
    _atomic_write_text(output_dir / "manifest.json", json.dumps({
        "shards": done, "row_shape": list(row_shape) if row_shape else None, "of": "noise", **job_settings,
        "input_fingerprints": fingerprints, "missing": [n for n in names if n not in set(done)]}, indent=1))


@dataclasses.dataclass
class _Job:
    """One run's chunks, inverted by a worker thread per local device."""

    store: object
    output_dir: Path
    model_fn: Callable
    scheduler: DPMSolverMultistepScheduler
    num_inference_steps: int
    exact: bool
    save_trajectory: bool
    progress: bool
    batch_rows: int
    row_shape: Optional[tuple]
    stop: threading.Event
    mine: list
    interrupted: bool = False  # a chunk was left part-way because of ``stop``

    def run(self) -> Summary:
        """Every chunk of ``mine`` not yet recorded, then the summary."""
        self.events = self.output_dir / "events.jsonl"
        self.recorded, self.skipped, self.failed, self.not_converged = [], [], {}, {}
        self.todo, self.busy = [], []  # busy: chunks another process was computing when we came to them
        for name in self.mine:
            (self.skipped if (self.output_dir / "chunks" / name).is_file() else self.todo).append(name)
        _log_unlogged_records(self.events, self.output_dir, self.skipped)
        _remove_recorded_claims(self.output_dir, self.skipped)
        self.lock = threading.Lock()  # guards the queues, the lists above, events.jsonl and the progress line
        self.counts = {"rows": 0, "done": len(self.skipped)}
        self.errors: list = []
        self.start = time.perf_counter()
        self.started = time.time()
        threads = [threading.Thread(target=self.worker, args=(device,), daemon=True) for device in jax.local_devices()]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if self.progress:
            sys.stderr.write("\n")
        if self.errors:
            raise self.errors[0]
        stopped = self.stop.is_set() and bool(self.todo or self.busy or self.interrupted)
        return Summary(recorded=self.recorded, skipped=self.skipped, failed=self.failed, rows=self.counts["rows"],
                       seconds=time.perf_counter() - self.start, not_converged=self.not_converged, stopped=stopped)

    def next_chunk(self) -> Optional[tuple]:
        """``(name, fd)`` of the next chunk this worker holds the claim of, or ``None`` when none is
        left (or the job stops). A chunk another process holds is looked at again later."""
        while True:
            with self.lock:
                if self.errors or self.stop.is_set():
                    return None
                queue = self.todo or self.busy
                if not queue:
                    return None
                name = queue.pop(0)
                retry = queue is self.busy
            fd = _claim_chunk(self.output_dir, name)
            if fd is None:
                with self.lock:
                    self.busy.append(name)
                if retry:
                    time.sleep(CLAIM_POLL_SECONDS)
                continue
            if (self.output_dir / "chunks" / name).is_file():  # recorded meanwhile by another process
                _release_chunk(self.output_dir, name, fd, done=True)
                with self.lock:
                    self.skipped.append(name)
                    self.counts["done"] += 1
                continue
            if retry and self.failed_meanwhile(name):  # quarantined meanwhile by another process
                _release_chunk(self.output_dir, name, fd, done=False)
                continue
            return name, fd

    def failed_meanwhile(self, name: str) -> bool:
        """Whether another process quarantined chunk ``name`` after this run began (then its
        reason is taken over instead of failing the chunk a second time)."""
        report = _side_path(self.output_dir / "failed", name)
        try:
            if report.stat().st_mtime < self.started:
                return False
            reason = json.loads(report.read_text())["reason"]
        except (OSError, ValueError, KeyError, TypeError):
            return False
        with self.lock:
            self.failed[name] = reason
        return True

    def worker(self, device) -> None:
        """One per local device: whole chunks, the same single-device program."""
        while True:
            claimed = self.next_chunk()
            if claimed is None:
                return
            name, fd = claimed
            done = False
            try:
                done = self.invert_chunk(name, device)
            except _Stopped:
                with self.lock:
                    self.interrupted = True
            except BaseException as error:  # not the chunk's fault (the model, the disk): stop the job
                with self.lock:
                    self.errors.append(error)
                return
            finally:
                _release_chunk(self.output_dir, name, fd, done=done)

    def invert_chunk(self, name: str, device) -> bool:
        """Invert one claimed chunk and record it (or quarantine it); returns whether it is recorded."""
        with self.lock:
            _append_event(self.events, chunk=name, event="started", device=device.id)
        try:
            x = self.store.read(name, self.row_shape)
            noise, samples, round_trip = _in_batches(invert_rows=self.invert_rows(device), x=x, batch_rows=self.batch_rows,
                                                     stop=self.stop)
            if not np.all(np.isfinite(noise)):
                raise ChunkError("the inversion produced non-finite noise")
        except ChunkError as error:
            self.quarantine(name, device, str(error))
            return False
        self.record(name=name, device=device, noise=noise, samples=samples, round_trip=round_trip)
        return True

    def invert_rows(self, device) -> Callable:
        """``piece -> (noise, samples or None, round_trip or None)`` on ``device``."""
        def invert_rows(piece):
            result = invert(self.model_fn, jax.device_put(piece, device), self.scheduler, self.num_inference_steps,
                            exact=self.exact, return_samples=self.save_trajectory,
                            **({"tolerance": EXACT_TOLERANCE} if self.exact else {}))
            return result.sample, result.samples if self.save_trajectory else None, result.round_trip
        return invert_rows

    def quarantine(self, name: str, device, reason: str) -> None:
        _atomic_write_text(_side_path(self.output_dir / "failed", name), json.dumps({"chunk": name, "reason": reason}))
        with self.lock:
            self.failed[name] = reason
            _append_event(self.events, chunk=name, event="failed", device=device.id, reason=reason)

    def record(self, name: str, device, noise: np.ndarray, samples, round_trip) -> None:
        """Write a chunk's outputs, the noise last (the record), log it and show progress."""
        if self.save_trajectory:
            _atomic_save(self.output_dir / "trajectories" / name, np.moveaxis(samples, 0, 1))
        missed = []
        if round_trip is not None:  # exact inversion: every row's measured round trip, and the rows that missed
            _atomic_save(self.output_dir / "round_trips" / name, round_trip)
            missed = np.flatnonzero(~(round_trip <= EXACT_TOLERANCE)).tolist()
        _atomic_save(self.output_dir / "chunks" / name, noise)  # the record: from here on the chunk is done
        _side_path(self.output_dir / "failed", name).unlink(missing_ok=True)
        rows = int(noise.shape[0])
        with self.lock:
            _append_event(self.events, chunk=name, event="recorded", device=device.id, rows=rows,
                          **({"rows_not_converged": missed} if round_trip is not None else {}))
            self.recorded.append(name)
            if missed:
                self.not_converged[name] = missed
            self.counts["rows"] += rows
            self.counts["done"] += 1
            if self.progress:
                elapsed = time.perf_counter() - self.start
                sys.stderr.write("\r" + progress_line.line(
                    "invert-batch", self.counts["done"], len(self.mine), unit="chunks",
                    suffix=f", {self.counts['rows']} rows ({self.counts['rows'] / max(elapsed, 1e-9):.0f} rows/s), "
                           f"{len(self.failed)} failed"))
                sys.stderr.flush()


# ----------------------------------------------------------------------------- the command
def _scheduler(args) -> DPMSolverMultistepScheduler:
    """The scheduler the options ask for; a config that cannot be used is a ``ValueError`` naming it."""
    # without a config: diffusers' default grid, but uniform in log-SNR for exact inversion, where every
    # step of the shipped model's sampler inverts (the default grid's last step folds)
    try:
        scheduler = (DPMSolverMultistepScheduler.from_pretrained(args.config) if args.config
                     else DPMSolverMultistepScheduler(final_sigmas_type="sigma_min", use_lu_lambdas=args.exact))
        if args.order:
            scheduler = DPMSolverMultistepScheduler(scheduler.config.replace(solver_order=args.order))
    except Exception as error:
        if not args.config:
            raise
        raise ValueError(f"scheduler config {args.config} cannot be used ({type(error).__name__}: {_first_line(error)}).") from None
    return scheduler


class _StopOnSignals:
    """While active, SIGINT and SIGTERM set ``event`` (the job stops cleanly, resumable); a second
    signal ends the process at once (the store stays resumable: every write is atomic)."""

    def __init__(self, event: threading.Event):
        self.event, self.received, self.previous = event, [], {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for number in (signal.SIGINT, signal.SIGTERM):
                self.previous[number] = signal.signal(number, self.handle)
        return self

    def handle(self, number, frame) -> None:
        if self.received:
            sys.stderr.write(f"\ninvert-batch: {signal.Signals(number).name} again: stopped at once; "
                             f"rerun the same command to resume.\n")
            sys.stderr.flush()
            os._exit(128 + number)
        self.received.append(number)
        self.event.set()

    def __exit__(self, *exc) -> None:
        for number, handler in self.previous.items():
            signal.signal(number, handler)


def _error(message: str) -> int:
    """A user's mistake: one line on stderr, exit status 2."""
    sys.stderr.write(f"dpmjax invert-batch: error: {message}\n")
    return 2


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
                             f"(default: the largest chunk's rows, at most {MAX_DEFAULT_BATCH_ROWS}; a resume keeps the job's)")
    parser.add_argument("--fill-value-is-data", action="store_true",
                        help="zarr input: a missing chunk file means its rows hold the fill value (default: such rows are quarantined)")
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
    stop = threading.Event()
    with _StopOnSignals(stop) as signals:
        try:
            if args.distributed:
                jax.distributed.initialize(**cluster)
            summary = run(args.input, args.output, model=args.model, num_inference_steps=args.steps, scheduler=_scheduler(args),
                          exact=args.exact, save_trajectory=args.save_trajectory, batch_rows=args.batch_rows,
                          fill_value_is_data=args.fill_value_is_data, stop=stop)
        except ModelError as error:
            return _error(f"--model {error.spec}: {_first_line(ValueError(error.reason), limit=1000)}")
        except (ValueError, OSError) as error:
            return _error(_first_line(error, limit=1000))
    if summary.stopped:
        number = signals.received[0] if signals.received else signal.SIGINT
        sys.stderr.write(f"invert-batch: stopped by {signal.Signals(number).name} after recording {len(summary.recorded)} "
                         f"chunks; rerun the same command to resume.\n")
        return 128 + number
    print(f"invert-batch: {len(summary.recorded)} chunks inverted ({summary.rows} rows, {summary.rows_per_second:.0f} rows/s), "
          f"{len(summary.skipped)} already done, {len(summary.failed)} failed")
    for name, reason in summary.failed.items():
        print(f"  FAILED {name}: {reason}")
    if args.exact:
        missed = sum(len(rows) for rows in summary.not_converged.values())
        print(f"exact inversion: {summary.rows - missed} of {summary.rows} rows within round trip {EXACT_TOLERANCE:g}"
              + (f"; not converged (rows by chunk, round trips in round_trips/): {summary.not_converged}" if missed else ""))
    return 1 if summary.failed else 0

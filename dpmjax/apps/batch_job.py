"""A resumable batch inversion job: an array store in, noise shards out; a killed run restarts
where it stopped, a rerun is idempotent, a bad chunk is reported and the rest is done.

Input (:mod:`dpmjax.apps.input_stores`, only ever read): a folder of ``.npy`` shards, one chunk each
(every ``*.npy`` sorted by name, or exactly the files listed in ``INPUT/manifest.json``:
``{"shards": [...], "row_shape": [...]}``, relative paths, subfolders kept), or a zarr array
``[rows, *row_shape]`` (v2 or v3, read with tensorstore) cut into chunks of its own row chunking,
named ``rows-BEGIN-END.npy``. Output (:mod:`dpmjax.apps.output_store`, its layout and guarantees):
``settings.json`` claimed atomically by the first run (a run with other settings, another input
path included, is refused), the noise of chunk NAME in ``chunks/NAME.npy`` (with
``trajectories/``, ``round_trips/``), quarantined chunks in ``failed/``, the inputs' fingerprints
in ``inputs/``, ``events.jsonl``, and ``manifest.json`` at the end.

Nothing is written before every setting is checked: the paths (OUTPUT neither is, nor lies inside,
nor contains INPUT; an existing OUTPUT is empty or this job's), the input (its manifest), the
scheduler and steps, and the model on one batch of the rows' shape (traced, not run).

A chunk counts as recorded once its output file exists; a restarted job skips it (and never
recomputes it). Each chunk is checked before and after: readable .npy, ``[rows, *row_shape]`` (the
manifest's or the zarr array's ``row_shape``, else the shape most chunks have) with at least one
row, finite input within float32's range, every zarr chunk file present, finite noise. The model
comes from ``module:function`` (called once with no arguments, returning ``model_fn(x, t)``); the
built-in default is the shipped digits model without guidance.

Concurrent runs with the same settings share the output: a process takes a chunk only under its
claim (an flock, released by the kernel when the process dies), so no chunk is computed twice; a
chunk another process is computing is left to it and waited for at the end.

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
import errno
import importlib
import json
import os
import signal
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .. import checks
from ..scheduler import DPMSolverMultistepScheduler
from ..trajectories import progress as progress_line
from ..trajectories.inversion import invert
from .input_stores import CHUNK_COPIES, ChunkError, majority_row_shape, open_store, shown
from .memory import array_bytes, device_memory, in_words
from .output_store import OutputStore

# exact inversion: a row whose measured round trip max|sample(noise) - x| / max(1, max|x|) exceeds this
# is reported (events.jsonl, the summary); every row's round trip is kept in round_trips/
EXACT_TOLERANCE = 1e-5

# exit statuses of ``dpmjax invert-batch`` (signals: 128 + the signal's number)
EXIT_OK = 0  # every chunk recorded (with --exact: every row within EXACT_TOLERANCE)
EXIT_FAILED = 1  # chunks quarantined in failed/, or the job stopped on an error that is no chunk's (model, disk)
EXIT_REFUSED = 2  # a setting, path, input or model refused before anything was computed
EXIT_NOT_CONVERGED = 3  # every chunk recorded, but exact inversion left rows above EXACT_TOLERANCE
# one piece of rows on a device: the rows, the noise, the model's output and the solver's history are
# (solver_order + PIECE_COPIES) float32 arrays of [batch_rows, *row_shape]; they may take at most
# 1/DEVICE_SHARE of the device's memory (the model needs the rest)
PIECE_COPIES = 3
DEVICE_SHARE = 2

DEFAULT_MODEL = "dpmjax.models.digits:unguided_model"
MAX_DEFAULT_BATCH_ROWS = 256  # rows per model call when the job is not told: memory stays bounded
CLAIM_POLL_SECONDS = 0.05
MAX_LISTED = 20  # chunks named one per line in the CLI's summary (the rest: failed/ and manifest.json)  # how often a run looks again at chunks other processes are computing


@dataclasses.dataclass(frozen=True)
class Summary:
    recorded: list  # chunks computed by this run
    skipped: list  # chunks already recorded before this run (or meanwhile by a concurrent process)
    failed: dict  # chunk -> reason
    rows: int  # rows computed by this run
    seconds: float
    # exact inversion, over every chunk of this process recorded in the output (this run's and earlier
    # runs'), read from round_trips/: chunk -> rows whose round trip missed, and the rows checked
    not_converged: dict = dataclasses.field(default_factory=dict)
    stopped: bool = False  # stopped by ``stop`` (a signal) before every chunk was done
    exact_rows: int = 0  # exact inversion: rows of the recorded chunks whose round trips were read
    notes: tuple = ()  # things the user should know that did not stop the job (e.g. corrupt log lines)


    @property
    def rows_per_second(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0


class _Stopped(Exception):
    """Raised inside a chunk when the job is asked to stop: the chunk is left for the next run."""


class JobError(RuntimeError):
    """The job stopped on an error that is not a chunk's (the model raised, the disk is full):
    every chunk recorded so far is kept and a rerun resumes."""


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
    except BaseException as error:  # ImportError, AttributeError, the module failing (or exiting) as it is imported
        raise ModelError(spec, f"cannot be imported ({type(error).__name__}: {_first_line(error)}).") from None
    if not callable(factory):
        raise ModelError(spec, f"{module}.{name} is a {type(factory).__name__}, not a function returning model_fn(x, t).")
    try:
        model_fn = factory()
    except BaseException as error:  # SystemExit too: a factory that exits gives no model, and is no success
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


def _first_line(error: BaseException, limit: int = 300) -> str:
    """An exception's message, first line, at most ``limit`` characters."""
    text = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_sizes(*, batch_rows: int, row_shape: Optional[tuple], scheduler) -> None:
    """One piece of ``batch_rows`` rows must fit on a device before anything of its size is made:
    the job's own arrays for it ((solver_order + :data:`PIECE_COPIES`) float32 copies of
    ``[batch_rows, *row_shape]``) may take at most 1/:data:`DEVICE_SHARE` of the device's memory."""
    if row_shape is None:
        return
    copies = scheduler.config.solver_order + PIECE_COPIES
    need = copies * array_bytes((batch_rows, *row_shape))
    memory = device_memory(jax.local_devices()[0])
    if memory is not None and need > memory // DEVICE_SHARE:
        raise ValueError(f"batch_rows {batch_rows} with rows of shape {tuple(row_shape)}: one piece needs {in_words(need)} "
                         f"for the job's own arrays ({copies} float32 copies of {in_words(need / copies)}), more than "
                         f"1/{DEVICE_SHARE} of the device's {in_words(memory)} of memory; use fewer rows per call "
                         f"(--batch-rows) or check the rows' shape.")


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
    except BaseException as error:  # SystemExit too
        raise ValueError(f"model {model} cannot take rows of shape {tuple(row_shape)} "
                         f"({type(error).__name__}: {_first_line(error)}).") from None
    if getattr(out, "shape", None) != shape:
        raise ValueError(f"model {model} returns {getattr(out, 'shape', type(out).__name__)} for input of shape {shape}: "
                         f"it must return one value per input value.")


# ----------------------------------------------------------------------------- the job
class _Plan(NamedTuple):
    """A run's checked settings and inputs, all fixed before anything is written."""

    input: object  # the input store (input_stores), only read
    output: OutputStore
    names: list  # every chunk, in job order
    mine: list  # this process' chunks
    fingerprints: dict  # name -> the input store's fingerprint, of ``mine``
    row_shape: Optional[tuple]
    settings: dict  # as claimed in settings.json
    model_fn: Callable
    scheduler: DPMSolverMultistepScheduler
    num_inference_steps: int
    exact: bool
    save_trajectory: bool
    batch_rows: int


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
    started = time.time()
    plan = _plan(input_dir=Path(input_dir), output=OutputStore(output_dir), model=model,
                 num_inference_steps=num_inference_steps, scheduler=scheduler, exact=exact,
                 save_trajectory=save_trajectory, batch_rows=batch_rows, fill_value_is_data=fill_value_is_data)
    plan.output.claim(settings=plan.settings, fingerprints=plan.fingerprints, started=started)  # the first write
    summary = _Job(plan=plan, progress=progress, stop=stop or threading.Event()).run()
    if plan.exact:  # every recorded chunk's rows, resumed or not, from the round trips written beside the noise
        report = plan.output.round_trips(plan.mine, EXACT_TOLERANCE)
        summary = dataclasses.replace(summary, exact_rows=sum(r["rows"] for r in report.values()),
                                      not_converged={n: r["rows_not_converged"] for n, r in report.items()
                                                     if r["rows_not_converged"]})
    count, first = plan.output.corrupt_event_lines
    if count:
        summary = dataclasses.replace(summary, notes=summary.notes + (
            f"{plan.output.root / 'events.jsonl'}: {count} line(s) are no JSON event (the first is line {first}); "
            f"they were skipped",))
    if not summary.stopped:  # stopped: no barrier, no manifest (the other processes may still be working)
        _write_manifest(plan)
    return summary


def _plan(*, input_dir: Path, output: OutputStore, model: str, num_inference_steps: int,
          scheduler: Optional[DPMSolverMultistepScheduler], exact: bool, save_trajectory: bool,
          batch_rows: Optional[int], fill_value_is_data: bool) -> _Plan:
    """Every check, reading only: the arguments, the paths, the input, a resumed job's settings and
    input shards (refused before the model is loaded), then the model on one batch."""
    _positive_int("num_inference_steps", num_inference_steps)
    _positive_int("batch_rows", batch_rows, optional=True)
    output.check_usable(input_dir)
    scheduler = scheduler or DPMSolverMultistepScheduler(final_sigmas_type="sigma_min")
    copies = CHUNK_COPIES + (num_inference_steps + 1 if save_trajectory else 0)  # a chunk's float32 copies on the host
    store = open_store(input_dir, fill_value_is_data=fill_value_is_data, copies=copies)
    shapes = store.shapes()
    row_shape = store.row_shape or majority_row_shape(shapes)
    before = output.settings()
    if batch_rows is None:
        batch_rows = _resumed_batch_rows(before=before, shapes=shapes, row_shape=row_shape)
    _check_sizes(batch_rows=batch_rows, row_shape=row_shape, scheduler=scheduler)
    _check_scheduler(scheduler=scheduler, num_inference_steps=num_inference_steps, batch_rows=batch_rows, row_shape=row_shape)
    settings = {"model": model, "num_inference_steps": num_inference_steps, "exact": exact, "batch_rows": batch_rows,
                "scheduler": json.loads(json.dumps(scheduler.config.to_dict())), "fill_value_is_data": fill_value_is_data,
                "save_trajectory": bool(save_trajectory), "input": store.describe(), "input_shards": list(store.names)}
    if before is not None:
        output.check_same_settings(before, settings)
    mine = store.names[jax.process_index():: jax.process_count()]
    fingerprints = {name: store.fingerprint(name) for name in mine}
    output.check_inputs(fingerprints)
    model_fn = load_model(model)
    _check_model(model_fn=model_fn, model=model, scheduler=scheduler, num_inference_steps=num_inference_steps,
                 batch_rows=batch_rows, row_shape=row_shape)
    return _Plan(input=store, output=output, names=store.names, mine=mine, fingerprints=fingerprints,
                 row_shape=row_shape, settings=settings, model_fn=model_fn, scheduler=scheduler,
                 num_inference_steps=num_inference_steps, exact=exact, save_trajectory=save_trajectory,
                 batch_rows=batch_rows)


def _resumed_batch_rows(before: Optional[dict], shapes: dict, row_shape: Optional[tuple]) -> int:
    """Rows per call when not given: a resume keeps the job's (a fixed shard must not change them)."""
    recorded = before.get("batch_rows") if before else None
    valid = isinstance(recorded, int) and not isinstance(recorded, bool) and recorded >= 1
    return recorded if valid else default_batch_rows(shapes, row_shape)


def _write_manifest(plan: _Plan) -> None:
    """The manifest, by process 0 once every process has finished its chunks."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("dpmjax invert-batch: all chunks done")
    if jax.process_index() == 0:
        plan.output.write_manifest(names=plan.names, row_shape=plan.row_shape, settings=plan.settings,
                                   tolerance=EXACT_TOLERANCE if plan.exact else None)


@dataclasses.dataclass
class _Tally:
    """What one run has done so far; its worker threads change it only under ``lock``."""

    todo: list  # chunks not taken yet
    skipped: list  # recorded before this run, or meanwhile by another process
    done: int  # chunks recorded, failed or skipped, for the progress line
    busy: list = dataclasses.field(default_factory=list)  # chunks another process was computing when we came to them
    recorded: list = dataclasses.field(default_factory=list)  # computed by this run
    failed: dict = dataclasses.field(default_factory=dict)  # chunk -> reason
    not_converged: dict = dataclasses.field(default_factory=dict)  # exact inversion: chunk -> rows that missed
    rows: int = 0  # rows computed by this run
    errors: list = dataclasses.field(default_factory=list)  # not a chunk's fault (the model, the disk): the job stops
    interrupted: bool = False  # a chunk was left part-way because of ``stop``
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)


@dataclasses.dataclass
class _Job:
    """One run's chunks, inverted by a worker thread per local device."""

    plan: _Plan
    progress: bool
    stop: threading.Event

    def run(self) -> Summary:
        """Every chunk of ``plan.mine`` not yet recorded, then the summary."""
        output = self.plan.output
        todo, skipped = [], []
        for name in self.plan.mine:
            (skipped if output.is_recorded(name) else todo).append(name)
        output.tidy_recorded(skipped)
        unreadable = self.unreadable(todo)
        self.tally = tally = _Tally(todo=[name for name in todo if name not in unreadable], skipped=skipped,
                                    done=len(skipped) + len(unreadable), failed=dict(unreadable))
        self.start, self.started = time.perf_counter(), time.time()
        if unreadable:
            output.quarantine_many(unreadable)
        self.show()  # chunks recorded before this run (and shards that cannot be read) count as done from the start
        threads = [threading.Thread(target=self.worker, args=(device,), daemon=True) for device in jax.local_devices()]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if self.progress and progress_line.interactive():
            sys.stderr.write("\n")
        if tally.errors:
            name, error = tally.errors[0]
            hint = " (free space, then" if isinstance(error, OSError) and error.errno == errno.ENOSPC else " ("
            raise JobError(f"the job stopped while inverting chunk {shown(name)}: {type(error).__name__}: "
                           f"{_first_line(error)}{hint} rerun the same command to resume: every chunk recorded "
                           f"so far is kept).") from error
        stopped = self.stop.is_set() and bool(tally.todo or tally.busy or tally.interrupted)
        return Summary(recorded=tally.recorded, skipped=tally.skipped, failed=tally.failed, rows=tally.rows,
                       seconds=time.perf_counter() - self.start, not_converged=tally.not_converged, stopped=stopped)

    def next_chunk(self) -> Optional[tuple]:
        """``(name, claim)`` of the next chunk this worker holds the claim of, or ``None`` when none
        is left (or the job stops). A chunk another process holds is looked at again later."""
        tally, output = self.tally, self.plan.output
        while True:
            with tally.lock:
                if tally.errors or self.stop.is_set():
                    return None
                queue = tally.todo or tally.busy
                if not queue:
                    return None
                name = queue.pop(0)
                retry = queue is tally.busy
            claim = output.claim_chunk(name)
            if claim is None:
                with tally.lock:
                    tally.busy.append(name)
                if retry:
                    time.sleep(CLAIM_POLL_SECONDS)
                continue
            if output.is_recorded(name):  # recorded meanwhile by another process
                claim.release(recorded=True)
                with tally.lock:
                    tally.skipped.append(name)
                    self.advance()
                continue
            if retry and self.failed_meanwhile(name):  # quarantined meanwhile by another process
                claim.release(recorded=False)
                continue
            return name, claim

    def unreadable(self, todo: list) -> dict:
        """The chunks of ``todo`` whose shard could not even be opened when the job started
        (missing, no permission): name -> why. They are quarantined together, before the workers
        start, instead of one claim, record and fsync each."""
        fingerprints = self.plan.fingerprints
        return {name: f"unreadable ({fingerprints[name]['error']})" for name in todo
                if isinstance(fingerprints.get(name), dict) and "error" in fingerprints[name]}

    def failed_meanwhile(self, name: str) -> bool:
        """Whether another process quarantined chunk ``name`` after this run began (then its
        reason is taken over instead of failing the chunk a second time)."""
        reason = self.plan.output.failure_since(name, self.started)
        if reason is None:
            return False
        with self.tally.lock:
            self.tally.failed[name] = reason
            self.advance()
        return True

    def worker(self, device) -> None:
        """One per local device: whole chunks, the same single-device program."""
        while (claimed := self.next_chunk()) is not None:
            name, claim = claimed
            recorded = False
            try:
                recorded = self.invert_chunk(name, device)
            except _Stopped:
                with self.tally.lock:
                    self.tally.interrupted = True
            except BaseException as error:  # not the chunk's fault (the model, even exiting; the disk): stop the job
                with self.tally.lock:
                    self.tally.errors.append((name, error))
                return
            finally:
                claim.release(recorded=recorded)

    def invert_chunk(self, name: str, device) -> bool:
        """Invert one claimed chunk and record it (or quarantine it); returns whether it is recorded."""
        self.plan.output.log(chunk=name, event="started", device=device.id)
        try:
            unnamable = self.plan.output.can_record(name)
            if unnamable:
                raise ChunkError(unnamable)
            x = self.plan.input.read(name, self.plan.row_shape)
            noise, samples, round_trip = _in_batches(invert_rows=self.invert_rows(device), x=x,
                                                     batch_rows=self.plan.batch_rows, stop=self.stop)
            if not np.all(np.isfinite(noise)):
                raise ChunkError("the inversion produced non-finite noise")
        except ChunkError as error:
            self.quarantine(name, device, str(error))
            return False
        self.record(name=name, device=device, noise=noise, samples=samples, round_trip=round_trip)
        return True

    def invert_rows(self, device) -> Callable:
        """``piece -> (noise, samples or None, round_trip or None)`` on ``device``."""
        plan = self.plan

        def invert_rows(piece):
            result = invert(model_fn=plan.model_fn, sample=jax.device_put(piece, device), scheduler=plan.scheduler,
                            num_inference_steps=plan.num_inference_steps, exact=plan.exact,
                            return_samples=plan.save_trajectory, **({"tolerance": EXACT_TOLERANCE} if plan.exact else {}))
            return result.sample, result.samples if plan.save_trajectory else None, result.round_trip
        return invert_rows

    def quarantine(self, name: str, device, reason: str) -> None:
        self.plan.output.quarantine(name, reason)
        with self.tally.lock:
            self.tally.failed[name] = reason
            self.advance()
        self.plan.output.log(chunk=name, event="failed", device=device.id, reason=reason)

    def record(self, name: str, device, noise: np.ndarray, samples, round_trip) -> None:
        """Write a chunk's outputs (the noise last: the record), log it and show progress."""
        missed = [] if round_trip is None else np.flatnonzero(~(round_trip <= EXACT_TOLERANCE)).tolist()
        self.plan.output.write_chunk(name=name, noise=noise, round_trip=round_trip,
                                     trajectory=np.moveaxis(samples, 0, 1) if self.plan.save_trajectory else None)
        rows = int(noise.shape[0])
        # exact inversion: the rows whose round trip missed (every row's round trip is in round_trips/)
        self.plan.output.log(chunk=name, event="recorded", device=device.id, rows=rows,
                             **({"rows_not_converged": missed} if round_trip is not None else {}))
        tally = self.tally
        with tally.lock:
            tally.recorded.append(name)
            if missed:
                tally.not_converged[name] = missed
            tally.rows += rows
            self.advance()

    def advance(self) -> None:
        """One more chunk done (recorded, failed or skipped): count it and redraw the progress line.
        Called under ``tally.lock``."""
        self.tally.done += 1
        self.show()

    def show(self) -> None:
        """Redraw the progress line (when ``progress``); called under ``tally.lock`` once threads run."""
        tally = self.tally
        if self.progress:  # redrawn in place on a terminal; a line per chunk in a log file
            text = progress_text(done=tally.done, total=len(self.plan.mine), rows=tally.rows, failed=len(tally.failed),
                                 seconds=time.perf_counter() - self.start)
            sys.stderr.write("\r" + text if progress_line.interactive() else text + "\n")
            sys.stderr.flush()


def progress_text(*, done: int, total: int, rows: int, failed: int, seconds: float) -> str:
    """The progress line: ``invert-batch [###...] done/total chunks, R rows (S rows/s), F failed``;
    one rate, this run's rows over the time since the job started (chunks recorded before this
    run count in ``done``, not in the rate)."""
    rate = f" ({rows / seconds:.0f} rows/s)" if rows and seconds > 0 else ""
    return f"invert-batch {progress_line.bar(done, total)} {done}/{total} chunks, {rows} rows{rate}, {failed} failed"


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
        scheduler.set_timesteps(scheduler.create_state(), args.steps, (1,))  # the grid for --steps (one value a row)
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


EPILOG = f"""guarantees:
  the input is only read, through resolved paths that stay inside INPUT; nothing is written before
  every setting, path and size is checked; every file is written whole (a temporary file, fsynced,
  renamed) and only inside OUTPUT; a killed or stopped run resumes where it stopped; a bad shard is
  quarantined in OUTPUT/failed/ and the rest is done; with --exact, every row's round trip is kept
  in OUTPUT/round_trips/ and counted in every summary and in manifest.json, resumed or not.

exit status:
  {EXIT_OK}  every chunk recorded (with --exact: every row within round trip {EXACT_TOLERANCE:g})
  {EXIT_FAILED}  chunks quarantined (OUTPUT/failed/), or the job stopped on an error that is no
     chunk's (the model, the disk): a rerun resumes
  {EXIT_REFUSED}  a setting, path, input or model refused before anything was computed
  {EXIT_NOT_CONVERGED}  every chunk recorded, but exact inversion left rows above the tolerance
  130/143  stopped by SIGINT/SIGTERM: a rerun resumes"""


def _error(message: str) -> int:
    """A user's mistake: one line on stderr, exit status 2."""
    sys.stderr.write(f"dpmjax invert-batch: error: {message}\n")
    return 2


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="dpmjax invert-batch", epilog=EPILOG,
                                     description=textwrap.fill(" ".join(__doc__.split("\n\n")[0].split()), width=100),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
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
        return _error(f"--steps must be >= 1 (got {args.steps})")
    cluster = {k: v for k, v in (("coordinator_address", args.coordinator_address), ("num_processes", args.num_processes),
                                 ("process_id", args.process_id)) if v is not None}
    if cluster and not args.distributed:
        return _error(f"{', '.join('--' + k.replace('_', '-') for k in cluster)} need{'s' if len(cluster) == 1 else ''} "
                      f"--distributed")
    stop = threading.Event()
    with _StopOnSignals(stop) as signals:
        try:
            if args.distributed:
                jax.distributed.initialize(**cluster)
            summary = run(input_dir=args.input, output_dir=args.output, model=args.model, num_inference_steps=args.steps,
                          scheduler=_scheduler(args), exact=args.exact, save_trajectory=args.save_trajectory,
                          batch_rows=args.batch_rows, fill_value_is_data=args.fill_value_is_data, stop=stop)
        except ModelError as error:
            return _error(f"--model {error.spec}: {_first_line(ValueError(error.reason), limit=1000)}")
        except (ValueError, OSError) as error:
            return _error(_first_line(error, limit=1000))
        except JobError as error:
            sys.stderr.write(f"dpmjax invert-batch: {_first_line(error, limit=1000)}\n")
            return EXIT_FAILED
    for note in summary.notes:
        sys.stderr.write(f"invert-batch: note: {shown(note)}\n")
    if summary.stopped:
        number = signals.received[0] if signals.received else signal.SIGINT
        sys.stderr.write(f"invert-batch: stopped by {signal.Signals(number).name} after recording {len(summary.recorded)} "
                         f"chunks; rerun the same command to resume.\n")
        return 128 + number
    print(f"invert-batch: {len(summary.recorded)} chunks inverted ({summary.rows} rows, {summary.rows_per_second:.0f} rows/s), "
          f"{len(summary.skipped)} already done, {len(summary.failed)} failed")
    for name, reason in list(summary.failed.items())[:MAX_LISTED]:
        print(shown(f"  FAILED {name}: {reason}"))
    if len(summary.failed) > MAX_LISTED:
        print(f"  ... and {len(summary.failed) - MAX_LISTED} more failed chunks (each with its reason in "
              f"{shown(str(Path(args.output) / 'failed'))}/)")
    missed = sum(len(rows) for rows in summary.not_converged.values())
    if args.exact:
        print(f"exact inversion: {summary.exact_rows - missed} of {summary.exact_rows} rows within round trip "
              f"{EXACT_TOLERANCE:g} (every recorded chunk, this run's and earlier runs')")
        for name, rows in list(summary.not_converged.items())[:MAX_LISTED]:
            print(shown(f"  NOT CONVERGED {name}: rows {rows} (round trips in round_trips/)"))
        if len(summary.not_converged) > MAX_LISTED:
            print(f"  ... and {len(summary.not_converged) - MAX_LISTED} more chunks with rows not converged (manifest.json)")
    if summary.failed:
        return EXIT_FAILED
    return EXIT_NOT_CONVERGED if missed else EXIT_OK

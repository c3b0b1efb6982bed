"""The batch job's workers: one thread per local device, each taking whole chunks under their
claims, inverting them in pieces of exactly ``batch_rows`` rows with one single-device program,
and recording (or quarantining) them; the progress line (see :mod:`dpmjax.apps.batch`)."""

from __future__ import annotations

import dataclasses
import errno
import sys
import threading
import time
from typing import Callable, Optional

import jax
import numpy as np

from ...trajectories import progress as progress_line
from ...trajectories.inversion import invert
from ..messages import first_line, shown
from .input_stores import ChunkError
from .plan import Plan

CLAIM_POLL_SECONDS = 0.05  # how often a run looks again at chunks other processes are computing


@dataclasses.dataclass(frozen=True)
class Summary:
    """What one run of the job did (:func:`dpmjax.apps.batch.run`'s result).

    Attributes:
        recorded: The chunks this run computed and recorded.
        skipped: The chunks recorded before this run (or meanwhile by a concurrent process).
        failed: Chunk -> why it was quarantined (``failed/``).
        rows: Rows this run computed.
        seconds: This run's time.
        not_converged: Exact inversion: chunk -> the rows whose round trip missed, over every chunk
            of this process recorded in the output (this run's and earlier runs'), read from
            ``round_trips/``.
        stopped: Whether ``stop`` (a signal) ended the run before every chunk was done.
        exact_rows: Exact inversion: the rows of those chunks (``not_converged`` counts against it).
        notes: Things the user should know that did not stop the job (e.g. corrupt log lines).
    """

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


def cause(error: BaseException) -> str:
    """``Type: message`` of an error, in one line. An error raised inside a compiled callback
    (JAX wraps it, with the Python traceback in its message) is named by the traceback's last
    line, the error the model raised (e.g. ``SystemExit: 0``)."""
    text = str(error)
    if "Traceback (most recent call last)" in text:
        lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
        return first_line(RuntimeError(lines[-1])) if lines else type(error).__name__
    return f"{type(error).__name__}: {first_line(error)}"


def rate(rows: int, seconds: float) -> str:
    """Rows per second in words: two significant digits below 10 (a slow job is not ``0 rows/s``)."""
    value = rows / seconds if seconds > 0 else 0.0
    return f"{value:.0f}" if value >= 10 else f"{value:.2g}"


class _Stopped(Exception):
    """Raised inside a chunk when the job is asked to stop: the chunk is left for the next run."""


class JobError(RuntimeError):
    """The job stopped on an error that is not a chunk's (the model raised, the disk is full):
    every chunk recorded so far is kept and a rerun resumes."""


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
class Workers:
    """One run's chunks, inverted by a worker thread per local device."""

    plan: Plan
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
            then = "free space, then rerun" if isinstance(error, OSError) and error.errno == errno.ENOSPC else "rerun"
            raise JobError(f"the job stopped while inverting chunk {shown(name)}: {cause(error)} ({then} the same "
                           f"command to resume: every chunk recorded so far is kept).") from error
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
                            num_inference_steps=plan.num_inference_steps, exact=plan.inversion,
                            return_samples=plan.save_trajectory)
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
        missed = [] if round_trip is None else np.flatnonzero(~(round_trip <= self.plan.tolerance)).tolist()
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
    speed = f" ({rate(rows, seconds)} rows/s)" if rows and seconds > 0 else ""
    return f"invert-batch {progress_line.bar(done, total)} {done}/{total} chunks, {rows} rows{speed}, {failed} failed"



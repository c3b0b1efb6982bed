"""Where the batch job writes: the OUTPUT folder, its layout and every write into it (plain
``.npy`` files and JSON, no format of our own). NAME is an input chunk's name, subfolders kept.

    OUTPUT/
    ├── settings.json          the job's settings, the input's resolved path and its shards
    ├── inputs/NAME.json       the fingerprint (size + SHA-256) of input shard NAME the job started on
    ├── chunks/NAME.npy        the noise of chunk NAME (float32): the record that the chunk is done
    ├── trajectories/NAME.npy  with save_trajectory: [rows, N, *row_shape], the path noise-ward
    ├── round_trips/NAME.npy   exact inversion: every row's measured round trip
    ├── failed/NAME.json       a quarantined chunk and why (a rerun tries it again)
    ├── claims/HASH            a chunk being computed, locked (flock) by its process while it works
    ├── events.jsonl           one line per chunk started / recorded / failed, for audits
    └── manifest.json          at the end: the recorded shards, the settings, the inputs' fingerprints

Guarantees:

* An atomic claim: ``settings.json`` is created exclusively (a complete temporary file hard-linked
  into place, or O_EXCL where there are no links), so the folder belongs to the first run's job.
  A run with other settings (another input path or other shards included) is refused, as is a
  folder of other files, and a shard whose bytes changed under a resume (a quarantined shard may
  be fixed).
* A chunk is computed once: a process computes a chunk only under its claim (an flock on
  ``claims/HASH``, released by the kernel when the process dies, so never stale) and only while
  ``chunks/NAME.npy`` does not exist; once that file exists the chunk is never computed again.
* A crash never leaves a half-written record: every file is written to a temporary
  ``.HASH.HOST.PID.RANDOM.tmp`` beside it, fsynced and renamed into place, and a chunk's noise is
  written after its trajectory and round trips. The next run removes the temporary files of dead
  processes of its host and any untouched for an hour before it started (only names of exactly
  that form, only at the root and in the folders above), logs chunks a kill left recorded but
  unlogged, and removes their leftover claim files.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import threading
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..messages import shown
from .files import (TEMP_NAME, atomic_save, atomic_write, atomic_write_text, append_events, create_exclusive,
                    fsync_folder, is_dead_writers, open_own, short_hash)
from .input_stores import inside, read_json, resolved

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: chunks are not claimed
    fcntl = None

MAX_NAME_BYTES = 255  # the longest file name most file systems take
# settings added after outputs were first written: an older settings.json without them is not refused
LATER_SETTINGS = ("fill_value_is_data", "input_shards", "input", "save_trajectory")
# settings added later whose absence from an older settings.json means a value: compared as that value
LATER_DEFAULTS = {"exact_settings": {}}
# the files the job keeps at the root of OUTPUT
JOB_FILES = ("settings.json", "events.jsonl", "manifest.json")
# the folders the job writes files into (with subfolders: chunk names may have them); the root too, not below it
JOB_FOLDERS = ("chunks", "trajectories", "round_trips", "failed", "inputs")


class ChunkClaim:
    """This process' claim on one chunk: an open, flock-ed ``claims/HASH``."""

    def __init__(self, path: Path, fd: int):
        self.path, self.fd = path, fd

    def release(self, recorded: bool) -> None:
        """Give the claim back; a recorded chunk's claim file is removed (whoever takes the file
        later finds the chunk recorded and leaves it)."""
        if recorded:
            self.path.unlink(missing_ok=True)
        os.close(self.fd)


class OutputStore:
    """The OUTPUT folder of one job (see the module docstring). Its methods are safe to call from
    the job's worker threads; processes sharing the folder coordinate through the files."""

    def __init__(self, root):
        self.root = Path(root)
        self._events_lock = threading.Lock()
        self.corrupt_event_lines = (0, None)  # lines of events.jsonl that are no JSON event: (count, first line number)

    # ------------------------------------------------------------------------- before anything is written
    def check_usable(self, input_dir: Path) -> None:
        """OUTPUT must be a folder (or not exist yet) apart from INPUT, and missing, empty or an
        output of this job (it has ``settings.json``): the job never writes into its input, nor
        into (or cleans) a folder of someone else's files."""
        _check_apart(Path(input_dir), self.root)
        try:
            entries = [entry for entry in os.listdir(self.root) if not TEMP_NAME.fullmatch(entry)]
        except FileNotFoundError:
            return
        self._check_folders_inside()
        if not entries or "settings.json" in entries or self._settings_path.exists():  # (a run creating it now)
            return
        raise ValueError(f"output {self.root} is a folder of other files ({len(entries)} entries, no settings.json), "
                         f"not an output of this job: name a new or empty folder.")

    def _check_folders_inside(self) -> None:
        """The job's folders and files in OUTPUT must be its own: a folder replaced by a symlink
        that leads elsewhere (into the input, say), or a file of the job replaced by a symlink, is
        refused, so nothing is ever read as a record, or written, through it."""
        real = resolved(self.root, "output")
        for entry in (*JOB_FOLDERS, "claims", *JOB_FILES):
            path = self.root / entry
            if os.path.lexists(path) and (path.is_symlink() or not inside(path, real)):
                kind = "a file" if entry in JOB_FILES else "a folder"
                raise ValueError(f"output {shown(str(self.root))}: {entry}{'' if entry in JOB_FILES else '/'} is a symlink "
                                 f"(to {shown(os.readlink(path))}), not {kind} of the output; the job writes only inside "
                                 f"its output folder, so restore it or write to a new output folder.")

    def _inside(self, path: Path) -> Path:
        """``path`` once checked to lie inside OUTPUT (its nearest existing folder resolved, every
        symlink followed): a write through a symlink leading out of OUTPUT is refused (``OSError``
        naming the file), never made. Returns ``path``."""
        real = resolved(self.root, "output")
        existing = path.parent
        while not os.path.lexists(existing) and existing != self.root and existing != existing.parent:
            existing = existing.parent
        if not inside(existing, real):
            raise OSError(f"refusing to write {shown(str(path))}: {shown(str(existing))} leads outside the output folder "
                          f"{shown(str(self.root))} (through a symlink); the job writes only inside its output folder.")
        return path

    def can_record(self, name: str) -> Optional[str]:
        """Why chunk ``name`` cannot have an output file (a path component longer than the file
        system takes), or ``None`` when it can."""
        too_long = [part for part in Path(name).parts if len(os.fsencode(part)) > MAX_NAME_BYTES]
        if too_long:
            return (f"its name has a component of {len(os.fsencode(too_long[0]))} bytes, longer than the "
                    f"{MAX_NAME_BYTES} bytes a file or folder name may have, so no output file can be named after it")
        return None

    def settings(self) -> Optional[dict]:
        """The settings the output was started with, or ``None`` for a new output."""
        return self._read_settings() if self._settings_path.exists() else None

    def check_same_settings(self, before: dict, settings: dict) -> None:
        """A resumed job must compute what the interrupted one did: an output holding one
        setting's noise is never topped up with another's (nor with another input's shards). The
        input is known by its resolved path (and, for zarr, its metadata): a moved input is another job."""
        compared = [key for key in settings if key != "input_shards" and not (key in LATER_SETTINGS and key not in before)]
        before = {**LATER_DEFAULTS, **before}
        changed = [key for key in compared if before.get(key) != settings[key]]
        if "input" not in changed:
            self._check_same_shards(before, settings)
        if not changed:
            return
        detail = "; ".join(f"{key}: was {before.get(key)!r}, now {settings[key]!r}" for key in changed
                           if key not in ("scheduler", "input"))
        if "input" in changed:
            detail = "; ".join(filter(None, [_input_change(before.get("input"), settings["input"]), detail]))
        if "scheduler" in changed:
            was = before.get("scheduler") if isinstance(before.get("scheduler"), dict) else {}
            keys = sorted(k for k in set(was) | set(settings["scheduler"]) if was.get(k) != settings["scheduler"].get(k))
            detail = "; ".join(filter(None, [detail, f"scheduler config differs in {', '.join(keys)}"]))
        raise ValueError(f"output {self.root} was started with other settings ({detail}): "
                         f"rerun with the same settings or write to a new output folder.")

    def check_inputs(self, fingerprints: dict) -> None:
        """Each shard's bytes (``fingerprints``: name -> the input store's fingerprint now) must be
        those the job started on; reads only."""
        self._input_changes(fingerprints)

    # ------------------------------------------------------------------------- claiming the folder
    def claim(self, settings: dict, fingerprints: dict, started: float) -> None:
        """Make the folder this job's (the first write): create ``settings.json`` exclusively, or,
        if some run created it first, require the same settings (processes of one job share the
        output; two jobs never do). Then record the inputs' fingerprints and remove the temporary
        files of writers dead before ``started`` (a ``time.time()``)."""
        if not create_exclusive(self._inside(self._settings_path), json.dumps(settings, indent=1)):
            self.check_same_settings(self._read_settings(), settings)
        # once the output is this job's: the records as they are now (another run may have written some meanwhile)
        self._write_fingerprints(*self._input_changes(fingerprints))
        (self.root / "chunks").mkdir(parents=True, exist_ok=True)
        self._remove_dead_writers_files(started)

    # ------------------------------------------------------------------------- chunks
    def is_recorded(self, name: str) -> bool:
        """Whether chunk ``name`` is done: its noise file exists, a regular file inside OUTPUT (a
        folder or a symlink there is not a record: the chunk is computed and the file replaced)."""
        path = self.root / "chunks" / name
        try:
            return stat.S_ISREG(os.lstat(path).st_mode) and inside(path.parent, resolved(self.root, "output"))
        except OSError:  # missing, or a name too long for the file system: no record
            return False

    def claim_chunk(self, name: str) -> Optional[ChunkClaim]:
        """Try to take chunk ``name`` for this process: an exclusive, non-blocking flock on
        ``claims/HASH`` (the kernel drops it when the process dies, so a killed run's claims are
        never stale). ``None`` when another process holds the chunk. Where the file system has no
        locks the chunk is taken unclaimed."""
        path = self._inside(self.root / "claims" / short_hash(name))
        path.parent.mkdir(parents=True, exist_ok=True)
        if os.path.islink(path):  # never the job's (it creates claim files, not links): gone, the target untouched
            path.unlink()
        fd = open_own(path, os.O_CREAT | os.O_RDWR)
        if fcntl is None:
            return ChunkClaim(path, fd)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except OSError:  # no locks here (some network file systems): unclaimed
            return ChunkClaim(path, fd)
        os.ftruncate(fd, 0)
        os.write(fd, os.fsencode(name) + f"\n{socket.gethostname()} {os.getpid()}\n".encode())
        return ChunkClaim(path, fd)

    def write_chunk(self, name: str, noise: np.ndarray, trajectory: Optional[np.ndarray] = None,
                    round_trip: Optional[np.ndarray] = None) -> None:
        """Write a chunk's outputs, each atomically, the noise last (the record: from then on the
        chunk is done), and drop an earlier quarantine record of it."""
        if trajectory is not None:
            atomic_save(self._inside(self.root / "trajectories" / name), trajectory)
        if round_trip is not None:
            atomic_save(self._inside(self.root / "round_trips" / name), round_trip)
        atomic_save(self._inside(self.root / "chunks" / name), noise)
        _side_path(self.root / "failed", name).unlink(missing_ok=True)

    def quarantine(self, name: str, reason: str) -> None:
        """Record chunk ``name`` as failed, and why (a rerun tries it again)."""
        atomic_write_text(self._inside(_side_path(self.root / "failed", name)), json.dumps({"chunk": name, "reason": reason}))

    def quarantine_many(self, reasons: dict) -> None:
        """Record many chunks as failed at once (``reasons``: name -> why), with one fsync per
        folder and one append to ``events.jsonl`` rather than a few per chunk: shards missing by
        the thousand cost seconds, not minutes. Each record is still written whole (a temporary
        file renamed into place); a crash before the folders are synced loses only records the
        next run makes again."""
        folders = set()
        for name, reason in reasons.items():
            path = self._inside(_side_path(self.root / "failed", name))
            atomic_write(path, lambda f, n=name, r=reason: f.write(json.dumps({"chunk": n, "reason": r}).encode()),
                          durable=False)
            folders.add(path.parent)
        for folder in folders:
            fsync_folder(folder)
        with self._events_lock:
            append_events(self._inside(self._events_path),
                           [{"chunk": name, "event": "failed", "reason": reason} for name, reason in reasons.items()])

    def failure_since(self, name: str, since: float) -> Optional[str]:
        """Why chunk ``name`` was quarantined, if that happened at ``since`` (a ``time.time()``) or later."""
        report = _side_path(self.root / "failed", name)
        try:
            if report.stat().st_mtime < since:
                return None
            return json.loads(report.read_text())["reason"]
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def tidy_recorded(self, recorded: Sequence[str]) -> None:
        """What a killed run may leave of chunks it recorded: log the ones it did not log yet, and
        remove their claim files."""
        self._log_unlogged_records(recorded)
        self._remove_recorded_claims(recorded)

    # ------------------------------------------------------------------------- events, manifest
    def log(self, **event) -> None:
        """Append one event (with the time and this process' id) to ``events.jsonl``, fsynced."""
        with self._events_lock:
            append_events(self._inside(self._events_path), [event])

    def round_trips(self, names: Sequence[str], tolerance: float) -> dict:
        """Exact inversion's measured round trips of the recorded chunks among ``names``, read from
        ``round_trips/`` (so a resumed job counts every row, not only this run's): name ->
        ``{"rows", "rows_converged", "worst_round_trip", "rows_not_converged"}``; a row converged
        when its round trip is at most ``tolerance`` (a non-finite one never is). A recorded chunk
        whose round-trip file is missing or unreadable counts every row as not converged."""
        report = {}
        for name in names:
            if not self.is_recorded(name):
                continue
            try:
                trips = np.asarray(np.load(self.root / "round_trips" / name, allow_pickle=False), np.float64).reshape(-1)
            except (OSError, ValueError):
                rows = int(np.load(self.root / "chunks" / name, mmap_mode="r").shape[0])
                report[name] = {"rows": rows, "rows_converged": 0, "worst_round_trip": None,
                                "rows_not_converged": list(range(rows)), "round_trips": "missing"}
                continue
            missed = np.flatnonzero(~(trips <= tolerance)).tolist()
            finite = trips[np.isfinite(trips)]
            report[name] = {"rows": int(trips.size), "rows_converged": int(trips.size - len(missed)),
                            "worst_round_trip": float(finite.max()) if finite.size == trips.size and trips.size else None,
                            "rows_not_converged": missed}
        return report

    def write_manifest(self, names: Sequence[str], row_shape: Optional[tuple], settings: dict,
                       tolerance: Optional[float] = None) -> None:
        """``manifest.json``: the recorded shards in job order, the settings, each recorded shard's
        input fingerprint, the shards still missing and, with exact inversion (a ``tolerance``),
        per shard the rows within it, the rows in all and the worst round trip (``null`` when one
        is not finite)."""
        done = [name for name in names if self.is_recorded(name)]
        if row_shape is None and done:  # nothing read by this run: the recorded outputs say it
            row_shape = tuple(np.load(self.root / "chunks" / done[0], mmap_mode="r").shape[1:])
        fingerprints = {}
        for name in done:
            record = _fingerprint_record(_side_path(self.root / "inputs", name))
            fingerprints[name] = record["fingerprint"] if record else None
        job_settings = {key: value for key, value in settings.items() if key != "input_shards"}
        exact = {}
        if tolerance is not None:
            shards = {name: {k: v for k, v in r.items() if k != "rows_not_converged"}
                      for name, r in self.round_trips(done, tolerance).items()}
            worst = [r["worst_round_trip"] for r in shards.values()]
            exact = {"exact_inversion": {
                "tolerance": tolerance, "rows": sum(r["rows"] for r in shards.values()),
                "rows_converged": sum(r["rows_converged"] for r in shards.values()),
                "worst_round_trip": None if None in worst else max(worst, default=None), "shards": shards}}
        done_set = set(done)
        atomic_write_text(self._inside(self.root / "manifest.json"), json.dumps({
            "shards": done, "row_shape": list(row_shape) if row_shape else None, "of": "noise", **job_settings,
            "input_fingerprints": fingerprints, "missing": [n for n in names if n not in done_set], **exact}, indent=1))

    # ------------------------------------------------------------------------- inside
    @property
    def _settings_path(self) -> Path:
        return self.root / "settings.json"

    @property
    def _events_path(self) -> Path:
        return self.root / "events.jsonl"

    def _read_settings(self) -> dict:
        """An existing ``settings.json``: a JSON object, or a ``ValueError`` naming the file. A file
        another process is creating right now (the no-hard-link fallback) is given a moment."""
        path = self._settings_path
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

    def _check_same_shards(self, before: dict, settings: dict) -> None:
        """The input's shard names must be those the output was started on."""
        if "input_shards" not in before:
            return
        listed = before["input_shards"] if isinstance(before["input_shards"], list) else []
        was, now = {name for name in listed if isinstance(name, str)}, set(settings["input_shards"])
        added, gone = sorted(now - was), sorted(was - now)
        if added or gone:
            name, what = (added[0], "is new") if added else (gone[0], "is gone")
            more = len(added) + len(gone) - 1
            raise ValueError(f"the input is not the one output {self.root} was started on: its shard {name} {what}"
                             f"{f' (and {more} more shards differ)' if more else ''}; restore that input or write to a new output folder.")

    def _input_changes(self, fingerprints: dict) -> tuple:
        """Each shard's bytes must be those the job started on (``inputs/NAME.json``); a shard not
        yet recorded whose earlier version was quarantined or unreadable may have been fixed. Reads
        only; returns ``(new, fixed)``, the fingerprint records to write (``path -> record``)."""
        new, fixed = {}, {}
        for name, now in fingerprints.items():
            path = _side_path(self.root / "inputs", name)
            before = _fingerprint_record(path)
            if before is None:
                (fixed if path.exists() else new)[path] = {"chunk": name, "fingerprint": now}  # a record lost to a crash: anew
                continue
            if before.get("fingerprint") == now:
                continue
            if self._may_be_fixed(name, before.get("fingerprint")):
                fixed[path] = {"chunk": name, "fingerprint": now}
                continue
            raise ValueError(f"input shard {name} is not the one output {self.root} was started on (its bytes changed: "
                             f"was {_short(before.get('fingerprint'))}, now {_short(now)}); restore it or write to a new output folder.")
        return new, fixed

    def _write_fingerprints(self, new: dict, fixed: dict) -> None:
        """Record the fingerprints of shards seen for the first time (``new``) and of fixed ones. A
        record another run wrote meanwhile must hold the same fingerprint: else the two runs read
        other bytes under one shard name, and this one is refused."""
        for path, record in new.items():  # one small file per shard: not fsynced (a record lost to a crash is made anew)
            if isinstance(record["fingerprint"], dict) and "error" in record["fingerprint"]:
                continue  # an unreadable shard: nothing to recognise it by (it is quarantined when its turn comes)
            if create_exclusive(self._inside(path), json.dumps(record), durable=False):
                continue
            before = _fingerprint_record(path)
            if before is not None and before.get("fingerprint") != record["fingerprint"]:
                raise ValueError(f"input shard {record['chunk']} is not the one output {self.root} was started on (another "
                                 f"run recorded it as {_short(before.get('fingerprint'))}, this run read "
                                 f"{_short(record['fingerprint'])}); restore it or write to a new output folder.")
        for path, record in fixed.items():
            atomic_write_text(self._inside(path), json.dumps(record))

    def _may_be_fixed(self, name: str, before) -> bool:
        """A shard may change under a resumed job only while its chunk is not recorded and it was
        quarantined (or unreadable when the job started): that change is its fix."""
        if self.is_recorded(name):
            return False
        return _side_path(self.root / "failed", name).exists() or (isinstance(before, dict) and "error" in before)

    def _remove_dead_writers_files(self, started: float) -> None:
        """Temporary files left by killed runs where the job writes: the root (not below it) and
        the folders of :data:`JOB_FOLDERS` with theirs; see :func:`is_dead_writers`."""
        places = [(self.root, [entry.name for entry in os.scandir(self.root) if entry.is_file(follow_symlinks=False)])]
        for job_folder in JOB_FOLDERS:
            places += [(Path(folder), files) for folder, _, files in os.walk(self.root / job_folder)]
        for folder, files in places:
            for file in files:
                if is_dead_writers(folder / file, started):
                    (folder / file).unlink(missing_ok=True)

    def _remove_recorded_claims(self, recorded: Sequence[str]) -> None:
        """A run killed between recording a chunk and giving its claim back leaves ``claims/HASH``:
        remove those of recorded chunks nobody holds (whoever opened one finds its chunk recorded)."""
        for name in recorded:
            if not (self.root / "claims" / short_hash(name)).exists():
                continue
            claim = self.claim_chunk(name)
            if claim is not None:
                claim.release(recorded=True)

    def _recorded_events(self) -> set:
        """The chunks ``events.jsonl`` logs as recorded. Lines that are no JSON event (bytes a
        crash or a stray write left: not UTF-8, cut short) are skipped, counted in
        :attr:`corrupt_event_lines` with the first one's number, so the job can say so."""
        logged, corrupt = set(), []
        with open(self._events_path, "rb") as f:
            for number, line in enumerate(f, start=1):
                try:
                    event = json.loads(line)
                except ValueError:  # UnicodeDecodeError included
                    if line.strip():
                        corrupt.append(number)
                    continue
                if isinstance(event, dict) and event.get("event") == "recorded":
                    logged.add(event.get("chunk"))
        self.corrupt_event_lines = (len(corrupt), corrupt[0] if corrupt else None)
        return logged

    def _log_unlogged_records(self, recorded: Sequence[str]) -> None:
        """A run killed between writing a chunk's output (the record) and logging it leaves the
        chunk done but unlogged: log it now (``"found": true``), so the audit has one "recorded"
        per chunk. A chunk still claimed is being logged by its live process and is left to it. A
        line cut short by the kill is ended first, so the next event starts on a line of its own."""
        events = self._events_path
        if events.exists() and events.stat().st_size:
            with os.fdopen(open_own(self._inside(events), os.O_RDWR), "rb+") as f:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    f.write(b"\n")
        logged = set()
        if recorded and events.exists():  # one pass over the log, only when a rerun finds finished chunks
            logged = self._recorded_events()
        for name in recorded:
            if name in logged:
                continue
            claim = self.claim_chunk(name)
            if claim is None:
                continue
            try:
                rows = int(np.load(self.root / "chunks" / name, mmap_mode="r").shape[0])
                self.log(chunk=name, event="recorded", rows=rows, found=True)
            finally:
                claim.release(recorded=True)


# ----------------------------------------------------------------------------- paths and records
def _check_apart(input_dir: Path, output_dir: Path) -> None:
    """OUTPUT must be a folder (or not exist yet) apart from INPUT: the job never writes into its input."""
    source, target = resolved(input_dir, "input"), resolved(output_dir, "output")
    if output_dir.is_symlink() and not output_dir.exists():
        raise ValueError(f"output {shown(str(output_dir))} is a symlink to {shown(os.readlink(output_dir))}, which does not "
                         f"exist: create that folder or name another output folder.")
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"output {output_dir} is a file, not a folder: name a folder (it is created if missing).")
    above = next((p for p in output_dir.absolute().parents if p.exists() or p.is_symlink()), None)
    if above is not None and not above.is_dir():
        raise ValueError(f"output {output_dir} cannot be created: {above} is a file, not a folder.")
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


def _input_change(was, now: dict) -> str:
    """How the input differs from the one a job started on, in a few words."""
    was_path = was.get("path") if isinstance(was, dict) else None
    if was_path == now.get("path"):
        return f"input {now.get('path')}: its {'zarr metadata' if 'metadata_sha256' in now else 'kind'} changed"
    return (f"input: was {was_path if isinstance(was_path, str) else json.dumps(was)[:120]}, now {now.get('path')} "
            f"(the input's path is part of the job: an input moved or copied elsewhere is another job's)")


def _fingerprint_record(path: Path) -> Optional[dict]:
    """``inputs/NAME.json`` as written, or ``None`` if it is missing or unreadable."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and "fingerprint" in record else None


def _short(fingerprint) -> str:
    """A fingerprint in a few words, for messages."""
    if isinstance(fingerprint, dict) and "sha256" in fingerprint:
        return f"{fingerprint['size']} bytes, sha256 {fingerprint['sha256'][:12]}"
    return json.dumps(fingerprint)[:120]


def _side_path(folder: Path, name: str) -> Path:
    """``folder/NAME.json`` for chunk ``NAME.npy`` (subfolders kept); a name with a file or folder
    name too long for that gets a hash instead, directly in ``folder`` (the JSON inside names the chunk)."""
    base = name[:-len(".npy")] if name.endswith(".npy") else name
    relative = Path(f"{base}.json")
    if all(len(os.fsencode(part)) <= MAX_NAME_BYTES for part in relative.parts):
        return folder / relative
    return folder / f"{short_hash(name)}.json"

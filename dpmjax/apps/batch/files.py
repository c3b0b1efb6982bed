"""Files written whole or not at all, and the temporary files of writers that died.

Every file is written to a temporary ``.HASH.HOST.PID.RANDOM.tmp`` beside it, fsynced and renamed
into place (the folder fsynced too): a reader sees the old file or the new one, never a part,
also across a crash. A write that fails (a full disk) removes its temporary file and is an
``OSError`` naming the file. A temporary file is a dead writer's when its process, on this host,
is gone, or when it was untouched for :data:`STALE_TEMP_SECONDS` (any host).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from ..messages import shown

def _file_mode() -> int:
    """The mode a new file gets here (0o666 less the umask): temporary files are created 0o600."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


FILE_MODE = _file_mode()  # read once, at import (os.umask is process-wide)
STALE_TEMP_SECONDS = 3600  # a temporary file untouched this long before a run starts is a dead writer's
# the temporary files, exactly: ".HASH.HOST.PID.RANDOM.tmp" (see temp_prefix; RANDOM from tempfile.mkstemp)
TEMP_NAME = re.compile(r"\.[0-9a-f]{10}\.(?P<host>[0-9a-f]{8})\.(?P<pid>[0-9]+)\.[a-z0-9_]{8}\.tmp")


def short_hash(text: str, length: int = 16) -> str:
    """A hex digest of ``text`` (a name's bytes: one that is not UTF-8 hashes as it is on disk)."""
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:length]


HOST_TAG = short_hash(socket.gethostname(), 8)  # in temporary names: whose host they are


def temp_prefix(path: Path) -> str:
    """A short temporary name beside ``path``: ``.HASH.HOST.PID.`` (a 255-byte shard name must not
    make its temporary name too long)."""
    return f".{short_hash(path.name, 10)}.{HOST_TAG}.{os.getpid()}."



def fsync_folder(folder: Path) -> None:
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def create_exclusive(path: Path, text: str, durable: bool = True) -> bool:
    """Create ``path`` holding ``text`` if it does not exist, atomically: a temporary file (fsynced
    if ``durable``), hard-linked into place (the link fails if ``path`` exists), so ``path`` is never
    seen half written. Returns whether this call created it; a failure (a full disk) is an
    ``OSError`` naming ``path``."""
    try:
        return _link_into_place(path, text, durable=durable)
    except OSError as error:
        raise _naming(error, path) from None


def _link_into_place(path: Path, text: str, durable: bool) -> bool:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path), suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, FILE_MODE)
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
            fsync_folder(path.parent)
        return True
    finally:
        os.unlink(tmp)


class _PlainWriter:
    """A file seen by numpy as a plain stream: it then writes with ``write()`` (an ``OSError`` with
    its errno, ENOSPC on a full disk) rather than ``tofile`` ("4096 requested and 2016 written")."""

    def __init__(self, file):
        self.write = file.write


def atomic_write(path: Path, write, durable: bool = True) -> None:
    """``write(file)`` into a temporary file beside ``path``, fsync, rename into place, fsync the
    folder: ``path`` then exists whole or not at all, also across a crash (``durable=False``: no
    fsyncs, for records a crash may lose because the next run makes them again). A failure (a
    full disk) leaves no temporary file and is an ``OSError`` naming ``path``."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path), suffix=".tmp", dir=path.parent)
        os.fchmod(fd, FILE_MODE)
    except OSError as error:
        raise _naming(error, path) from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(error, OSError):
            raise _naming(error, path) from None
        raise
    if durable:
        fsync_folder(path.parent)


def _naming(error: OSError, path: Path) -> OSError:
    """``error`` as an ``OSError`` whose message names the file the job was writing."""
    reason = error.strerror or str(error)
    return OSError(error.errno, f"cannot write {shown(str(path))}: {reason}")


def atomic_save(path: Path, array: np.ndarray) -> None:
    atomic_write(path, lambda f: np.lib.format.write_array(_PlainWriter(f), np.asanyarray(array), allow_pickle=False))


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def open_own(path: Path, flags: int) -> int:
    """``os.open(path, flags)`` on a file of the job's own, never through a symlink at ``path``
    (one there is refused with an ``OSError`` naming it: it would write to its target)."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), FILE_MODE)
    except OSError as error:
        if os.path.islink(path):
            raise OSError(error.errno, f"refusing to write {shown(str(path))}: it is a symlink (to "
                                       f"{shown(os.readlink(path))}), not a file of the output") from None
        raise _naming(error, path) from None


def append_events(path: Path, events: Sequence[dict]) -> None:
    """Append ``events`` (each with the time and this process' id) in one write, fsynced."""
    now, pid = time.time(), os.getpid()
    text = "".join(json.dumps(dict(event, time=now, pid=pid)) + "\n" for event in events)
    fd = open_own(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        with os.fdopen(fd, "ab") as f:
            f.write(text.encode())
            f.flush()
            os.fsync(f.fileno())
    except OSError as error:
        raise _naming(error, path) from None


# ----------------------------------------------------------------------------- temporary files of dead writers
def _pid_is_dead(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, someone else's
        return False
    return False


def is_dead_writers(tmp: Path, started: float) -> bool:
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
    if match["host"] == HOST_TAG and _pid_is_dead(pid):
        return True
    try:
        return tmp.stat().st_mtime < started - STALE_TEMP_SECONDS
    except FileNotFoundError:
        return False

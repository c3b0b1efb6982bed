"""One progress line on stderr: ``label [#####.....] done/total (rate unit/s)``.

Used from the host (the batch job, the digits job) and from inside compiled loops through
:func:`report` (a ``jax.debug.callback``, so the line advances while the loop runs on the device).
The rate appears from the second update on: one update gives no interval to measure.
"""

from __future__ import annotations

import sys
import time
from typing import Dict

import jax
import numpy as np

_WIDTH = 30
_STARTED: Dict[str, tuple] = {}


def bar(done: int, total: int) -> str:
    """``[#####.....]``: the share of ``total`` that ``done`` is, in a bar of fixed width."""
    filled = int(_WIDTH * min(done, total) / max(total, 1))
    return f"[{'#' * filled}{'.' * (_WIDTH - filled)}]"


def line(label: str, done: int, total: int, *, unit: str = "steps", suffix: str = "") -> str:
    """The text of a progress line after ``done`` of ``total`` units; the rate counts from the first
    update of ``label`` (the first call for a label, or ``done <= 1``, restarts its clock)."""
    now = time.perf_counter()
    started = _STARTED.get(label)
    if started is None or done <= 1 or done < started[1]:
        _STARTED[label] = started = (now, done)
    elapsed, counted = now - started[0], done - started[1]
    rate = f" ({counted / elapsed:.1f} {unit}/s)" if counted > 0 and elapsed > 0 else ""
    return f"{label} {bar(done, total)} {done}/{total}{rate}{suffix}"


def interactive() -> bool:
    """Whether stderr is a terminal: only there is a line redrawn in place."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def show(label: str, done: int, total: int, *, unit: str = "steps", suffix: str = "") -> None:
    """Redraw the progress line in place on stderr; a newline once ``done`` reaches ``total``.
    Redirected to a file, only the finished line is written (no carriage returns or escapes)."""
    text = line(label, done, total, unit=unit, suffix=suffix)
    if interactive():
        sys.stderr.write("\r" + text + ("\n" if done >= total else ""))
    elif done >= total:
        sys.stderr.write(text + "\n")
    sys.stderr.flush()


def clear() -> None:
    """Erase the progress line (before printing a result line in its place); nothing when stderr
    is not a terminal."""
    if interactive():
        sys.stderr.write("\r\x1b[2K")
        sys.stderr.flush()


def _status(label: str, message: str, *values) -> None:
    sys.stderr.write(f"{label}: {message.format(*(np.asarray(v).item() for v in values))}\n")
    sys.stderr.flush()


def status(enabled: bool, label: str, message: str, *, values=()) -> None:
    """Inside a compiled program: one finished line ``label: message`` on stderr when ``enabled``
    (static), ``message`` formatted with the (traced) scalar ``values`` (``str.format``)."""
    if enabled:
        jax.debug.callback(_status, label, message, *values, ordered=False)


def _tick(i, total: int, label: str) -> None:
    show(label, int(np.max(np.asarray(i))) + 1, total)


def report(enabled: bool, i, total: int, *, label: str) -> None:
    """Inside a compiled loop: show step ``i`` (0-based, traced) of ``total`` when ``enabled`` (static),
    under ``label``."""
    if enabled:
        jax.debug.callback(_tick, i, total, label, ordered=False)

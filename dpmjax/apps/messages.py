"""How the programs speak to users: a file name as it can be printed, an exception's first line,
and the one error printer every command uses (one line on stderr, exit status 2)."""

from __future__ import annotations

import sys

USAGE_ERROR = 2  # the exit status of a refused command line, setting or input


def shown(name: str) -> str:
    """A file name as it can be printed: bytes that are not UTF-8 (kept by Python as surrogates)
    are written as ``\\xNN`` escapes."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def first_line(error: BaseException, limit: int = 300) -> str:
    """An exception's message, its first line, at most ``limit`` characters (its type's name when
    it has no message), printable."""
    text = shown((str(error).strip().splitlines() or [type(error).__name__])[0])
    return text if len(text) <= limit else text[: limit - 3] + "..."


def fail(prog: str, message: str) -> int:
    """A user's mistake: ``PROG: error: MESSAGE`` as one line on stderr; returns exit status 2."""
    sys.stderr.write(f"{prog}: error: {' '.join(shown(message).split())}\n")
    sys.stderr.flush()
    return USAGE_ERROR

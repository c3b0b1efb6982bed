"""The ``dpmjax`` command: ``dpmjax [demo] [options]`` runs the built-in round-trip job."""

from __future__ import annotations

import sys
from typing import Optional, Sequence

from . import demo

COMMANDS = {"demo": demo.main}


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("-h", "--help"):
        print("usage: dpmjax [demo] [options]\n\ncommands:\n  demo   invert analytic data and sample it back "
              "(the default)\n\n'dpmjax demo --help' lists the options.")
        return 0
    command = args.pop(0) if args and args[0] in COMMANDS else "demo"
    return COMMANDS[command](args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

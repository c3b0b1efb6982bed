"""The ``dpmjax`` command: ``dpmjax [digits|demo|invert-batch|edit] [options]``."""

from __future__ import annotations

import sys
from typing import Optional, Sequence

from . import batch, demo, digits_job
from .messages import fail


def _edit(args):
    from . import edit  # imports diffusers (< 0.40) only when run

    return edit.main(args)


COMMANDS = {"digits": digits_job.main, "demo": demo.main, "invert-batch": batch.main, "edit": _edit}
USAGE = """usage: dpmjax [digits|demo|invert-batch|edit] [options]

commands:
  digits  invert held-out handwritten digits with the shipped model and sample them back:
          plain vs exact inversion, with and without guidance, PSNR table and PNG grid (the default)
  demo    invert analytic data (Gaussian mixture or Gaussian) and sample it back: round-trip error
          per solver order and number of steps
  invert-batch INPUT OUTPUT
          invert a store of .npy shards chunk by chunk, resumably (a killed run restarts where it
          stopped; bad chunks are reported and the rest is done)
  edit    edit images with a saved diffusers 0.39 Flax Stable Diffusion pipeline: invert them with
          --prompt (exact, plain or null-text), sample --target-prompt, write original | edited

'dpmjax COMMAND --help' lists a command's options."""


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    if args and args[0] not in COMMANDS and not args[0].startswith("-"):
        return fail("dpmjax", f"unknown command {args[0]!r} (commands: {', '.join(COMMANDS)})")
    command = args.pop(0) if args and args[0] in COMMANDS else "digits"
    return COMMANDS[command](args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

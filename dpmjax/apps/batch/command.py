"""``dpmjax invert-batch``: the options, signals that stop the job cleanly, the summary and the
exit status (see :mod:`dpmjax.apps.batch`)."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import textwrap
import threading
from pathlib import Path
from typing import Optional, Sequence, Union

import jax

from ...scheduler import DPMSolverMultistepScheduler
from ...trajectories.exact_options import ExactInversion
from .. import options
from ..messages import fail, first_line, shown
from .job import run
from .plan import DEFAULT_MODEL, EXACT_TOLERANCE, MAX_DEFAULT_BATCH_ROWS, ModelError
from .workers import JobError, rate

PROG = "dpmjax invert-batch"
DESCRIPTION = ("A resumable batch inversion job: an array store in, noise shards out; a killed run restarts where it "
               "stopped, a rerun is idempotent, a bad chunk is reported and the rest is done.")
# exit statuses (signals: 128 + the signal's number)
EXIT_OK = 0  # every chunk recorded (with --exact: every row within the tolerance)
EXIT_FAILED = 1  # chunks quarantined in failed/, or the job stopped on an error that is no chunk's (model, disk)
EXIT_REFUSED = 2  # a setting, path, input or model refused before anything was computed
EXIT_NOT_CONVERGED = 3  # every chunk recorded, but exact inversion left rows above the tolerance
MAX_LISTED = 20  # chunks named one per line in the summary (the rest: failed/ and manifest.json)


def _exact(args) -> Union[bool, ExactInversion]:
    """What ``run``'s ``exact=`` gets from --exact, --tolerance and --max-calls-per-step; an option that
    cannot be used is a ``ValueError`` naming it."""
    if not args.exact:
        named = options.given(args, options.EXACT_OPTIONS)
        if named:
            raise ValueError(options.not_yours(named, "exact inversion") + ": add --exact")
        return False
    return options.exact_inversion(args, default_tolerance=EXACT_TOLERANCE)


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
        raise ValueError(f"scheduler config {args.config} cannot be used ({type(error).__name__}: {first_line(error)}).") from None
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
  {EXIT_OK}  every chunk recorded (with --exact: every row within the round trip --tolerance)
  {EXIT_FAILED}  chunks quarantined (OUTPUT/failed/), or the job stopped on an error that is no
     chunk's (the model, the disk): a rerun resumes
  {EXIT_REFUSED}  a setting, path, input or model refused before anything was computed
  {EXIT_NOT_CONVERGED}  every chunk recorded, but exact inversion left rows above the tolerance
  130/143  stopped by SIGINT/SIGTERM: a rerun resumes"""


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, epilog=EPILOG,
                                     description=textwrap.fill(DESCRIPTION, width=100),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", help="a directory of .npy shards (optionally with manifest.json) or a zarr array")
    parser.add_argument("output", help="output directory (created; reruns resume)")
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"module:function returning model_fn(x, t) (default: {DEFAULT_MODEL})")
    parser.add_argument("--steps", type=int, default=25, help="inference steps (default: 25)")
    parser.add_argument("--config", help="a diffusers scheduler_config.json (default: DPM-Solver++ order 2, ending at sigma_min)")
    parser.add_argument("--order", type=int, choices=(1, 2, 3), help="solver order (overrides the config)")
    parser.add_argument("--exact", action="store_true", help="exact inversion (sampling the noise gives the input back)")
    parser.add_argument("--tolerance", type=float,
                        help=f"with --exact: the round trip a row must reach, relative to max(1, max|row|) "
                             f"(default: {EXACT_TOLERANCE:g})")
    parser.add_argument("--max-calls-per-step", type=int,
                        help="with --exact: at most this many model calls per sampler step for each batch of "
                             "--batch-rows (>= 2); rows still open when it runs out keep their best noise and are "
                             "reported (default: no limit)")
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
        return fail(PROG, f"--steps must be >= 1 (got {args.steps})")
    cluster = {k: v for k, v in (("coordinator_address", args.coordinator_address), ("num_processes", args.num_processes),
                                 ("process_id", args.process_id)) if v is not None}
    if cluster and not args.distributed:
        return fail(PROG, f"{', '.join('--' + k.replace('_', '-') for k in cluster)} need{'s' if len(cluster) == 1 else ''} "
                      f"--distributed")
    try:
        exact = _exact(args)
    except ValueError as error:
        return fail(PROG, str(error))
    stop = threading.Event()
    with _StopOnSignals(stop) as signals:
        try:
            if args.distributed:
                jax.distributed.initialize(**cluster)
            summary = run(input_dir=args.input, output_dir=args.output, model=args.model, num_inference_steps=args.steps,
                          scheduler=_scheduler(args), exact=exact, save_trajectory=args.save_trajectory,
                          batch_rows=args.batch_rows, fill_value_is_data=args.fill_value_is_data, stop=stop)
        except ModelError as error:
            return fail(PROG, f"--model {error.spec}: {first_line(ValueError(error.reason), limit=1000)}")
        except (ValueError, OSError) as error:
            return fail(PROG, first_line(error, limit=1000))
        except JobError as error:
            sys.stderr.write(f"{PROG}: {first_line(error, limit=1000)}\n")
            return EXIT_FAILED
    for note in summary.notes:
        sys.stderr.write(f"invert-batch: note: {shown(note)}\n")
    if summary.stopped:
        number = signals.received[0] if signals.received else signal.SIGINT
        sys.stderr.write(f"invert-batch: stopped by {signal.Signals(number).name} after recording {len(summary.recorded)} "
                         f"chunks; rerun the same command to resume.\n")
        return 128 + number
    print(f"invert-batch: {len(summary.recorded)} chunks inverted ({summary.rows} rows, {rate(summary.rows, summary.seconds)} rows/s), "
          f"{len(summary.skipped)} already done, {len(summary.failed)} failed")
    for name, reason in list(summary.failed.items())[:MAX_LISTED]:
        print(shown(f"  FAILED {name}: {reason}"))
    if len(summary.failed) > MAX_LISTED:
        print(f"  ... and {len(summary.failed) - MAX_LISTED} more failed chunks (each with its reason in "
              f"{shown(str(Path(args.output) / 'failed'))}/)")
    missed = sum(len(rows) for rows in summary.not_converged.values())
    if args.exact:
        print(f"exact inversion: {summary.exact_rows - missed} of {summary.exact_rows} rows within round trip "
              f"{exact.tolerance:g} (every recorded chunk, this run's and earlier runs')")
        for name, rows in list(summary.not_converged.items())[:MAX_LISTED]:
            print(shown(f"  NOT CONVERGED {name}: rows {rows} (round trips in round_trips/)"))
        if len(summary.not_converged) > MAX_LISTED:
            print(f"  ... and {len(summary.not_converged) - MAX_LISTED} more chunks with rows not converged (manifest.json)")
    if summary.failed:
        return EXIT_FAILED
    return EXIT_NOT_CONVERGED if missed else EXIT_OK


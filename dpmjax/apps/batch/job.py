"""``run``: the batch job as one call: the plan, the output claimed, the workers, the exact
inversion's account read from the output, and the manifest (see :mod:`dpmjax.apps.batch`)."""

from __future__ import annotations

import dataclasses
import threading
import time
from pathlib import Path
from typing import Optional, Union

import jax

from ...scheduler import DPMSolverMultistepScheduler
from ...trajectories.exact_options import ExactInversion
from .output_store import OutputStore
from .plan import DEFAULT_MODEL, Plan, make_plan
from .workers import Summary, Workers


def run(
    input_dir,
    output_dir,
    model: str = DEFAULT_MODEL,
    num_inference_steps: int = 25,
    scheduler: Optional[DPMSolverMultistepScheduler] = None,
    exact: Union[bool, ExactInversion] = False,
    save_trajectory: bool = False,
    progress: bool = True,
    batch_rows: Optional[int] = None,
    fill_value_is_data: bool = False,
    stop: Optional[threading.Event] = None,
) -> Summary:
    """Invert every chunk of ``input_dir`` not yet recorded in ``output_dir`` (the library call of
    ``dpmjax invert-batch``; the layout and guarantees are :mod:`dpmjax.apps.batch`'s). Every
    argument, path and size, the input and the model are checked before anything is written.

    Args:
        input_dir: A folder of ``.npy`` shards (optionally with ``manifest.json``) or a zarr array.
        output_dir: The output folder: created, or an output of this same job (it resumes).
        model: ``module:function``, a factory called once with no arguments that returns
            ``model_fn(x, t)``; the default is the shipped digits model without guidance.
        num_inference_steps: Sampler steps (N).
        scheduler: The forward scheduler whose sampler the noise inverts. Default: DPM-Solver++(2M)
            ending at ``sigma_min``, on the grid uniform in log-SNR (``use_lu_lambdas``) when
            ``exact``, where every step of the shipped models' sampler inverts (the default grid's
            last step folds), as the CLI does.
        exact: Exact inversion: sampling the noise gives the input back to within
            :data:`~dpmjax.apps.batch.plan.EXACT_TOLERANCE` (every row's round trip is kept in
            ``round_trips/`` and counted in the summary and ``manifest.json``). A
            :class:`~dpmjax.ExactInversion` gives other settings, its ``tolerance`` the one rows
            are judged by, e.g. ``ExactInversion(tolerance=1e-5, max_calls_per_step=100)`` bounds
            the model calls per step (rows still open when it runs out are reported); the settings
            that differ from ``exact=True``'s are recorded in ``settings.json`` and a resume must
            give the same.
        save_trajectory: Also write every intermediate sample to ``trajectories/``.
        progress: Print one progress line on stderr (redrawn on a terminal, a line per chunk in a log).
        batch_rows: Rows per model call (pieces of exactly this many rows, the last padded); default:
            the largest chunk's rows, at most 256, and a resume keeps the job's.
        fill_value_is_data: zarr input: a missing chunk file means its rows hold the fill value.
        stop: An event; once set, every worker finishes the write it is in and the job returns
            with ``stopped=True`` (resumable).

    Returns:
        The :class:`~dpmjax.apps.batch.workers.Summary` of this run (with exact inversion, the
        rows of every chunk recorded in the output so far).

    Raises:
        ValueError: A setting, path, size, input or model that cannot work (nothing is written);
            :class:`~dpmjax.apps.batch.plan.ModelError` for ``model``.
        JobError: The job stopped on an error that is no chunk's (the model raised or exited,
            the disk is full); the chunks recorded so far are kept and a rerun resumes.
    """
    started = time.time()
    if scheduler is None:
        scheduler = DPMSolverMultistepScheduler(final_sigmas_type="sigma_min", use_lu_lambdas=bool(exact))
    plan = make_plan(input_dir=Path(input_dir), output=OutputStore(output_dir), model=model,
                     num_inference_steps=num_inference_steps, scheduler=scheduler, exact=exact,
                     save_trajectory=save_trajectory, batch_rows=batch_rows, fill_value_is_data=fill_value_is_data)
    plan.output.claim(settings=plan.settings, fingerprints=plan.fingerprints, started=started)  # the first write
    summary = Workers(plan=plan, progress=progress, stop=stop or threading.Event()).run()
    if plan.exact:  # every recorded chunk's rows, resumed or not, from the round trips written beside the noise
        report = plan.output.round_trips(plan.mine, plan.tolerance)
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


def _write_manifest(plan: Plan) -> None:
    """The manifest, by process 0 once every process has finished its chunks."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("dpmjax invert-batch: all chunks done")
    if jax.process_index() == 0:
        plan.output.write_manifest(names=plan.names, row_shape=plan.row_shape, settings=plan.settings,
                                   tolerance=plan.tolerance)



"""The batch job's plan: every setting, path, size, the input and the model checked before
anything is written, and the constants that define a job (see :mod:`dpmjax.apps.batch`)."""

from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path
from typing import Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp

from ... import checks
from ...scheduler import DPMSolverMultistepScheduler
from ...trajectories.exact_options import ExactInversion
from ..messages import first_line
from .input_stores import CHUNK_COPIES, majority_row_shape, open_store
from .memory import array_bytes, device_memory, in_words
from .output_store import OutputStore

# exact inversion: a row whose measured round trip max|sample(noise) - x| / max(1, max|x|) exceeds this
# is reported (events.jsonl, the summary, manifest.json); every row's round trip is kept in round_trips/
EXACT_TOLERANCE = 1e-5
# one piece of rows on a device: the rows, the noise, the model's output and the solver's history are
# (solver_order + PIECE_COPIES) float32 arrays of [batch_rows, *row_shape]; they may take at most
# 1/DEVICE_SHARE of the device's memory (the model needs the rest)
PIECE_COPIES = 3
DEVICE_SHARE = 2
DEFAULT_MODEL = "dpmjax.models.digits:unguided_model"
MAX_DEFAULT_BATCH_ROWS = 256  # rows per model call when the job is not told: memory stays bounded


class ModelError(ValueError):
    """A ``--model`` that gives no model: ``spec`` and ``reason`` (the CLI names the option)."""

    def __init__(self, spec: str, reason: str):
        super().__init__(f"model {spec!r}: {reason}")
        self.spec, self.reason = spec, reason


def _import_here_or_installed(module: str):
    """``module`` imported as ``python -m`` finds it: from the current folder first, then the installed
    packages (the ``dpmjax`` command's own path does not hold the current folder)."""
    here = os.getcwd()
    added = here not in sys.path and "" not in sys.path
    if added:
        sys.path.insert(0, here)
    try:
        return importlib.import_module(module)
    finally:
        if added and here in sys.path:
            sys.path.remove(here)


def load_model(spec: str) -> Callable:
    """``module:function`` -> ``function()``, the model_fn(x, t); a spec that gives no callable
    model is a :class:`ModelError` saying why."""
    module, sep, name = spec.partition(":")
    if not sep or not module or not name:
        raise ModelError(spec, "model must be 'module:function' (a factory called with no arguments).")
    try:
        factory = getattr(_import_here_or_installed(module), name)
    except BaseException as error:  # ImportError, AttributeError, the module failing (or exiting) as it is imported
        raise ModelError(spec, f"cannot be imported ({type(error).__name__}: {first_line(error)}).") from None
    if not callable(factory):
        raise ModelError(spec, f"{module}.{name} is a {type(factory).__name__}, not a function returning model_fn(x, t).")
    try:
        model_fn = factory()
    except BaseException as error:  # SystemExit too: a factory that exits gives no model, and is no success
        raise ModelError(spec, f"calling {name}() with no arguments failed ({type(error).__name__}: {first_line(error)}); "
                               f"name a factory that takes none and returns model_fn(x, t).") from None
    if not callable(model_fn):
        raise ModelError(spec, f"{name}() returned {type(model_fn).__name__}, not a function model_fn(x, t).")
    return model_fn


def default_batch_rows(shapes: dict, row_shape: Optional[tuple]) -> int:
    """The largest well-shaped chunk's rows (1 if none), at most :data:`MAX_DEFAULT_BATCH_ROWS`."""
    rows = [shape[0] for shape in shapes.values() if len(shape) >= 2 and (row_shape is None or shape[1:] == tuple(row_shape))]
    return max(1, min(max(rows, default=1), MAX_DEFAULT_BATCH_ROWS))


# ----------------------------------------------------------------------------- checks before writing
def _positive_int(name: str, value, optional: bool = False) -> None:
    """Refuse anything but a positive int (``None`` too, when ``optional``)."""
    if optional and value is None:
        return
    checks.integer(name, value, 1, note=" (rows per model call) or None" if optional else "")


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
                         f"({type(error).__name__}: {first_line(error)}).") from None
    if getattr(out, "shape", None) != shape:
        raise ValueError(f"model {model} returns {getattr(out, 'shape', type(out).__name__)} for input of shape {shape}: "
                         f"it must return one value per input value.")


# ----------------------------------------------------------------------------- the plan
class Plan(NamedTuple):
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
    save_trajectory: bool
    batch_rows: int
    # what invert's exact= gets: False (plain), or the job's ExactInversion (job_inversion), built once here
    inversion: Union[bool, ExactInversion] = False

    @property
    def exact(self) -> bool:
        """Whether the job inverts exactly (``inversion`` is an :class:`~dpmjax.ExactInversion`)."""
        return bool(self.inversion)

    @property
    def tolerance(self) -> Optional[float]:
        """Exact inversion's tolerance (a row above it is reported), or None for plain inversion."""
        return self.inversion.tolerance if self.inversion else None


def job_inversion(exact) -> Union[bool, ExactInversion]:
    """What :func:`~dpmjax.invert`'s ``exact=`` gets for the job's ``exact``: False (plain inversion),
    ``ExactInversion(tolerance=EXACT_TOLERANCE)`` for True, or the settings object given.

    Raises:
        ValueError: ``exact`` is neither a bool nor a :class:`~dpmjax.ExactInversion`.
    """
    if isinstance(exact, ExactInversion):
        return exact
    if isinstance(exact, bool):
        return ExactInversion(tolerance=EXACT_TOLERANCE) if exact else False
    raise ValueError(f"exact must be True, False or a dpmjax.ExactInversion (exact inversion's settings), "
                     f"got {exact!r}.")


def inversion_settings(inversion: Union[bool, ExactInversion]) -> dict:
    """The exact-inversion settings a job records in ``settings.json``: the fields that differ from
    ``ExactInversion(tolerance=EXACT_TOLERANCE)`` (empty for plain inversion and for ``exact=True``,
    so outputs written before the settings were recorded resume unchanged)."""
    if not inversion:
        return {}
    default = ExactInversion(tolerance=EXACT_TOLERANCE)
    return {name: getattr(inversion, name) for name in ExactInversion.__dataclass_fields__
            if getattr(inversion, name) != getattr(default, name)}


def make_plan(*, input_dir: Path, output: OutputStore, model: str, num_inference_steps: int,
          scheduler: DPMSolverMultistepScheduler, exact: Union[bool, ExactInversion], save_trajectory: bool,
          batch_rows: Optional[int], fill_value_is_data: bool) -> Plan:
    """Every check, reading only: the arguments, the paths, the input, a resumed job's settings and
    input shards (refused before the model is loaded), then the model on one batch."""
    inversion = job_inversion(exact)
    _positive_int("num_inference_steps", num_inference_steps)
    _positive_int("batch_rows", batch_rows, optional=True)
    output.check_usable(input_dir)
    copies = CHUNK_COPIES + (num_inference_steps + 1 if save_trajectory else 0)  # a chunk's float32 copies on the host
    store = open_store(input_dir, fill_value_is_data=fill_value_is_data, copies=copies)
    shapes = store.shapes()
    row_shape = store.row_shape or majority_row_shape(shapes)
    before = output.settings()
    if batch_rows is None:
        batch_rows = _resumed_batch_rows(before=before, shapes=shapes, row_shape=row_shape)
    _check_sizes(batch_rows=batch_rows, row_shape=row_shape, scheduler=scheduler)
    _check_scheduler(scheduler=scheduler, num_inference_steps=num_inference_steps, batch_rows=batch_rows, row_shape=row_shape)
    settings = {"model": model, "num_inference_steps": num_inference_steps, "exact": bool(inversion),
                "exact_settings": inversion_settings(inversion), "batch_rows": batch_rows,
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
    return Plan(input=store, output=output, names=store.names, mine=mine, fingerprints=fingerprints,
                 row_shape=row_shape, settings=settings, model_fn=model_fn, scheduler=scheduler,
                 num_inference_steps=num_inference_steps, save_trajectory=save_trajectory,
                 batch_rows=batch_rows, inversion=inversion)


def _resumed_batch_rows(before: Optional[dict], shapes: dict, row_shape: Optional[tuple]) -> int:
    """Rows per call when not given: a resume keeps the job's (a fixed shard must not change them)."""
    recorded = before.get("batch_rows") if before else None
    valid = isinstance(recorded, int) and not isinstance(recorded, bool) and recorded >= 1
    return recorded if valid else default_batch_rows(shapes, row_shape)



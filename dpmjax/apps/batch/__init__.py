"""A resumable batch inversion job: an array store in, noise shards out; a killed run restarts
where it stopped, a rerun is idempotent, a bad chunk is reported and the rest is done.

Input (:mod:`dpmjax.apps.batch.input_stores`, only ever read): a folder of ``.npy`` shards, one chunk each
(every ``*.npy`` sorted by name, or exactly the files listed in ``INPUT/manifest.json``:
``{"shards": [...], "row_shape": [...]}``, relative paths, subfolders kept), or a zarr array
``[rows, *row_shape]`` (v2 or v3, read with tensorstore) cut into chunks of its own row chunking,
named ``rows-BEGIN-END.npy``. Output (:mod:`dpmjax.apps.batch.output_store`, its layout and guarantees):
``settings.json`` claimed atomically by the first run (a run with other settings, another input
path included, is refused), the noise of chunk NAME in ``chunks/NAME.npy`` (with
``trajectories/``, ``round_trips/``), quarantined chunks in ``failed/``, the inputs' fingerprints
in ``inputs/``, ``events.jsonl``, and ``manifest.json`` at the end.

Nothing is written before every setting is checked: the paths (OUTPUT neither is, nor lies inside,
nor contains INPUT; an existing OUTPUT is empty or this job's), the input (its manifest), the
scheduler and steps, and the model on one batch of the rows' shape (traced, not run).

A chunk counts as recorded once its output file exists; a restarted job skips it (and never
recomputes it). Each chunk is checked before and after: readable .npy, ``[rows, *row_shape]`` (the
manifest's or the zarr array's ``row_shape``, else the shape most chunks have) with at least one
row, finite input within float32's range, every zarr chunk file present, finite noise. The model
comes from ``module:function`` (called once with no arguments, returning ``model_fn(x, t)``); the
built-in default is the shipped digits model without guidance.

Concurrent runs with the same settings share the output: a process takes a chunk only under its
claim (an flock, released by the kernel when the process dies), so no chunk is computed twice; a
chunk another process is computing is left to it and waited for at the end.

Rows per model call: every chunk is inverted in pieces of exactly ``batch_rows`` rows (the last
piece padded by repeating its last row; the padding is dropped), so one compiled program serves
chunks of any size and the model's working memory does not grow with a shard. The shard itself is
read whole, with a float32 copy and its noise (and trajectory), so host memory holds a few times a
shard per device. Without ``batch_rows`` a job derives it once (the largest chunk's rows) and a
resume keeps it.

Many devices: one worker thread per local device, each inverting whole chunks with the same
single-device program; many processes (``jax.distributed``): process ``p`` of ``P`` takes chunks
``p, p + P, ...`` of the same sorted list, writing into the same output store. A chunk's noise
therefore depends on the chunk and ``batch_rows``, not on the number of devices or hosts: a run on
one CPU, on 8 devices and on 2 hosts x 4 devices writes the same bits.
(Splitting rows over the devices would not: XLA's CPU matmul rounds 1, 2-48 and 64 rows
differently, ~1e-6 per layer.)

Stopping: ``stop`` (an event; the CLI sets it on SIGINT and SIGTERM) makes every worker finish the
write it is in and leave its chunk at the next piece boundary; the store stays resumable.

The package by stage: :mod:`~dpmjax.apps.batch.plan` (every check, before anything is written),
:mod:`~dpmjax.apps.batch.workers` (a thread per device), :mod:`~dpmjax.apps.batch.job` (``run``,
the stages in order), :mod:`~dpmjax.apps.batch.command` (the CLI), beside the input and output
stores and :mod:`~dpmjax.apps.batch.memory` (the sizes it may plan on).
"""

from .command import EXIT_FAILED, EXIT_NOT_CONVERGED, EXIT_OK, EXIT_REFUSED, main
from .input_stores import ChunkError, open_store
from .job import run
from .output_store import OutputStore
from .plan import DEFAULT_MODEL, EXACT_TOLERANCE, ModelError, load_model
from .workers import JobError, Summary

__all__ = ["run", "main", "Summary", "JobError", "ModelError", "ChunkError", "load_model", "open_store", "OutputStore",
           "DEFAULT_MODEL", "EXACT_TOLERANCE", "EXIT_OK", "EXIT_FAILED", "EXIT_REFUSED", "EXIT_NOT_CONVERGED"]

"""Whole trajectories in one ``jax.lax.scan``: the loop every sampler and plain inversion runs, and
:func:`sample`.

The model is called inside the compiled loop: ``model_fn(sample, timestep)`` or, with ``cond``,
``model_fn(sample, timestep, cond)`` (``cond`` is any pytree, passed through unchanged; the contract:
:mod:`dpmjax.trajectories.model_fn`). Everything
that depends on the step number alone is gathered before the loop, so one iteration is the model
call and :func:`dpmjax.solver.step_from_output`.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import flax.struct
import jax
import jax.numpy as jnp
from jax import lax

from .. import checks, solver
from ..scheduler import DPMSolverMultistepBase, DPMSolverMultistepScheduler
from ..state import SchedulerState
from . import progress as progress_line
from .grid_entry import empty_history, grid_state, grid_steps
from .model_fn import ConditionalModelFn, ModelFn

Array = jax.Array


@flax.struct.dataclass
class Trajectory:
    """Result of :func:`sample` or :func:`invert`.

    A pytree (``flax.struct`` dataclass): it passes through ``jit`` and ``vmap``. Fields that were
    not requested, or do not apply to the run that made it, are ``None``.

    Attributes:
        sample: The end point: the sample (forward) or the noise (inversion), with the input's
            shape and dtype.
        samples: ``[N, *shape]``, the sample after each step; only with ``return_samples=True``.
        model_outputs: ``[N, ...]``, the raw model output of each step; only with
            ``return_model_outputs=True``.
        timesteps: ``[N]``, where the model was evaluated, in the order of the steps taken.
        sigmas: ``[N + 1]``, the noise levels visited (diffusers' sigma), in order.
        round_trip: Exact inversion only: ``[rows]``, the measured
            ``max|sample(noise) - x| / max(1, max|x|)`` per row of the input ``x`` (one value for
            ``independent_rows=False``).
        iterations: Exact inversion only: Newton iterations of the whole-sampler solve.
        sweeps: Exact inversion only: defect-correction sweeps made.
        converged: Exact inversion only: ``[rows]``, whether ``round_trip`` is within the
            ``tolerance`` asked for (``False`` flags a row left above it: the grid folds, the
            solve stalled or the budget ran out; the row keeps the best start it met, never worse
            than plain inversion's).
        model_calls: Exact inversion only: the model calls the solve made per sampler step, over
            the whole batch (a Jacobian-vector product counts as one; with hard rows finished
            apart, the sub-batch's calls added: calls of fewer rows).
    """

    sample: Array
    samples: Optional[Array] = None
    model_outputs: Optional[Array] = None
    timesteps: Optional[Array] = None
    sigmas: Optional[Array] = None
    round_trip: Optional[Array] = None
    iterations: Optional[Array] = None
    sweeps: Optional[Array] = None
    converged: Optional[Array] = None
    model_calls: Optional[Array] = None


class ScanOptions(NamedTuple):
    """Static settings of one trajectory scan (hashable: one compiled program per distinct value).

    Attributes:
        return_samples: Stack each step's sample (``[N, *shape]``).
        return_outputs: Stack each step's raw model output (``[N, ...]``).
        checkpoint: Rematerialise each step in the backward pass.
        unroll: The scan's unroll factor.
        progress: Print a progress line on stderr.
        label: The progress line's label.
        steps: ``(start, stop)``: run the grid's steps ``start .. stop - 1`` only, from an empty
            history (:func:`~dpmjax.trajectories.grid_entry.grid_steps`); ``None`` (default): all.
    """

    return_samples: bool = False
    return_outputs: bool = False
    checkpoint: bool = False
    unroll: int = 1
    progress: bool = False
    label: str = ""
    steps: Optional[tuple] = None


class Kept(NamedTuple):
    """A region held on a reference trajectory while the rest is sampled (blended diffusion,
    DiffEdit): after step ``i`` the sample becomes ``mask * x + (1 - mask) * reference[i]``
    (exactly ``x`` where ``mask`` is 1 and exactly ``reference[i]`` where it is 0).

    Attributes:
        mask: Broadcastable to the sample: 1 where the sampler draws, 0 where the reference is
            kept (values in between blend).
        reference: ``[steps, *shape]``, the reference sample at the noise level each step ends on.
    """

    mask: Array
    reference: Array


def blend(mask: Array, x: Array, reference: Array) -> Array:
    """``mask * x + (1 - mask) * reference``, exact where ``mask`` is 0 or 1 (a NaN or Inf in the
    region not taken does not leak into the other)."""
    mixed = (x * mask + reference * (1 - mask)).astype(x.dtype)
    return jnp.where(mask == 1, x, jnp.where(mask == 0, reference.astype(x.dtype), mixed))


def call_model(model_fn: ModelFn | ConditionalModelFn, x: Array, t: Array, *, cond: Any, config=None, name: str = "model_fn") -> Array:
    """``model_fn(x, t)``, or ``model_fn(x, t, cond)`` when a condition is given, its output checked.

    Args:
        model_fn: The model, ``model_fn(sample, timestep[, cond]) -> model_output``.
        x: The sample.
        t: The timestep.
        cond: Any pytree passed through unchanged, or ``None`` for an unconditional call.
        config: The scheduler's config: when given, the output's shape is checked against the one
            the step needs (:func:`dpmjax.solver.model_output_shape`).
        name: The model's name in error messages (the parameter the user passed it as).

    Returns:
        The model output.

    Raises:
        ValueError: The model returned something other than one floating-point array (a tuple, a
            Python number, ...), or one of the wrong shape (with ``config``); or the model failed
            where a leaf of ``cond`` has another number of rows than ``x`` (the model's error
            chained). Raised while tracing, before anything runs.
    """
    if cond is None:
        out = model_fn(x, t)
    else:
        try:
            out = model_fn(x, t, cond)
        except (TypeError, ValueError) as error:
            other_rows = [jnp.shape(a) for a in jax.tree_util.tree_leaves(cond)
                          if jnp.ndim(x) >= 1 and jnp.ndim(a) >= 1 and jnp.shape(a)[0] not in (x.shape[0], 1)]
            if not other_rows:  # nothing to say about cond's rows: the model's own error
                raise
            raise ValueError(f"{name} failed on samples of {x.shape[0]} rows, and cond has a leaf of shape "
                             f"{tuple(other_rows[0])}: a per-row leaf of cond needs one row per row of the samples "
                             f"(axis 0). The model's error: {error}") from error
    check_model_output(out, x, name=name, config=config)
    return out


def check_model_output(out, x: Array, *, name: str, config=None) -> None:
    """Refuse a model output that is not one floating-point array (of the shape the step needs for
    samples shaped like ``x``, when ``config`` is given), naming the model's parameter."""
    if config is None:
        checks.output_array(name, out, note=f" (the model output for samples of shape {tuple(x.shape)})")
    else:
        checks.output_array(name, out, expected_shape=solver.model_output_shape(config, x.shape),
                            note=solver.model_output_note(config))


def scan_steps(scheduler, model_fn, options: ScanOptions, *, state, x, cond, keys, noises, kept: Optional[Kept] = None):
    """The whole trajectory from step 0, one scan iteration per step: ``(x_N, samples, outputs)``.

    Each step's update row (warm-up orders applied) is gathered before the loop. The model-output
    history is a ``[K, ...]`` ring buffer (none at order 1): step ``i`` writes slot ``i % K`` in
    place, then reads the older slots. (Blocks of K steps with a tuple of K buffers avoid the
    dynamic slices but were no faster on the CPU: XLA then recomputes the cheap outputs in each
    consumer, and the program holds K copies of the model.)

    ``scan_steps_jit`` is this function jitted with ``scheduler``, ``model_fn`` and ``options``
    static; ``scan_steps_donating`` is the same program reusing ``x``'s buffer for the result. The
    arguments after ``options`` are keyword-only.

    Args:
        scheduler: The scheduler (forward or inverse) whose config the steps use.
        model_fn: The model, ``model_fn(sample, timestep)`` or ``model_fn(sample, timestep, cond)``.
        options: The static :class:`ScanOptions`.
        state: A :class:`~dpmjax.state.SchedulerState` after ``set_timesteps`` (or
            ``state_on_grid``); its ``N`` timesteps are the steps taken.
        x: The starting sample.
        cond: The condition passed to ``model_fn``, or ``None``.
        keys: ``[N]`` random keys, one per step, for SDE types drawing their noise; else ``None``.
        noises: ``[N, *x.shape]`` per-step noise for SDE types given it explicitly; else ``None``.
        kept: A :class:`Kept` region held on its reference after each step; ``None`` (default):
            none.

    Returns:
        ``(x_N, samples, outputs)``: the end point; the ``[N, *shape]`` samples after each step
        (``None`` unless ``options.return_samples``); the ``[N, ...]`` raw model outputs (``None``
        unless ``options.return_outputs``).
    """
    config = scheduler.config
    n = state.timesteps.shape[0]
    start, stop = options.steps or (0, n)

    def body(carry, inputs):
        x, history = carry
        step, key, noise, reference = inputs
        out = call_model(model_fn, x, step.timestep, cond=cond, config=config)
        x_new, history = solver.step_from_output(config, state, index=step.index, row=step.row, sample=x,
                                                 model_output=out, history=history, key=key, noise=noise)
        if kept is not None:
            x_new = blend(kept.mask, x_new, reference)
        progress_line.report(options.progress, step.index - start, stop - start, label=options.label)
        return (x_new, history), (x_new if options.return_samples else None, out if options.return_outputs else None)

    if options.checkpoint:
        body = jax.checkpoint(body)
    per_step = (grid_steps(state, start, stop), keys, noises, None if kept is None else kept.reference)
    (x, _), (samples, outputs) = lax.scan(body, (x, empty_history(config, x)), per_step, unroll=options.unroll)
    return x, samples, outputs


scan_steps_jit = jax.jit(scan_steps, static_argnums=(0, 1, 2))
# the same program, reusing the input sample's buffer for the output (donate=True); ``x`` is passed by
# keyword, so it is donated by name
scan_steps_donating = jax.jit(scan_steps, static_argnums=(0, 1, 2), donate_argnames=("x",))


def stochastic_inputs(scheduler, n: int, shape, *, key, noises):
    if not scheduler.config.is_sde:
        return None, None
    if noises is not None:
        noises = jnp.asarray(noises)
        if noises.shape != (n,) + tuple(shape):
            raise ValueError(f"noises must have shape {(n,) + tuple(shape)} (one per step), got {noises.shape}.")
        return None, noises
    if key is None:
        raise ValueError(f"algorithm_type={scheduler.config.algorithm_type!r} is stochastic: pass key or noises.")
    return jax.random.split(key, n), None


def visited_sigmas(state: SchedulerState, n: int) -> Array:
    """The ``N + 1`` noise levels of a state's grid (sliced only if the state holds more: a
    dispatched slice costs ~100 us, more than a small trajectory)."""
    return state.sigmas if state.sigmas.shape[0] == n + 1 else state.sigmas[: n + 1]


def as_array(x) -> Array:
    return x if isinstance(x, jax.Array) else jnp.asarray(x)


def check_scheduler(scheduler) -> None:
    if not isinstance(scheduler, DPMSolverMultistepBase):
        raise ValueError(f"scheduler must be a dpmjax scheduler, got {type(scheduler).__name__}.")


def check_unroll(unroll) -> None:
    checks.integer("unroll", unroll, 1)


def sample(
    model_fn: ModelFn | ConditionalModelFn,
    noise: Array,
    scheduler: DPMSolverMultistepScheduler,
    num_inference_steps: Optional[int] = None,
    *,
    sigmas: Optional[Array] = None,
    cond: Any = None,
    key: Optional[Array] = None,
    noises: Optional[Array] = None,
    return_samples: bool = False,
    return_model_outputs: bool = False,
    checkpoint: bool = False,
    unroll: int = 1,
    progress: bool = False,
    donate: bool = False,
) -> Trajectory:
    """Sample from ``noise`` with a forward scheduler, the whole trajectory in one jitted scan.

    SDE types draw their per-step noise from ``key`` (split per step) or take ``noises``
    (``[N, *shape]``); deterministic (ODE) samplers refuse both. ``checkpoint=True``
    rematerialises each step in the backward pass, so ``jax.grad`` keeps one sample (and the
    model-output history) per step instead of every activation of the model. ``unroll`` unrolls
    the scan by that factor. ``donate=True`` lets the result reuse ``noise``'s device buffer
    (``noise`` is then deleted): one sample less in memory.

    The model is called inside the compiled loop as ``model_fn(sample, timestep)`` or, with
    ``cond``, ``model_fn(sample, timestep, cond)``.

    Args:
        model_fn: The model: ``model_fn(sample, timestep[, cond]) -> model_output``, the output of
            the kind the scheduler's ``prediction_type`` names, with the sample's shape (twice its
            channels with a learned ``variance_type``); see :class:`~dpmjax.ModelFn`.
        noise: The starting sample, a floating-point array; its shape is the sample shape (leading
            axis: batch) and its dtype the sample's dtype.
        scheduler: A :class:`~dpmjax.DPMSolverMultistepScheduler` (forward); its config fixes the
            grid, the order and the algorithm.
        num_inference_steps: ``N``, the number of steps (an integer in
            ``[1, num_train_timesteps]``) on diffusers' grid; or pass ``sigmas``.
        sigmas: The grid itself instead: ``[N + 1]`` noise levels (diffusers' sigma, decreasing),
            possibly traced, so ``jax.grad`` reaches them (e.g. a grid from
            :func:`dpmjax.learn_grid`); the model then receives fractional timesteps (see
            ``set_timesteps``).
        cond: Any pytree passed unchanged as ``model_fn``'s third argument; ``None`` (default)
            calls ``model_fn(sample, timestep)``. Large arrays (embeddings, weights) passed here
            are arguments of the compiled program: a new value does not recompile it.
        key: A ``jax.random`` key for SDE types (``algorithm_type`` ``"sde-dpmsolver"`` or
            ``"sde-dpmsolver++"``), split into one key per step.
        noises: ``[N, *noise.shape]``, the per-step noise of an SDE type, instead of ``key``.
        return_samples: Also return the sample after each step (``Trajectory.samples``).
        return_model_outputs: Also return each step's raw model output
            (``Trajectory.model_outputs``).
        checkpoint: Rematerialise each step in the backward pass (less memory under ``jax.grad``).
        unroll: The scan's unroll factor, an integer >= 1 (default 1).
        progress: Print a progress line on stderr while the steps run.
        donate: Let the result reuse ``noise``'s device buffer; ``noise`` is deleted.

    Returns:
        A :class:`Trajectory` with ``sample`` (the end point), ``timesteps`` and ``sigmas``, and
        ``samples`` / ``model_outputs`` when asked for.

    Raises:
        ValueError: ``scheduler`` is not a dpmjax scheduler, or is an inverse scheduler (use
            :func:`dpmjax.invert`); ``unroll`` is not an integer >= 1; ``num_inference_steps`` is
            not an integer in ``[1, num_train_timesteps]`` (or too many for ``"leading"``
            spacing); both or neither of ``num_inference_steps`` and ``sigmas``, or ``sigmas``
            that are not a sampler's grid (see ``set_timesteps``); ``key`` or ``noises`` is given
            to a deterministic sampler; an SDE sampler
            gets neither; ``noises`` does not have shape ``[N, *noise.shape]``; ``noise`` is not
            floating point or has size zero; ``model_fn`` returns something other than one
            floating-point array of the sample's shape (a tuple, a Python number, another shape).
    """
    check_scheduler(scheduler)
    check_unroll(unroll)
    checks.function("model_fn", model_fn)
    for name, value in (("return_samples", return_samples), ("return_model_outputs", return_model_outputs),
                        ("checkpoint", checkpoint), ("progress", progress), ("donate", donate)):
        checks.boolean(name, value)
    if not scheduler.forward:
        raise ValueError("sample needs a forward scheduler (DPMSolverMultistepScheduler); use invert for inversion.")
    if not scheduler.config.is_sde and (key is not None or noises is not None):
        raise ValueError(
            f"key/noises apply to stochastic samplers (algorithm_type sde-dpmsolver or sde-dpmsolver++); this one is "
            f"deterministic (algorithm_type={scheduler.config.algorithm_type!r}): pass neither."
        )
    noise = as_array(noise)
    checks.floating_array("noise", noise)
    checks.non_empty("noise", noise)
    state = grid_state(scheduler, noise.shape, num_inference_steps=num_inference_steps, sigmas=sigmas,
                       dtype=solver.compute_dtype(noise), caller="sample")
    n = state.num_inference_steps
    keys, noises = stochastic_inputs(scheduler, n, noise.shape, key=key, noises=noises)
    run = scan_steps_donating if donate else scan_steps_jit
    options = ScanOptions(return_samples=return_samples, return_outputs=return_model_outputs, checkpoint=checkpoint,
                          unroll=unroll, progress=progress, label="sample")
    x, samples, outputs = run(scheduler, model_fn, options, state=state, x=noise, cond=cond, keys=keys, noises=noises)
    return Trajectory(sample=x, samples=samples, model_outputs=outputs, timesteps=state.timesteps,
                      sigmas=visited_sigmas(state, n))

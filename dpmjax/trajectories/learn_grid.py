"""Learned time discretisations: the ``N + 1`` noise levels on which an ``N``-step sampler best
reproduces a many-step one.

LD3 (Tong et al., "Learning to Discretize Denoising Diffusion ODEs", ICLR 2025): a *teacher* (the
same solver on a fine grid) maps training noises to samples once; a *student* of ``N`` steps on
learnable levels ``xi`` is trained by gradient descent to reproduce them,

    min_xi  E_x || Psi_xi(x_T + delta) - Psi_teacher(x_T) ||^2,    ||delta|| <= r ||x_T||,

where ``delta`` is LD3's soft teacher forcing (a per-sample slack that lets the student start near,
not at, the teacher's noise, so the grid is not spent on samples it cannot reach; ``r = 0`` turns
it off). The gradient reaches ``xi`` through the whole sampler because the step tables are built
from the levels with ``jax.numpy`` (:mod:`dpmjax.traced_tables`).

The levels are kept ordered by construction: in log-SNR ``lambda = -log sigma``, the grid runs from
the teacher's first level to the training schedule's last by positive increments, a softmax of
``N`` free logits (with a final zero noise level, the last increment is slack and the level before
the zero step is learned too).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from .. import checks
from ..noise_schedule import training_schedule
from ..scheduler import DPMSolverMultistepScheduler
from . import progress as progress_line
from .model_fn import ConditionalModelFn, ModelFn
from .scan import check_scheduler, sample

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class LearnedGrid:
    """The result of :func:`learn_grid`.

    Attributes:
        sigmas: ``[N + 1]`` float32 noise levels (diffusers' sigma, not increasing: a step whose
            share trains to nothing is left as a zero-length step, as in diffusers' own Karras
            grid): pass them as
            ``sigmas=`` to :func:`dpmjax.sample`, :func:`dpmjax.invert` or ``set_timesteps``.
        initial_sigmas: The grid training started from.
        losses: ``[iterations]``, the training loss (mean squared error to the teacher per
            element, on each iteration's mini-batch).
        teacher_steps: The teacher's number of steps.
        seconds: Wall time of the training (teacher included).
        improved: Whether the trained grid beat the starting grid on the training noises (if not,
            ``sigmas`` is the starting grid).
    """

    sigmas: np.ndarray
    initial_sigmas: np.ndarray
    losses: np.ndarray
    teacher_steps: int
    seconds: float
    improved: bool = True


@dataclasses.dataclass(frozen=True)
class GridParameterisation:
    """Ordered noise levels from free logits (static: hashable).

    ``N + 1`` levels from ``first`` (the teacher's first level) towards ``last`` (the training
    schedule's smallest), the log-SNR increments a softmax of ``N`` logits. With ``zero_end`` the
    last level is 0 and the ``N``-th increment is slack, so the level before the zero step moves.
    """

    steps: int
    lambda_first: float
    lambda_last: float
    zero_end: bool
    flow: bool

    def sigmas(self, logits: Array) -> Array:
        """The ``N + 1`` levels of ``logits`` (``[N]``), differentiably."""
        shares = jnp.cumsum(jax.nn.softmax(logits))
        lambdas = self.lambda_first + (self.lambda_last - self.lambda_first) * jnp.concatenate([jnp.zeros(1), shares])
        levels = jax.nn.sigmoid(-lambdas) if self.flow else jnp.exp(-lambdas)
        if self.zero_end:
            levels = jnp.concatenate([levels[: self.steps], jnp.zeros(1, levels.dtype)])
        return levels

    def logits(self, sigmas) -> Array:
        """Logits whose grid is ``sigmas`` (the inverse of :meth:`sigmas`, for a starting grid)."""
        s = np.asarray(sigmas, np.float64)
        positive = s[: self.steps] if self.zero_end else s
        lambdas = np.log1p(-positive) - np.log(positive) if self.flow else -np.log(positive)
        if self.zero_end:  # the slack increment: what is left up to lambda_last
            lambdas = np.concatenate([lambdas, [self.lambda_last]])
        shares = np.clip(np.diff(lambdas) / (self.lambda_last - self.lambda_first), 1e-6, None)
        return jnp.asarray(np.log(shares / shares.sum()), jnp.float32)


def parameterisation(scheduler, num_steps: int, first_sigma: float) -> GridParameterisation:
    config = scheduler.config
    smallest = float(training_schedule(config).sigmas[0])
    to_lambda = (lambda s: float(np.log1p(-s) - np.log(s))) if config.use_flow_sigmas else (lambda s: float(-np.log(s)))
    return GridParameterisation(steps=num_steps, lambda_first=to_lambda(first_sigma), lambda_last=to_lambda(smallest),
                                zero_end=config.final_sigmas_type == "zero", flow=config.use_flow_sigmas)


def _rows(tree, index):
    return None if tree is None else jax.tree_util.tree_map(lambda a: a[index], tree)


def _project(delta: Array, noise: Array, radius: float) -> Array:
    """``delta`` shrunk per row onto the ball ``||delta|| <= radius ||noise||``."""
    axes = tuple(range(1, noise.ndim))
    limit = radius * jnp.sqrt(jnp.sum(noise**2, axis=axes, keepdims=True))
    size = jnp.sqrt(jnp.sum(delta**2, axis=axes, keepdims=True) + 1e-30)  # smooth at delta = 0, where it starts
    return delta * jnp.minimum(1.0, limit / size)


def _training_step(model_fn, scheduler, *, grid: GridParameterisation, optimizer, radius: float):
    """One optimiser step on a mini-batch ``index`` of the training pairs, jitted."""

    def loss(params, *, noise, target, cond):
        start = noise + _project(params["delta"], noise, radius) if radius > 0 else noise
        out = sample(model_fn, start, scheduler, sigmas=grid.sigmas(params["logits"]), cond=cond).sample
        return jnp.mean((out - target) ** 2)

    def step(params, opt_state, *, noise, target, cond, index):
        def on_batch(p):
            batch = dict(logits=p["logits"], delta=p["delta"][index])
            return loss(batch, noise=noise[index], target=target[index], cond=_rows(cond, index))

        value, grads = jax.value_and_grad(on_batch)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    return jax.jit(step)


def learn_grid(
    model_fn: ModelFn | ConditionalModelFn,
    scheduler: DPMSolverMultistepScheduler,
    num_inference_steps: int,
    noise: Array,
    *,
    cond: Any = None,
    teacher_steps: int = 100,
    iterations: int = 300,
    batch_size: int = 32,
    optimizer: Optional[optax.GradientTransformation] = None,
    teacher_forcing_radius: float = 0.0,
    init: Any = "best",
    key: Optional[Array] = None,
    progress: bool = True,
) -> LearnedGrid:
    """Learn the ``N + 1`` noise levels of an ``N``-step sampler from a many-step teacher (LD3).

    The teacher (``scheduler`` with ``teacher_steps`` steps on its own grid) maps ``noise`` to
    samples once; the student (``scheduler`` on the learned levels) is trained on random
    mini-batches of those pairs with ``optimizer``. Endpoints: the teacher's first noise level and
    the training schedule's smallest (or zero, with ``final_sigmas_type="zero"``). Use held-out
    noise to judge the result: :func:`dpmjax.sample` with ``sigmas=result.sigmas``.

    Args:
        model_fn: The model, ``model_fn(x, t)`` or, with ``cond``, ``model_fn(x, t, cond)``
            (guidance included, e.g. :func:`dpmjax.classifier_free_guidance`); it must accept
            fractional timesteps.
        scheduler: The deterministic sampler (:class:`~dpmjax.DPMSolverMultistepScheduler`) whose
            grid is learned; its config (order, algorithm, final sigma) is the student's and the
            teacher's.
        num_inference_steps: ``N``, the student's steps (an integer >= 1).
        noise: ``[M, *shape]`` training noises (``M >= 1`` rows).
        cond: ``None``, or a pytree whose leaves have ``M`` rows (one condition per noise),
            sliced into the mini-batches with them.
        teacher_steps: The teacher's steps (an integer > ``N``; default 100).
        iterations: Optimiser steps (default 300).
        batch_size: Rows per mini-batch (default 32; more than ``M`` uses ``M``).
        optimizer: Any optax transformation; default ``optax.adam(5e-2)``.
        teacher_forcing_radius: LD3's slack ``r`` (default 0: the student starts at the teacher's
            noise): each training noise may move by up to ``r`` times its norm. Measured on the
            digits MLP at guidance 3: ``r = 0.1`` lowers the mean error further but leaves a few
            noises whose samples the grid ruins, which the final check below then refuses.
        init: The starting grid: ``"best"`` (default: whichever of the scheduler's own grid of
            ``N`` steps, uniform log-SNR steps and the Karras grid is closest to the teacher on
            the first mini-batch), ``"default"`` (the scheduler's own grid), ``"lu"`` (uniform in
            log-SNR), ``"karras"`` or ``[N + 1]`` noise levels (their shape is kept between the
            fixed ends: the teacher's first level and the schedule's smallest, or zero).
        key: A ``jax.random`` key for the mini-batches (default ``PRNGKey(0)``).
        progress: Print a progress line on stderr.

    Returns:
        A :class:`LearnedGrid`: ``sigmas`` and the training record. The grid returned is never
        worse than the starting grid on (up to 256 of) the training noises: the starting grid is
        returned otherwise, and ``LearnedGrid.improved`` is False.

    Raises:
        ValueError: ``scheduler`` is not a deterministic forward dpmjax scheduler; an integer
            argument is out of range; ``noise`` is not a finite floating-point array with a batch
            axis; a leaf of ``cond`` does not have ``M`` rows; ``init`` is not ``"best"``,
            ``"default"``, ``"lu"``, ``"karras"`` or ``N + 1`` levels; ``optimizer`` is not an
            optax transformation; ``key`` is not a ``jax.random`` key.
    """
    check_scheduler(scheduler)
    if not scheduler.forward or scheduler.config.is_sde:
        raise ValueError("learn_grid takes a deterministic DPMSolverMultistepScheduler (the sampler whose grid is learned).")
    checks.function("model_fn", model_fn)
    n = checks.integer("num_inference_steps", num_inference_steps, 1)
    teacher_steps = checks.integer("teacher_steps", teacher_steps, n + 1)
    iterations = checks.integer("iterations", iterations, 1)
    batch_size = checks.integer("batch_size", batch_size, 1)
    radius = checks.real("teacher_forcing_radius", teacher_forcing_radius, low=0.0, finite=True)
    checks.boolean("progress", progress)
    if optimizer is None:
        optimizer = optax.adam(5e-2)
    elif not (callable(getattr(optimizer, "init", None)) and callable(getattr(optimizer, "update", None))):
        raise ValueError(f"optimizer must be an optax GradientTransformation (e.g. optax.adam(5e-2)), got {optimizer!r}.")
    noise = jnp.asarray(noise)
    checks.floating_array("noise", noise)
    if noise.ndim < 1 or noise.shape[0] < 1:
        raise ValueError(f"noise must have a batch axis with at least one row, got shape {tuple(noise.shape)}.")
    rows = noise.shape[0]
    if not bool(jnp.all(jnp.isfinite(noise))):
        raise ValueError("noise must be finite (the training noises), got NaN or infinite values.")
    batch_size = min(batch_size, rows)
    for leaf in jax.tree_util.tree_leaves(cond):
        if jnp.ndim(leaf) < 1 or jnp.shape(leaf)[0] != rows:
            raise ValueError(f"cond must be None or a pytree whose every leaf has the noise's {rows} rows on axis 0 "
                             f"(sliced into the mini-batches with them), got a leaf of shape {jnp.shape(leaf)}.")
    if key is None:
        key = jax.random.PRNGKey(0)
    elif not (isinstance(key, jax.Array) and (jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
                                               or (key.shape == (2,) and key.dtype == jnp.uint32))):
        raise ValueError(f"key must be a jax.random key (e.g. jax.random.PRNGKey(0)), got {key!r}.")

    began = time.perf_counter()
    teacher = sample(model_fn, noise, scheduler, num_inference_steps=teacher_steps, cond=cond, progress=progress)
    first = float(teacher.sigmas[0])
    grid = parameterisation(scheduler, n, first)
    if isinstance(init, str) and init == "best":
        probe = slice(0, batch_size)
        init = _closest_to_teacher(model_fn, scheduler, n, grid=grid, noise=noise[probe], target=teacher.sample[probe],
                                   cond=_rows(cond, probe))
    start = _starting_grid(scheduler, n, init=init, grid=grid)
    params = dict(logits=grid.logits(start), delta=jnp.zeros_like(noise))
    step = _training_step(model_fn, scheduler, grid=grid, optimizer=optimizer, radius=radius)
    opt_state = optimizer.init(params)
    losses = np.empty(iterations, np.float64)
    for k in range(iterations):
        key, pick = jax.random.split(key)
        index = jax.random.choice(pick, rows, (batch_size,), replace=False)
        params, opt_state, value = step(params, opt_state, noise=noise, target=teacher.sample, cond=cond, index=index)
        losses[k] = float(value)
        if progress:
            progress_line.show("learn_grid", k + 1, iterations, unit="iterations", suffix=f" loss {losses[k]:.3g}")
    learned = np.asarray(grid.sigmas(params["logits"]), np.float32)
    # never worse than where it started, on (up to 256 of) the training noises
    probe = slice(0, min(rows, 256))

    def error(levels):
        out = sample(model_fn, noise[probe], scheduler, sigmas=jnp.asarray(levels, jnp.float32), cond=_rows(cond, probe))
        return float(jnp.mean((out.sample - teacher.sample[probe]) ** 2))

    improved = error(learned) <= error(start)
    if not improved:
        learned = np.asarray(start, np.float32)
    return LearnedGrid(sigmas=learned, initial_sigmas=np.asarray(start, np.float32), losses=losses,
                       teacher_steps=teacher_steps, seconds=time.perf_counter() - began, improved=improved)


_INITS = ("best", "default", "lu", "karras")


def _starting_grid(scheduler, n: int, *, init, grid: GridParameterisation) -> np.ndarray:
    """The grid named by ``init`` (or given by it), in the parameterisation's range."""
    if isinstance(init, str):
        if init == "lu":
            return np.asarray(grid.sigmas(jnp.zeros(n)), np.float64)
        if init in ("default", "karras"):
            config = scheduler.config
            if init == "karras":
                config = config.replace(**{option: option == "use_karras_sigmas" for option in config.SIGMA_GRID_OPTIONS})
            other = type(scheduler)(config)
            levels = np.asarray(other.set_timesteps(other.create_state(), n, (1,)).sigmas[: n + 1], np.float64)
            return np.asarray(grid.sigmas(grid.logits(levels)), np.float64)  # its shape, between the fixed ends
        raise ValueError(f"init must be one of {_INITS} or N + 1 = {n + 1} noise levels, got {init!r}.")
    levels = np.asarray(init, np.float64)
    if levels.shape != (n + 1,):
        raise ValueError(f"init must be one of {_INITS} or N + 1 = {n + 1} noise levels, got shape {levels.shape}.")
    return levels


def _closest_to_teacher(model_fn, scheduler, n: int, *, grid: GridParameterisation, noise, target, cond) -> np.ndarray:
    """Of the named starting grids, the one whose samples of ``noise`` are closest to ``target``."""
    best, best_error = None, np.inf
    for name in _INITS[1:]:
        levels = _starting_grid(scheduler, n, init=name, grid=grid)
        out = sample(model_fn, noise, scheduler, sigmas=jnp.asarray(levels, jnp.float32), cond=cond).sample
        error = float(jnp.mean((out - target) ** 2))
        if error < best_error:
            best, best_error = levels, error
    return best

"""Does every step of a sampler invert? A per-step check users can run on their own model and grid.

Exact inversion solves each sampler step ``x_{k+1} = F_k(x_k)`` (or the whole sampler) for its
input. That has a unique answer only where the step's map is injective near the trajectory. A step
whose Jacobian ``c_x I + c_0 dD/dx`` changes sign along the way *folds*: two inputs map to one
output, and a solver started from the plain-inversion predictor can land on the wrong one. On
diffusers' default grid (uniform in t) the last step of a ``final_sigmas_type="sigma_min"`` sampler
is one long jump in log-SNR (sigma 0.14 -> 0.01 at N = 25), where that happens for a trained model;
on a grid uniform in log-SNR (``use_lu_lambdas=True``) or Karras' grid it does not.

:func:`check_step_inversion` samples from ``noise`` (so the true input of every step is known),
then solves every step, given its true history, from the plain (DDIM-like) predictor with damped
Newton-Krylov, and reports per step how many rows came back to the true input, how many converged
to *another* input with the same output (a fold), and how many did not converge.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from .. import checks, solver
from ..numerics.newton import newton_krylov
from ..numerics.rows import row_max_abs
from ..scheduler import DPMSolverMultistepScheduler
from .grid_entry import grid_state
from .scan import ModelFn, sample


class StepInversionCheck(NamedTuple):
    """Result of :func:`check_step_inversion`: one entry per step ``k`` of the sampler (noise first).

    Every field is a NumPy array of length ``N``. ``table()`` formats them as a Markdown table.

    Attributes:
        sigma_from: The noise level step ``k`` starts from.
        sigma_to: The noise level step ``k`` moves to (``sigma_from[k] -> sigma_to[k]``).
        on_true_input: Count of rows whose solve came back to the true input.
        elsewhere: Count of rows whose solve converged elsewhere (the step folds there).
        unsolved: Count of rows whose solve did not converge.
        distance: The largest distance from the true input among the rows that converged
            (relative to ``max(1, max|row|)`` of the step's output; 0 where none converged).
    """

    sigma_from: np.ndarray
    sigma_to: np.ndarray
    on_true_input: np.ndarray
    elsewhere: np.ndarray
    unsolved: np.ndarray
    distance: np.ndarray

    @property
    def rows(self) -> int:
        """The number of rows checked (the batch size of ``noise``)."""
        return int(self.on_true_input[0] + self.elsewhere[0] + self.unsolved[0])

    @property
    def injective(self) -> bool:
        """Every row of every step came back to its true input."""
        return bool(np.all(self.on_true_input == self.rows))

    def table(self) -> str:
        """The check as a Markdown table, one line per step.

        Returns:
            The table: step, sigma, on true input, elsewhere (fold), unsolved, max distance.
        """
        lines = ["| step | sigma | on true input | elsewhere (fold) | unsolved | max distance |", "|---|---|---|---|---|---|"]
        for k in range(len(self.sigma_from)):
            lines.append(f"| {k + 1} | {self.sigma_from[k]:.3g} -> {self.sigma_to[k]:.3g} | {self.on_true_input[k]} | "
                         f"{self.elsewhere[k]} | {self.unsolved[k]} | {self.distance[k]:.1e} |")
        return "\n".join(lines)


def check_step_inversion(
    model_fn: ModelFn,
    noise: jax.Array,
    scheduler: DPMSolverMultistepScheduler,
    num_inference_steps: int,
    *,
    cond: Any = None,
    tolerance: float = 1e-5,
    max_iterations: int = 50,
) -> StepInversionCheck:
    """Sample from ``noise`` (``[B, ...]``, rows independent) and solve each step back from its output.

    See the module docstring: every step is solved, given its true history, from the plain
    (DDIM-like) predictor with damped Newton-Krylov. A row's solve *converged* when its residual is
    within ``tolerance`` (relative to max(1, max|row|)), and came back to the *true input* when it
    is also within ``100 * tolerance`` of it.

    Args:
        model_fn: The model, ``model_fn(sample, timestep[, cond])``, as in :func:`dpmjax.sample`.
        noise: ``[B, ...]``, the starting noise; its rows are independent problems.
        scheduler: A deterministic :class:`~dpmjax.DPMSolverMultistepScheduler` (the sampler to
            check).
        num_inference_steps: ``N``, the number of sampler steps.
        cond: Any pytree passed unchanged as ``model_fn``'s third argument; ``None`` (default)
            calls ``model_fn(sample, timestep)``.
        tolerance: The residual within which a row's solve counts as converged, relative to
            ``max(1, max|row|)`` (default ``1e-5``).
        max_iterations: Newton iterations per step's solve at most (default 50).

    Returns:
        A :class:`StepInversionCheck` with the per-step counts.

    Raises:
        ValueError: ``scheduler`` is not a deterministic ``DPMSolverMultistepScheduler``;
            ``noise`` has no batch axis with at least one row; or :func:`dpmjax.sample` refuses
            the sampling (e.g. ``num_inference_steps`` not an integer in
            ``[1, num_train_timesteps]``).
    """
    if not isinstance(scheduler, DPMSolverMultistepScheduler) or scheduler.config.is_sde:
        raise ValueError("check_step_inversion takes a deterministic DPMSolverMultistepScheduler (the sampler to invert).")
    tolerance = checks.real("tolerance", tolerance, low=0.0, high=1.0, open_low=True, open_high=True)
    max_iterations = checks.integer("max_iterations", max_iterations, 1)
    noise = jnp.asarray(noise)
    checks.floating_array("noise", noise)
    if noise.ndim < 1 or noise.shape[0] < 1:
        raise ValueError(f"noise must have a batch axis with at least one row, got shape {tuple(noise.shape)}.")
    path = sample(model_fn, noise, scheduler, num_inference_steps=num_inference_steps, cond=cond, return_samples=True)
    state = grid_state(scheduler, noise.shape, num_inference_steps=num_inference_steps, sigmas=None,
                       dtype=solver.compute_dtype(noise), caller="check_step_inversion")
    inputs = jnp.concatenate([noise[None], path.samples[:-1]])  # the true input of each step
    found, residual = _solve_steps(scheduler=scheduler, model_fn=model_fn, tolerance=tolerance,
                                   max_iterations=max_iterations, state=state, inputs=inputs,
                                   outputs=path.samples, cond=cond)
    rows = noise.shape[0]
    scale = np.maximum(1.0, np.asarray(jax.vmap(lambda x: row_max_abs(x, rows))(path.samples)))
    distance = np.asarray(jax.vmap(lambda a, b: row_max_abs(a - b, rows))(found, inputs)) / scale
    converged = np.asarray(residual) <= tolerance
    on_true = converged & (distance <= 100 * tolerance)
    sigmas = np.asarray(path.sigmas)
    return StepInversionCheck(
        sigma_from=sigmas[:-1], sigma_to=sigmas[1:],
        on_true_input=on_true.sum(axis=1), elsewhere=(converged & ~on_true).sum(axis=1),
        unsolved=(~converged).sum(axis=1),
        distance=np.where(converged, distance, 0.0).max(axis=1),
    )


def _solve_steps(scheduler, model_fn, tolerance, max_iterations, state, inputs, outputs, cond):
    """Each step's input solved from its output and its true history, per row, from the predictor."""
    config = scheduler.config
    rows = solver.trajectory_rows(state)
    K = config.solver_order
    n = inputs.shape[0]
    batch = inputs.shape[1]

    def converted(k, y):
        out = model_fn(y, state.timesteps[k]) if cond is None else model_fn(y, state.timesteps[k], cond)
        return solver.converted_output(config, state, k, model_output=out, sample=y)

    true_converted = jax.vmap(converted)(jnp.arange(n), inputs)  # the history each step really had

    def solve(_, k):
        row = rows[k]
        history = [true_converted[jnp.maximum(k - j, 0)] for j in range(1, K)]
        x_next = outputs[k]
        equation = solver.step_equation(row, history, noise=None, like=x_next)
        F = lambda y: equation.forward(y, converted(k, y))  # noqa: E731
        y0 = jnp.where(equation.invertible, equation.fixed_point_map(x_next, converted(k, x_next)), x_next)
        result = newton_krylov(F, x_next, y0, max_iterations=max_iterations, tolerance=tolerance / 10, rows=batch)
        return None, (result.solution, result.residual)

    return lax.scan(solve, None, jnp.arange(n))[1]


_solve_steps = jax.jit(_solve_steps, static_argnames=("scheduler", "model_fn", "tolerance", "max_iterations"))

"""The device-side step: pure functions of (static config, state pytree, arrays).

Nothing here branches in Python on a traced value; Python ``if`` only reads the static config and
static shapes. The step is

    m_i   = convert(model_output)                  (linear: a_i x + b_i model_output; then thresholding)
    x_i+1 = c_x x_i + sum_k c_k m_{i-k} + c_z z    (one row of the precomputed update table)

so its cost is one small gather and a handful of fused multiply-adds over the sample.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from . import checks
from .config import SchedulerConfig
from .numerics.rows import working_dtype
from .state import SchedulerState

Array = jax.Array


# ----------------------------------------------------------------------------- static checks
def require_timesteps(state: SchedulerState) -> None:
    if state.update_coefficients is None:
        raise ValueError("the state has no inference grid: call set_timesteps(state, num_inference_steps, shape) first.")


def concrete_int(value) -> Optional[int]:
    """``int(value)`` when it is known now, ``None`` when it is traced."""
    try:
        return int(value)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerIntegerConversionError):
        return None


def compute_dtype(sample: Array):
    """float32 arithmetic for bf16/fp16/fp32 samples; float64 for float64 samples (``jax_enable_x64``)."""
    return working_dtype(sample.dtype)


def model_output_shape(config: SchedulerConfig, sample_shape) -> tuple:
    """The shape a model output must have for samples of ``sample_shape``: the same, or twice the
    channels on ``config.channel_axis`` with a learned ``variance_type``."""
    expected = list(sample_shape)
    if config.variance_type is not None and expected:
        expected[config.channel_axis % len(expected)] *= 2
    return tuple(expected)


def model_output_note(config: SchedulerConfig) -> str:
    """What :func:`model_output_shape` asks for, in words, for error messages."""
    if config.variance_type is None:
        return " (the model output, shaped like the sample)"
    return (f" (the model output: twice the sample's channels on channel_axis={config.channel_axis}, "
            f"for variance_type={config.variance_type!r})")


def mean_of_model_output(config: SchedulerConfig, model_output: Array, sample: Array) -> Array:
    """The part of the model output the solver uses, checked against the sample's shape.

    With a learned variance (``variance_type`` set) the model output carries twice the sample's
    channels on ``config.channel_axis``; the first half is the mean prediction.
    """
    checks.floating_array("model_output", model_output)
    checks.floating_array("sample", sample)
    if config.variance_type is not None:
        axis = config.channel_axis % max(sample.ndim, 1) if sample.ndim else 0
        expected = list(sample.shape)
        if sample.ndim:
            expected[axis] *= 2
        if tuple(model_output.shape) != tuple(expected):
            raise ValueError(
                f"variance_type={config.variance_type!r}: model_output must have twice the sample's channels on "
                f"channel_axis={config.channel_axis}, i.e. shape {tuple(expected)}; got {tuple(model_output.shape)}."
            )
        return lax.slice_in_dim(model_output, 0, sample.shape[axis], axis=axis)
    if model_output.shape != sample.shape:
        raise ValueError(f"model_output shape {tuple(model_output.shape)} differs from sample shape {tuple(sample.shape)}.")
    return model_output


# ----------------------------------------------------------------------------- step location
def locate_step(timesteps: Array, timestep) -> Array:
    """diffusers' ``index_for_timestep``: the position of ``timestep`` in the schedule.

    The second match when it occurs more than once (so that a schedule entered mid-way never skips
    a noise level), the last step when it does not occur at all. One deliberate difference: the
    schedule's own first timestep is step 0 even when it repeats (Karras or Lu grids of the cosine
    schedule start 998, 998, ...), where diffusers skips step 0 and runs off the end (IndexError).
    """
    n = timesteps.shape[0]
    none = jnp.int32(n)
    positions = jnp.where(timesteps == jnp.asarray(timestep), jnp.arange(n, dtype=jnp.int32), none)

    def two_smallest(a, b):  # associative: the two smallest positions of the union
        (first_a, second_a), (first_b, second_b) = a, b
        return (jnp.minimum(first_a, first_b),
                jnp.minimum(jnp.maximum(first_a, first_b), jnp.minimum(second_a, second_b)))

    # one pass (a single kernel in a loop body): the first and second matches, n where there are none
    first, second = lax.reduce(operands=(positions, jnp.full_like(positions, none)), init_values=(none, none),
                               computation=two_smallest, dimensions=(0,))
    index = jnp.where(first == none, n - 1, jnp.where((second < none) & (first > 0), second, first))
    return index.astype(jnp.int32)


def current_step_index(state: SchedulerState, timestep) -> Array:
    """The index of the step about to be taken: the state's counter, or on the first step the
    position of ``timestep`` in the schedule."""
    n = state.timesteps.shape[0]
    known = concrete_int(state.step_index)
    if known is not None and known >= n:
        raise ValueError(
            f"step past the end of the schedule: all {n} steps of this state were taken "
            "(call set_timesteps again to start a new trajectory; under jit such a step returns its sample "
            "unchanged and counts itself in state.steps_past_end)."
        )
    if known is not None and known >= 0:
        return state.step_index
    return jnp.where(state.step_index < 0, locate_step(state.timesteps, timestep), state.step_index)


# ----------------------------------------------------------------------------- model output conversion
def dynamic_threshold(x0: Array, ratio: float, max_value: float) -> Array:
    """Imagen's dynamic thresholding (Saharia et al. 2022, arXiv:2205.11487, Sec. 2.3).

    Per sample (axis 0 is the batch), ``s = clip(quantile(|x0|, ratio), 1, max_value)`` and
    ``x0 <- clip(x0, -s, s) / s``; with ``s = 1`` this is plain clipping to [-1, 1].
    """
    dtype = x0.dtype
    flat = x0.reshape(x0.shape[0], -1).astype(jnp.promote_types(dtype, jnp.float32))
    s = jnp.quantile(jnp.abs(flat), ratio, axis=1)
    s = jnp.clip(s, 1.0, max_value)[:, None]
    return (jnp.clip(flat, -s, s) / s).reshape(x0.shape).astype(dtype)


def convert_model_output(config: SchedulerConfig, state: SchedulerState, index: Array, *, model_output: Array,
                         sample: Array) -> Array:
    """The quantity the solver integrates, at step ``index``: the data prediction x0 (DPM-Solver++)
    or the noise prediction eps (DPM-Solver), thresholded if ``config.thresholding``."""
    cdt = compute_dtype(sample)
    x, out = sample.astype(cdt), model_output.astype(cdt)
    identity = (config.predicts_data and config.prediction_type == "sample") or (
        not config.predicts_data and config.prediction_type == "epsilon"
    )
    if identity:
        converted = out
    else:
        a, b = state.convert_coefficients[index].astype(cdt)
        converted = a * x + b * out
    if config.thresholding:
        ratio, max_value = config.dynamic_thresholding_ratio, config.sample_max_value
        if config.predicts_data:
            converted = dynamic_threshold(converted, ratio, max_value)
        else:
            alpha, sigma = state.step_alpha[index].astype(cdt), state.step_sigma[index].astype(cdt)
            x0 = dynamic_threshold((x - sigma * converted) / alpha, ratio, max_value)
            converted = (x - alpha * x0) / sigma
    return converted


# ----------------------------------------------------------------------------- the linear update
def linear_update(row: Array, sample: Array, outputs_newest_first: Sequence[Array], *, noise: Optional[Array] = None) -> Array:
    """``c_x x + sum_k c_k m_k + c_z z`` for one coefficient row ``(c_x, c_0, .., c_{K-1}, c_z)``."""
    K = row.shape[0] - 2
    result = row[0] * sample
    for k, m in enumerate(outputs_newest_first[:K]):
        result = result + row[1 + k] * m
    if noise is not None:
        result = result + row[K + 1] * noise
    return result


class StepEquation(NamedTuple):
    """One step as an equation in its input ``y``, for inverting it:

        F(y) = c_x y + c_0 m(y) + r,   r = sum_{k>=1} c_k m_{i-k} + c_z z   (the known part),

    with the older outputs ``m_{i-k}`` and the noise ``z`` held fixed. ``F(y) = x_next`` is the
    fixed point ``y = g(y) = (x_next - r - c_0 m(y)) / c_x``; ``g`` with ``m`` at ``x_next`` is the
    explicit (DDIM-like) predictor (Hong et al. 2024, "On Exact Inversion of DPM-Solvers").
    """

    row: Array
    history: list
    noise: Optional[Array]
    known: Array

    @property
    def invertible(self) -> Array:
        """``|c_x| > 1e-6``: a step to zero noise (``c_x = 0``) keeps nothing of its input."""
        return jnp.abs(self.row[0]) > 1e-6

    def forward(self, y: Array, m_y: Array) -> Array:
        """``F(y)`` given ``m_y``, the converted model output at ``y``."""
        return linear_update(self.row, y, [m_y] + self.history, noise=self.noise)

    def fixed_point_map(self, x_next: Array, m_y: Array) -> Array:
        """``g(y) = (x_next - r - c_0 m(y)) / c_x`` given ``m_y`` (``c_x`` replaced by 1 where it is 0)."""
        return (x_next - self.known - self.row[1] * m_y) / jnp.where(self.invertible, self.row[0], 1.0)


def step_equation(row: Array, history: Sequence[Array], *, noise: Optional[Array], like: Array) -> StepEquation:
    """The :class:`StepEquation` of the step with update ``row``, older converted outputs ``history``
    (newest first) and SDE ``noise`` (or None), for samples shaped like ``like``."""
    zero = jnp.zeros_like(like)
    known = linear_update(row.at[:2].set(0.0), zero, [zero] + list(history), noise=noise)
    return StepEquation(row=row, history=list(history), noise=noise, known=known)


def step_noise(config: SchedulerConfig, sample: Array, *, key: Optional[Array], variance_noise: Optional[Array], cdt) -> Optional[Array]:
    """The Gaussian noise of an SDE step (``variance_noise`` if given, else drawn from ``key``)."""
    if not config.is_sde:
        return None
    if variance_noise is not None:
        if tuple(variance_noise.shape) != tuple(sample.shape):
            raise ValueError(
                f"variance_noise shape {tuple(variance_noise.shape)} differs from sample shape {tuple(sample.shape)}."
            )
        return variance_noise.astype(cdt)
    if key is None:
        raise ValueError(
            f"algorithm_type={config.algorithm_type!r} is stochastic: pass key (a jax.random key) or variance_noise to step."
        )
    return jax.random.normal(key, sample.shape, cdt)


def step(
    config: SchedulerConfig,
    state: SchedulerState,
    model_output: Array,
    *,
    timestep,
    sample: Array,
    key: Optional[Array] = None,
    variance_noise: Optional[Array] = None,
):
    """One multistep DPM-Solver step: ``(prev_sample, new_state)``.

    Pure and traceable: ``state`` and ``timestep`` may be traced (inside ``jit``/``scan``). The order
    used is ``min(solver_order, steps taken + 1, order_cap[i])`` (warm-up and lower-order final
    steps, as in diffusers). The sample keeps its dtype; the arithmetic runs in float32 or wider.

    A step after the last one is a ``ValueError`` when the state is concrete; traced, it returns
    ``sample`` unchanged (whatever the model output, NaN included), keeps ``step_index`` at ``N``
    and adds one to ``state.steps_past_end``.
    """
    require_timesteps(state)
    history = state.model_outputs
    if tuple(history.shape[1:]) != tuple(sample.shape):
        raise ValueError(
            f"sample shape {tuple(sample.shape)} differs from the shape given to set_timesteps {tuple(history.shape[1:])}."
        )
    n = state.timesteps.shape[0]
    index = current_step_index(state, timestep)
    past_end = index >= n  # only ever True when traced: a concrete state past the end raised above
    index = jnp.minimum(index, n)  # row N of the update table is the identity
    K = state.update_coefficients.shape[1]  # the solver order (the history holds history_length(K) slots)
    if K == 1:  # every step is first order: no warm-up or order cap to look up
        row = state.update_coefficients[index, 0]
    else:
        in_schedule = jnp.minimum(index, state.timesteps.shape[0] - 1)
        row = state.update_coefficients[index, step_order(state.lower_order_nums, K, state.order_cap[in_schedule]) - 1]
    prev_sample, history = step_from_output(config, state, index=index, row=row, sample=sample,
                                            model_output=model_output, history=history, key=key, noise=variance_noise)
    # past the end: the input unchanged (a select the update's fusion absorbs), and the call counted
    prev_sample = jnp.where(past_end, sample, prev_sample)
    overrun = jnp.asarray(0, jnp.int32) if state.steps_past_end is None else state.steps_past_end
    new_state = state.replace(
        model_outputs=history,
        lower_order_nums=jnp.minimum(state.lower_order_nums + 1, K).astype(jnp.int32),
        step_index=jnp.minimum(index + 1, n).astype(jnp.int32),
        steps_past_end=(overrun + past_end).astype(jnp.int32),
    )
    return prev_sample, new_state


def step_order(steps_taken, solver_order: int, order_cap):
    """The order of a step: ``min(steps_taken + 1, solver_order, order_cap)``. The warm-up (a
    multistep method has only ``steps_taken`` older outputs) and diffusers' lower-order final steps
    (``order_cap``, from :func:`dpmjax.coefficients.order_caps`) in one rule."""
    return jnp.minimum(jnp.minimum(steps_taken + 1, solver_order), order_cap)


def converted_output(config: SchedulerConfig, state: SchedulerState, index, *, model_output: Array, sample: Array) -> Array:
    """``convert(mean(model_output))``: the solver's quantity at step ``index`` from a raw model output."""
    return convert_model_output(config, state, index, model_output=mean_of_model_output(config, model_output, sample),
                                sample=sample)


def step_from_output(config: SchedulerConfig, state: SchedulerState, *, index, row: Array, sample: Array,
                     model_output: Array, history: Array, key: Optional[Array] = None,
                     noise: Optional[Array] = None) -> tuple:
    """The step itself, shared by every loop in dpmjax: convert the model output, push it into the
    history ring buffer, apply the update ``row``. Returns ``(next_sample, history)``.

    ``x_{i+1} = c_x x_i + sum_k c_k m_{i-k} + c_z z`` with ``m_i = convert(model_output)``
    (Lu et al. 2022, DPM-Solver++, arXiv:2211.01095, Alg. 2 written as one linear combination).
    """
    in_schedule = jnp.minimum(index, state.timesteps.shape[0] - 1)
    m0 = converted_output(config, state, in_schedule, model_output=model_output, sample=sample)
    history, previous = push_history(history, m0, index)
    return update(config, row, sample, converted=m0, previous=previous, key=key, variance_noise=noise), history


def history_length(solver_order: int) -> int:
    """Slots of a state's model-output history: ``solver_order`` (the ring buffer), none at order 1,
    where no step reads an older output (the state then carries a ``[0, *shape]`` array)."""
    return 0 if solver_order == 1 else solver_order


def push_history(history: Array, converted: Array, index) -> tuple:
    """Write step ``index``'s converted output into the ``[K, ...]`` ring buffer (slot ``index % K``)
    and read the ``K - 1`` older ones, newest first: ``(history, previous)``. The read follows the
    write so that XLA updates the buffer in place. A buffer of fewer than two slots is never read
    back (first order uses no older output), so nothing is written to it: the order-1 step moves
    no history."""
    K = history.shape[0]
    if K < 2:
        return history, []
    history = lax.dynamic_update_index_in_dim(history, converted.astype(history.dtype), index % K, 0)
    previous = [lax.dynamic_index_in_dim(history, (index - k) % K, 0, keepdims=False) for k in range(1, K)]
    return history, previous


def update(config: SchedulerConfig, row: Array, sample: Array, *, converted: Array, previous: Sequence[Array],
           key: Optional[Array] = None, variance_noise: Optional[Array] = None) -> Array:
    """The step's linear update from the converted model output and the older ones (newest first),
    with an SDE step's noise; returns the next sample in the sample's dtype."""
    cdt = compute_dtype(sample)
    x = sample.astype(cdt)
    noise = step_noise(config, x, key=key, variance_noise=variance_noise, cdt=cdt)
    outputs = [converted.astype(cdt)] + [m.astype(cdt) for m in previous]
    return linear_update(row.astype(cdt), x, outputs, noise=noise).astype(sample.dtype)


def trajectory_rows(state: SchedulerState) -> Array:
    """``[N, K + 2]``: the update row of every step of a whole trajectory run from step 0, where
    ``lower_order_nums`` is ``min(i, K)`` at step ``i`` (known before the loop, so the loop needs no
    order logic)."""
    n, K = state.timesteps.shape[0], state.update_coefficients.shape[1]
    steps = jnp.arange(n)
    return state.update_coefficients[steps, step_order(steps, K, state.order_cap) - 1]


def order_k_update(state: SchedulerState, order: int, outputs_newest_first: Sequence[Array], *, sample: Array,
                   noise: Optional[Array]) -> Array:
    """The order-``order`` update at ``state.step_index`` from already converted model outputs."""
    require_timesteps(state)
    index = concrete_int(state.step_index)
    if index is not None and index < 0:
        raise ValueError("the state has no step index yet: take a step, or call set_begin_index(state, index) first.")
    if not 1 <= order <= state.update_coefficients.shape[1]:
        raise ValueError(f"order {order} exceeds this scheduler's solver_order={state.update_coefficients.shape[1]}.")
    if len(outputs_newest_first) < order:
        raise ValueError(f"an order-{order} update needs {order} model outputs, got {len(outputs_newest_first)}.")
    cdt = compute_dtype(sample)
    row = state.update_coefficients[state.step_index, order - 1].astype(cdt)
    outputs = [m.astype(cdt) for m in outputs_newest_first[:order]]
    return linear_update(row, sample.astype(cdt), outputs, noise=None if noise is None else noise.astype(cdt)).astype(sample.dtype)

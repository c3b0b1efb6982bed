"""The model a trajectory calls: its arguments, its output, and how to pass it large arrays.

Every trajectory (:func:`dpmjax.sample`, :func:`dpmjax.invert`, exact inversion,
:func:`dpmjax.check_step_inversion`) calls the model inside its compiled loop (once per step; exact inversion more often, in its
solves), positionally, as ``model_fn(x, t)`` or, when the
call is given a ``cond``, as ``model_fn(x, t, cond)``: a :class:`ModelFn` or a
:class:`ConditionalModelFn`. :func:`dpmjax.classifier_free_guidance` turns a conditional model into
a :class:`ModelFn`; null-text inversion calls a conditional model, with its weights as a fourth
argument when given them (:class:`ParametrisedModelFn`).

Arguments:

* ``x``: the sample, ``[batch, ...]`` (the layout is the model's: NCHW, NHWC or flat), floating
  point: the dtype of the sample the call was given (bf16/fp16 included) when sampling and in plain
  inversion; exact inversion calls the model at its working precision (float32 for a bf16/fp16
  sample).
* ``t``: the timestep, an int32 array: 0-d (one timestep for every row) in every dpmjax trajectory.
  A model that also takes one timestep per row (``[batch]``) serves hand-written loops that step
  rows at different timesteps (``scheduler.step`` accepts them).
* ``cond``: any pytree, passed through unchanged (text embeddings ``[batch, tokens, width]``,
  labels ``[batch]``, a dict of both); ``None`` is not passed (the call is then ``model_fn(x, t)``).

The trajectories are compiled once per model function (it is a static argument, told apart by
identity): arrays the function closes over become constants of the compiled program, so a new
closure per prompt recompiles everything, and a large constant (weights, embeddings) is copied
into the program. Arrays passed as ``cond`` (and null-text's ``model_params``) are arguments of the
program instead: one compilation serves every value of the same shapes and dtypes, and the
gradient with respect to them is available.

Output: one floating-point array with ``x``'s shape (twice its channels along the config's
``channel_axis`` with a learned ``variance_type``): the model output the scheduler's
``prediction_type`` names (``"epsilon"``: the noise; ``"sample"``: the data; ``"v_prediction"``:
``alpha_t eps - sigma_t x_0``; ``"flow_prediction"``: the velocity ``eps - x_0``). Anything else
(a tuple, a Python number, another shape) is a ``ValueError`` raised while tracing, naming the
model's parameter.
"""

from __future__ import annotations

from typing import Any, Protocol

import jax

Array = jax.Array


class ModelFn(Protocol):
    """A model called without a condition: ``model_fn(x, t) -> model_output``.

    ``x`` is the sample ``[batch, ...]``, ``t`` the timestep (an int32 array, 0-d in the
    trajectories); the output is one floating-point array of ``x``'s shape (twice its channels
    with a learned ``variance_type``), of the kind the scheduler's ``prediction_type`` names. See
    :mod:`dpmjax.trajectories.model_fn` for the whole contract.
    """

    def __call__(self, x: Array, t: Array, /) -> Array:
        ...


class ConditionalModelFn(Protocol):
    """A model called with a condition: ``model_fn(x, t, cond) -> model_output``.

    As :class:`ModelFn`, with ``cond`` the pytree the call was given, unchanged (batched on axis 0
    like ``x`` where guidance doubles the batch). Large arrays belong in ``cond`` rather than in the
    function's closure: they are then arguments of the compiled program, not constants, and a new
    value does not recompile it.
    """

    def __call__(self, x: Array, t: Array, cond: Any, /) -> Array:
        ...


class ParametrisedModelFn(Protocol):
    """A conditional model with its weights as an argument: ``model(x, t, cond, params)``.

    Null-text inversion calls a model this way when given ``model_params``, so that the weights
    enter the compiled program as an argument rather than as constants.
    """

    def __call__(self, x: Array, t: Array, cond: Any, params: Any, /) -> Array:
        ...

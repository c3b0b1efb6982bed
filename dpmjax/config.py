"""Static scheduler configuration: frozen, hashable, validated at construction.

The field names, defaults and meanings are those of diffusers' ``DPMSolverMultistepScheduler`` and
``DPMSolverMultistepInverseScheduler``, so a ``scheduler_config.json`` written by diffusers (or by a
Stable Diffusion checkpoint, whatever its scheduler class) loads as it is: keys this config does not
know are ignored, exactly like diffusers' ``from_config``.

Everything here is Python data. Nothing in it is traced: a :class:`SchedulerConfig` is the static
half of a scheduler, the :class:`~dpmjax.state.SchedulerState` pytree is the traced half.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Mapping, Optional, Tuple

import numpy as np

from . import checks
from .noise_schedule import training_schedule

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction", "flow_prediction")
ALGORITHM_TYPES = ("dpmsolver", "dpmsolver++", "sde-dpmsolver", "sde-dpmsolver++")
SOLVER_TYPES = ("midpoint", "heun")
TIMESTEP_SPACINGS = ("linspace", "leading", "trailing")
FINAL_SIGMAS_TYPES = ("zero", "sigma_min")
VARIANCE_TYPES = (None, "learned", "learned_range")
TIME_SHIFT_TYPES = ("exponential",)

# Aliases diffusers accepts so that configs of sibling schedulers (DEIS, UniPC) load.
_ALGORITHM_ALIASES = {"deis": "dpmsolver++"}
_SOLVER_ALIASES = {"logrho": "midpoint", "bh1": "midpoint", "bh2": "midpoint"}

SDE_ALGORITHMS = ("sde-dpmsolver", "sde-dpmsolver++")
DATA_PREDICTION_ALGORITHMS = ("dpmsolver++", "sde-dpmsolver++")

CONFIG_NAME = "scheduler_config.json"

# The largest num_train_timesteps: its tables (several float32 arrays of that length) are built on the
# host and copied to the device before anything else can fail, so an absurd value (a typo of 1e12 in a
# config file) is refused here, in one line, instead of allocating terabytes. Trained models use 1000.
MAX_TRAIN_TIMESTEPS = 2**20


def check_num_inference_steps(value: Any) -> int:
    """``num_inference_steps`` as a Python int (NumPy integers accepted); bools, floats (also
    integral ones such as ``10.0``) and anything else are a ValueError. The range is checked
    where the grid is built.

    Args:
        value: The number of inference steps as passed.

    Returns:
        ``value`` as a Python ``int``.

    Raises:
        ValueError: ``value`` is not a Python or NumPy integer (a bool, a float, a string, ...).
    """
    return checks.integer("num_inference_steps", value)


def _lambda_min_clipped(config: "SchedulerConfig") -> float:
    """``lambda_min_clipped`` as a float: -inf (no clipping) or a finite log-SNR that keeps at
    least one training timestep (the least noisy one's log-SNR is the largest allowed); +inf, NaN
    or a larger value would clip every timestep and give the grid negative timesteps."""
    clip = checks.real("lambda_min_clipped", config.lambda_min_clipped)
    if clip == -math.inf:
        return clip
    if not math.isfinite(clip):
        raise ValueError(f"lambda_min_clipped must be a finite number or -inf (no clipping), got {clip!r}.")
    largest = float(np.max(training_schedule(config).lambda_t))
    if np.float32(clip) > np.float32(largest):
        raise ValueError(
            f"lambda_min_clipped must be -inf or at most {largest:.6g} (the largest log-SNR of this training "
            f"schedule; above it every timestep is clipped), got {clip!r}."
        )
    return clip


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """Configuration shared by the forward and the inverse DPM-Solver multistep schedulers.

    The fields carry diffusers' names and defaults, except ``channel_axis`` (dpmjax's own field).
    Every field is checked at construction; aliases diffusers accepts so that configs of sibling
    schedulers load (``algorithm_type="deis"``; ``solver_type`` ``"logrho"``, ``"bh1"``,
    ``"bh2"``) are mapped to ``"dpmsolver++"`` and ``"midpoint"``.

    Attributes:
        num_train_timesteps: Number of diffusion steps the model was trained with (an
            integer in ``[2, MAX_TRAIN_TIMESTEPS]``, ``MAX_TRAIN_TIMESTEPS = 2**20 = 1048576``;
            default 1000). The bound keeps the training tables, built before anything else can
            fail, to a few MiB; trained models use 1000.
        beta_start: Start of the beta schedule (in ``(0, 1)`` for the linear schedules; default
            0.0001).
        beta_end: End of the beta schedule (in ``(0, 1)`` for the linear schedules; default 0.02).
        beta_schedule: ``"linear"`` (default), ``"scaled_linear"`` (Stable Diffusion) or
            ``"squaredcos_cap_v2"``.
        trained_betas: Explicit betas: a 1-D sequence (list, tuple or array) of
            ``num_train_timesteps`` finite numbers, each in ``(0, 1)`` (stored as a tuple of
            floats); overrides the three above.
        solver_order: 1, 2 or 3 (multistep order; 2 for guided sampling, 3 unconditional;
            default 2).
        prediction_type: What the model predicts: ``"epsilon"`` (default), ``"sample"``,
            ``"v_prediction"``, ``"flow_prediction"`` (needs a data-prediction
            ``algorithm_type``).
        thresholding: Imagen's dynamic thresholding of the data prediction (pixel-space models
            only; default False).
        dynamic_thresholding_ratio: The quantile of dynamic thresholding, in ``[0, 1]`` (default
            0.995).
        sample_max_value: The largest threshold of dynamic thresholding, > 0 (default 1.0).
        algorithm_type: ``"dpmsolver++"`` (data prediction, default), ``"dpmsolver"`` (noise
            prediction), or their SDE variants ``"sde-dpmsolver++"`` / ``"sde-dpmsolver"`` (the
            latter not with ``solver_order=3``).
        solver_type: ``"midpoint"`` (default) or ``"heun"`` form of the second-order update.
        lower_order_final: Lower the order over the last steps when there are fewer than 15
            steps (default True).
        euler_at_final: First-order update for the very last step (default False).
        use_karras_sigmas: Karras et al. 2022 (EDM): noise levels uniform in ``sigma^(1/7)``.
            This and the next four are alternative noise-level grids (at most one; default
            False).
        use_exponential_sigmas: Noise levels uniform in ``log sigma``.
        use_beta_sigmas: Noise levels at Beta(0.6, 0.6) quantiles (Lee et al. 2024).
        use_lu_lambdas: Lu et al. 2022 (DPM-Solver): steps uniform in log-SNR.
        use_flow_sigmas: The (shifted) flow-matching grid.
        flow_shift: Time shift of the flow-matching grid, > 0 (default 1.0).
        final_sigmas_type: Forward scheduler only: end the schedule at ``"zero"`` noise (default)
            or at ``"sigma_min"`` (the smallest training noise level). Ignored by the inverse
            scheduler.
        lambda_min_clipped: Clip the smallest log-SNR used by the grid (for the cosine schedule):
            ``-inf`` (default, no clipping; ``None`` in a dict is read as ``-inf``) or a finite
            value at most the largest log-SNR of the training schedule.
        variance_type: ``None`` (default), or ``"learned"``/``"learned_range"`` when the model
            also outputs a variance: the model output then has twice the sample's channels and
            its first half is used.
        timestep_spacing: ``"linspace"`` (default), ``"leading"`` or ``"trailing"`` (Lin et al.
            2023, Table 2).
        steps_offset: Offset added to the timesteps for ``"leading"`` spacing (an integer in
            ``[0, num_train_timesteps - 1]``; default 0). The timesteps must stay training
            timesteps: ``set_timesteps`` refuses a step count whose ``"leading"`` timesteps plus
            the offset pass ``num_train_timesteps - 1``.
        rescale_betas_zero_snr: Rescale the betas to zero terminal SNR (Lin et al. 2023; default
            False).
        use_dynamic_shifting: Flow models whose shift is given per call as ``mu`` (needs
            ``use_flow_sigmas=True``; default False).
        time_shift_type: The form of that shift: ``"exponential"`` (the only one).
        channel_axis: dpmjax's own field: the channel axis of samples and model outputs (1 for
            diffusers' NCHW, the default; -1 for NHWC Flax models). Only the learned-variance
            split depends on it.
        sigmas: dpmjax's own field: a grid of its own, ``N + 1`` noise levels in the sampler's
            order (e.g. :attr:`dpmjax.LearnedGrid.sigmas`), stored as a tuple of floats and
            written to ``scheduler_config.json`` (diffusers ignores the key). ``set_timesteps``
            uses it when called without ``num_inference_steps`` or with ``N`` (so diffusers'
            pipelines, which pass ``N``, run it); any other step count gets the configured grid.
            Default ``None``.

    Raises:
        ValueError: A field has a value outside the ones listed (wrong type, unknown name, out of
            range), more than one alternative grid is set, or two fields conflict as noted
            above.
    """

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: Optional[Tuple[float, ...]] = None
    solver_order: int = 2
    prediction_type: str = "epsilon"
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 1.0
    algorithm_type: str = "dpmsolver++"
    solver_type: str = "midpoint"
    lower_order_final: bool = True
    euler_at_final: bool = False
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False
    use_lu_lambdas: bool = False
    use_flow_sigmas: bool = False
    flow_shift: float = 1.0
    final_sigmas_type: str = "zero"
    lambda_min_clipped: float = -math.inf
    variance_type: Optional[str] = None
    timestep_spacing: str = "linspace"
    steps_offset: int = 0
    rescale_betas_zero_snr: bool = False
    use_dynamic_shifting: bool = False
    time_shift_type: str = "exponential"
    channel_axis: int = 1
    sigmas: Optional[Tuple[float, ...]] = None

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen)
        set_("algorithm_type", _ALGORITHM_ALIASES.get(self.algorithm_type, self.algorithm_type))
        set_("solver_type", _SOLVER_ALIASES.get(self.solver_type, self.solver_type))

        set_("num_train_timesteps", checks.integer(
            "num_train_timesteps", self.num_train_timesteps, 2, maximum=MAX_TRAIN_TIMESTEPS,
            note=" (at most MAX_TRAIN_TIMESTEPS = 2**20: the training tables are allocated at that length)"))
        set_("beta_start", checks.real("beta_start", self.beta_start))
        set_("beta_end", checks.real("beta_end", self.beta_end))
        checks.choice("beta_schedule", self.beta_schedule, BETA_SCHEDULES)
        if self.trained_betas is not None:
            set_("trained_betas", _trained_betas(self.trained_betas, self.num_train_timesteps))
        elif self.beta_schedule in ("linear", "scaled_linear"):
            if not 0.0 < self.beta_start < 1.0 or not 0.0 < self.beta_end < 1.0:
                raise ValueError(
                    f"beta_start={self.beta_start} and beta_end={self.beta_end} must lie in the open interval (0, 1)."
                )
        set_("solver_order", checks.integer_choice("solver_order", self.solver_order, (1, 2, 3)))
        checks.choice("prediction_type", self.prediction_type, PREDICTION_TYPES)
        checks.boolean("thresholding", self.thresholding)
        ratio = checks.real("dynamic_thresholding_ratio", self.dynamic_thresholding_ratio)
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"dynamic_thresholding_ratio must lie in [0, 1], got {ratio}.")
        set_("dynamic_thresholding_ratio", ratio)
        smv = checks.real("sample_max_value", self.sample_max_value)
        if not smv > 0.0:
            raise ValueError(f"sample_max_value must be > 0, got {smv}.")
        set_("sample_max_value", smv)
        checks.choice("algorithm_type", self.algorithm_type, ALGORITHM_TYPES + tuple(_ALGORITHM_ALIASES))
        checks.choice("solver_type", self.solver_type, SOLVER_TYPES + tuple(_SOLVER_ALIASES))
        for name in (
            "lower_order_final",
            "euler_at_final",
            *self.SIGMA_GRID_OPTIONS,
            "rescale_betas_zero_snr",
            "use_dynamic_shifting",
        ):
            checks.boolean(name, getattr(self, name))
        grids = [n for n in self.SIGMA_GRID_OPTIONS if getattr(self, n)]
        if len(grids) > 1:
            raise ValueError(
                f"{' and '.join(grids)} are mutually exclusive: set at most one of {', '.join(self.SIGMA_GRID_OPTIONS)}."
            )
        shift = checks.real("flow_shift", self.flow_shift)
        if not shift > 0.0:
            raise ValueError(f"flow_shift must be > 0, got {shift}.")
        set_("flow_shift", shift)
        checks.choice("final_sigmas_type", self.final_sigmas_type, FINAL_SIGMAS_TYPES)
        checks.choice("variance_type", self.variance_type, VARIANCE_TYPES)
        checks.choice("timestep_spacing", self.timestep_spacing, TIMESTEP_SPACINGS)
        set_("steps_offset", checks.integer(
            "steps_offset", self.steps_offset, 0, maximum=self.num_train_timesteps - 1,
            note=" (num_train_timesteps - 1 at most: the 'leading' spacing adds it to every timestep, which "
                 "must stay a training timestep; the other spacings ignore it)"))
        checks.choice("time_shift_type", self.time_shift_type, TIME_SHIFT_TYPES)
        set_("channel_axis", checks.integer("channel_axis", self.channel_axis, note=" (an axis index)"))
        if self.prediction_type == "flow_prediction" and self.algorithm_type not in DATA_PREDICTION_ALGORITHMS:
            raise ValueError(
                f"prediction_type='flow_prediction' needs a data-prediction algorithm_type "
                f"({' or '.join(map(repr, DATA_PREDICTION_ALGORITHMS))}), got algorithm_type={self.algorithm_type!r}."
            )
        if self.solver_order == 3 and self.algorithm_type == "sde-dpmsolver":
            raise ValueError(
                "solver_order=3 is not defined for algorithm_type='sde-dpmsolver' (diffusers fails with an "
                "UnboundLocalError); use solver_order 1 or 2, or algorithm_type='sde-dpmsolver++'."
            )
        if self.use_dynamic_shifting and not self.use_flow_sigmas:
            raise ValueError("use_dynamic_shifting=True needs use_flow_sigmas=True.")
        set_("lambda_min_clipped", _lambda_min_clipped(self))  # it needs the training schedule
        if self.sigmas is not None:  # last: checked against everything above
            set_("sigmas", _grid_sigmas(self.sigmas))
            check_grid_values(self, np.asarray(self.sigmas, np.float64))

    # The flags that replace the spaced timesteps by another noise-level grid, mutually exclusive. The one
    # list: the type check, the exclusivity check and the grids' refusals (custom timesteps, the
    # unused steps_offset) all read it.
    SIGMA_GRID_OPTIONS = (
        "use_karras_sigmas",
        "use_exponential_sigmas",
        "use_beta_sigmas",
        "use_lu_lambdas",
        "use_flow_sigmas",
    )

    @property
    def is_sde(self) -> bool:
        """True for the stochastic algorithm types (``"sde-dpmsolver"``, ``"sde-dpmsolver++"``)."""
        return self.algorithm_type in SDE_ALGORITHMS

    @property
    def predicts_data(self) -> bool:
        """True when the solver integrates the data prediction x0 (DPM-Solver++), else the noise."""
        return self.algorithm_type in DATA_PREDICTION_ALGORITHMS

    # ------------------------------------------------------------------ dict / JSON round trips
    @classmethod
    def field_names(cls) -> Tuple[str, ...]:
        """The names of the config's fields, in declaration order."""
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], **overrides: Any) -> "SchedulerConfig":
        """Build a config from a diffusers-style dict; unknown keys (and ``_``-keys) are ignored.

        Args:
            values: The config values, e.g. a ``scheduler_config.json``'s contents. A
                ``lambda_min_clipped`` of ``None`` (JSON has no -inf) is read as ``-inf``.
            **overrides: Fields that replace those in ``values``; these must be known fields.

        Returns:
            The validated config.

        Raises:
            ValueError: An override names no field; a value is invalid.
        """
        merged = {k: v for k, v in dict(values).items() if k in cls.field_names()}
        unknown = sorted(k for k in overrides if k not in cls.field_names())
        if unknown:
            raise ValueError(
                f"unknown scheduler parameter(s) {', '.join(unknown)}; known parameters: {', '.join(cls.field_names())}."
            )
        merged.update(overrides)
        if merged.get("lambda_min_clipped") is None and "lambda_min_clipped" in merged:
            merged["lambda_min_clipped"] = -math.inf  # JSON has no -inf; diffusers writes -Infinity or null
        return cls(**merged)

    def to_dict(self) -> dict:
        """The fields as a plain dict (``trained_betas`` and ``sigmas`` as lists), as diffusers' config
        holds them."""
        d = dataclasses.asdict(self)
        for name in ("trained_betas", "sigmas"):
            if d[name] is not None:
                d[name] = list(d[name])
        return d

    def replace(self, **changes: Any) -> "SchedulerConfig":
        """A copy with some fields changed, validated again.

        Args:
            **changes: The fields to change.

        Returns:
            The new config.

        Raises:
            ValueError: A change names no field, or the new values are invalid.
        """
        return self.from_dict(self.to_dict(), **changes)


def _grid_sigmas(value: Any) -> Tuple[float, ...]:
    """``sigmas`` as a tuple of float32-rounded floats: a 1-D sequence of at least 2 numbers."""
    message = f"sigmas must be a 1-D sequence of N + 1 >= 2 noise levels, got {_short(value)}."
    try:
        values = np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError):
        raise ValueError(message) from None
    if values.ndim != 1 or values.shape[0] < 2:
        raise ValueError(message)
    return tuple(float(v) for v in values)


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _trained_betas(value: Any, num_train_timesteps: int) -> Tuple[float, ...]:
    """``trained_betas`` as a tuple of floats: a 1-D sequence (list, tuple, NumPy/JAX array) of
    ``num_train_timesteps`` finite numbers in ``(0, 1)``; anything else is a ValueError naming it."""
    allowed = f"a 1-D sequence of num_train_timesteps={num_train_timesteps} finite numbers in (0, 1), or None"
    if isinstance(value, (str, bytes, Mapping)):
        raise ValueError(f"trained_betas must be {allowed}, got a {type(value).__name__}: {_short(value)}.")
    try:
        items = value.tolist() if hasattr(value, "tolist") else list(value)
    except TypeError:
        raise ValueError(f"trained_betas must be {allowed}, got {_short(value)}.") from None
    if not isinstance(items, list):  # a 0-d array
        raise ValueError(f"trained_betas must be {allowed}, got a single number {_short(value)}.")
    if len(items) != num_train_timesteps:
        raise ValueError(f"trained_betas must be {allowed}; it has {len(items)} values.")
    betas = []
    for i, item in enumerate(items):
        number = isinstance(item, (int, float, np.integer, np.floating)) and not isinstance(item, (bool, np.bool_))
        if not number or not 0.0 < float(item) < 1.0:  # also refuses NaN and infinities
            raise ValueError(f"trained_betas must be {allowed}; value {i} is {_short(item)}.")
        betas.append(float(item))
    return tuple(betas)


def read_config_file(path: str, subfolder: Optional[str] = None) -> dict:
    """Read a diffusers ``scheduler_config.json``.

    ``path`` is either the JSON file itself or a folder holding it (optionally in ``subfolder``,
    as in ``from_pretrained(model_dir, subfolder="scheduler")``).

    Args:
        path: The JSON file, or a folder holding it (a string or path-like).
        subfolder: The folder inside ``path`` that holds the file, e.g. ``"scheduler"``.

    Returns:
        The JSON object as a dict (all keys, also those the config does not know).

    Raises:
        FileNotFoundError: There is no file at that path (nor a ``scheduler_config.json`` in the
            folder).
        ValueError: The file does not hold a JSON object.
    """
    path = os.fspath(path)
    if subfolder:
        path = os.path.join(path, subfolder)
    if os.path.isdir(path):
        path = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no scheduler config at {path!r} (expected a {CONFIG_NAME} file or a folder with one).")
    with open(path, encoding="utf-8") as f:
        values = json.load(f)
    if not isinstance(values, dict):
        raise ValueError(f"{path!r} does not hold a JSON object.")
    return values


def write_config_file(directory: str, values: Mapping[str, Any]) -> str:
    """Write ``values`` as ``scheduler_config.json`` into ``directory`` (created if missing).

    Keys are sorted and indented; non-finite numbers are written as diffusers writes them
    (``-Infinity`` for ``lambda_min_clipped``), which it reads back.

    Args:
        directory: The folder to write into.
        values: The config values (JSON-serialisable).

    Returns:
        The path of the written file.
    """
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, CONFIG_NAME)
    # allow_nan: diffusers itself writes -Infinity for lambda_min_clipped and reads it back.
    with open(path, "w", encoding="utf-8") as f:
        json.dump(dict(values), f, indent=2, sort_keys=True, allow_nan=True)
        f.write("\n")
    return path


def check_grid_values(config: "SchedulerConfig", s: np.ndarray) -> None:
    """Refuse noise levels ``s`` (the sampler's order) that are not a grid ``config`` can step:
    not finite, not positive (a zero is allowed last), increasing somewhere or all equal, outside
    the training range (flow: ``(0, 1)``), or a final zero with noise prediction."""
    if not np.all(np.isfinite(s)):
        raise ValueError(f"sigmas must be finite, got {s.tolist()}.")
    if np.any(s[:-1] <= 0) or s[-1] < 0:
        raise ValueError(f"sigmas must be positive (only the last one may be 0), got {s.tolist()}.")
    if np.any(np.diff(s) > 0) or s[0] == s[-1]:
        raise ValueError(
            f"sigmas must not increase (the sampler's order, noisiest first) and must not all be equal "
            f"(equal neighbours make a zero-length step), got {s.tolist()}."
        )
    last_zero = s[-1] == 0
    body = s[:-1] if last_zero else s
    if last_zero and not config.predicts_data:
        raise ValueError(
            f"sigmas may end at zero only for data prediction (algorithm_type 'dpmsolver++' or 'sde-dpmsolver++'), "
            f"not {config.algorithm_type!r}: its update has no value at zero noise."
        )
    if config.use_flow_sigmas:
        low, high = 0.0, 1.0
        inside = np.all((body > low) & (body < high))
    else:
        train = training_schedule(config).sigmas.astype(np.float64)
        low, high = train[0] * (1 - 1e-6), train[-1] * (1 + 1e-6)
        inside = np.all((body >= low) & (body <= high))
    if not inside:
        span = f"({low:g}, {high:g})" if config.use_flow_sigmas else f"[{low:.6g}, {high:.6g}]"
        raise ValueError(f"sigmas must lie in the training schedule's range {span} (the last one may be 0), "
                         f"got {s.tolist()}.")

"""The edit methods of :func:`~dpmjax.models.flax_sd.edit.edit_images` as settings objects, one per
method, each frozen, hashable and checked when built: ``method=`` takes a method's name (its
defaults) or its object (other settings).

    from dpmjax.models.flax_sd import ExactEdit, NullTextEdit, edit_images

    edit_images(pipeline, params, images, "a cat", "a dog", method="exact")          # the defaults
    edit_images(pipeline, params, images, "a cat", "a dog",
                method=ExactEdit(inversion=dpmjax.ExactInversion(tolerance=1e-4)))
    edit_images(pipeline, params, images, "a cat", "a dog", method=NullTextEdit(inner_steps=5))

A method's settings live on its object and nowhere else, so a setting cannot be given to a method
that ignores it, and another method is one more class here, not more keywords of ``edit_images``.
The keywords the objects replaced are refused with a ``TypeError`` that gives the new call
(:data:`REMOVED_KEYWORDS`).
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any, ClassVar

from ... import checks
from ...trajectories.diffedit import DiffEdit
from ...trajectories.exact_options import MOVED_KEYWORDS as EXACT_FIELDS
from ...trajectories.exact_options import ExactInversion


class EditMethod:
    """The base of the edit methods' settings (:class:`ExactEdit`, :class:`PlainEdit`,
    :class:`NullTextEdit`): each is a frozen dataclass whose ``name`` is the string ``method=``
    also accepts for its defaults."""

    name: ClassVar[str]

    def replace(self, **changes) -> EditMethod:
        """A copy with ``changes`` (checked again)."""
        return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True)
class ExactEdit(EditMethod):
    """Exact inversion of the guided sampler (:func:`dpmjax.invert` with ``exact=``): sampling the
    noise with the source prompt gives back the source latents to float32 precision, so the only
    change to the image comes from the prompt. ``method="exact"`` is ``method=ExactEdit()``.

    Attributes:
        inversion: Exact inversion's settings, a :class:`~dpmjax.ExactInversion` (tolerance,
            sweeps, iterations, ...); default ``ExactInversion()``, the defaults of
            :func:`dpmjax.invert`'s ``exact=True``.

    Example:
        >>> import dpmjax
        >>> ExactEdit(inversion=dpmjax.ExactInversion(tolerance=1e-4)) == ExactEdit(dpmjax.ExactInversion(tolerance=1e-4))
        True
    """

    name: ClassVar[str] = "exact"
    inversion: ExactInversion = dataclasses.field(default_factory=ExactInversion)

    def __post_init__(self):
        if not isinstance(self.inversion, ExactInversion):
            raise ValueError("inversion must be a dpmjax.ExactInversion (exact inversion's settings; ExactInversion() "
                             f"for the defaults), got {self.inversion!r}.")


@dataclasses.dataclass(frozen=True)
class PlainEdit(EditMethod):
    """DDIM-style inversion of the same guided sampler (one UNet call per step); no settings.
    ``method="plain"`` is ``method=PlainEdit()``."""

    name: ClassVar[str] = "plain"


@dataclasses.dataclass(frozen=True)
class NullTextEdit(EditMethod):
    """Null-text inversion (:func:`dpmjax.null_text_inversion`): the unconditional embedding is tuned
    per step so that guided sampling with the source prompt retraces the ``w = 1`` inversion; the
    edit samples the target prompt with those per-step embeddings. ``method="null-text"`` is
    ``method=NullTextEdit()``.

    Attributes:
        inner_steps: Optimiser steps per sampler step at most (an integer >= 0, default 10).
        optimizer: The optax optimiser (a ``GradientTransformation``); ``None`` (default) is
            ``optax.adam(1e-2)``, as in the paper.
    """

    name: ClassVar[str] = "null-text"
    inner_steps: int = 10
    optimizer: Any = None

    def __post_init__(self):
        object.__setattr__(self, "inner_steps", checks.integer("inner_steps", self.inner_steps, 0,
                                                               note=" (optimiser steps per sampler step at most)"))
        optimizer = self.optimizer
        if optimizer is not None and not (callable(getattr(optimizer, "init", None))
                                          and callable(getattr(optimizer, "update", None))):
            raise ValueError("optimizer must be None (optax.adam(1e-2)) or an optax GradientTransformation "
                             f"(e.g. optax.adam(1e-3)), got {optimizer!r}.")
        try:
            hash(optimizer)
        except TypeError:
            raise ValueError(f"optimizer must be hashable (optax's transformations are), got {optimizer!r}.") from None


#: The largest seed of DiffEdit's mask noise (``jax.random.PRNGKey`` takes 32-bit seeds whole).
MAX_SEED = 2**32 - 1


@dataclasses.dataclass(frozen=True)
class DiffEditEdit(EditMethod):
    """DiffEdit (Couairon et al., ICLR 2023; :func:`dpmjax.diffedit`): a mask where the UNet's
    noise predictions under the source and target prompts disagree, the image inverted with the
    source prompt over the grid's last steps, and sampling with the target prompt that keeps the
    inverted latents outside the mask, so the image changes only inside it.
    ``method="diffedit"`` is ``method=DiffEditEdit()``.

    Attributes:
        diffedit: DiffEdit's settings, a :class:`~dpmjax.DiffEdit` (strength, the mask's
            noisings and threshold, plain or exact inversion, the background's level); default
            ``DiffEdit()``, diffusers' pipeline's defaults.
        seed: The seed of the mask's noise draws (an integer from 0 to 2**32 - 1, default 0).
    """

    name: ClassVar[str] = "diffedit"
    diffedit: DiffEdit = dataclasses.field(default_factory=DiffEdit)
    seed: int = 0

    def __post_init__(self):
        if not isinstance(self.diffedit, DiffEdit):
            raise ValueError(f"diffedit must be a dpmjax.DiffEdit (DiffEdit's settings; DiffEdit() for the defaults), "
                             f"got {self.diffedit!r}.")
        object.__setattr__(self, "seed", checks.integer("seed", self.seed, 0, maximum=MAX_SEED,
                                                        note=" (the seed of the mask's noise)"))


#: The method objects by name: what ``method=`` accepts as a string, and the defaults it stands for.
METHOD_SETTINGS: dict[str, type] = {kind.name: kind for kind in (ExactEdit, PlainEdit, NullTextEdit, DiffEditEdit)}
METHODS = tuple(METHOD_SETTINGS)


def edit_method(method: str | EditMethod) -> EditMethod:
    """The settings object of ``method``: a method's name (``"exact"``, ``"plain"``,
    ``"null-text"``, ``"diffedit"``) gives its defaults; a settings object is returned as it is.

    Raises:
        ValueError: ``method`` is neither a method's name nor one of the settings objects.
    """
    if isinstance(method, tuple(METHOD_SETTINGS.values())):
        return method
    if isinstance(method, str) and method in METHOD_SETTINGS:
        return METHOD_SETTINGS[method]()
    objects = ", ".join(kind.__name__ for kind in METHOD_SETTINGS.values())
    raise ValueError(f"method must be one of {', '.join(map(repr, METHODS))} or a method's settings ({objects}), "
                     f"got {method!r}.")


# ----------------------------------------------------------------------------- the keywords they replaced
#: The keywords ``edit_images`` took before: exact inversion's (``exact`` and, before it, its fields),
#: null-text inversion's, and ``solver_order`` (a scheduler parameter, in ``scheduler_config``).
REMOVED_KEYWORDS = ("exact",) + EXACT_FIELDS + ("null_text_steps", "optimizer", "solver_order")


def _value(name: str, value) -> str:
    """``value`` as code where it reads as code (a number, string, bool or None), else ``name``."""
    return repr(value) if value is None or isinstance(value, (numbers.Number, str)) else name


def _exact_call(given: dict[str, Any]) -> str:
    """The ``method=`` that carries ``exact=`` and exact inversion's fields as they were given."""
    fields = {name: value for name, value in given.items() if name in EXACT_FIELDS}
    inversion = given.get("exact")
    if inversion is False and not fields:
        return "method='plain'"
    if isinstance(inversion, ExactInversion) and not fields:  # the settings that differ from the defaults
        fields = {name: getattr(inversion, name) for name in EXACT_FIELDS
                  if getattr(inversion, name) != getattr(ExactInversion(), name)}
    elif not any(inversion is flag for flag in (None, True)) and not fields:
        return "method=ExactEdit(inversion=dpmjax.ExactInversion(...))"
    if not fields:
        return "method=ExactEdit()"
    return "method=ExactEdit(inversion=dpmjax.ExactInversion(" + ", ".join(f"{k}={v!r}" for k, v in fields.items()) + "))"


def removed_keywords_message(function: str, given: dict[str, Any]) -> str:
    """What to write instead of ``function(..., null_text_steps=3, ...)``: ``given`` maps the
    removed keywords passed (:data:`REMOVED_KEYWORDS`) to their values."""
    calls, notes = [], []
    if any(name == "exact" or name in EXACT_FIELDS for name in given):
        calls.append(_exact_call(given))
    null_text = {new: given[old] for old, new in (("null_text_steps", "inner_steps"), ("optimizer", "optimizer"))
                 if old in given}
    if null_text:
        calls.append("method=NullTextEdit(" + ", ".join(f"{k}={_value(k, v)}" for k, v in null_text.items()) + ")")
    if calls:
        imported = [kind.__name__ for kind in (ExactEdit, NullTextEdit) if any(f"={kind.__name__}(" in c for c in calls)]
        notes.append("a method's settings are its object now"
                     + (f" (from dpmjax.models.flax_sd import {', '.join(imported)})" if imported else ""))
    if "solver_order" in given:
        calls.append(f"scheduler_config={{'solver_order': {_value('solver_order', given['solver_order'])}}}")
        notes.append("the solver order is a scheduler parameter (put it beside any others in scheduler_config)")
    return (f"{function}() no longer takes {', '.join(given)}: {'; '.join(notes)}. "
            f"Pass {' and '.join(calls)} instead; see the migration guide.")


rejects_removed_keywords = checks.rejects_keywords(REMOVED_KEYWORDS, removed_keywords_message)

"""Settings objects built from command-line options: the object's own checks judge the values, and
its messages name the options the user typed (``--tolerance must be ...``) instead of the fields
(``tolerance must be ...``). One place for every command, so a check is written once, on the object.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence, Tuple

from ..trajectories.exact_options import ExactInversion

#: exact inversion's options: (option, field)
EXACT_OPTIONS = (("--tolerance", "tolerance"), ("--max-calls-per-step", "max_calls_per_step"))


def given(args, options: Sequence[Tuple[str, str]]) -> list:
    """The options of ``options`` ((option, field) pairs) the user gave (not ``None`` in ``args``)."""
    return [option for option, field in options if getattr(args, field) is not None]


def not_yours(names: Sequence[str], owner: str) -> str:
    """``--a and --b are OWNER's``: options given to a command or method that does not use them."""
    return f"{' and '.join(names)} {'are' if len(names) > 1 else 'is'} {owner}'s"


def build(make: Callable[..., Any], options: Sequence[Tuple[str, str]], values: Mapping[str, Any]):
    """``make(**values)``; its ``ValueError`` with each field's name replaced by its option's.

    Args:
        make: The settings class (or any callable that checks its keywords).
        options: ``(option, field)`` pairs: ``("--tolerance", "tolerance")``.
        values: The keywords to pass.

    Raises:
        ValueError: ``make`` refused a value; the message names the option, without its final
            full stop (commands add their own punctuation).
    """
    try:
        return make(**values)
    except ValueError as error:
        text = str(error)
        for option, field in options:
            if text.startswith(field + " "):
                text = option + text[len(field):]
        raise ValueError(text.rstrip(".")) from None


def exact_inversion(args, *, default_tolerance: float) -> ExactInversion:
    """The :class:`~dpmjax.ExactInversion` of ``args.tolerance`` (``default_tolerance`` when not
    given) and ``args.max_calls_per_step``; a ``ValueError`` naming the option that cannot be used."""
    tolerance = default_tolerance if args.tolerance is None else args.tolerance
    return build(ExactInversion, EXACT_OPTIONS, dict(tolerance=tolerance, max_calls_per_step=args.max_calls_per_step))

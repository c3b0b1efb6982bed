"""Argument checks shared by every public entry point: each raises a ``ValueError`` that names the
parameter and says what is allowed, before anything is traced or written. :func:`rejects_keywords`
refuses keywords a call no longer takes with a ``TypeError`` that gives the call to write instead."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np


def choice(name: str, value: Any, allowed: Tuple[Any, ...]) -> None:
    """``value`` must be one of ``allowed``."""
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; allowed values: {', '.join(map(repr, allowed))}.")


def boolean(name: str, value: Any) -> None:
    """``value`` must be ``True`` or ``False`` (not 0/1)."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}.")


def integer(name: str, value: Any, minimum: Optional[int] = None, *, maximum: Optional[int] = None,
            note: str = "") -> int:
    """``value`` as a Python ``int`` (Python or NumPy integers; not a bool, float or string), at least
    ``minimum`` and at most ``maximum`` when given. NumPy integers become Python ints, so that configs
    and cache keys hash alike whichever was passed. ``note`` is added to the message (what the
    parameter is, why the bound)."""
    if maximum is None:
        allowed = "an integer" if minimum is None else f"an integer >= {minimum}"
    else:
        allowed = f"an integer <= {maximum}" if minimum is None else f"an integer in [{minimum}, {maximum}]"
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be {allowed}{note} (not a bool, float or string), got {value!r}.")
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise ValueError(f"{name} must be {allowed}{note}, got {value!r}.")
    return int(value)


def integer_choice(name: str, value: Any, allowed: Tuple[int, ...]) -> int:
    """One of the integers ``allowed`` (as a Python int)."""
    description = f"an integer, one of {', '.join(map(str, allowed))}"
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be {description} (not a bool, float or string), got {value!r}.")
    if value not in allowed:
        raise ValueError(f"{name} must be {description}, got {value!r}.")
    return int(value)


def real(name: str, value: Any, *, low: Optional[float] = None, high: Optional[float] = None,
         open_low: bool = False, open_high: bool = False, finite: bool = False, note: str = "") -> float:
    """``value`` as a float (a Python or NumPy real; not a bool), inside the bounds when given:
    ``low <= value`` (``<`` with ``open_low``) and ``value <= high`` (``<`` with ``open_high``);
    not NaN or infinite when ``finite``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a real number{note}, got {value!r}.")
    number = float(value)
    if finite and not math.isfinite(number):
        raise ValueError(f"{name} must be a finite number{note}, got {value!r}.")
    too_low = low is not None and not (number > low if open_low else number >= low)
    too_high = high is not None and not (number < high if open_high else number <= high)
    if too_low or too_high or (number != number and (low is not None or high is not None)):
        bounds = ("(" if open_low else "[") + ("-inf" if low is None else f"{low:g}") + ", " + \
                 ("inf" if high is None else f"{high:g}") + (")" if open_high else "]")
        raise ValueError(f"{name} must be a number in {bounds}{note}, got {value!r}.")
    return number


def floating_array(name: str, value: Any) -> None:
    """``value`` must be an array (or array-like) of a floating-point dtype."""
    dtype = getattr(value, "dtype", None)
    if dtype is None:
        dtype = np.asarray(value).dtype
    if not jnp.issubdtype(dtype, jnp.floating):  # JAX's view: bfloat16 and float8 are floating too
        raise ValueError(f"{name} must be a floating-point array, got dtype {dtype}.")


def non_empty(name: str, value: Any) -> None:
    """``value`` (an array) must hold at least one value: a zero-size array has nothing to step."""
    shape = tuple(np.shape(value))
    if math.prod(shape) == 0:
        raise ValueError(f"{name} must not be empty (at least one row, every axis of size >= 1), got shape {shape}.")


def output_array(name: str, value: Any, *, expected_shape: Optional[Tuple[int, ...]] = None, note: str = "") -> None:
    """``value``, what the function ``name`` returned, must be one floating-point array (of
    ``expected_shape`` when given): not a tuple, a dict or a Python number. Checked while tracing,
    where the output's type, dtype and shape are known."""
    wanted = "one floating-point array" + (f" of shape {tuple(expected_shape)}" if expected_shape is not None else "")
    if not isinstance(value, (jax.Array, np.ndarray)):
        raise ValueError(f"{name} must return {wanted}{note}, got a {type(value).__name__}.")
    if not jnp.issubdtype(value.dtype, jnp.floating):
        raise ValueError(f"{name} must return {wanted}{note}, got dtype {value.dtype}.")
    if expected_shape is not None and tuple(value.shape) != tuple(expected_shape):
        raise ValueError(f"{name} must return {wanted}{note}, got shape {tuple(value.shape)}.")


def function(name: str, value: Any) -> None:
    """``value`` must be callable."""
    if not callable(value):
        raise ValueError(f"{name} must be a function, got {type(value).__name__}.")


def rejects_keywords(removed: Sequence[str], message: Callable[[str, dict[str, Any]], str]):
    """A decorator: the function refuses the keywords ``removed`` (ones it no longer takes) with a
    ``TypeError`` whose text is ``message(function name, {keyword: value given})``, the new call to
    write, rather than Python's bare "unexpected keyword argument". All the removed keywords of a
    call are named together, in the order of ``removed``, before the function runs; the wrapper
    keeps the function's signature and docstring.

    Example:
        >>> @rejects_keywords(("tol",), lambda name, given: f"{name}() takes settings=S(tolerance={given['tol']!r})")
        ... def solve(x, *, settings=None):
        ...     return x
        >>> solve(1, tol=1e-3)
        Traceback (most recent call last):
        TypeError: solve() takes settings=S(tolerance=0.001)
    """
    removed = tuple(removed)

    def decorate(function):
        @functools.wraps(function)
        def checked(*args, **kwargs):
            given = {name: kwargs[name] for name in removed if name in kwargs}
            if given:
                raise TypeError(message(function.__name__, given))
            return function(*args, **kwargs)

        return checked

    return decorate

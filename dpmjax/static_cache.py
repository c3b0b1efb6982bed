"""One bounded cache for the static objects handed to ``jax.jit``, and the keys that find them.

Why: ``jax.jit`` compiles once per value of its *static* arguments, which it compares with ``==``
and ``hash``. Several of dpmjax's static arguments are Python objects built inside a call: the
model function that wraps a user's model, the guided model function of a Flax UNet, the jitted
encoder of a VAE, an optax optimiser (``optax.adam(1e-2)`` returns new closures each time, and
closures compare by identity). Without a cache each call hands jit a new object, and jit compiles
the whole trajectory again (seconds to minutes each time) while the old programs pile up in its
own cache. With one, equal settings give back the object built the first time, and the compiled
program is reused. The schedulers' host tables (grids, per-step coefficients, the initial state)
are kept the same way, so ``set_timesteps`` costs a lookup.

Keys. :meth:`StaticCache.get` takes a hashable key that stands for the static settings:

* a hashable value is its own key (a config, a number, a string, a scheduler; a function by
  identity);
* :func:`value_key` describes an object that compares by identity but is rebuilt per call with
  the same behaviour -- an optax transformation -- by what determines its behaviour: the code of
  its functions and the values they close over;
* :class:`ByIdentity` is the fallback where no value key exists (an unhashable object, such as a
  Flax UNet whose config holds lists, or a closure over something :func:`value_key` cannot pin
  down): equal only to itself, and it keeps its object alive, so an ``id`` is never reused;
* :func:`static_key` is the value itself where it is hashable, else :class:`ByIdentity`.

A key that cannot be hashed at all is not cached: ``make()`` runs on every call (and usually
refuses the argument with a clear error).

Eviction: every cache holds at most :data:`MAX_ENTRIES` entries and drops the least recently used
one first. A dropped entry is built again when next asked for: at worst one compilation more,
never a wrong result.

Threads: the batch job calls from a thread per device. Each cache has a lock; ``make()`` runs
outside it, and when two threads build the same key at once both get the value stored first, so
jit sees one object. :func:`clear_all` empties every cache (for tests).
"""

from __future__ import annotations

import collections
import enum
import functools
import threading
import types
from typing import Any, Callable, Hashable, List, TypeVar

import jax
import numpy as np

T = TypeVar("T")

MAX_ENTRIES = 64
"""The size bound of every cache (entries), the least recently used dropped first."""

_CACHES: List["StaticCache"] = []
_MISSING = object()


class _Hashed:
    """A key with its hash computed once (a config's hash walks every field)."""

    __slots__ = ("key", "hash")

    def __init__(self, key: Hashable):
        self.key = key
        self.hash = hash(key)

    def __hash__(self):
        return self.hash

    def __eq__(self, other):
        return self.key == other.key


class StaticCache:
    """A bounded, thread-safe map from static keys to the objects built for them.

    Args:
        name: What it holds, in words (shown by ``repr``).
    """

    def __init__(self, name: str):
        self.name = name
        self._entries: "collections.OrderedDict[Hashable, Any]" = collections.OrderedDict()
        self._lock = threading.Lock()
        _CACHES.append(self)

    def get(self, key: Hashable, make: Callable[[], T]) -> T:
        """The value stored under ``key``, else ``make()``, stored (an unhashable ``key``: ``make()``
        on every call, nothing stored)."""
        try:
            key = _Hashed(key)
        except TypeError:
            return make()
        return self._get(key, make)

    def _get(self, key: "_Hashed", make: Callable[[], T]) -> T:
        with self._lock:
            value = self._entries.get(key, _MISSING)
            if value is not _MISSING:
                self._entries.move_to_end(key)
                return value
        value = make()
        with self._lock:
            value = self._entries.setdefault(key, value)  # another thread's, if it stored first
            self._entries.move_to_end(key)
            while len(self._entries) > MAX_ENTRIES:
                self._entries.popitem(last=False)
        return value

    def clear(self) -> None:
        """Drop every entry."""
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"StaticCache({self.name!r}, {len(self)} of {MAX_ENTRIES} entries)"


def clear_all() -> None:
    """Empty every cache (tests: the next call of each entry point builds and compiles afresh)."""
    for cache in _CACHES:
        cache.clear()


def memoized(fn: Callable[..., T]) -> Callable[..., T]:
    """``fn`` with its results kept in a :class:`StaticCache` (``.cache``), keyed by its arguments
    as given (each through :func:`static_key`): call it the same way each time."""
    cache = StaticCache(fn.__qualname__)

    @functools.wraps(fn)
    def cached(*args, **kwargs):
        try:
            key = _Hashed((args, tuple(kwargs.items())))
        except TypeError:
            key = _Hashed((tuple(static_key(a) for a in args), tuple((k, static_key(v)) for k, v in kwargs.items())))
        return cache._get(key, lambda: fn(*args, **kwargs))

    cached.cache = cache
    return cached


# ----------------------------------------------------------------------------- keys
class ByIdentity:
    """A key equal only to another for the same object (``is``), holding that object alive.

    Args:
        value: The object; read back as ``.value``.
    """

    __slots__ = ("value",)

    def __init__(self, value: Any):
        self.value = value

    def __eq__(self, other):
        return isinstance(other, ByIdentity) and other.value is self.value

    def __hash__(self):
        return id(self.value)

    def __repr__(self) -> str:
        return f"ByIdentity({type(self.value).__name__} at {id(self.value):#x})"


def static_key(value: Any) -> Hashable:
    """``value`` itself where it is hashable, else :class:`ByIdentity` of it."""
    try:
        hash(value)
    except TypeError:
        return ByIdentity(value)
    return value


def value_key(value: Any) -> Hashable:
    """A key equal for objects of the same behaviour, such as two ``optax.adam(1e-2)``: functions by
    their code, module and closed-over values; containers, numbers, strings, dtypes and small
    concrete arrays by value; objects that compare by identity by identity. Where some part is
    none of these (a tracer, an array over 64 KiB, an object with its own ``__eq__``), the whole
    object's :class:`ByIdentity`."""
    try:
        key = ("value", _describe(value))
        hash(key)
    except (_Unrecognised, TypeError):
        return ByIdentity(value)
    return key


_MAX_DEPTH = 64
_MAX_ARRAY_BYTES = 1 << 16
_ATOMS = (type(None), bool, int, str, bytes, type(Ellipsis))


class _Unrecognised(Exception):
    """A part whose behaviour its value does not pin down."""


def _array_key(value) -> tuple:
    """A small concrete array (NumPy or JAX; not a tracer) by type, dtype, shape and bytes."""
    if isinstance(value, jax.core.Tracer):
        raise _Unrecognised(value)
    array = np.asarray(value)
    if array.dtype == object or array.nbytes > _MAX_ARRAY_BYTES:
        raise _Unrecognised(value)
    return ("array", type(value), array.dtype.str, array.shape, array.tobytes())


def _cell_key(cell, path: tuple):
    """A closure cell by its contents (an empty cell, not yet assigned, as such)."""
    try:
        contents = cell.cell_contents
    except ValueError:
        return ("empty cell",)
    return _describe(contents, path)


def _function_key(fn, path: tuple) -> tuple:
    """A Python function by its code, module globals, defaults and closed-over values."""
    cells = tuple(_cell_key(cell, path) for cell in (fn.__closure__ or ()))
    return ("function", fn.__code__, id(fn.__globals__), _describe(fn.__defaults__, path),
            _describe(fn.__kwdefaults__, path), cells)


def _has_identity_equality(value) -> bool:
    """True for objects that compare (and hash) by identity, so using them in a key is exact."""
    cls = type(value)
    return cls.__eq__ is object.__eq__ and cls.__hash__ is object.__hash__


def _describe(value, path: tuple = ()):
    """A hashable description of ``value``, equal for behaviourally identical objects; raises
    :class:`_Unrecognised` for a part it cannot pin down. ``path``: the ids of the objects being
    described around it (a cycle is described by how far back it closes)."""
    if len(path) > _MAX_DEPTH:
        raise _Unrecognised(value)
    if id(value) in path:
        return ("cycle", path.index(id(value)))
    path = path + (id(value),)
    if isinstance(value, _ATOMS):
        return (type(value), value)
    if isinstance(value, (float, complex)):
        return (type(value), repr(value))  # repr: NaN equals itself and -0.0 differs from 0.0
    if isinstance(value, (tuple, list)):  # also NamedTuples such as GradientTransformation
        return (type(value), tuple(_describe(v, path) for v in value))
    if isinstance(value, dict):
        return (type(value), tuple((_describe(k, path), _describe(v, path)) for k, v in value.items()))
    if isinstance(value, types.FunctionType):
        return _function_key(value, path)
    if isinstance(value, functools.partial):
        return ("partial", type(value), _describe(value.func, path), _describe(value.args, path),
                _describe(value.keywords, path))
    if isinstance(value, (np.ndarray, np.generic, jax.Array)):
        return _array_key(value)
    if isinstance(value, (type, types.BuiltinFunctionType, types.ModuleType, types.CodeType, np.dtype, enum.Enum)):
        return ("object", value)
    if _has_identity_equality(value):
        return ("identity", value)
    raise _Unrecognised(value)

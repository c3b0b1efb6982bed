"""Shared helpers: paired diffusers (PyTorch, live) and dpmjax schedulers, and trajectory drivers."""

from __future__ import annotations

import functools
import inspect
import math
import os
import warnings
from pathlib import Path

# A persistent compilation cache for the test session and the processes it starts (the CLI tests):
# identical programs compiled in another file, worker or subprocess are read back instead of compiled
# again (the fixture below drops the in-memory programs after each file). Keys are the programs
# themselves (with jax's version and flags), so an entry cannot go stale. DPMJAX_TEST_COMPILATION_CACHE=0
# turns it off; a path puts it elsewhere.
_CACHE = os.environ.get("DPMJAX_TEST_COMPILATION_CACHE", str(Path(__file__).resolve().parent.parent / ".pytest_cache" / "jax-compilation"))
try:
    import filelock  # noqa: F401  (jax locks the cache's files with it when the cache has a size limit)
except ImportError:  # without it two workers could write one entry at once: no cache
    _CACHE = "0"
if _CACHE != "0":
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE)
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
    os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(2 << 30))

import jax  # noqa: E402  (after the cache's settings, which jax reads when imported)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import dpmjax  # noqa: E402

if _CACHE != "0":  # also where a plugin imported jax before this file
    jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))
    jax.config.update("jax_compilation_cache_max_size", int(os.environ["JAX_COMPILATION_CACHE_MAX_SIZE"]))

warnings.filterwarnings("ignore", category=FutureWarning)

SHAPE = (2, 4, 8, 8)


def _diffusers():
    import diffusers  # noqa: WPS433 (imported lazily so that collection errors are clear)

    return diffusers


def diffusers_class(kind: str):
    d = _diffusers()
    return d.DPMSolverMultistepScheduler if kind == "forward" else d.DPMSolverMultistepInverseScheduler


def dpmjax_class(kind: str):
    return dpmjax.DPMSolverMultistepScheduler if kind == "forward" else dpmjax.DPMSolverMultistepInverseScheduler


def diffusers_accepts(kind: str, name: str) -> bool:
    return name in inspect.signature(diffusers_class(kind).__init__).parameters


def make_diffusers(kind: str, **config):
    accepted = {k: v for k, v in config.items() if diffusers_accepts(kind, k)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return diffusers_class(kind)(**accepted)


@functools.lru_cache(maxsize=None)
def jitted_step(scheduler):
    """``step`` jitted once per scheduler (schedulers hash by config)."""

    def fn(state, model_output, timestep, sample, variance_noise):
        return scheduler.step(state, model_output, timestep, sample, variance_noise=variance_noise, return_dict=False)

    return jax.jit(fn)


def torch_model(x, t):
    import torch

    return 0.5 * torch.tanh(x) + 0.01 * float(t) / 1000.0


def jax_model(x, t):
    return 0.5 * jnp.tanh(x) + 0.01 * jnp.asarray(t, x.dtype) / 1000.0


def relative_error(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(1.0, np.max(np.abs(b))))


def assert_matches_diffusers(ours, ref32, ref64, tol=1e-4, where=""):
    """``ours`` within ``tol`` (relative) of diffusers' float32 result, plus twice diffusers' own
    float32-vs-float64 spread. Where diffusers' result is not finite, ours must be finite.
    Returns True when diffusers was not finite (a documented difference)."""
    ours = np.asarray(ours, np.float64)
    assert np.all(np.isfinite(ours)), f"{where}: dpmjax returned non-finite values"
    if not np.all(np.isfinite(ref32)):
        return True
    spread = relative_error(ref32, ref64) if np.all(np.isfinite(ref64)) else 0.0
    err = relative_error(ours, ref32)
    assert err <= tol + 2 * spread, f"{where}: {err:.2e} from diffusers (its own f32/f64 spread {spread:.2e})"
    return False


def draw(shape, seed, dtype=np.float32):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def model_output_shape(config: dict, shape=SHAPE):
    if config.get("variance_type"):
        s = list(shape)
        s[1] *= 2
        return tuple(s)
    return shape


def widen(out, config):
    """Append a (meaningless) variance half along the channel axis when the config learns variance."""
    if not config.get("variance_type"):
        return out
    if hasattr(out, "numpy"):
        import torch

        return torch.cat([out, 0.3 * out + 7.0], dim=1)
    return jnp.concatenate([out, 0.3 * out + 7.0], axis=1)


def diffusers_trajectory(kind, config, n, x0, noises=None, float64=False, begin=0):
    """Run diffusers' own loop; returns the list of samples after each step (numpy float64)."""
    import torch

    d = make_diffusers(kind, **config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        d.set_timesteps(n)
    dtype = torch.float64 if float64 else torch.float32
    if float64:
        d.sigmas = d.sigmas.double()
    x = torch.from_numpy(np.asarray(x0)).to(dtype)
    path = []
    for i, t in enumerate(d.timesteps[begin:]):
        out = widen(torch_model(x, t), config).to(dtype)
        noise = None if noises is None else torch.from_numpy(noises[i]).to(dtype)
        x = d.step(out, t, x, variance_noise=noise).prev_sample
        path.append(x.double().numpy())
    return path


def dpmjax_trajectory(kind, config, n, x0, noises=None, begin=0):
    s = dpmjax_class(kind)(**config)
    state = s.set_timesteps(s.create_state(), n, np.shape(x0))
    step = jitted_step(s)
    x = jnp.asarray(x0)
    path = []
    for i, t in enumerate(np.asarray(state.timesteps)[begin:]):
        out = widen(jax_model(x, t), config)
        noise = None if noises is None else jnp.asarray(noises[i])
        x, state = step(state, out, jnp.asarray(t), x, noise)
        path.append(np.asarray(x, np.float64))
    return path


NEG_INF = -math.inf


@pytest.fixture(autouse=True, scope="module")
def _compiled_programs_freed_after_each_file():
    """Drop every compiled program after each test file. A worker that runs hundreds of files keeps
    thousands of executables otherwise, each with its own memory mappings: measured 41,503 mappings in
    one worker near the end of the suite, against the kernel's limit of 65,530
    (``vm.max_map_count``); past it XLA's compiler crashed (a segfault in ``backend_compile_and_load``)."""
    yield
    jax.clear_caches()


@pytest.fixture(autouse=True)
def _no_x64_leak():
    """Tests that enable float64 must do it in a context manager; check nothing leaks."""
    yield
    assert not jax.config.jax_enable_x64


# The files that take minutes, first. With pytest-xdist's ``--dist loadfile`` each file is one unit of
# work, handed out in collection order: a long file handed out last keeps one worker busy while the
# other has nothing left (longest-first scheduling). Measured from the suite's slowest tests; the
# rest keep pytest's order.
LONGEST_FILES_FIRST = (
    "test_notebooks.py", "test_exact_digits.py", "test_traced_grids.py", "test_exact_budget.py", "test_flax_sd_edit.py",
    "test_flax_sd.py", "test_flax_sd_pipelines.py", "test_exact_derivatives.py", "test_digits.py",
    "test_flax_sd_diffedit.py", "test_batch_job.py", "test_batch_job_hardening.py", "test_exact_options.py",
    "test_rows_independent.py", "test_exact_per_row_cost.py", "test_doc_examples.py", "test_sharding.py",
)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(Path(str(item.fspath)).name, len(rank)))  # stable: files keep their tests' order

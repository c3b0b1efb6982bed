"""The static-argument caches (dpmjax.static_cache): a second call with equal static settings compiles
nothing, through every entry point that builds a static object per call, and another setting compiles
again; the cache's bound, its least-recently-used eviction, its keys, threads and clearing.

Compilations are counted with ``jax.monitoring`` (XLA compilations during a call) and by the model's
traces (a Python side effect in the model runs once per trace), never by timing."""

from __future__ import annotations

import contextlib
import threading
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dpmjax
from dpmjax import DPMSolverMultistepScheduler as Forward
from dpmjax import static_cache
from dpmjax.models.flax_sd import guided_unet, unet_with_embedding
from dpmjax.models.flax_sd.edit import decode_latents, encode_images
from dpmjax.models.flax_sd.unet import UNetInputs
from dpmjax.static_cache import MAX_ENTRIES, ByIdentity, StaticCache, memoized, static_key, value_key
from dpmjax.trajectories import null_text

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
# A program read back from the persistent compilation cache (tests/conftest.py) is a program obtained
# all the same: it counts as a compilation here.
CACHE_READ_EVENT = "/jax/compilation_cache/cache_retrieval_time_sec"


@contextlib.contextmanager
def compilations():
    """The number of XLA compilations inside the block (``count[0]``)."""
    count = [0]

    def listener(name, duration, **kwargs):
        if name in (COMPILE_EVENT, CACHE_READ_EVENT):
            count[0] += 1

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield count
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


class Traced:
    """A model that counts its traces: ``model(x, t[, cond]) = scale * x (+ 0.01 cond)``."""

    def __init__(self, scale: float = 0.1):
        self.scale = scale
        self.traces = 0

    def __call__(self, x, t, cond=None):
        self.traces += 1
        out = self.scale * x
        return out if cond is None else out + 0.01 * cond


def _twice_then_other(run, model: Traced, other):
    """``run()`` twice (the second compiles nothing and traces nothing), then ``other()`` (traces)."""
    run()
    traced = model.traces
    assert traced > 0
    with compilations() as count:
        run()
    assert count[0] == 0 and model.traces == traced, (count[0], model.traces, traced)
    other()
    assert model.traces > traced


X = jnp.linspace(-1.0, 1.0, 24).reshape(2, 3, 4)


# ----------------------------------------------------------------------------- entry points
def test_sample_compiles_once_per_scheduler_config_not_per_scheduler_object():
    model = Traced()
    _twice_then_other(lambda: dpmjax.sample(model, X, Forward(solver_order=2), 6).sample.block_until_ready(), model,
                      lambda: dpmjax.sample(model, X, Forward(solver_order=3), 6).sample.block_until_ready())


def test_set_timesteps_shares_the_tables_of_equal_schedulers():
    a, b = Forward(solver_order=2), Forward(solver_order=2)
    assert a.create_state() is b.create_state()
    sa = a.set_timesteps(a.create_state(), 7, (2, 3))
    sb = b.set_timesteps(b.create_state(), 7, (2, 3))
    assert sa.update_coefficients is sb.update_coefficients and sa.sigmas is sb.sigmas
    assert a.set_timesteps(a.create_state(), 8, (2, 3)).sigmas is not sa.sigmas


def test_plain_invert_compiles_once_per_static_setting():
    model = Traced()
    _twice_then_other(lambda: dpmjax.invert(model, X, Forward(solver_order=2), 6).sample.block_until_ready(), model,
                      lambda: dpmjax.invert(model, X, Forward(solver_order=1), 6).sample.block_until_ready())


def test_exact_invert_compiles_once_per_static_setting():
    model = Traced()
    scheduler = Forward(solver_order=2, final_sigmas_type="sigma_min")
    _twice_then_other(lambda: dpmjax.invert(model, X, scheduler, 4, exact=True).sample.block_until_ready(), model,
                      lambda: dpmjax.invert(model, X, Forward(solver_order=1, final_sigmas_type="sigma_min"), 4,
                                            exact=True).sample.block_until_ready())


def test_exact_invert_compiles_once_per_distinct_exact_settings():
    """Two equal ExactInversion objects (built apart) share a program; another value compiles again."""
    model = Traced()
    scheduler = Forward(solver_order=2, final_sigmas_type="sigma_min")
    run = lambda options: dpmjax.invert(model, X, scheduler, 4, exact=options).sample.block_until_ready()  # noqa: E731
    _twice_then_other(lambda: run(dpmjax.ExactInversion(tolerance=1e-4, max_sweeps=np.int64(3))), model,
                      lambda: run(dpmjax.ExactInversion(tolerance=1e-4, max_sweeps=4)))
    traced = model.traces
    with compilations() as count:
        run(dpmjax.ExactInversion(tolerance=np.float64(1e-4), max_sweeps=3))
    assert count[0] == 0 and model.traces == traced


def _null_text(model, optimizer):
    x = jnp.linspace(-1.0, 1.0, 12).reshape(3, 4)
    result = null_text.null_text_inversion(model, x, Forward(solver_order=2, final_sigmas_type="sigma_min"), 4,
                                           cond=jnp.ones((3, 4)), uncond=jnp.zeros((3, 4)), guidance_scale=2.5,
                                           optimizer=optimizer, inner_steps=2)
    return result.reconstruction.block_until_ready()


def test_null_text_with_a_new_equal_optax_optimiser_compiles_once():
    model = Traced()
    _twice_then_other(lambda: _null_text(model, optax.adam(1e-2)), model,
                      lambda: _null_text(model, optax.adam(2e-2)))


def test_the_default_optimiser_and_an_equal_inline_one_share_a_program():
    model = Traced()
    _null_text(model, None)
    traced = model.traces
    _null_text(model, optax.adam(1e-2))
    assert model.traces == traced


class ToyUNet:
    """Stands for diffusers' Flax UNet (``apply(...).sample``, a ``dtype``); unhashable, like a UNet
    loaded from a config (its config holds lists). Counts its traces."""

    __hash__ = None

    def __init__(self):
        self.dtype = jnp.float32
        self.block_out_channels = [32, 64]
        self.traces = 0

    def __eq__(self, other):
        return isinstance(other, ToyUNet) and other.block_out_channels == self.block_out_channels

    def apply(self, variables, latents, t, encoder_hidden_states):
        self.traces += 1
        eps = variables["params"] * latents + 0.01 * jnp.mean(encoder_hidden_states, axis=(1, 2))[:, None, None, None]
        return types.SimpleNamespace(sample=eps)


def _unet_inputs():
    return UNetInputs(jnp.asarray(0.1), jnp.ones((1, 5, 3)), jnp.zeros((1, 5, 3)))


LATENTS = jnp.linspace(-1.0, 1.0, 2 * 4 * 2 * 2).reshape(2, 4, 2, 2)


def test_guided_unet_sampling_and_inversion_compile_once_per_unet_and_scale():
    unet = ToyUNet()

    def run(w, invert=False):
        entry = dpmjax.invert if invert else dpmjax.sample
        return entry(guided_unet(unet, guidance_scale=w), LATENTS, Forward(), 5, cond=_unet_inputs()).sample.block_until_ready()

    _twice_then_other(lambda: run(3.0), unet, lambda: run(5.0))
    _twice_then_other(lambda: run(3.0, invert=True), unet, lambda: run(1.0, invert=True))
    assert guided_unet(unet, 3) is guided_unet(unet, guidance_scale=3.0)
    assert guided_unet(ToyUNet(), 3.0) is not guided_unet(unet, 3.0), "a UNet object is recognised by identity"


def test_unet_with_embedding_is_one_function_per_unet():
    unet = ToyUNet()
    assert unet_with_embedding(unet) is unet_with_embedding(unet)
    assert unet_with_embedding(ToyUNet()) is not unet_with_embedding(unet)


def test_a_guided_unet_in_use_survives_any_number_of_other_settings():
    """Least recently used first: a model function used between others is never dropped (a cache
    emptied whenever it fills would hand out a new function, and jit would compile again)."""
    unet = ToyUNet()
    first = guided_unet(unet, 7.5)
    for i in range(3 * MAX_ENTRIES):
        guided_unet(unet, 1.0 + i)
        assert guided_unet(unet, 7.5) is first, i


def test_threads_asking_for_the_guided_unet_at_once_get_one_function():
    unet, barrier, got = ToyUNet(), threading.Barrier(8), []

    def ask():
        barrier.wait()
        got.append(guided_unet(unet, 2.0))

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(got) == 8 and all(f is got[0] for f in got)


class ToyVAE:
    """Stands for diffusers' Flax VAE (``apply`` with ``method``, ``config.scaling_factor``, ``dtype``);
    unhashable. Counts its traces."""

    __hash__ = None

    def __init__(self):
        self.dtype = jnp.float32
        self.config = types.SimpleNamespace(scaling_factor=0.5)
        self.traces = 0

    def __eq__(self, other):
        return isinstance(other, ToyVAE)

    def encode(self, pixels):
        return types.SimpleNamespace(latent_dist=types.SimpleNamespace(mean=pixels[..., :1]))

    def decode(self, latents):
        return types.SimpleNamespace(sample=jnp.repeat(latents, 3, axis=-1))

    def apply(self, variables, x, method):
        self.traces += 1
        return method(variables["params"] * x)


def test_encoding_and_decoding_with_one_vae_compile_once_per_vae_object():
    vae, other, images, latents = ToyVAE(), ToyVAE(), jnp.full((2, 4, 4, 3), 0.25), jnp.zeros((2, 1, 4, 4))

    def run(v):
        return encode_images(v, 1.0, images).block_until_ready(), decode_latents(v, 1.0, latents)

    run(vae)
    assert vae.traces == 2
    with compilations() as count:
        run(vae)
    assert count[0] == 0 and vae.traces == 2
    run(other)  # an equal but other VAE object: its own jitted functions
    assert other.traces == 2 and vae.traces == 2


def test_clear_all_makes_the_next_call_build_and_compile_again():
    unet = ToyUNet()
    first = guided_unet(unet, 4.0)
    static_cache.clear_all()
    assert guided_unet(unet, 4.0) is not first


# ----------------------------------------------------------------------------- the cache itself
def test_the_bound_is_respected_and_the_least_recently_used_entry_goes_first():
    cache, made = StaticCache("test"), []

    def make(i):
        made.append(i)
        return [i]

    kept = cache.get("kept", lambda: make("kept"))
    for i in range(2 * MAX_ENTRIES):
        cache.get(i, lambda: make(i))
        assert len(cache) <= MAX_ENTRIES
        assert cache.get("kept", lambda: make("again")) is kept
    assert len(cache) == MAX_ENTRIES and made.count("again") == 0
    cache.get(0, lambda: make("zero again"))  # long since dropped: built again
    assert made[-1] == "zero again"


def test_an_unhashable_key_is_built_every_time_and_not_stored():
    cache = StaticCache("test")
    assert cache.get(([1],), lambda: object()) is not cache.get(([1],), lambda: object())
    assert len(cache) == 0


def test_clear_empties_a_cache_and_clear_all_every_cache():
    a, b = StaticCache("a"), StaticCache("b")
    a.get(1, object)
    b.get(1, object)
    a.clear()
    assert len(a) == 0 and len(b) == 1
    static_cache.clear_all()
    assert len(b) == 0


def test_threads_building_one_key_at_once_all_get_the_value_stored_first():
    cache, barrier, got = StaticCache("threads"), threading.Barrier(16), []

    def slow():
        time.sleep(0.01)
        return object()

    def ask(i):
        barrier.wait()
        for j in range(3 * MAX_ENTRIES):
            value = cache.get("shared", slow) if j % 2 else cache.get((i, j), object)
            if j % 2:
                got.append(value)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(cache) <= MAX_ENTRIES
    assert len(got) == 16 * (3 * MAX_ENTRIES // 2) and all(value is got[0] for value in got)


def test_memoized_calls_once_per_arguments_and_takes_unhashable_ones_by_identity():
    calls = []

    @memoized
    def build(a, *, b):
        calls.append((a, b))
        return object()

    box = [1]
    assert build(1, b=2) is build(1, b=2) and build(box, b=2) is build(box, b=2)
    assert build([1], b=2) is not build(box, b=2)
    assert build(1, b=3) is not build(1, b=2) and len(calls) == 4
    build.cache.clear()
    build(1, b=2)
    assert len(calls) == 5


def test_value_keys_are_equal_for_equal_optax_settings_and_identity_otherwise():
    assert value_key(optax.adam(1e-2)) == value_key(optax.adam(1e-2))
    assert hash(value_key(optax.adam(1e-2))) == hash(value_key(optax.adam(1e-2)))
    assert value_key(optax.adam(1e-2)) != value_key(optax.adam(2e-2))
    assert value_key(optax.adam(1e-2)) != value_key(optax.sgd(1e-2))
    chain = lambda: optax.chain(optax.clip_by_global_norm(1.0), optax.adam(optax.linear_schedule(1e-2, 0.0, 10)))
    assert value_key(chain()) == value_key(chain())
    big = np.zeros(1 << 15)  # 256 KiB closed over: not described
    opaque = optax.GradientTransformation(lambda p: (), lambda g, s, p=None: (big, s))
    assert value_key(opaque) == ByIdentity(opaque) and value_key(opaque) != value_key(
        optax.GradientTransformation(opaque.init, lambda g, s, p=None: (big, s)))


def test_identity_keys_compare_by_identity_and_keep_their_object():
    a, b = [1], [1]
    assert ByIdentity(a) == ByIdentity(a) and hash(ByIdentity(a)) == hash(ByIdentity(a))
    assert ByIdentity(a) != ByIdentity(b) and ByIdentity(a) != a
    assert static_key(a) == ByIdentity(a) and static_key((1, "x")) == (1, "x")
    assert ByIdentity(a).value is a


@pytest.mark.parametrize("entry", ["sample", "invert"])
def test_a_scheduler_cache_emptied_between_calls_still_gives_the_same_numbers(entry):
    fn = getattr(dpmjax, entry)
    before = np.asarray(fn(Traced(), X, Forward(solver_order=2), 6).sample)
    static_cache.clear_all()
    np.testing.assert_array_equal(np.asarray(fn(Traced(), X, Forward(solver_order=2), 6).sample), before)


def test_guidance_that_takes_its_conditions_as_cond_compiles_once_for_every_prompt():
    """``classifier_free_guidance(model, guidance_scale=w)`` takes ``(cond, uncond)`` as dpmjax's
    ``cond=``: another prompt (new values, same shapes) reuses the program, sampling and inverting;
    the result equals the form with the conditions fixed in ``model_fn`` (which compiles again)."""
    model = Traced()
    guided = dpmjax.classifier_free_guidance(model, guidance_scale=3.0)
    prompt, other, null = jnp.full(X.shape, 1.0), jnp.full(X.shape, -2.0), jnp.zeros(X.shape)
    dpmjax.sample(guided, X, Forward(), 6, cond=(prompt, null)).sample.block_until_ready()
    dpmjax.invert(guided, X, Forward(), 6, cond=(prompt, null)).sample.block_until_ready()
    traces = model.traces
    with compilations() as count:
        sampled = dpmjax.sample(guided, X, Forward(), 6, cond=(other, null)).sample
        inverted = dpmjax.invert(guided, X, Forward(), 6, cond=(other, null)).sample
    assert count[0] == 0 and model.traces == traces, (count[0], model.traces - traces)
    fixed = dpmjax.classifier_free_guidance(model, other, null, 3.0)
    np.testing.assert_allclose(sampled, dpmjax.sample(fixed, X, Forward(), 6).sample, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(inverted, dpmjax.invert(fixed, X, Forward(), 6).sample, rtol=1e-6, atol=1e-6)


def test_guidance_takes_both_conditions_or_neither_and_a_scale():
    with pytest.raises(ValueError, match="cond and uncond together"):
        dpmjax.classifier_free_guidance(Traced(), jnp.ones(2), guidance_scale=3.0)
    with pytest.raises(ValueError, match="guidance_scale must be a"):
        dpmjax.classifier_free_guidance(Traced())

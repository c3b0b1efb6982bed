"""The edit methods' settings objects (``dpmjax.models.flax_sd.edit_methods``): ``edit_images(method=)``
takes a method's name or its object; each object is frozen, hashable and checks its fields when built;
the keywords they replaced (``exact``, exact inversion's fields, ``null_text_steps``, ``optimizer``,
``solver_order``) raise a ``TypeError`` that gives the new call; and the settings reach the inversion.
No pipeline is needed: the checks run before anything is loaded, and the pass-through tests stop the
call at the inversion (tests/test_flax_sd_edit.py runs real edits)."""

from __future__ import annotations

import dataclasses
import inspect
import re

import numpy as np
import optax
import pytest

import dpmjax
from dpmjax.checks import rejects_keywords
from dpmjax.models import flax_sd
from dpmjax.models.flax_sd import (
    DiffEditEdit,
    METHODS,
    EditMethod,
    ExactEdit,
    NullTextEdit,
    PlainEdit,
    edit_images,
    edit_method,
)
from dpmjax.models.flax_sd import edit as edit_module
from dpmjax.models.flax_sd.edit_methods import REMOVED_KEYWORDS


# ----------------------------------------------------------------------------- the objects
def test_the_names_stand_for_the_objects_with_their_defaults():
    assert METHODS == ("exact", "plain", "null-text", "diffedit")
    assert edit_method("exact") == ExactEdit() == ExactEdit(inversion=dpmjax.ExactInversion())
    assert edit_method("plain") == PlainEdit()
    assert edit_method("null-text") == NullTextEdit() == NullTextEdit(inner_steps=10, optimizer=None)
    assert edit_method("diffedit") == DiffEditEdit() == DiffEditEdit(diffedit=dpmjax.DiffEdit(), seed=0)
    settings = NullTextEdit(inner_steps=3)
    assert edit_method(settings) is settings
    assert [type(edit_method(name)).name for name in METHODS] == list(METHODS)
    assert all(isinstance(edit_method(name), EditMethod) for name in METHODS)


def test_the_fields_are_these():
    assert [f.name for f in dataclasses.fields(ExactEdit)] == ["inversion"]
    assert [f.name for f in dataclasses.fields(PlainEdit)] == []
    assert [f.name for f in dataclasses.fields(NullTextEdit)] == ["inner_steps", "optimizer"]
    assert [f.name for f in dataclasses.fields(DiffEditEdit)] == ["diffedit", "seed"]
    assert [f.name for f in dataclasses.fields(dpmjax.DiffEdit)] == ["strength", "mask_strength", "mask_noisings",
                                                                     "mask_threshold", "inversion", "background"]


@pytest.mark.parametrize("kwargs, message", [
    (dict(diffedit={"strength": 0.5}), "diffedit must be a dpmjax.DiffEdit"),
    (dict(seed=-1), "seed must be an integer in [0, 4294967295]"),
    (dict(seed=2**64), "seed must be an integer in [0, 4294967295]"),
    (dict(seed=1.5), "seed must be an integer in [0, 4294967295]")])
def test_diffedit_s_settings_are_checked_when_built(kwargs, message):
    with pytest.raises(ValueError) as error:
        DiffEditEdit(**kwargs)
    assert message in str(error.value)


@pytest.mark.parametrize("method", ["ddim", "Exact", "null_text", None, 3, PlainEdit, EditMethod()])
def test_an_unknown_method_is_named_with_what_is_allowed(method):
    with pytest.raises(ValueError, match=r"^method must be one of 'exact', 'plain', 'null-text', 'diffedit' or a method's "
                                         r"settings \(ExactEdit, PlainEdit, NullTextEdit, DiffEditEdit\), got "):
        edit_method(method)
    with pytest.raises(ValueError, match="^method must be one of"):  # before anything is loaded
        edit_images(None, {}, None, "a", "b", method=method)


class _Unhashable:
    """An optimiser-like object (callable ``init`` and ``update``) that cannot be hashed."""

    __hash__ = None

    def init(self, params):
        return ()

    def update(self, updates, state, params=None):
        return updates, state


@pytest.mark.parametrize("build, field, allowed", [
    (lambda: ExactEdit(inversion=True), "inversion", r"a dpmjax\.ExactInversion"),
    (lambda: ExactEdit(inversion={"tolerance": 1e-4}), "inversion", r"a dpmjax\.ExactInversion"),
    (lambda: ExactEdit(inversion=None), "inversion", r"a dpmjax\.ExactInversion"),
    (lambda: NullTextEdit(inner_steps=-1), "inner_steps", "an integer >= 0"),
    (lambda: NullTextEdit(inner_steps=2.0), "inner_steps", "an integer >= 0"),
    (lambda: NullTextEdit(inner_steps=True), "inner_steps", "an integer >= 0"),
    (lambda: NullTextEdit(inner_steps="3"), "inner_steps", "an integer >= 0"),
    (lambda: NullTextEdit(optimizer="adam"), "optimizer", r"None \(optax\.adam\(1e-2\)\) or an optax GradientTransformation"),
    (lambda: NullTextEdit(optimizer=optax.adam), "optimizer", r"None \(optax\.adam\(1e-2\)\) or an optax GradientTransformation"),
    (lambda: NullTextEdit(optimizer=_Unhashable()), "optimizer", "hashable"),
    (lambda: NullTextEdit().replace(inner_steps=-3), "inner_steps", "an integer >= 0"),
    (lambda: ExactEdit().replace(inversion=0.1), "inversion", r"a dpmjax\.ExactInversion"),
])
def test_each_bad_field_is_named_with_what_is_allowed(build, field, allowed):
    with pytest.raises(ValueError, match=rf"^{field} must be {allowed}"):
        build()


def test_frozen_hashable_and_equal_whatever_number_types_were_passed():
    adam = optax.adam(1e-3)
    a = NullTextEdit(inner_steps=np.int64(3), optimizer=adam)
    b = NullTextEdit(inner_steps=3, optimizer=adam)
    assert a == b and hash(a) == hash(b) and {a: 1}[b] == 1 and type(a.inner_steps) is int
    assert a != NullTextEdit(inner_steps=4, optimizer=adam) and a != NullTextEdit(inner_steps=3)
    exact = ExactEdit(inversion=dpmjax.ExactInversion(tolerance=1e-4))
    assert hash(exact) == hash(ExactEdit(dpmjax.ExactInversion(tolerance=np.float64(1e-4))))
    assert exact != ExactEdit() and hash(PlainEdit()) == hash(PlainEdit())
    assert len({ExactEdit(), PlainEdit(), NullTextEdit(), ExactEdit(), PlainEdit(), NullTextEdit()}) == 3
    for settings, field, value in [(a, "inner_steps", 5), (exact, "inversion", dpmjax.ExactInversion())]:
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(settings, field, value)
    assert a.replace(inner_steps=5) == NullTextEdit(inner_steps=5, optimizer=adam)


# ----------------------------------------------------------------------------- edit_images
def test_edit_images_takes_at_most_fourteen_parameters_and_these():
    parameters = inspect.signature(edit_images).parameters
    assert len(parameters) <= 14
    assert list(parameters) == ["pipeline_or_parts", "params", "images", "source_prompt", "target_prompt", "method",
                                "num_inference_steps", "guidance_scale", "scheduler_config", "negative_prompt",
                                "inversion_guidance_scale", "reconstruct", "progress"]
    assert not set(REMOVED_KEYWORDS) & set(parameters)
    assert flax_sd.edit_images is edit_images


@pytest.mark.parametrize("given, written", [
    ({"exact": dpmjax.ExactInversion(tolerance=1e-3, max_sweeps=2)},
     "method=ExactEdit(inversion=dpmjax.ExactInversion(tolerance=0.001, max_sweeps=2))"),
    ({"exact": dpmjax.ExactInversion()}, "method=ExactEdit()"),
    ({"exact": None}, "method=ExactEdit()"),
    ({"exact": True}, "method=ExactEdit()"),
    ({"exact": False}, "method='plain'"),
    ({"tolerance": 1e-4}, "method=ExactEdit(inversion=dpmjax.ExactInversion(tolerance=0.0001))"),
    ({"max_sweeps": 2}, "method=ExactEdit(inversion=dpmjax.ExactInversion(max_sweeps=2))"),
    ({"max_iterations": 5}, "method=ExactEdit(inversion=dpmjax.ExactInversion(max_iterations=5))"),
    ({"gmres_restart": 7}, "method=ExactEdit(inversion=dpmjax.ExactInversion(gmres_restart=7))"),
    ({"gmres_maxiter": 2}, "method=ExactEdit(inversion=dpmjax.ExactInversion(gmres_maxiter=2))"),
    ({"independent_rows": False}, "method=ExactEdit(inversion=dpmjax.ExactInversion(independent_rows=False))"),
    ({"null_text_steps": 3}, "method=NullTextEdit(inner_steps=3)"),
    ({"optimizer": optax.adam(1e-3)}, "method=NullTextEdit(optimizer=optimizer)"),
    ({"null_text_steps": 3, "optimizer": None}, "method=NullTextEdit(inner_steps=3, optimizer=None)"),
    ({"solver_order": 3}, "scheduler_config={'solver_order': 3}"),
])
def test_each_removed_keyword_gives_the_new_call(given, written):
    with pytest.raises(TypeError) as raised:
        edit_images(None, {}, None, "a", "b", method="null-text", **given)
    message = str(raised.value)
    assert message.startswith(f"edit_images() no longer takes {', '.join(given)}: "), message
    assert f"Pass {written} instead; see the migration guide." in message, message
    for name in ("ExactEdit", "NullTextEdit"):
        assert (f"={name}(" in written) == (f"import {name}" in message or f", {name}" in message), message


def test_every_removed_keyword_is_covered_and_all_are_named_together():
    # the keywords edit_images took before the method objects: a fixed, historical list (fields added to
    # ExactInversion since, such as finish_apart, were never keywords of edit_images)
    exact_fields = {"tolerance", "max_iterations", "max_sweeps", "gmres_restart", "gmres_maxiter",
                    "independent_rows"}
    assert set(REMOVED_KEYWORDS) == {"exact", "null_text_steps", "optimizer", "solver_order", *exact_fields}
    assert exact_fields <= set(dataclasses.asdict(dpmjax.ExactInversion())), "each must still have a field to go to"
    with pytest.raises(TypeError) as raised:
        edit_images(None, {}, None, "a", "b", null_text_steps=3, solver_order=1, tolerance=1e-4)
    message = str(raised.value)
    assert message.startswith("edit_images() no longer takes tolerance, null_text_steps, solver_order: "), message
    assert ("Pass method=ExactEdit(inversion=dpmjax.ExactInversion(tolerance=0.0001)) and "
            "method=NullTextEdit(inner_steps=3) and scheduler_config={'solver_order': 1} instead") in message, message
    assert "from dpmjax.models.flax_sd import ExactEdit, NullTextEdit" in message, message


def test_the_mechanism_is_shared_and_keeps_the_signature():
    @rejects_keywords(("old", "older"), lambda name, given: f"{name}: {sorted(given.items())}")
    def call(x, *, new=1):
        """Doc."""
        return x + new

    assert call(1, new=2) == 3 and call.__doc__ == "Doc." and list(inspect.signature(call).parameters) == ["x", "new"]
    with pytest.raises(TypeError, match=re.escape("call: [('old', 1), ('older', 2)]")):
        call(1, older=2, old=1)
    assert inspect.signature(edit_images) == inspect.signature(edit_images.__wrapped__)


class _Stopped(Exception):
    pass


@pytest.mark.parametrize("method, inversion", [
    ("exact", dpmjax.ExactInversion()), (ExactEdit(), dpmjax.ExactInversion()),
    (ExactEdit(dpmjax.ExactInversion(tolerance=1e-3, max_sweeps=2)), dpmjax.ExactInversion(tolerance=1e-3, max_sweeps=2)),
    ("plain", False), (PlainEdit(), False),
])
def test_the_exact_settings_reach_invert(monkeypatch, method, inversion):
    """What edit_images hands invert as ``exact=``; the order in scheduler_config reaches the sampler."""
    seen = {}

    def recording(model, latents, scheduler, **kwargs):
        seen.update(exact=kwargs["exact"], order=scheduler.config.solver_order)
        raise _Stopped

    _stub_pipeline(monkeypatch)
    monkeypatch.setattr(edit_module, "invert", recording)
    with pytest.raises(_Stopped):
        edit_images(_PARTS, _PARAMS, np.zeros((1, 8, 8, 3), np.float32), "a", "b", method=method,
                    scheduler_config={"solver_order": 3})
    assert seen == {"exact": inversion, "order": 3}


@pytest.mark.parametrize("method, steps, optimizer", [
    ("null-text", 10, None), (NullTextEdit(inner_steps=3), 3, None), (NullTextEdit(optimizer=optax.sgd(0.1)), 10, "sgd")])
def test_the_null_text_settings_reach_the_inversion(monkeypatch, method, steps, optimizer):
    seen = {}

    def recording(model, latents, scheduler, **kwargs):
        seen.update(inner_steps=kwargs["inner_steps"], optimizer=kwargs["optimizer"], order=scheduler.config.solver_order)
        raise _Stopped

    _stub_pipeline(monkeypatch)
    monkeypatch.setattr(edit_module, "null_text_inversion", recording)
    with pytest.raises(_Stopped):
        edit_images(_PARTS, _PARAMS, np.zeros((1, 8, 8, 3), np.float32), "a", "b", method=method)
    assert seen["inner_steps"] == steps and seen["order"] == 2, seen
    assert seen["optimizer"] is (None if optimizer is None else method.optimizer)


# a stand-in pipeline: the VAE and text encoder are replaced by stubs that return arrays of the right shapes
class _Config:
    block_out_channels = (1, 1)
    scaling_factor = 1.0


class _Vae:
    config = _Config()


_PARTS = flax_sd.EditParts(tokenizer=None, text_encoder=None, vae=_Vae(), unet=None)
_PARAMS = {"text_encoder": None, "vae": None, "unet": None}


def _stub_pipeline(monkeypatch):
    import jax.numpy as jnp

    monkeypatch.setattr(edit_module, "embed_prompts", lambda tokenizer, encoder, params, prompts: jnp.zeros((len(prompts), 2, 4)))
    monkeypatch.setattr(edit_module, "_encoder", lambda vae: lambda params, pixels: jnp.zeros((pixels.shape[0], 4, 4, 4)))

"""Every Python block of the README and the documentation runs, as written, somewhere in the tests.

Each block is one of (an HTML comment on the line before the fence says which; the site hides it):

* **run here** (no comment): the block runs as it is, the page's blocks in order in one namespace;
* ``<!-- stand-ins: a, b -->``: it runs here with those names defined first by stand-ins from what
  ships with dpmjax (:func:`stand_ins`): the digits MLP for a Stable Diffusion UNet, its label
  embeddings for text embeddings, held-out digits for latents, a folder holding Stable Diffusion
  1.5's scheduler config for a model folder, the exact model of Gaussian data for a model of any
  shape;
* ``<!-- tested in tests/FILE -->``: that test runs the block as written (the file reads the page);
* ``<!-- excerpt of tests/FILE -->``: an excerpt (a Flax Stable Diffusion pipeline, a call that
  raises on purpose, a long training run); that file makes each dpmjax call the block makes.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import jax
import pytest

import dpmjax
from dpmjax.models import flax_sd

from test_config import SD15_SCHEDULER  # Stable Diffusion 1.5's scheduler_config.json

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "docs" / "guides").glob("*.md"))]
# the rows the stand-in latents hold (the blocks run whatever the batch; two keep the suite short)
ROWS = 2
FENCE = re.compile(r"(?:<!-- (?P<marker>[^>]*?) -->\n)?```python\n(?P<code>.*?)```", re.S)


def blocks(page: Path) -> list:
    """``(line, kind, detail, code)`` of each Python block of ``page``: ``kind`` is ``"run"``,
    ``"stand-ins"`` (``detail``: the names), ``"tested"`` or ``"excerpt"`` (``detail``: the file)."""
    text = page.read_text()
    found = []
    for match in FENCE.finditer(text):
        line = text[:match.start("code")].count("\n")
        marker = (match.group("marker") or "").strip()
        if not marker:
            found.append((line, "run", None, match.group("code")))
        elif marker.startswith("stand-ins:"):
            found.append((line, "stand-ins", [n.strip() for n in marker[len("stand-ins:"):].split(",")], match.group("code")))
        elif marker.startswith("tested in "):
            found.append((line, "tested", marker[len("tested in "):], match.group("code")))
        elif marker.startswith("excerpt of "):
            found.append((line, "excerpt", marker[len("excerpt of "):], match.group("code")))
        else:
            found.append((line, "unknown", marker, match.group("code")))
    return found


ALL = [(page, *block) for page in PAGES for block in blocks(page)]


def _name(page: Path) -> str:
    return str(page.relative_to(ROOT))


def test_every_block_is_run_here_tested_elsewhere_or_an_excerpt_of_a_test():
    kinds = {}
    for page, line, kind, detail, _ in ALL:
        assert kind != "unknown", f"{_name(page)}:{line}: unknown marker {detail!r}"
        kinds[kind] = kinds.get(kind, 0) + 1
    assert len(ALL) >= 29 and set(kinds) == {"run", "stand-ins", "tested", "excerpt"}, kinds


def _called(code: str) -> set:
    """The dpmjax functions and classes a block calls (``dpmjax.invert(``, ``edit_images(``, ...)."""
    public = set(dpmjax.__all__) | set(flax_sd.__all__)
    return {name for name in re.findall(r"\b([A-Za-z_]\w*)\(", code) if name in public}


@pytest.mark.parametrize("page, line, kind, detail, code",
                         [b for b in ALL if b[2] in ("tested", "excerpt")],
                         ids=[f"{_name(b[0])}:{b[1]}" for b in ALL if b[2] in ("tested", "excerpt")])
def test_a_block_run_elsewhere_names_a_test_that_runs_it(page, line, kind, detail, code):
    test = ROOT / detail
    assert test.is_file() and test.parent.name == "tests", f"{_name(page)}:{line}: {detail} is no test file"
    text = test.read_text()
    if kind == "tested":  # the test reads the page and runs its block
        assert page.name in text and "exec(" in text, f"{detail} does not run {_name(page)}'s blocks"
        return
    missing = sorted(name for name in _called(code) if name not in text)
    assert not missing, f"{_name(page)}:{line}: {detail} never calls {missing}"


# ----------------------------------------------------------------------------- stand-ins
def stand_ins(folder: Path) -> dict:
    """What the documentation's blocks assume the reader has, from what ships with dpmjax."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from dpmjax.models import digits
    from dpmjax.models.analytic import Gaussian, timestep_model

    model = digits.load("mlp")
    images, labels = digits.heldout()
    x, labels = jnp.asarray(images[:ROWS]), jnp.asarray(labels[:ROWS])
    null = jnp.full_like(labels, digits.NULL_LABEL)
    model_dir = folder / "stable-diffusion-v1-5"
    (model_dir / "scheduler").mkdir(parents=True, exist_ok=True)
    (model_dir / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD15_SCHEDULER))
    unguided = digits.unguided_model()
    lu = dpmjax.DPMSolverMultistepScheduler(use_lu_lambdas=True, final_sigmas_type="sigma_min")
    key = jax.random.PRNGKey(0)
    any_shape = timestep_model(Gaussian(), dpmjax.SchedulerConfig.from_dict(SD15_SCHEDULER))
    return {
        "jax": jax, "jnp": jnp, "np": np, "optax": optax, "dpmjax": dpmjax,
        "model_dir": str(model_dir), "stable-diffusion-v1-5": str(model_dir),
        # a conditional UNet: model(x, t, embeddings), and the embeddings of the labels
        "unet_apply": model.conditional, "model": unguided, "unet": model.net, "params": model.params,
        "text_embeddings": model.embed(labels), "null_embeddings": model.embed(null),
        "target_embeddings": model.embed((labels + 1) % 10),
        "text_emb": model.embed(labels), "null_emb": model.embed(null), "edited_emb": model.embed((labels + 1) % 10),
        "latents": x, "images": x, "x": x, "target": x, "labels": labels,
        "local_latents": x, "global_shape": x.shape,
        "noise": jax.random.normal(key, x.shape), "v": jax.random.normal(jax.random.PRNGKey(1), x.shape),
        "w": jax.random.normal(jax.random.PRNGKey(2), x.shape),
        "fwd": lu, "unet_with_guidance": unguided,
        # model_fn: any shape (the exact model of Gaussian data) where a block makes SD-sized latents,
        # the digits model elsewhere
        "model_fn": any_shape,
    }


# per page, stand-ins that differ from the defaults above
PAGE_STAND_INS = {
    "docs/guides/exact-inversion.md": lambda s: {"model_fn": s["model"]},
    "docs/guides/batch-job.md": lambda s: {"model_fn": s["unet_apply_labels"]},
    "docs/guides/null-text.md": lambda s: {"model": s["unet_apply"]},
}


def _getting_started(scope):
    import numpy as np

    assert bool(np.all(scope["inv"].converged)), scope["inv"].round_trip  # "every row True"
    assert float(np.max(np.abs(np.asarray(scope["back"]) - np.asarray(scope["images"])))) < 1e-5  # "below 1e-5"


# what a page's comments promise about its results, checked after its blocks ran
PAGE_CLAIMS = {"docs/getting-started.md": _getting_started}


def _runnable_pages():
    pages = {}
    for page, line, kind, detail, code in ALL:
        if kind in ("run", "stand-ins"):
            pages.setdefault(page, []).append((line, kind, detail, code))
    return pages


RUNNABLE = _runnable_pages()


@pytest.mark.slow
@pytest.mark.parametrize("page", list(RUNNABLE), ids=[_name(p) for p in RUNNABLE])
def test_the_page_s_blocks_run_as_written(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # files a block writes (a saved scheduler) land here
    given = stand_ins(tmp_path)
    given["unet_apply_labels"] = lambda x, t, labels: given["unet_apply"](x, t, labels)
    given.update(PAGE_STAND_INS.get(_name(page), lambda s: {})(given))
    scope: dict = {}
    for line, kind, names, code in RUNNABLE[page]:
        if kind == "stand-ins":
            missing = [n for n in names if n not in given]
            assert not missing, f"{_name(page)}:{line}: no stand-in for {missing}"
            scope.update({n: given[n] for n in names})
        with contextlib.redirect_stdout(io.StringIO()):
            try:
                exec(compile(code, f"{_name(page)}:{line}", "exec"), scope)
            except Exception as error:  # noqa: BLE001 - the page and line in the failure
                raise AssertionError(f"{_name(page)}:{line}: {type(error).__name__}: {error}") from error
    PAGE_CLAIMS.get(_name(page), lambda scope: None)(scope)
    jax.clear_caches()  # each page's programs are its own: measured, keeping them slowed the next pages' compiles

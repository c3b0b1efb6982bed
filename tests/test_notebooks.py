"""The notebooks run top to bottom (small settings, so they cannot rot) and are kept without outputs;
with ``DPMJAX_EXECUTED_NOTEBOOKS=DIR`` the executed copies are written to ``DIR/notebooks/`` for the
documentation site to render (CI sets it)."""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from test_flax_compat import old_diffusers  # noqa: F401  (the fixture)
from test_flax_sd_pipelines import old_transformers  # noqa: F401  (the fixture)

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


def test_there_are_the_six_notebooks_and_they_are_stripped():
    assert [p.name for p in NOTEBOOKS] == ["01_quickstart.ipynb", "02_inversion.ipynb", "03_null_text.ipynb",
                                           "04_flax_stable_diffusion.ipynb", "05_differentiable_sampling.ipynb",
                                           "06_diffedit.ipynb"]
    for path in NOTEBOOKS:
        book = nbformat.read(path, as_version=4)
        for cell in book.cells:
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: outputs must be stripped"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_top_to_bottom(path, old_diffusers, request, tmp_path, monkeypatch):  # noqa: F811
    if "stable_diffusion" in path.name:  # the Flax pipeline needs diffusers < 0.40 and transformers < 5, installed beside
        old_transformers = request.getfixturevalue("old_transformers")  # noqa: F811
        monkeypatch.setenv("PYTHONPATH", os.pathsep.join([old_diffusers, old_transformers, os.environ.get("PYTHONPATH", "")]))
        monkeypatch.delenv("DPMJAX_SD_PIPELINE", raising=False)
        monkeypatch.delenv("DPMJAX_SD_IMAGE", raising=False)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.delenv("UNET_DIR", raising=False)
    book = nbformat.read(path, as_version=4)
    NotebookClient(book, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    errors = [o for cell in book.cells if cell.cell_type == "code" for o in cell.outputs if o.output_type == "error"]
    assert not errors
    text = "".join(o.get("text", "") for cell in book.cells if cell.cell_type == "code" for o in cell.outputs)
    assert "Traceback" not in text
    executed = os.environ.get("DPMJAX_EXECUTED_NOTEBOOKS")
    if executed:  # the documentation site renders this run's outputs (docs/_hooks/results.py)
        target = Path(executed) / "notebooks" / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary = target.with_name(target.name + ".tmp")
        nbformat.write(book, str(temporary))
        os.replace(temporary, target)

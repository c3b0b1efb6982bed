"""MkDocs hooks for the dpmjax site (loaded by mkdocs.yml; not a page).

* Files outside ``docs/`` become part of the site as they are: the notebooks (``notebooks/*.ipynb``,
  rendered by mkdocs-jupyter without executing them; with their outputs where the test run wrote
  executed copies to ``$DPMJAX_EXECUTED_NOTEBOOKS``, as CI does) and the measured results
  (``benchmarks/results/*``: images and raw JSON, linked from the benchmark pages). Nothing is copied
  into ``docs/``, so the site always shows the files the benchmarks last wrote.
* A line ``[[results: FILE TABLE]]`` in a page is replaced by a Markdown table rendered from
  ``benchmarks/results/FILE`` (a JSON file a benchmark wrote), in the format the benchmark itself
  prints, so no measured number is copied by hand. An unknown file or table fails the build.

* Sphinx roles left in docstrings (``:class:`~dpmjax.SchedulerConfig```, ``:func:`sample```) are
  shown as code and linked where the object is documented on the site (an optional cross-reference:
  no warning where it is not).

Text results (``*.md``, ``*.txt``) are included with pymdownx.snippets (``--8<--``) instead.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

from mkdocs.plugins import event_priority
from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
NOTEBOOKS = ROOT / "notebooks"
MARKER = re.compile(r"^\[\[results: (\S+) (\S+)\]\]$", re.M)
ROLE = re.compile(r":(?:class|func|meth|mod|attr|data|obj|exc):<code>(~?)([\w.]+)</code>")


@event_priority(100)  # before mkdocs-jupyter's on_files, so that it renders the notebooks added here
def on_files(files, config):
    for folder, pattern in ((NOTEBOOKS, "*.ipynb"), (RESULTS, "*")):
        for path in sorted(folder.glob(pattern)):
            if path.is_file() and path.suffix != ".md":  # the .md results are included into pages instead
                root = _executed_root(path) or ROOT
                files.append(File(path.relative_to(ROOT).as_posix(), str(root), config["site_dir"],
                                  config["use_directory_urls"]))
    return files


def _executed_root(path: Path):
    """Where an executed copy of the notebook ``path`` lies (``$DPMJAX_EXECUTED_NOTEBOOKS/notebooks/``,
    written by tests/test_notebooks.py when that variable is set): the site renders its outputs. None
    for other files, or when there is no copy (the stored notebook, without outputs, is rendered)."""
    executed = os.environ.get("DPMJAX_EXECUTED_NOTEBOOKS")
    if path.suffix != ".ipynb" or not executed or not (Path(executed) / "notebooks" / path.name).is_file():
        return None
    return Path(executed)


def on_page_markdown(markdown, page, config, files):
    return MARKER.sub(lambda m: render(m.group(1), m.group(2)), markdown)


def on_page_content(html, page, config, files):
    def link(match):
        short, target = match.groups()
        shown = target.rsplit(".", 1)[-1] if short else target.lstrip(".")
        return f'<autoref identifier="{target.lstrip(".")}" optional><code>{shown}</code></autoref>'
    return ROLE.sub(link, html)


def render(name: str, table: str) -> str:
    data = json.loads((RESULTS / name).read_text())
    try:
        return TABLES[name, table](data)
    except KeyError as error:
        raise ValueError(f"{name}: no table {table!r} (known: {sorted(TABLES)})") from error


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    return "\n".join(lines)


def pair(values):
    return f"{values[0]:.1f} / {values[1]:.1f}"


def shape(values):
    return "x".join(map(str, values))


def cpu_per_step(data):  # python -m benchmarks, section 1
    return table(
        ["shape", "order", "diffusers loop", "dpmjax step loop (Python)", "step in a user's scan", "dpmjax invert (scan)",
         "invert unroll=10", "floor scan", "diffusers / invert", "diffusers / user scan", "invert / floor"],
        [[shape(r["shape"]), r["order"], pair(r["diffusers"]), pair(r["step_loop"]), pair(r["user_scan"]),
          pair(r["invert"]), pair(r["invert_unroll10"]), pair(r["floor"]),
          f"{r['diffusers'][0] / r['invert'][0]:.0f}x", f"{r['diffusers'][0] / r['user_scan'][0]:.0f}x",
          f"{r['invert'][0] / r['floor'][0]:.1f}x"] for r in data["rows"]])


def cpu_compile(data):  # section 2
    return table(["steps", "compile seconds"], [[r["steps"], f"{r['seconds']:.2f}"] for r in data["compile"]])


def cpu_gradient(data):  # section 3
    return table(["steps", "checkpoint", "seconds per grad (best / median)", "compiled temp memory"],
                 [[r["steps"], r["checkpoint"], f"{r['seconds'][0]:.3f} / {r['seconds'][1]:.3f}",
                   f"{r['temp_bytes'] / 2**20:.1f} MiB"] for r in data["gradient"]])


def cpu_dtypes(data):  # section 4
    return table(["dtype", "us per step (best / median)"], [[r["dtype"], pair(r["invert"])] for r in data["dtypes"]])


def cpu_conv_model(data):  # section 5
    return table(["order", "model alone (scan)", "invert with the model", "scheduler share"],
                 [[r["order"], pair(r["model_alone"]), pair(r["invert"]), f"{100 * r['scheduler_share']:.0f}%"]
                  for r in data["conv_model"]])


def flax_loop(variant):  # python -m benchmarks.flax_loop (section 6 of python -m benchmarks)
    def render_variant(data):
        rows = [r for r in data["rows"] if r["returns"] == variant]
        orders = sorted({r["order"] for r in rows})
        shapes = list(dict.fromkeys(shape(r["shape"]) for r in rows))
        cell = {(shape(r["shape"]), r["order"]): f"{r['dpmjax']['median']:.1f} / {r['diffusers_0_39']['median']:.1f}"
                for r in rows}
        return table(["shape"] + [f"order {o}" for o in orders], [[s] + [cell[s, o] for o in orders] for s in shapes])
    return render_variant


def scaling_devices(data):  # python -m benchmarks.scaling
    first = data["results"][0]["rows_per_second"]
    return table(["devices", "processes", "rows/s", "vs 1 device", "memory per device (MiB)"],
                 [[r["devices"], r["processes"], f"{r['rows_per_second']:.0f}", f"{r['rows_per_second'] / first:.2f}x",
                   "n/a" if r["bytes_per_device"] is None else f"{r['bytes_per_device'] / 2**20:.1f}"]
                  for r in data["results"]])


def scaling_job(data):
    first = data["job"][0]["steady_rows_per_second"]
    rows = []
    for r in data["job"]:
        steady = r["steady_rows_per_second"]
        ratio = steady / first if steady is not None and first else float("nan")
        rows.append([r["devices"], r["processes"], f"{r['seconds']:.1f}", f"{r['rows_per_second']:.0f}"]
                    + ([f"{steady:.0f}", f"{ratio:.2f}x"] if math.isfinite(ratio) else ["n/a", "n/a"]))
    return table(["devices", "processes", "seconds", "rows/s", "steady rows/s", "vs 1 device (steady)"], rows)


def flax_sd_inversion(data):  # python tests/flax_sd_check.py OUT (under diffusers 0.39)
    inversion = data["inversion"]
    rows = []
    for key in (k for k in inversion if k.startswith("w=")):
        r = inversion[key]
        rows.append([key[2:], f"{r['plain']:.1f}", f"{r['exact']:.1f}", f"{r['null-text']:.1f}" if "null-text" in r else "—"])
    return table(["w", "plain", "exact", "null-text"], rows)


TABLES = {
    ("cpu.json", "per_step"): cpu_per_step,
    ("cpu.json", "compile"): cpu_compile,
    ("cpu.json", "gradient"): cpu_gradient,
    ("cpu.json", "dtypes"): cpu_dtypes,
    ("cpu.json", "conv_model"): cpu_conv_model,
    ("cpu-flax_loop.json", "latents"): flax_loop("latents"),
    ("cpu-flax_loop.json", "state"): flax_loop("state"),
    ("scaling.json", "devices"): scaling_devices,
    ("scaling.json", "job"): scaling_job,
    ("flax_sd.json", "inversion"): flax_sd_inversion,
}

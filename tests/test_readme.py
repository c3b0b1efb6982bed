"""The README's claims: its Quickstart holds exactly two commands and CI runs the second one; the
docs repeat them unchanged; its tables and numbers are the measured ones; its links resolve."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"


def section(text, heading):
    return text.split(heading, 1)[1].split("\n## ", 1)[0]


def quickstart_commands(path=README, heading="## Quickstart"):
    block = re.search(r"```bash\n(.*?)```", section(path.read_text(), heading), re.S).group(1)
    return [line.strip() for line in block.splitlines() if line.strip()]


def markdown_tables(text):
    """Each Markdown table of ``text`` as (the line before it, its rows)."""
    tables, lines = [], text.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].startswith("|") and i + 1 < len(lines) and lines[i + 1].startswith("|---"):
            j = i
            while j < len(lines) and lines[j].startswith("|"):
                j += 1
            before = next((line for line in reversed(lines[:i]) if line.strip()), "")
            tables.append((before, lines[i:j]))
            i = j
        else:
            i += 1
    return tables


def slug(heading):
    """Python-Markdown's default toc slug (what MkDocs and GitHub anchors use for these headings)."""
    text = re.sub(r"[^\w\s-]", "", heading.strip().lower())
    return re.sub(r"[-\s]+", "-", text).strip("-")


def test_quickstart_has_two_commands_and_ci_runs_the_test_one():
    commands = quickstart_commands()
    assert len(commands) == 2
    assert commands[0].startswith("pip install .") and commands[0].endswith("dpmjax")
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert commands[1] in [line.strip() for line in ci]


def test_getting_started_repeats_the_quickstart_unchanged():
    assert quickstart_commands(DOCS / "getting-started.md") == quickstart_commands()


def table_cells(rows):
    """A Markdown table's rows (header and separator included) as lists of stripped cells."""
    return [[cell.strip() for cell in row.strip().strip("|").split("|")] for row in rows]


def test_analytic_demo_table_is_labelled_with_its_command_and_is_its_output():
    demo = [(before, rows) for before, rows in markdown_tables(README.read_text()) if rows[0].startswith("| order | N=10")]
    assert len(demo) == 1
    before, rows = demo[0]
    assert "`dpmjax demo`" in before, "the table names the command that printed it"
    output = [rows for _, rows in markdown_tables((ROOT / "benchmarks" / "results" / "demo.txt").read_text())]
    assert len(output) == 1, "benchmarks/results/demo.txt holds one table"
    assert table_cells(rows) == table_cells(output[0])
    numerics = section((DOCS / "numerics.md").read_text(), "## The analytic demo")
    assert "`dpmjax demo`" in numerics
    assert '--8<-- "benchmarks/results/demo.txt"' in numerics, "the numerics page includes the output file"


def test_ground_truth_table_is_the_benchmark_output():
    ground_truth = section((DOCS / "numerics.md").read_text(), "## Ground truth")
    assert "python -m benchmarks.convergence_orders > benchmarks/results/convergence_orders.md" in ground_truth
    assert '--8<-- "benchmarks/results/convergence_orders.md"' in ground_truth
    output = markdown_tables((ROOT / "benchmarks" / "results" / "convergence_orders.md").read_text())
    assert len(output) == 1 and table_cells(output[0][1])[0][-1] == "observed order"


def test_default_job_numbers_are_those_of_its_output():
    table = {}
    for line in (ROOT / "benchmarks" / "results" / "digits_job.txt").read_text().splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 6 and cells[0].isdigit():
            table[cells[0], cells[1]] = cells
    claim = next(line for line in section(README.read_text(), "## Measured").split("\n* ") if "default `dpmjax` job" in line)
    _, _, plain, exact, rows, _ = table["25", "1"]
    assert f"plain {plain}, exact {exact} ({rows.split('/')[0]} of {rows.split('/')[1]} rows exact)" in " ".join(claim.split())
    assert f"null-text inversion reaches {table['25', '7.5'][5]}" in " ".join(claim.split())


def test_links_resolve_to_files_and_headings():
    docs = DOCS.resolve()
    for doc in [README, *DOCS.rglob("*.md")]:
        for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text()):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            file = (doc.parent / path).resolve() if path else doc
            if not file.exists() and file.is_relative_to(docs):
                # the site adds the notebooks and benchmarks/results from outside docs/ (docs/_hooks)
                file = ROOT / file.relative_to(docs)
            assert file.exists(), f"{doc.relative_to(ROOT)} links to {target}, which does not exist"
            if anchor and file.suffix == ".md":
                headings = [slug(h) for h in re.findall(r"^#+ (.*)$", file.read_text(), re.M)]
                assert anchor in headings, f"{doc.relative_to(ROOT)} links to {target}: no such heading"

"""The README's first command: the built-in demo job, run small."""

from __future__ import annotations

import subprocess
import sys

import pytest

from dpmjax.apps import cli
from dpmjax.apps.demo import roundtrip_errors


def test_demo_prints_the_table_and_writes_a_png(tmp_path, capsys):
    out = tmp_path / "demo.png"
    assert cli.main(["demo", "--data", "gaussian", "--orders", "1", "2", "--steps", "10", "40", "--batch", "256", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| order | N=10 | N=40 |" in printed and printed.count("\n| ") >= 3
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_round_trip_error_falls_with_steps_on_gaussian_data():
    errors = roundtrip_errors("gaussian", orders=(1, 2), steps=(10, 40), batch=512)
    for order in (1, 2):
        assert errors[(order, 40)][1] < errors[(order, 10)][1] / 2
        assert errors[(order, 40)][0] <= errors[(order, 40)][1]
    assert errors[(2, 40)][1] < errors[(1, 40)][1]


def test_module_entry_point_and_bad_arguments(tmp_path):
    done = subprocess.run([sys.executable, "-m", "dpmjax", "--orders", "4"], capture_output=True, text=True)
    assert done.returncode == 2 and "--orders" in done.stderr
    done = subprocess.run([sys.executable, "-m", "dpmjax", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "demo" in done.stdout


def test_an_unknown_command_is_named_in_one_line(capsys):
    assert cli.main(["bogus", "--steps", "5"]) == 2
    assert capsys.readouterr().err.strip() == "dpmjax: error: unknown command 'bogus' (commands: digits, demo, invert-batch, edit)"


@pytest.mark.parametrize("command", ["digits", "demo", "invert-batch", "edit"])
def test_each_command_help_describes_it_in_whole_sentences(command, capsys, monkeypatch):
    """The description (the paragraph after the usage) is complete, not a docstring's first line cut mid-sentence."""
    monkeypatch.setenv("COLUMNS", "100")
    with pytest.raises(SystemExit) as exited:
        cli.main([command, "--help"])
    assert exited.value.code == 0
    description = " ".join(capsys.readouterr().out.split("\n\n")[1].split())
    assert description.endswith("."), description
    assert len(description) > 60, description


@pytest.mark.parametrize("args, named, not_named", [
    (["--steps", "0", "5"], "--steps must be >= 1 (got 0 5)", "--batch"),
    (["--batch", "0"], "--batch must be >= 1 (got 0)", "--steps"),
    (["--orders", "4", "--batch", "-1"], "--orders: 4 is not a solver order", "--steps"),
])
def test_demo_argument_errors_are_one_line_naming_the_bad_option(args, named, not_named, capsys):
    assert cli.main(["demo", *args]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("dpmjax demo: error: "), err
    assert named in err and not_named not in err and "usage" not in err, err

"""The README's first command: the built-in demo job, run small."""

from __future__ import annotations

import subprocess
import sys

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

"""The sample-and-invert guide's partial-inversion block, run as written: exact inversion of the
grid's last steps samples back to the data, and another label changes the image."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

GUIDE = Path(__file__).parent.parent / "docs" / "guides" / "sample-and-invert.md"


def test_the_guide_s_partial_inversion_block_runs_and_samples_back_to_the_data():
    text = GUIDE.read_text()
    section = text[text.index("## Partial inversion"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    scope = {}
    exec(code, scope)
    x, back, edited, partial, tail = (np.asarray(scope[k]) for k in ("x", "back", "edited", "partial", "tail"))
    assert tail.shape == (16,) and np.all(np.diff(tail) <= 0) and 2.5 < tail[0] < 3.1  # 15 steps, noise first
    assert bool(np.all(scope["partial"].converged)), np.asarray(scope["partial"].round_trip)
    scale = np.maximum(1.0, np.max(np.abs(x).reshape(len(x), -1), axis=1))
    round_trip = np.max(np.abs(back - x).reshape(len(x), -1), axis=1) / scale
    assert np.all(round_trip <= 1e-5 * 1.01), round_trip  # the tolerance, measured again here
    np.testing.assert_allclose(round_trip, np.asarray(scope["partial"].round_trip), rtol=1e-3, atol=1e-7)
    change = np.max(np.abs(edited - x).reshape(len(x), -1), axis=1)
    assert np.all(change > 0.1), change  # another label moves every image

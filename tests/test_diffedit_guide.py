"""The DiffEdit guide's digits block, run as written: outside the mask the input comes back bit for
bit, and most digits become the next one."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import numpy as np

GUIDE = Path(__file__).parent.parent / "docs" / "guides" / "diffedit.md"


def test_the_guide_s_digits_block_runs_as_written():
    text = GUIDE.read_text()
    section = text[text.index("## On the shipped digits model"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    scope, printed = {}, io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(code, scope)
    assert printed.getvalue().splitlines()[0] == "True"
    edit, x = scope["edit"], np.asarray(scope["x"])
    mask = np.asarray(edit.mask)
    assert 0.15 < mask.mean() < 0.4, mask.mean()  # the page says 26% in all
    keep = np.broadcast_to(mask == 0, x.shape)
    np.testing.assert_array_equal(np.asarray(edit.sample)[keep], x[keep])
    from dpmjax.models.digits.common import classify

    predicted = np.asarray(classify(scope["model"].classifier, edit.sample))
    assert np.sum(predicted == np.asarray((scope["labels"] + 1) % 10)) >= 6, predicted  # the page says 7 of 8

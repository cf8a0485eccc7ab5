"""The README's Python example runs as written and its two R_V numbers agree."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


@pytest.mark.slow
def test_readme_python_example_runs_and_agrees_with_the_engine(capsys) -> None:
    code = re.search(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S).group(1)
    exec(compile(code, str(README), "exec"), {})
    printed = capsys.readouterr().out
    values = [float(v) for v in re.findall(r"\d+\.\d+", printed)]
    assert len(values) == 2 and 0 < values[0] < 5
    np.testing.assert_allclose(values[0], values[1], rtol=1e-3)  # the tensor prints 4 decimals

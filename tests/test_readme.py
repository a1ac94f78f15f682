"""The README's Python blocks run verbatim, as a user pastes them into a plain script (grad mode on)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def _param(index: int, code: str):
    needs_model = "load(" in code or "pretrained=" in code
    marks = [pytest.mark.slow] if needs_model else []
    if "lm_eval" in code:
        marks.append(pytest.mark.skipif(not _has("lm_eval"), reason="needs the eval extra"))
    return pytest.param(code, id=f"block{index}-line{_line_of(code)}", marks=marks)


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _line_of(code: str) -> int:
    return README.read_text()[: README.read_text().index(code)].count("\n") + 1


def test_the_readme_has_python_blocks():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("code", [_param(i, c) for i, c in enumerate(BLOCKS)])
def test_readme_block_runs_as_written(code):
    exec(compile(code, f"README.md:{_line_of(code)}", "exec"), {"__name__": "__readme__"})

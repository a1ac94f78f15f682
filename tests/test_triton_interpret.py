"""The Triton kernel under ``TRITON_INTERPRET=1`` (CPU tensors), checked by the tolerance rule.

Triton decides interpret-vs-compile when a ``@triton.jit`` function is defined, i.e. when our kernel
module is first imported, so setting the variable inside this process would be too late or would leak
into other tests. All interpreted cases therefore run in ONE subprocess with TRITON_INTERPRET=1: this
module saves the inputs, the subprocess runs ``block_sparse_attention(..., impl="triton")`` and
saves the outputs, and each case is then checked here. Shapes are tiny (the interpreter is ~200x
slower); the whole module takes well under a minute.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from attention_cases import Case, build, case_id, check_attention, params
from test_key_bias import key_bias

from sparse_llm.kernels import merge_attention

pytestmark = [
    pytest.mark.interpret,
    pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton"),
]

TINY = Case(tq=33, tk=70, hq=2, hkv=1, d=64, block_q=16, block_k=16)
CASES = [
    TINY,
    TINY.but(tq=1, tk=45, mask="causal"),  # decode
    TINY.but(hq=4, hkv=2, mask_heads="q", d=48, dtype="bfloat16"),  # D padded to 64
    TINY.but(mask="empty_rows", b=2, left_pad=(0, 21), mask_batch=1),
    TINY.but(mask="causal", window=19, dtype="bfloat16"),
    TINY.but(softcap=10.0, mask="full_rows", hq=2, hkv=2),
    TINY.but(block_q=64, block_k=128, tq=40, tk=150, mask="sink", d=128),  # sub-tiles; tiles past Tq exit
    TINY.but(block_q=4, block_k=8, mask="single", hq=3, hkv=1),  # blocks below the 16-wide tile
    TINY.but(mask_heads="1", transposed=True, dtype="float16", causal=False),
    TINY.but(window=25, mask_window=False, d=256, tk=40),
    TINY.but(key_rule=True, mask="full_rows", b=2, left_pad=(0, 21)),  # sinks + per-query window starts
    TINY.but(key_rule=True, mask="causal", mask_heads="q", hq=4, hkv=2, dtype="bfloat16"),
    TINY.but(tq=48, tk=64, block_q=16, block_k=32, mask="causal"),  # Tk, D on the tile grid: unmasked loads
]
# key_bias [B or 1, Hkv, Tk] (test_key_bias.key_bias: log run lengths, -inf keys and a -inf block)
BIAS_CASES = [
    TINY,
    TINY.but(tq=1, tk=45, mask="causal"),
    TINY.but(softcap=10.0, mask="empty_rows", hq=2, hkv=2),
    TINY.but(key_rule=True, mask="full_rows", b=2, left_pad=(0, 21), dtype="bfloat16"),
    TINY.but(tq=48, tk=64, block_q=16, block_k=32, mask="causal", b=2),  # batch-1 bias broadcast
]
# Launcher-only options: decode split across programs (empty splits included), and the
# half-precision branch (upcast=False) run in fp32, see test_half_precision_branch_in_fp32.
DIRECT = {
    "split-decode": (TINY.but(tq=1, tk=150, hq=4, hkv=2), dict(splits=4)),
    "split-tq5": (TINY.but(tq=5, tk=150, mask="sink", b=2, left_pad=(0, 17)), dict(splits=3)),
    "split-many": (TINY.but(tq=1, tk=45, mask="single"), dict(splits=7)),  # most splits empty
    "native-gqa-hflayout": (TINY.but(hq=4, hkv=2, transposed=True, mask="causal"), dict(upcast=False)),
    "native-split-softcap": (TINY.but(tq=3, tk=90, softcap=10.0), dict(upcast=False, splits=2)),
    "native-rule-pad": (TINY.but(key_rule=True, mask="full_rows", b=2, left_pad=(0, 21)), dict(upcast=False)),
}

RUNNER = """
import sys, torch
from sparse_llm.kernels import block_sparse_attention
from sparse_llm.kernels.triton_attention import triton_block_sparse_attention
cases = torch.load(sys.argv[1], weights_only=False)
results = {}
for key, (q, k, v, mask, kwargs, direct) in cases.items():
    if direct is None:
        results[key] = block_sparse_attention(q, k, v, mask, return_lse=True, impl="triton", **kwargs)
    else:
        results[key] = triton_block_sparse_attention(q, k, v, mask, **kwargs, **direct)
torch.save(results, sys.argv[2])
"""


def _with_bias(case):
    q, k, v, mask, kwargs = build(case)
    kwargs["key_bias"] = key_bias(case, batch=1 if case.b == 2 and not case.left_pad else None)
    return q, k, v, mask, kwargs


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory) -> dict:
    """Every case in ``CASES`` plus the two halves of a split mask, run in one interpreted subprocess."""
    folder = tmp_path_factory.mktemp("triton_interpret")
    inputs = {case_id(c): build(c) for c in CASES}
    inputs.update({"bias-" + case_id(c): _with_bias(c) for c in BIAS_CASES})
    inputs.update({key: (*build(case), extra) for key, (case, extra) in DIRECT.items()})
    q, k, v, mask, kwargs = build(TINY.but(mask="full_rows"))
    dense = mask.to_dense()
    side = torch.rand(dense.shape, generator=torch.Generator().manual_seed(3)) < 0.5
    geo = dict(block_q=mask.block_q, block_k=mask.block_k, q_len=mask.q_len, kv_len=mask.kv_len)
    from sparse_llm.kernels import BlockMask

    inputs["split-a"] = (q, k, v, BlockMask.from_dense(dense & side, **geo), kwargs)
    inputs["split-b"] = (q, k, v, BlockMask.from_dense(dense & ~side, **geo), kwargs)
    inputs["split-union"] = (q, k, v, mask, kwargs)
    torch.save(
        {key: val if len(val) == 6 else (*val, None) for key, val in inputs.items()}, folder / "inputs.pt"
    )
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(root)}
    proc = subprocess.run(
        [sys.executable, "-c", RUNNER, str(folder / "inputs.pt"), str(folder / "outputs.pt")],
        env=env,
        cwd=root,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"interpreted run failed:\n{proc.stderr[-4000:]}"
    return {"inputs": inputs, "outputs": torch.load(folder / "outputs.pt", weights_only=False)}


@pytest.mark.parametrize("case", params(CASES))
def test_interpreted_triton_matches_reference(case, interpreted):
    key = case_id(case)
    out, lse = interpreted["outputs"][key]
    check_attention(out, lse, *interpreted["inputs"][key])


def test_interpreted_split_masks_merge_to_union(interpreted):
    (out_a, lse_a), (out_b, lse_b) = interpreted["outputs"]["split-a"], interpreted["outputs"]["split-b"]
    out, lse = merge_attention(out_a, lse_a, out_b, lse_b)
    check_attention(out, lse, *interpreted["inputs"]["split-union"])
    union_out, union_lse = interpreted["outputs"]["split-union"]
    check_attention(union_out, union_lse, *interpreted["inputs"]["split-union"])


@pytest.mark.parametrize("case", params(BIAS_CASES))
def test_interpreted_triton_with_key_bias_matches_reference(case, interpreted):
    key = "bias-" + case_id(case)
    out, lse = interpreted["outputs"][key]
    check_attention(out, lse, *interpreted["inputs"][key])


@pytest.mark.parametrize("key", [k for k in DIRECT if k.startswith("split")])
def test_interpreted_decode_splits_merge_to_reference(key, interpreted):
    out, lse = interpreted["outputs"][key]
    check_attention(out, lse, *interpreted["inputs"][key][:5])


@pytest.mark.parametrize("key", [k for k in DIRECT if k.startswith("native")])
def test_half_precision_branch_in_fp32(key, interpreted):
    """The branch bf16/fp16 inputs take on GPU (UPCAST=False: operands not upcast, default dot
    precision, p cast to V's dtype, the output stored in the input dtype by the kernel with no torch
    cast; split rows in fp32), run here on fp32 inputs so the interpreter's arithmetic is right: its
    shapes, strides, pointer offsets, masks and stores are checked against the reference.

    Unverified until a GPU runs the ``cuda`` tests: bf16/fp16 rounding in the tensor-core dots and in
    p.to(bf16), the store's round-to-nearest, and the sm_90 lowering's numerics (that it compiles
    for sm_90 is checked by test_triton_sm90_compile.py)."""
    q, k, v, mask, kwargs, direct = interpreted["inputs"][key]
    assert q.dtype == torch.float32 and direct["upcast"] is False
    out, lse = interpreted["outputs"][key]
    check_attention(out, lse, q, k, v, mask, kwargs)

"""What only a GPU can check (marker ``cuda``, skipped without one; ``scripts/gpu_bench.sh`` runs them):
the Triton kernel's half-precision branch in real bf16/fp16 with key_bias, decode splits and tile-grid
lengths (unmasked loads), compiled FlexAttention (``impl="flex"``), and a launch on a second GPU.
Every case is checked by the tolerance rule of ``attention_cases.py``.
"""

from __future__ import annotations

import pytest
import torch
from attention_cases import BASE, GRID, Case, build, check_attention, params
from test_key_bias import key_bias

from sparse_llm.kernels import block_sparse_attention

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

LONG = Case(tq=4096, tk=4096, hq=4, hkv=1, d=64, block_q=128, block_k=128, mask="random", dtype="bfloat16")
TRITON_CASES = [
    LONG,  # on the tile grid: full tiles load unmasked
    LONG.but(d=128, mask="causal", hq=8, hkv=2),
    LONG.but(d=256, mask="sink", dtype="float16"),
    LONG.but(tq=1, mask="random"),  # decode: the key tiles split across programs
    LONG.but(tq=1, tk=8000, mask="sink", b=2, left_pad=(0, 300)),
    LONG.but(tq=1000, tk=4000, block_q=64, block_k=64, window=700, mask="causal", transposed=True),
]
FLEX_CASES = [
    BASE.but(dtype="bfloat16", block_q=64, block_k=64),
    BASE.but(dtype="bfloat16", softcap=30.0, block_q=64, block_k=64, mask_heads="q"),
    BASE.but(
        dtype="bfloat16", key_rule=True, mask="full_rows", b=2, left_pad=(0, 29), block_q=64, block_k=64
    ),
    BASE.but(dtype="bfloat16", tq=1, block_q=64, block_k=64),  # decode: flex's decoding kernel
    LONG,
]


@pytest.mark.parametrize("case", params(TRITON_CASES))
def test_triton_half_precision_on_cuda(case):
    q, k, v, mask, kwargs = build(case, "cuda")
    out, lse = block_sparse_attention(q, k, v, mask, return_lse=True, impl="triton", **kwargs)
    check_attention(out, lse, q, k, v, mask, kwargs)


@pytest.mark.parametrize("case", params([LONG, *[c for c in GRID if c.dtype != "float32"][:4]]))
def test_triton_key_bias_on_cuda(case):
    q, k, v, mask, kwargs = build(case, "cuda")
    kwargs["key_bias"] = key_bias(case).to("cuda")
    out, lse = block_sparse_attention(q, k, v, mask, return_lse=True, impl="triton", **kwargs)
    check_attention(out, lse, q, k, v, mask, kwargs)


@pytest.mark.parametrize("case", params(FLEX_CASES))
def test_compiled_flex_on_cuda(case):
    q, k, v, mask, kwargs = build(case, "cuda")
    kwargs["key_bias"] = key_bias(case).to("cuda", q.dtype)
    out, lse = block_sparse_attention(q, k, v, mask, return_lse=True, impl="flex", **kwargs)
    check_attention(out, lse, q, k, v, mask, kwargs)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_triton_launches_on_the_inputs_gpu():
    q, k, v, mask, kwargs = build(BASE.but(dtype="bfloat16"), "cuda:1")
    out, lse = block_sparse_attention(q, k, v, mask, return_lse=True, impl="triton", **kwargs)
    check_attention(out, lse, q, k, v, mask, kwargs)

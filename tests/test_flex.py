"""``impl="flex"``: PyTorch FlexAttention on our BlockMask, checked by the tolerance rule.

On CPU flex runs eagerly (compiled CPU flex cannot return the LSE): the eager path applies the
``mask_mod`` to every element, so these tests check the element mask, softcap/key_bias score_mod,
GQA, LSE and empty rows. The compiled CUDA kernel's block skipping is checked by the conversion test
(the flex mask's blocks equal ours) and on a GPU by ``-m cuda`` tests.
"""

from __future__ import annotations

import pytest
import torch
from attention_cases import BASE, GRID, build, check_attention, params
from test_key_bias import key_bias

from sparse_llm.kernels import block_sparse_attention
from sparse_llm.kernels.flex import to_flex_block_mask

pytest.importorskip("torch.nn.attention.flex_attention")
pytestmark = pytest.mark.usefixtures("one_thread")

FLEX_GRID = [c for c in GRID if c.tq < 1000]


@pytest.mark.parametrize("case", params(FLEX_GRID))
def test_flex_matches_reference(case):
    q, k, v, mask, kwargs = build(case)
    out, lse = block_sparse_attention(q, k, v, mask, return_lse=True, impl="flex", **kwargs)
    check_attention(out, lse, q, k, v, mask, kwargs)


@pytest.mark.parametrize(
    "case", params([BASE, BASE.but(softcap=30.0, mask="empty_rows"), GRID[0], GRID[-5], GRID[10]])
)
def test_flex_with_key_bias_matches_reference(case):
    q, k, v, mask, kwargs = build(case)
    kwargs["key_bias"] = key_bias(case)
    out, lse = block_sparse_attention(q, k, v, mask, return_lse=True, impl="flex", **kwargs)
    check_attention(out, lse, q, k, v, mask, kwargs)


@pytest.mark.parametrize("case", params([BASE, BASE.but(mask_heads="q"), GRID[10], GRID[-5]]))
def test_flex_block_mask_selects_our_blocks(case):
    q, k, v, mask, kwargs = build(case)
    flex = to_flex_block_mask(mask, num_q_heads=case.hq, causal=case.causal, sliding_window=case.window)
    group = case.hq // mask.shape[1] if mask.shape[1] not in (1, case.hq) else 1
    assert torch.equal(flex.to_dense().bool(), mask.to_dense().repeat_interleave(group, dim=1))
    full = mask.full_kv_num_blocks.repeat_interleave(group, dim=1)
    assert torch.equal(flex.full_kv_num_blocks, full)  # flex skips the element mask on the same blocks


def test_prebuilt_flex_mask_gives_the_same_result():
    """The kernel bench converts the mask once, outside its timing: same result as converting per call."""
    from sparse_llm.kernels.flex import flex_block_sparse_attention

    q, k, v, mask, kwargs = build(BASE.but(mask="sink", window=50))
    converted = to_flex_block_mask(mask, num_q_heads=q.shape[1], sliding_window=50)
    out, lse = flex_block_sparse_attention(q, k, v, mask, flex_mask=converted, **kwargs)
    ref_out, ref_lse = block_sparse_attention(q, k, v, mask, return_lse=True, impl="flex", **kwargs)
    assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)

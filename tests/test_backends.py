"""Selection of the built-in methods, checked on hand-built inputs against obvious expectations."""

from __future__ import annotations

import pytest
import torch

from sparse_llm.backends import LayerCall, get_method
from sparse_llm.kernels import BlockMask


def test_sinks_follow_left_padding():
    mask = BlockMask.sink_window(
        q_len=256,
        kv_len=256,
        block_q=16,
        block_k=16,
        sink_tokens=16,
        local_tokens=32,
        kv_start=torch.tensor([0, 40]),
    )
    dense = mask.to_dense()  # [2, 1, nQ, nK]
    last = dense[:, 0, -1]  # the last query block sees sinks + local window only
    assert last[0].nonzero().flatten().tolist() == [0, 14, 15]  # window: keys 224..255
    assert last[1].nonzero().flatten().tolist() == [2, 3, 14, 15]  # tokens 40..55 span blocks 2-3


def test_streaming_padded_row_keeps_its_first_real_tokens():
    method = get_method("streaming", sink_tokens=16, local_tokens=32, block_size=16)
    q = torch.randn(2, 2, 256, 64)
    k = torch.randn(2, 1, 256, 64)
    padding = torch.ones(2, 256, dtype=torch.bool)
    padding[1, :64] = False
    dense = method.block_mask(q, k, LayerCall(0, 0.125, key_padding_mask=padding)).to_dense()
    assert dense[1, 0, -1, 4] and not dense[1, 0, -1, 0]
    assert dense[0, 0, -1, 0] and not dense[0, 0, -1, 4]


def test_block_topk_finds_the_planted_block_and_respects_the_budget():
    torch.manual_seed(0)
    b, hkv, g, t, d, bs = 1, 2, 2, 512, 64, 32
    q = torch.randn(b, hkv * g, t, d) * 0.1
    k = torch.randn(b, hkv, t, d) * 0.1
    direction = torch.randn(d)
    q[:, :, -bs:] += direction  # the last query block points at ...
    k[:, 0, 5 * bs : 6 * bs] += direction  # ... key block 5 of KV head 0 only
    method = get_method("block_topk", budget=5 * bs, sink_tokens=bs, local_tokens=2 * bs, block_size=bs)
    mask = method.block_mask(q, k, LayerCall(0, d**-0.5))
    last = mask.to_dense()[0, :, -1]  # [Hkv, nK]
    n_k = t // bs
    assert last[0, 5] and last[0, 0] and last[0, n_k - 2 :].all()
    assert last.sum(-1).tolist() == [5, 5]  # budget / block_size blocks per query block
    # query block n reaches n + 1 blocks and keeps min(n + 1, 5) of them
    assert mask.density() == pytest.approx(sum(min(n + 1, 5) for n in range(n_k)) / sum(range(1, n_k + 1)))


def test_block_topk_budget_must_cover_the_forced_blocks():
    with pytest.raises(ValueError, match="must cover sink_tokens"):
        get_method("block_topk", budget=256, sink_tokens=128, local_tokens=512)

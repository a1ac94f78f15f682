"""scripts/shared_mask_oracle.py: the oracle masses behind its claim about query-independent masks."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from sparse_llm.backends.base import LayerCall

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from shared_mask_oracle import OracleDMA, attention_mass  # noqa: E402


@pytest.mark.parametrize("q_len", [150, 70])  # a whole odd-length prompt, and a chunk of it
def test_attention_mass_is_the_causal_softmax_summed_per_block_pair(q_len):
    torch.manual_seed(0)
    b, hkv, g, kv_len, d, bs = 1, 2, 3, 150, 16, 32
    q, k = torch.randn(b, hkv * g, q_len, d), torch.randn(b, hkv, kv_len, d)
    call = LayerCall(0, d**-0.5, softcap=5.0)
    logits = torch.einsum("bhgqd,bhkd->bhgqk", q.view(b, hkv, g, q_len, d), k) * call.scale
    logits = 5.0 * torch.tanh(logits / 5.0)
    pos = torch.arange(q_len) + kv_len - q_len
    probs = logits.masked_fill(torch.arange(kv_len) > pos[:, None], float("-inf")).softmax(-1)
    n_q, n_k = -(-q_len // bs), -(-kv_len // bs)
    padded = F.pad(probs, (0, n_k * bs - kv_len, 0, n_q * bs - q_len))
    expected = padded.view(b, hkv, g, n_q, bs, n_k, bs).sum((2, 4, 6))
    mass = attention_mass(q, k, call, bs)
    torch.testing.assert_close(mass, expected)
    rows = torch.full((n_q,), g * bs, dtype=torch.float32)
    rows[-1] = g * (q_len - (n_q - 1) * bs)
    torch.testing.assert_close(mass.sum(-1)[0, 0], rows)  # every query's weights sum to 1


def test_per_block_oracle_keeps_each_blocks_own_key_block_and_shared_one_ranking():
    """Query block n attends to key block n - 5 alone (planted). With room for one free block, the
    per-block oracle keeps each query block's own; the shared one gives every query block that sees
    the same candidates the same pick, so it misses most of them."""
    bs, n, d = 32, 16, 16
    k = torch.randn(1, 1, n * bs, d) * 0.01
    q = torch.zeros(1, 1, n * bs, d)
    for block in range(8, n):
        k[0, 0, (block - 5) * bs : (block - 4) * bs, block - 8] = 10.0
        q[0, 0, block * bs : (block + 1) * bs, block - 8] = 10.0
    call = LayerCall(0, d**-0.5)
    params = dict(budget=3 * bs, sink_tokens=bs, local_tokens=bs, block_size=bs, dense_tail_blocks=0)
    per_block = OracleDMA(oracle="per_block", **params).block_mask(q, k, k, call).to_dense()[0, 0]
    shared = OracleDMA(oracle="shared", **params).block_mask(q, k, k, call).to_dense()[0, 0]
    for block in range(8, n):
        assert per_block[block, block - 5]
        assert per_block[block].sum() == 3
    free = shared.clone()
    free[:, 0] = False
    free[torch.arange(n), torch.arange(n)] = False
    picks = {int(free[block].nonzero()[0]) for block in range(11, n)}  # each sees every planted block (3-10)
    assert len(picks) == 1
    assert sum(bool(shared[block, block - 5]) for block in range(8, n)) <= 2

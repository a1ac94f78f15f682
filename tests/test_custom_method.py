"""A method written outside the package, through the public API only: ``block_mask`` alone makes a
working method, and ``far_field`` alone adds an approximate part that the shared ``attend`` merges."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from conftest import float64_reference, random_ids, rule_bound, tiny_model

import sparse_llm
from sparse_llm.backends import base
from sparse_llm.backends.streaming import Streaming
from sparse_llm.kernels import BlockMask, block_sparse_attention

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny tensors run faster on one thread

IDS = random_ids(1, 160, seed=7)


@pytest.fixture
def registry(monkeypatch):
    """Methods registered by a test are dropped after it."""
    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


def logits(model, method=None, **params):
    with torch.no_grad():
        if method is None:
            return model(IDS).logits
        with sparse_llm.sparse_attention(model, method, **params):
            return model(IDS).logits


def test_a_method_with_only_block_mask_works_through_sparsify(registry, model):
    @sparse_llm.register_method
    @dataclass
    class FirstAndLast(sparse_llm.SparseMethod):
        """Each query block attends the first key block and its own diagonal block."""

        name = "first_and_last"
        description = "test: first block + diagonal block"

        def block_mask(self, q, k, v, call):
            return BlockMask.sink_window(
                q_len=q.shape[2],
                kv_len=k.shape[2],
                block_q=self.block_size,
                block_k=self.block_size,
                sink_tokens=self.block_size,
                local_tokens=self.block_size,
                device=q.device,
            )

    assert "first_and_last" in sparse_llm.list_methods()
    with sparse_llm.sparse_attention(model, "first_and_last", block_size=16), torch.no_grad():
        ours = model(IDS).logits
        assert sparse_llm.attention_stats(model)["density"] < 0.5
    same = logits(model, "streaming", block_size=16, sink_tokens=16, local_tokens=16)
    assert torch.equal(ours, same)
    assert (ours - logits(model)).abs().max() > 1e-3  # really sparse


def test_a_far_field_is_merged_with_the_exact_part(registry, model):
    """A far field that attends the left-out keys exactly turns a sink + window method into dense."""

    @sparse_llm.register_method
    @dataclass
    class WindowPlusRest(Streaming):
        name = "window_plus_rest"
        description = "test: streaming + the other keys exactly, as a far field"

        def far_field(self, q, k, v, mask, call):
            rest = BlockMask.from_dense(
                ~mask.to_dense(),
                block_q=mask.block_q,
                block_k=mask.block_k,
                q_len=mask.q_len,
                kv_len=mask.kv_len,
            )
            return block_sparse_attention(q, k, v, rest, scale=call.scale, return_lse=True)

    window = dict(block_size=16, sink_tokens=16, local_tokens=16)
    with sparse_llm.sparse_attention(model, "window_plus_rest", **window), torch.no_grad():
        ours = model(IDS).logits
        assert sparse_llm.attention_stats(model)["density"] < 0.5  # the exact part's mask
    with torch.no_grad():
        ref64 = float64_reference(model)(IDS).logits
    assert (ours.double() - ref64).abs().max().item() <= rule_bound(ref64, logits(model))
    assert (logits(model, "streaming", **window) - ours).abs().max() > 1e-3

"""Every method runs in grad mode (a plain script without ``torch.no_grad()``): the same output as
under no_grad, and a clear error only when backward is attempted through the kernel."""

from __future__ import annotations

import pytest
import torch

import sparse_llm
from sparse_llm.kernels import BlockMask, block_sparse_attention
from tests.conftest import random_ids, tiny_model

SEQ = 160


def small_params(name: str) -> dict:
    """The method's own setting that really sparsifies a SEQ-token prompt (dense: block_size 16)."""
    return sparse_llm.get_method(name).small_params or {"block_size": 16}


@pytest.mark.parametrize("name", sorted(sparse_llm.list_methods()))
def test_forward_in_grad_mode_equals_no_grad_and_backward_is_refused(name):
    model = tiny_model("llama")
    ids = random_ids(1, SEQ)
    with torch.no_grad(), sparse_llm.sparse_attention(model, name, **small_params(name)):
        expected = model(ids).logits
    with sparse_llm.sparse_attention(model, name, **small_params(name)):
        logits = model(ids).logits
    torch.testing.assert_close(logits, expected, rtol=0, atol=0)
    if logits.requires_grad:
        with pytest.raises(NotImplementedError, match="has no backward pass"):
            logits.sum().backward()


@pytest.mark.parametrize("impl", ["cpu", "reference"])
def test_kernel_accepts_inputs_that_require_grad(impl):
    torch.manual_seed(0)
    q = torch.randn(1, 2, 100, 32, requires_grad=True)
    k, v = torch.randn(1, 1, 100, 32, requires_grad=True), torch.randn(1, 1, 100, 32, requires_grad=True)
    mask = BlockMask.sink_window(
        q_len=100, kv_len=100, block_q=16, block_k=16, sink_tokens=16, local_tokens=32
    )
    out = block_sparse_attention(q, k, v, mask, impl=impl)
    with torch.no_grad():
        expected = block_sparse_attention(q, k, v, mask, impl=impl)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    if impl == "reference":  # the dense oracle is plain PyTorch: gradients flow
        out.sum().backward()
        assert q.grad is not None and torch.isfinite(q.grad).all()
    else:
        with pytest.raises(NotImplementedError, match="has no backward pass"):
            out.sum().backward()

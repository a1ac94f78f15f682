"""Each transformers-version difference handled in patches/compat.py, checked on both shapes."""

from __future__ import annotations

import torch

from sparse_llm.patches import compat


def test_padding_mask_function_accepts_both_mask_signatures():
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    # transformers 5.17..5.24: q_length/q_offset/kv_offset keywords
    new = compat.padding_mask_function(
        batch_size=2,
        q_length=4,
        kv_length=4,
        q_offset=0,
        kv_offset=0,
        attention_mask=mask,
        dtype=torch.float32,
        config=None,
    )
    # older releases passed cache_position instead of offsets
    old = compat.padding_mask_function(
        batch_size=2, cache_position=torch.arange(4), kv_length=4, attention_mask=mask
    )
    assert torch.equal(new, mask.bool()) and torch.equal(old, mask.bool())


def test_padding_mask_function_drops_unpadded_masks_and_slices_sliding_caches():
    assert (
        compat.padding_mask_function(attention_mask=torch.ones(2, 5, dtype=torch.long), kv_length=5) is None
    )
    assert compat.padding_mask_function(attention_mask=None, kv_length=5) is None
    mask = torch.tensor([[0, 0, 1, 1, 1]])
    assert compat.padding_mask_function(attention_mask=mask, kv_length=4).tolist() == [
        [False, True, True, True]
    ]


def test_cache_kwarg_detects_the_renamed_argument():
    class New(torch.nn.Module):
        def forward(self, input_ids, cache=None):
            return input_ids

    class Old(torch.nn.Module):
        def forward(self, input_ids, past_key_values=None):
            return input_ids

    assert compat.cache_kwarg(New()) == "cache"
    assert compat.cache_kwarg(Old()) == "past_key_values"

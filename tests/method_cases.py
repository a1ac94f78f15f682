"""What the contract and chunked-prefill tests share: every registered method, the tiny model variants
they run on (tests/conftest.py: Hq = 4, Hkv = 2 unless overridden), and each method's sparse setting."""

from __future__ import annotations

import functools

import pytest
from conftest import tiny_model

import sparse_llm
from sparse_llm import SparseMethod

BLOCK = 16
METHODS = [pytest.param(name, id=name) for name in sparse_llm.list_methods()]
# Tiny models: (family, config overrides).
VARIANTS = {
    "llama": ("llama", {}),
    "llama-mqa": ("llama", {"num_key_value_heads": 1}),
    "gemma2": ("gemma2", {}),  # softcap; layer 0 sliding-window (48)
    "gemma3": ("gemma3", {}),  # layers 0-1 sliding-window (48), layer 2 global
    "bitnet": ("bitnet", {}),
}


def method_class(name: str) -> type[SparseMethod]:
    return type(sparse_llm.get_method(name))


def sparse_setting(name: str) -> dict:
    """``small_params``, or for a method that is never sparse (``dense``) its exact setting."""
    cls = method_class(name)
    if cls.small_params is None:
        return {"block_size": BLOCK, **(cls.exact_params or {})}
    return dict(cls.small_params)


@functools.cache
def model_of(variant: str):
    family, overrides = VARIANTS[variant]
    return tiny_model(family, **overrides)

"""Sparse-attention methods, one file each, registered by name on import of this package."""

from sparse_llm.backends import (  # noqa: F401  (registration)
    block_topk,
    deltallm,
    dense,
    dhsa,
    dma,
    lightning,
    lla,
    routing,
    streaming,
)
from sparse_llm.backends.base import LayerCall, SparseMethod, get_method, list_methods, register_method

__all__ = ["LayerCall", "SparseMethod", "get_method", "list_methods", "register_method"]

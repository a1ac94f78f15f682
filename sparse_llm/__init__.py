"""sparse-llm: training-free sparse attention for long-context prefill of Hugging Face causal LMs.

Importing this package has no side effects: nothing is registered with transformers until
:func:`sparsify` is called.
"""

from sparse_llm.api import active_method, attention_stats, prefill, sparse_attention, sparsify, unsparsify
from sparse_llm.backends import ParameterTypeError, SparseMethod, get_method, list_methods, register_method

__version__ = "0.1.0"

__all__ = [
    "ParameterTypeError",
    "SparseMethod",
    "active_method",
    "attention_stats",
    "get_method",
    "list_methods",
    "prefill",
    "register_method",
    "sparse_attention",
    "sparsify",
    "unsparsify",
]

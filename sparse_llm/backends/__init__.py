"""Sparse-attention methods, one file each, registered by name when this package is imported.

Every module of this package that does not start with an underscore and is not one of the shared
modules (``base``, ``selection``) is a method file: adding a method is adding its file.
"""

import importlib
import pkgutil

from sparse_llm.backends.base import (
    LayerCall,
    ParameterTypeError,
    SparseMethod,
    get_method,
    list_methods,
    register_method,
)

_SHARED = {"base", "selection"}
for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    if not _module.startswith("_") and _module not in _SHARED:
        importlib.import_module(f"{__name__}.{_module}")

__all__ = ["LayerCall", "ParameterTypeError", "SparseMethod", "get_method", "list_methods", "register_method"]

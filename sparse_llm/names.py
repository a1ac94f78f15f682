"""Names shared by every layer: the dtype table and the error for an unknown name."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

import torch

# The dtypes the kernels accept, by the names the command line and configs use.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def unknown_name(kind: str, name: object, known: Iterable[str], hint: str | None = None) -> ValueError:
    """The ``ValueError`` for a ``name`` that is not among the ``known`` names of ``kind`` ("method",
    "embedded model"...): close matches first, then every valid name (lm-eval's registry pattern).
    ``hint`` replaces the close matches when the caller knows better."""
    known = list(known)
    if hint is None:
        close = difflib.get_close_matches(str(name), known, n=3)
        hint = f"Did you mean {', '.join(close)}?" if close else ""
    hint = f" {hint}" if hint else ""
    return ValueError(f"unknown {kind} {name!r}.{hint} Known {kind}s: {', '.join(known)}")

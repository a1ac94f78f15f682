"""The model families we patch, and their quirks, in one table read from the config.

Backends never see model classes: softcap and sliding windows reach the attention function as
keyword arguments (Gemma2/Gemma3 pass ``sliding_window`` on their local layers and Gemma2 passes
``softcap``); this table only says which families are supported and which HF implementation is
their exact reference (Gemma2's softcap rules out sdpa, so its reference is eager).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    description: str
    reference_attn: str = "sdpa"


FAMILIES: dict[str, Family] = {
    "llama": Family("Llama 2/3, SmolLM2 and other Llama-architecture models"),
    "gemma2": Family("Gemma 2 (logit softcap, alternating sliding-window layers)", reference_attn="eager"),
    "gemma3_text": Family("Gemma 3 text models (5 sliding-window layers per global layer)"),
    "bitnet": Family("BitNet b1.58 (Llama-like attention with a sub-norm)"),
}


def family_of(model) -> Family:
    """The family of a loaded model; unsupported families raise a NotImplementedError naming ours."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise NotImplementedError(
            f"model type {model_type!r} is not supported; supported families: {', '.join(FAMILIES)}"
        )
    return FAMILIES[model_type]

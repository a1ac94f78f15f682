"""Random-weight models with the exact shapes of real checkpoints, for benchmarks without weights.

Prefill latency and memory depend on the architecture (layers, heads, head dim, MLP width, vocab,
sliding-window layers), not on the weight values, so ``sparse-llm bench --model llama-3.2-1b-shape``
measures a Llama-3.2-1B-sized prefill on a machine that has no hub access. The configurations are
copied from the public ``config.json`` of each model (numbers only); quality cannot be measured on them.
"""

from __future__ import annotations

import logging

import torch

from sparse_llm.names import unknown_name

logger = logging.getLogger(__name__)

_LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 32.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}

SHAPES: dict[str, tuple[str, str, dict]] = {
    "llama-3.2-1b-shape": (
        "meta-llama/Llama-3.2-1B shape (16 layers, 32/8 heads, head dim 64, 128K context), random weights",
        "llama",
        dict(
            vocab_size=128256,
            hidden_size=2048,
            intermediate_size=8192,
            num_hidden_layers=16,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=64,
            max_position_embeddings=131072,
            rope_parameters=_LLAMA3_ROPE,
            tie_word_embeddings=True,
            rms_norm_eps=1e-5,
        ),
    ),
    "gemma2-2b-shape": (
        "google/gemma-2-2b shape (26 layers alternating 4K-window/global, 8/4 heads, head dim 256, "
        "softcap 50), random weights",
        "gemma2",
        dict(
            vocab_size=256000,
            hidden_size=2304,
            intermediate_size=9216,
            num_hidden_layers=26,
            num_attention_heads=8,
            num_key_value_heads=4,
            head_dim=256,
            max_position_embeddings=8192,
            sliding_window=4096,
            attn_logit_softcapping=50.0,
            final_logit_softcapping=30.0,
            query_pre_attn_scalar=256,
        ),
    ),
    "bitnet-2b-shape": (
        "microsoft/bitnet-b1.58-2B-4T shape (30 layers, 20/5 heads, head dim 128, relu2 MLP), "
        "random weights (not ternary-quantized)",
        "bitnet",
        dict(
            vocab_size=128256,
            hidden_size=2560,
            intermediate_size=6912,
            num_hidden_layers=30,
            num_attention_heads=20,
            num_key_value_heads=5,
            head_dim=128,
            max_position_embeddings=4096,
            hidden_act="relu2",
            rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        ),
    ),
}


def list_shapes() -> dict[str, str]:
    """Shape-only model names mapped to one-line descriptions."""
    return {name: description for name, (description, _, _) in SHAPES.items()}


def shape_config(name: str, **overrides):
    """The transformers config of shape ``name`` (``overrides`` replace fields, e.g. fewer layers)."""
    from transformers import AutoConfig

    if name not in SHAPES:
        raise unknown_name("model shape", name, SHAPES)
    _, model_type, fields = SHAPES[name]
    return AutoConfig.for_model(model_type, **{**fields, **overrides})


def build_shape_model(
    name: str,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    **overrides,
):
    """A random-weight model of shape ``name`` in eval mode (seeded: the same weights every time).

    Weights are drawn directly on ``device`` in ``dtype`` (normal, std = the config's
    ``initializer_range``), so a 1B-parameter model builds in seconds without a float32 copy.
    """
    from transformers import AutoModelForCausalLM

    config = shape_config(name, **overrides)
    with torch.device("meta"):
        # transformers picks sdpa where the architecture supports it (eager for Gemma2's softcap)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model = model.to_empty(device=device)
    model.tie_weights()  # to_empty gives every parameter its own storage, untying lm_head from the embedding
    generator = torch.Generator(device=device).manual_seed(seed)
    std = getattr(config, "initializer_range", 0.02)
    with torch.no_grad():
        for pname, param in model.named_parameters():
            if "norm" in pname:  # RMSNorm weights: 1 (Gemma stores 1 + w, so 0 there)
                param.fill_(0.0 if config.model_type.startswith("gemma") else 1.0)
            else:
                param.normal_(0.0, std, generator=generator)
    # Buffers (rotary inverse frequencies) were allocated on meta: rebuild those modules for real.
    for module in list(model.modules()):
        own = dict(module.named_buffers(recurse=False))
        if own and hasattr(module, "config"):
            fresh = type(module)(module.config)
            for key, value in fresh.named_buffers(recurse=False):
                setattr(module, key, value.to(device))
        elif set(own) == {"embed_scale"} and hasattr(module, "scalar_embed_scale"):  # Gemma embeddings
            module.embed_scale = torch.tensor(module.scalar_embed_scale, device=device)
        elif own:
            raise NotImplementedError(f"cannot rebuild the buffers {sorted(own)} of {type(module).__name__}")
    logger.debug("built %s (%.2fB parameters) on %s", name, model.num_parameters() / 1e9, device)
    return model.eval()

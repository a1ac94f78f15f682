"""Tiny random-weight models of every supported family, built from configs (no hub access)."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, BitNetConfig, Gemma2Config, Gemma3TextConfig, LlamaConfig

VOCAB = 128


def _common(**overrides):
    base = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=1024,
        # Larger init than the default 0.02 so that logits are peaked enough for greedy decoding
        # to be decided by the model, not by float rounding.
        initializer_range=0.2,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    base.update(overrides)
    return base


CONFIGS = {
    "llama": lambda: LlamaConfig(**_common()),
    "gemma2": lambda: Gemma2Config(
        **_common(num_hidden_layers=2, query_pre_attn_scalar=64),
        sliding_window=48,
        attn_logit_softcapping=5.0,
        final_logit_softcapping=30.0,
    ),
    "gemma3": lambda: Gemma3TextConfig(
        **_common(num_hidden_layers=3, query_pre_attn_scalar=64),
        sliding_window=48,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
    ),
    "bitnet": lambda: BitNetConfig(**_common(hidden_size=256)),  # its sub-norm needs Hq * D == hidden
}
FAMILIES = list(CONFIGS)


def tiny_model(family: str, attn: str | None = None, dtype=torch.float32, seed: int = 0, **overrides):
    """A tiny random model of ``family`` with the HF reference attention (eager for Gemma2);
    ``overrides`` set fields of the family's config (e.g. ``num_key_value_heads=1`` for MQA)."""
    torch.manual_seed(seed)
    config = CONFIGS[family]()
    for key, value in overrides.items():
        setattr(config, key, value)
    attn = attn or ("eager" if family == "gemma2" else "sdpa")
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=dtype)
    return model.eval()


def float64_reference(model):
    """The same weights in float64 with eager attention: the ground truth for the tolerance rule."""
    ref = copy.deepcopy(model).to(torch.float64)
    ref.set_attn_implementation("eager")
    return ref


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture
def one_thread():
    """One intra-op thread for tiny tensors: they gain nothing from threads, and where cores are
    shared OpenMP's spin-waiting dominates each tiny op. The previous count is restored."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def random_ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=gen)


def rule_bound(ref64: torch.Tensor, pt: torch.Tensor, factor: float = 2.0) -> float:
    """flash-attention's tolerance: ``factor`` x the error of the same-precision reference, plus a floor.

    ``ref64`` is the HF reference in float64, ``pt`` the HF reference in the tested precision; the
    floor is twice the float32 rounding of the reference's magnitude.
    """
    floor = 2 * torch.finfo(torch.float32).eps * ref64.abs().max().item()
    return factor * (pt.double() - ref64).abs().max().item() + floor


@pytest.fixture(scope="module")
def tiny():
    """A tiny random Gemma3 with a tokenizer trained on the NIAH texts (for the eval tests)."""
    from tiny_tokenizer import train_tokenizer

    from sparse_llm.eval.haystack import INTRO, NEEDLES
    from sparse_llm.texts import REPEAT_FILLER

    tokenizer = train_tokenizer(
        [REPEAT_FILLER, INTRO, *(n.text + " " + n.question for n in NEEDLES.values())]
    )
    config = CONFIGS["gemma3"]()  # max_position_embeddings 1024
    config.vocab_size = len(tokenizer)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    return model, tokenizer

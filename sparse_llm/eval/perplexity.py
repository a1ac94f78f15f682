"""Perplexity of a causal LM over a token sequence, with the LM head applied in chunks."""

from __future__ import annotations

import math

import torch


@torch.inference_mode()
def perplexity(model, ids: torch.Tensor, chunk: int = 512) -> tuple[float, float]:
    """(perplexity over every predicted token, over the second half) of ``ids`` ``[1, T]``.

    One forward of the whole sequence (prefill attention, the path a sparse method changes); the LM
    head runs on ``chunk`` positions at a time, since full logits of a 262K vocabulary need GBs.
    The second half is where keys far outside a local window exist.
    """
    hidden = model.model(input_ids=ids).last_hidden_state[0, :-1]
    targets = ids[0, 1:]
    cap = getattr(model.config, "final_logit_softcapping", None)
    nll = torch.empty(targets.shape[0])
    for lo in range(0, targets.shape[0], chunk):
        logits = model.lm_head(hidden[lo : lo + chunk]).float()
        if cap:
            logits = cap * torch.tanh(logits / cap)
        nll[lo : lo + chunk] = torch.nn.functional.cross_entropy(
            logits, targets[lo : lo + chunk], reduction="none"
        )
    half = nll.shape[0] // 2
    return math.exp(nll.mean().item()), math.exp(nll[half:].mean().item())

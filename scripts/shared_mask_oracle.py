"""What one key ranking shared by all queries can reach: `dma`'s perplexity against two oracles.

`dma` (DMA's query-independent mask) ranks key blocks by one score vector per KV head, and every query
block keeps the best of those it can see. This script asks whether a better score could bring it
within reach of dense on long-range language modeling (issue 12's 10 %), by replacing its score with
ones computed from the layer's true attention (oracles: they read the whole attention matrix, which
no prefill can afford), at the same budget, through the same `mask_from_scores`:

* ``shared``: the attention mass all queries give each key block (column sums of the softmax,
  summed per block) -- one ranking per KV head, as DMA's. Keeping a shared set, this ranking keeps
  the most mass summed over all queries.
* ``per_block``: the attention mass each query block gives each key block -- a ranking per query
  block, the query-dependent selection that `block_topk` and the others estimate.

Text, budget and perplexity as in ``scripts/longrange_ppl.py`` (second half of 8192 code tokens).

    python scripts/shared_mask_oracle.py [--text gemma] [--budgets 1024,2048]
        [--out docs/results/dma_shared_oracle_gemma3-270m_8k.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from longrange_ppl import TEXTS, code_text

import sparse_llm
from sparse_llm.backends.dma import DMA
from sparse_llm.eval.perplexity import perplexity
from sparse_llm.models import load
from sparse_llm.results import atomic_write_json, run_metadata

_ROWS = 256  # query rows per softmax chunk: bounds the [G * rows, Tk] probabilities


def attention_mass(q: torch.Tensor, k: torch.Tensor, call, block: int) -> torch.Tensor:
    """The causal softmax attention of every query, summed per (query block, key block) and over the
    GQA group: ``[B, Hkv, nQ, nK]`` fp32."""
    (b, hq, q_len, d), (_, hkv, kv_len, _) = q.shape, k.shape
    g, n_k = hq // hkv, -(-kv_len // block)
    keys = F.pad(k.float(), (0, 0, 0, n_k * block - kv_len)).transpose(-1, -2)
    mass = []
    for lo in range(0, q_len, block):
        pos = torch.arange(lo, min(lo + block, q_len)) + kv_len - q_len
        rows = q[:, :, pos - (kv_len - q_len)].float().reshape(b, hkv, g * pos.numel(), d)
        logits = (rows @ keys) * call.scale
        if call.softcap is not None:
            logits = torch.tanh(logits / call.softcap) * call.softcap
        future = torch.arange(n_k * block)[None, :] > pos.repeat(g)[:, None]
        probs = logits.masked_fill(future, float("-inf")).softmax(-1)
        mass.append(probs.sum(2).view(b, hkv, n_k, block).sum(-1))
    return torch.stack(mass, 2)


@dataclass
class OracleDMA(DMA):
    """`dma` with its key-block scores replaced by an oracle from the true attention (see above)."""

    name = "dma_oracle"
    oracle: str = "shared"

    def block_mask(self, q, k, v, call):
        mass = attention_mass(q, k, call, self.block_size)
        if self.oracle == "shared":
            mass = mass.sum(2, keepdim=True).expand_as(mass)
        return self.mask_from_scores(mass, q, k, call)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--text", choices=sorted(TEXTS), default="gemma")
    parser.add_argument("--budgets", default="1024,2048")
    parser.add_argument("--out", default="docs/results/dma_shared_oracle_gemma3-270m_8k.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_grad_enabled(False)
    model, tokenizer = load("gemma3-270m")
    ids = tokenizer(code_text(args.text), return_tensors="pt").input_ids[:, : args.tokens]
    out = Path(args.out)
    report = json.loads(out.read_text()) if out.exists() else {}
    report.update(
        {
            "model": "gemma3-270m",
            "dtype": "float32",
            "tokens": args.tokens,
            "text": args.text,
            **run_metadata("cpu"),
        }
    )
    rows = report.setdefault("runs", {})
    if "dense" not in rows:
        rows["dense"] = {"perplexity_second_half": perplexity(model, ids)[1], "density": 1.0}
    dense = rows["dense"]["perplexity_second_half"]
    for budget in map(int, args.budgets.split(",")):
        for label in ("dma", "shared", "per_block"):
            method = DMA(budget=budget) if label == "dma" else OracleDMA(budget=budget, oracle=label)
            start = time.perf_counter()
            with sparse_llm.sparse_attention(model, method):
                tail = perplexity(model, ids)[1]
                stats = sparse_llm.attention_stats(model)
            rows[f"{label},budget={budget}"] = {
                "ranking": label,
                "budget": budget,
                "perplexity_second_half": tail,
                "vs_dense": tail / dense,
                "density": stats["density"],
                "far_density": stats["far_density"],
                "seconds": time.perf_counter() - start,
            }
            atomic_write_json(out, report)
            logging.info(
                "%s budget %d: density %.3f + far %.3f, 2nd half %.3f (%.3fx dense)",
                label,
                budget,
                stats["density"],
                stats["far_density"],
                tail,
                tail / dense,
            )


if __name__ == "__main__":
    main()

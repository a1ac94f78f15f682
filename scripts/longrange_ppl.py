"""Long-range language modeling: perplexity on the second half of an 8K-token code text, per method.

The text is the source of Hugging Face modeling files concatenated (``--text gemma``: Llama, then
Gemma 2, then Gemma 3; ``--text qwen``: Qwen2, Mistral, Phi-3, OLMo; from the installed
transformers): later files repeat classes, names and docstrings of earlier ones thousands of tokens
back, so a method that loses far context pays in perplexity. The second text is there so that no
default is tuned to one text. The same ids go through every method; each method's measured density
of the global layers (and that of the far field, which selection methods read by default) is recorded
beside its perplexity (compare at equal density, not at equal nominal budget).

    python scripts/longrange_ppl.py [--tokens 8192] [--text gemma] [--budget-fraction 0.125]
        [--methods dense,xattention] [--method-params JSON]
        [--out docs/results/longrange_ppl_gemma3-270m_8k.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import transformers

import sparse_llm
from sparse_llm.eval.perplexity import perplexity
from sparse_llm.models import load
from sparse_llm.results import atomic_write_json, run_metadata

TEXTS = {
    "gemma": ("llama/modeling_llama.py", "gemma2/modeling_gemma2.py", "gemma3/modeling_gemma3.py"),
    "qwen": (
        "qwen2/modeling_qwen2.py",
        "mistral/modeling_mistral.py",
        "phi3/modeling_phi3.py",
        "olmo/modeling_olmo.py",
    ),
}
SELECTION = "dense,streaming,block_topk,dma,routing,dhsa,xattention,flexprefill"


def code_text(text: str = "gemma") -> str:
    root = Path(transformers.__file__).parent / "models"
    return "\n\n".join((root / name).read_text() for name in TEXTS[text])


def method_params(name: str, budget: int, extra: dict) -> dict:
    """The budget for budgeted methods; streaming's window spends the same tokens (sink 64)."""
    have = set(sparse_llm.get_method(name).params())
    params = {"budget": budget} if "budget" in have else {}
    if name == "streaming":
        params = {"sink_tokens": 64, "local_tokens": budget - 64}
    return {**params, **extra.get(name, {})}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--text", choices=sorted(TEXTS), default="gemma")
    parser.add_argument("--budget-fraction", type=float, default=0.125)
    parser.add_argument("--methods", default=SELECTION)
    parser.add_argument(
        "--method-params", default="{}", help='JSON per method, e.g. \'{"dhsa": {"dense_tail_blocks": 0}}\''
    )
    parser.add_argument("--out", default="docs/results/longrange_ppl_gemma3-270m_8k.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    extra = json.loads(args.method_params)
    budget = int(args.tokens * args.budget_fraction)

    model, tokenizer = load("gemma3-270m")
    ids = tokenizer(code_text(args.text), return_tensors="pt").input_ids[:, : args.tokens]
    if ids.shape[1] < args.tokens:
        raise ValueError(f"the code text gave only {ids.shape[1]} tokens")
    out = Path(args.out)
    report = json.loads(out.read_text()) if out.exists() else {}
    report.update(
        {
            "model": "gemma3-270m",
            "dtype": "float32",
            "tokens": args.tokens,
            "budget": budget,
            "text": {"transformers": transformers.__version__, "files": list(TEXTS[args.text])},
            **run_metadata("cpu"),
        }
    )
    report.setdefault("methods", {})
    for name in args.methods.split(","):
        params = method_params(name, budget, extra) if name != "dense" else {}
        key = name + "".join(f",{k}={v}" for k, v in sorted(params.items()) if k != "budget")
        start = time.perf_counter()
        with sparse_llm.sparse_attention(model, name, **params):
            ppl, ppl_tail = perplexity(model, ids)
            stats = sparse_llm.attention_stats(model)
        density, far_density = stats["density"], stats["far_density"]
        report["methods"][key] = {
            "method": name,
            "params": params,
            "perplexity": ppl,
            "perplexity_second_half": ppl_tail,
            "density": density,
            "far_density": far_density,
            "seconds": time.perf_counter() - start,
        }
        atomic_write_json(out, report)
        logging.info(
            "%s: density %.3f + far %.3f, ppl %.3f (second half %.3f)",
            key,
            density,
            far_density,
            ppl,
            ppl_tail,
        )

    dense = report["methods"].get("dense", {}).get("perplexity_second_half")
    print(f"\nGemma3-270M, {args.tokens} tokens of code, budget {budget}\n")
    print("| method | density | far density | ppl | ppl, 2nd half | vs dense |\n|---|---|---|---|---|---|")
    for key, row in report["methods"].items():
        ratio = f"{row['perplexity_second_half'] / dense:.3f}" if dense else "-"
        nums = (row["density"], row.get("far_density", 0.0), row["perplexity"], row["perplexity_second_half"])
        cells = (key, *(f"{x:.3f}" for x in nums))
        print("| " + " | ".join((*cells, ratio)) + " |")


if __name__ == "__main__":
    main()

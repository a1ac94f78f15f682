"""The rate of ATen's fused CPU attention op by the shape of one call's items: what a tile costs.

The CPU kernel (``sparse_llm/kernels/cpu.py``) hands ATen's ``_scaled_dot_product_flash_attention_for_cpu``
batches of items, each R query rows over L keys (R = 64 positions x the 4 query heads of a KV group
for a per-KV-head mask, 64 for a per-query-head one). This times items of R rows x L keys for several
R at a fixed total of query rows (so every row count does the same work), fp32, head dim 256, with
and without an additive mask broadcast over the rows, and reports GFLOP/s (4 R L D flops per item).
All shapes of one thread count run in interleaved rounds; medians.

    python scripts/fused_op_tiles.py --out docs/results/fused_op_tiles_cpu_....json
"""

from __future__ import annotations

import argparse
import statistics

import torch

from sparse_llm.bench.kernel import time_interleaved
from sparse_llm.results import atomic_write_json, run_metadata


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="64,128,256,512,768,1024,2048")
    parser.add_argument("--keys", type=int, default=1024)
    parser.add_argument("--total-rows", type=int, default=2**17)
    parser.add_argument("--head-dim", type=int, default=256)
    parser.add_argument("--threads", default=f"{torch.get_num_threads()},1")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    d, length = args.head_dim, args.keys
    gen = torch.Generator().manual_seed(0)
    calls = {}
    for r in map(int, args.rows.split(",")):
        n = args.total_rows // r
        q, k, v = (torch.randn(n, 1, t, d, generator=gen) for t in (r, length, length))
        mask = torch.zeros(n, 1, 1, length)
        mask[..., length // 2 :: 7] = float("-inf")  # some masked keys, as a partial block has
        calls[r, False] = lambda q=q, k=k, v=v: op(q, k, v)
        calls[r, True] = lambda q=q, k=k, v=v, m=mask: op(q, k, v, attn_mask=m)
    rows = []
    for threads in map(int, args.threads.split(",")):
        torch.set_num_threads(threads)
        times = time_interleaved(calls, args.rounds, torch.device("cpu"))
        for (r, masked), ts in times.items():
            seconds = statistics.median(ts)
            gflops = 4 * args.total_rows * length * d / seconds / 1e9
            rows.append({"threads": threads, "rows": r, "keys": length, "mask": masked, "gflops": gflops})
            print(f"threads {threads}  rows {r:5d}  keys {length}  mask {masked!s:5}  {gflops:6.1f} GFLOP/s")
    what = f"ATen fused CPU attention, items of R rows x {length} keys, D={d}, fp32, medians of {args.rounds}"
    atomic_write_json(args.out, {"what": what, "rows": rows, **run_metadata(torch.device("cpu"))})


if __name__ == "__main__":
    main()

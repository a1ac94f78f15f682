"""``sparse-llm bench kernel``: the block-sparse kernel alone against the ideal 1/density speedup.

For each length and target density, one mask per pattern: ``window`` (a sink block + a local window,
the contiguous case) and ``random`` (per query block, random reachable blocks plus the diagonal, the
scattered case of the selection methods). Each is timed with our kernel, and compared with our own
kernel on the full causal mask (``dense``: what the ideal 1/density speedup is relative to), PyTorch
SDPA (causal; the flash backend on CUDA half precision) and, optionally, compiled FlexAttention on
the same BlockMask. Inputs are random, fp32 by default, batch 1, bottom-right causal, Tq = Tk.
Warm-up (and compilation) is untimed; the device is synchronized around every timed call; the
median of ``repeats`` runs is reported.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from sparse_llm.kernels import BlockMask, block_sparse_attention
from sparse_llm.measure import synchronize
from sparse_llm.names import DTYPES
from sparse_llm.results import atomic_write_json, run_metadata

if TYPE_CHECKING:
    from torch.nn.attention.flex_attention import BlockMask as FlexBlockMask

logger = logging.getLogger(__name__)

PATTERNS = ("window", "random")


@dataclass
class KernelBenchConfig:
    """Shapes default to a Gemma3-270M global layer (4 query heads, 1 KV head, head dim 256)."""

    lengths: tuple[int, ...] = (8192,)
    densities: tuple[float, ...] = (0.1, 0.25, 0.5, 0.75, 1.0)
    patterns: tuple[str, ...] = PATTERNS
    q_heads: int = 4
    kv_heads: int = 1
    head_dim: int = 256
    block_size: int = 64
    dtype: str = "float32"
    device: str = "cpu"
    repeats: int = 5
    flex: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if any(not 0 < d <= 1 for d in self.densities):
            raise ValueError(f"densities must be in (0, 1], got {self.densities}")
        if unknown := set(self.patterns) - set(PATTERNS):
            raise ValueError(f"unknown patterns {sorted(unknown)}; allowed: {PATTERNS}")
        if self.q_heads % self.kv_heads:
            raise ValueError(f"q_heads ({self.q_heads}) must be a multiple of kv_heads ({self.kv_heads})")
        if self.repeats < 1 or any(n < self.block_size for n in self.lengths):
            raise ValueError("repeats must be >= 1 and every length at least one block")


def window_mask(length: int, block: int, density: float, device) -> BlockMask:
    """Sink (one block) + local window, the window width chosen so the density is nearest the target."""

    def make(width: int) -> BlockMask:
        return BlockMask.sink_window(
            q_len=length,
            kv_len=length,
            block_q=block,
            block_k=block,
            sink_tokens=block,
            local_tokens=width,
            device=device,
        )

    lo, hi = block, -(-length // block) * block  # density grows with the width: bisect on blocks
    while hi - lo > block:
        mid = (lo + hi) // 2 // block * block
        lo, hi = (mid, hi) if make(mid).density() < density else (lo, mid)
    return min((make(lo), make(hi)), key=lambda m: abs(m.density() - density))


def random_mask(length: int, block: int, density: float, device, seed: int = 0) -> BlockMask:
    """Per query block the diagonal block plus random reachable blocks, ``density`` of them in all."""
    mask = BlockMask.causal(q_len=length, kv_len=length, block_q=block, block_k=block, device=device)
    reach = mask.reachable()
    gen = torch.Generator(device="cpu").manual_seed(seed)
    scores = torch.rand(reach.shape, generator=gen).to(device)
    scores += torch.eye(*reach.shape, device=device) * 2  # the diagonal always wins
    keep = (reach.sum(-1, keepdim=True) * density).round().clamp_min(1)
    rank = scores.masked_fill(~reach, -1).argsort(-1, descending=True).argsort(-1)
    picked = (rank < keep) & reach
    return BlockMask.from_dense(picked[None, None], block_q=block, block_k=block, q_len=length, kv_len=length)


def _time(fn: Callable[[], object], repeats: int, device) -> list[float]:
    fn()  # warm-up (and compilation), untimed
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def _ours(q, k, v, mask: BlockMask):
    return lambda: block_sparse_attention(q, k, v, mask)


def _sdpa(q, k, v):
    def run():
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def flash():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return run()

        return flash
    return run


def to_flex_block_mask(mask: BlockMask) -> FlexBlockMask:
    """Our ``BlockMask`` as PyTorch FlexAttention's, for timing ``flex_attention`` on the same blocks.

    The layout is the same (per query-block row a count ``kv_num_blocks [B, H, nQ]`` and indices
    ``kv_indices [B, H, nQ, maxK]``, plus the optional full-block pair); flex wants the index rows
    padded to ``nK`` entries, which is done here (entries past the count are ignored). Partial blocks
    get a bottom-right causal ``mask_mod`` (queries are the last ``q_len`` of ``kv_len`` positions),
    so the result matches :func:`sparse_llm.kernels.block_sparse_attention` with ``causal=True``.
    """
    from torch.nn.attention.flex_attention import BlockMask as FlexBlockMask

    n_k, offset = mask.num_kv_blocks, mask.kv_len - mask.q_len

    def causal(b, h, q_idx, kv_idx):
        return kv_idx <= q_idx + offset

    def pad(idx):
        return F.pad(idx, (0, n_k - idx.shape[-1]))

    return FlexBlockMask.from_kv_blocks(
        mask.kv_num_blocks,
        pad(mask.kv_indices),
        mask.full_kv_num_blocks,
        pad(mask.full_kv_indices),
        BLOCK_SIZE=(mask.block_q, mask.block_k),
        mask_mod=causal,
        seq_lengths=(mask.q_len, mask.kv_len),
    )


def _flex(q, k, v, mask: BlockMask):
    from torch.nn.attention.flex_attention import flex_attention

    flex_mask = to_flex_block_mask(mask)
    compiled = torch.compile(flex_attention, dynamic=False)
    return lambda: compiled(q, k, v, block_mask=flex_mask, enable_gqa=True)


def _row(config, length, pattern, mask, name, times, dense_s) -> dict:
    median = statistics.median(times)
    density = mask.density() if mask is not None else 1.0
    # Attended (query, key) pairs of the causal triangle, times heads: 4 flops each (QK^T and PV).
    flops = 4 * config.q_heads * config.head_dim * density * length * (length + 1) / 2
    return {
        "length": length,
        "pattern": pattern,
        "impl": name,
        "density": density,
        "median_ms": median * 1e3,
        "spread_ms": (max(times) - min(times)) * 1e3,
        "speedup_vs_dense": dense_s / median,
        "ideal": 1 / density,
        "fraction_of_ideal": dense_s / median * density,
        "tflops": flops / median / 1e12,
    }


def run_kernel_bench(config: KernelBenchConfig, out=None, progress: bool = False) -> dict:
    """Time every (length, pattern, density); returns (and writes to ``out``) a JSON-able report."""
    from tqdm.auto import tqdm

    device, dtype = torch.device(config.device), DTYPES[config.dtype]
    rows = []
    gen = torch.Generator(device="cpu").manual_seed(config.seed)
    cells = [(n, p, d) for n in config.lengths for p in config.patterns for d in config.densities]
    bar = tqdm(total=len(cells) + len(config.lengths), desc="kernel", disable=not progress)
    for length in config.lengths:
        shapes = ((config.q_heads, length), (config.kv_heads, length), (config.kv_heads, length))
        q, k, v = (torch.randn(1, h, t, config.head_dim, generator=gen).to(device, dtype) for h, t in shapes)
        dense = BlockMask.causal(
            q_len=length, kv_len=length, block_q=config.block_size, block_k=config.block_size, device=device
        )
        dense_times = _time(_ours(q, k, v, dense), config.repeats, device)
        dense_s = statistics.median(dense_times)
        rows.append(_row(config, length, "causal", dense, "ours", dense_times, dense_s))
        sdpa_times = _time(_sdpa(q, k, v), config.repeats, device)
        rows.append(_row(config, length, "causal", None, "sdpa", sdpa_times, dense_s))
        bar.update()
        for pattern in config.patterns:
            for density in config.densities:
                make = window_mask if pattern == "window" else random_mask
                mask = make(length, config.block_size, density, device)
                impls = {"ours": _ours(q, k, v, mask)}
                if config.flex:
                    impls["flex"] = _flex(q, k, v, mask)
                for name, fn in impls.items():
                    rows.append(
                        _row(config, length, pattern, mask, name, _time(fn, config.repeats, device), dense_s)
                    )
                bar.update()
    bar.close()
    report = {"config": asdict(config), **run_metadata(device), "results": rows}
    if out is not None:
        atomic_write_json(out, report)
    return report


def kernel_markdown(rows: list[dict]) -> str:
    lines = [
        "| length | pattern | impl | density | ms (median) | speedup vs our dense | ideal | % of ideal |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['length']} | {r['pattern']} | {r['impl']} | {r['density']:.3f} | {r['median_ms']:.1f} "
            f"| {r['speedup_vs_dense']:.2f}x | {r['ideal']:.2f}x | {r['fraction_of_ideal']:.0%} |"
        )
    return "\n".join(lines)

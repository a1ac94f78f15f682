"""``sparse-llm bench kernel``: the block-sparse kernel alone against the ideal 1/density speedup.

For each length and target density, one mask per pattern: ``window`` (a sink block + a local window,
the contiguous case), ``random`` (per query block, random reachable blocks plus the diagonal, the
scattered case of the selection methods) and the ``neighborhood`` method's patterns (``NEIGHBORHOODS``:
strided and blocked windows on the block grid, GNA's perfectly block-sparse case, and sliding,
strided and blocked + halo windows off it, whose cut blocks are partial). Each is timed with our
kernel, and compared with our own kernel on the full causal mask (``dense``: what the ideal
1/density speedup is relative to), PyTorch SDPA (causal; the flash backend on CUDA half precision)
and, optionally, FlexAttention on the same BlockMask (``impl="flex"``, compiled on CUDA). Inputs
are random, fp32 by default, batch 1, bottom-right causal, Tq = Tk. Warm-up (and compilation) is
untimed; the device is synchronized around every timed call. The calls of one length run in
``repeats`` interleaved rounds (dense, sdpa, then every mask, once each per round); a row reports
its median time and, as its speedup, the median over rounds of dense's time / its time.

Beside the ideal 1/density each row gives an ``expected`` speedup that prices partial blocks (those
needing an element mask) apart from full ones: ``(F_d + x P_d) / (F + x P)``, with F, P the mask's
full and partial blocks, F_d, P_d those of the dense causal mask and x = the cost of a partial block
over a full one, measured in the same run: the ``random`` mask of the row's target density is timed
as built (t_f) and with every block partial (t_p, ``as_partial()``), and t_f = c (F_r + x P_r),
t_p = c x (F_r + P_r) give x. The gap from the ideal to ``expected`` is the pattern's (its partial
blocks), the gap from ``expected`` to the measured speedup the kernel's.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from sparse_llm.kernels import BlockMask, block_sparse_attention
from sparse_llm.measure import synchronize
from sparse_llm.names import DTYPES
from sparse_llm.results import atomic_write_json, run_metadata

logger = logging.getLogger(__name__)

# neighborhood patterns: (stride, halo, window step, fewest window tokens) per block size b; the
# window is chosen for the target density. Strides and windows on the grid give only full blocks
# off the causal diagonal.
NEIGHBORHOODS = {
    "nbh_aligned": lambda b: dict(stride=b, halo=0, step=b, least=b),  # strided, on the grid
    "nbh_blocked": lambda b: dict(stride=None, halo=0, step=b, least=b),  # stride == window, on the grid
    "nbh_sliding": lambda b: dict(stride=1, halo=0, step=1, least=1),
    "nbh_strided": lambda b: dict(stride=3 * b // 2, halo=0, step=1, least=3 * b // 2),
    "nbh_halo": lambda b: dict(stride=None, halo=b // 2, step=1, least=1),  # blocked + halo, off the grid
}
PATTERNS = ("window", "random", *NEIGHBORHOODS)


@dataclass
class KernelBenchConfig:
    """Shapes default to a Gemma3-270M global layer (4 query heads, 1 KV head, head dim 256)."""

    lengths: tuple[int, ...] = (8192,)
    densities: tuple[float, ...] = (0.1, 0.25, 0.5, 0.75, 1.0)
    patterns: tuple[str, ...] = ("window", "random")  # any of PATTERNS
    q_heads: int = 4
    kv_heads: int = 1
    head_dim: int = 256
    block_size: int = 64
    dtype: str = "float32"
    device: str = "cpu"
    repeats: int = 5
    flex: bool = False
    partial_cost: bool = True  # measure x (and ``expected``): two extra timings per density
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


def _nearest(make: Callable[[int], BlockMask], lo: int, hi: int, step: int, density: float) -> int:
    """The width in [lo, hi] (multiples of ``step`` above ``lo``) whose mask's density is nearest
    ``density``; the density grows with the width, so bisect."""
    while hi - lo > step:
        mid = lo + (hi - lo) // 2 // step * step
        lo, hi = (mid, hi) if make(mid).density() < density else (lo, mid)
    return min((lo, hi), key=lambda w: abs(make(w).density() - density))


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

    return make(_nearest(make, block, -(-length // block) * block, block, density))


def neighborhood_mask(
    pattern: str, length: int, block: int, density: float, device
) -> tuple[BlockMask, dict]:
    """The ``neighborhood`` method's mask for one of ``NEIGHBORHOODS`` (one sink block), the window
    chosen so the density is nearest the target; returns (mask, the method's parameters)."""
    from sparse_llm import get_method
    from sparse_llm.backends import LayerCall

    spec = NEIGHBORHOODS[pattern](block)
    x = torch.empty(1, 1, length, 1, device=device)

    def params(window: int) -> dict:
        stride = window if spec["stride"] is None else spec["stride"]
        return dict(block_size=block, window=window, stride=stride, halo=spec["halo"], sink_tokens=block)

    def make(window: int) -> BlockMask:
        return get_method("neighborhood", **params(window)).block_mask(x, x, x, LayerCall(0, 1.0))

    hi = -(-length // spec["step"]) * spec["step"]
    window = _nearest(make, spec["least"], hi, spec["step"], density)
    return make(window), params(window)


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


def time_interleaved(
    fns: dict, repeats: int, device, on_round: Callable[[int], None] | None = None
) -> dict[object, list[float]]:
    """Seconds per call of each of ``fns``, ``repeats`` rounds that call each once in turn, after
    one untimed warm-up (and compilation) call of each; ``on_round(i)`` before round i (progress)."""
    for fn in fns.values():
        fn()
    times = {key: [] for key in fns}
    for i in range(repeats):
        if on_round is not None:
            on_round(i)
        for key, fn in fns.items():
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            times[key].append(time.perf_counter() - start)
    return times


def _ours(q, k, v, mask: BlockMask):
    return lambda: block_sparse_attention(q, k, v, mask)


def _sdpa(q, k, v):
    def run():
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        # PyTorch's flash backend may refuse enable_gqa: give it K/V with every query head's copy
        # (made once, untimed), as a model without native GQA would.
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)

        def flash():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)

        return flash
    return run


def _flex(q, k, v, mask: BlockMask):
    """``impl="flex"`` on the same blocks (compiled on CUDA), the mask converted once outside the
    timing as ours is built outside it."""
    from sparse_llm.kernels.flex import flex_block_sparse_attention, to_flex_block_mask

    converted = to_flex_block_mask(mask, num_q_heads=q.shape[1])
    scale = q.shape[-1] ** -0.5
    return lambda: flex_block_sparse_attention(q, k, v, mask, scale=scale, flex_mask=converted)


def _blocks(mask: BlockMask) -> tuple[int, int]:
    """(full, partial) selected blocks over all rows."""
    return int(mask.full_kv_num_blocks.sum()), int(mask.kv_num_blocks.sum())


def partial_cost(mask: BlockMask, t_full: float, t_partial: float) -> float:
    """x = cost of a partial block / cost of a full one, from ``mask`` timed as built (``t_full``) and
    with every block partial (``t_partial``): t_full = c (F + x P), t_partial = c x (F + P)."""
    full, part = _blocks(mask)
    return t_partial * full / (t_full * (full + part) - t_partial * part)


def expected_speedup(mask: BlockMask, dense: BlockMask, x: float) -> float:
    """Speedup over ``dense`` if a full block costs 1 and a partial one ``x``: the pattern's bound."""
    (full_d, part_d), (full, part) = _blocks(dense), _blocks(mask)
    return (full_d + x * part_d) / (full + x * part)


def _row(config, length, pattern, mask, name, times, dense_times, expected=None, **extra) -> dict:
    """One report row; the speedup over dense is the median of the rounds' ratios (each round times
    dense and this row back to back), robust to the machine's drift between rounds."""
    median = statistics.median(times)
    speedup = statistics.median(d / t for d, t in zip(dense_times, times, strict=True))
    density = mask.density() if mask is not None else 1.0
    full, part = _blocks(mask) if mask is not None else (None, None)
    # Attended (query, key) pairs of the causal triangle, times heads: 4 flops each (QK^T and PV).
    flops = 4 * config.q_heads * config.head_dim * density * length * (length + 1) / 2
    return {
        "length": length,
        "pattern": pattern,
        "impl": name,
        "density": density,
        "full_blocks": full,
        "partial_blocks": part,
        "median_ms": median * 1e3,
        "spread_ms": (max(times) - min(times)) * 1e3,
        "times_ms": [t * 1e3 for t in times],  # per round, in the order the rounds ran
        "speedup_vs_dense": speedup,
        "ideal": 1 / density,
        "fraction_of_ideal": speedup * density,
        "expected": expected,
        "fraction_of_expected": None if expected is None else speedup / expected,
        "tflops": flops / median / 1e12,
        **extra,
    }


def _pattern_mask(pattern: str, length: int, block: int, density: float, device) -> tuple[BlockMask, dict]:
    """(mask, the neighborhood method's parameters or {}) of one pattern at one target density."""
    if pattern in NEIGHBORHOODS:
        return neighborhood_mask(pattern, length, block, density, device)
    make = window_mask if pattern == "window" else random_mask
    return make(length, block, density, device), {}


def run_kernel_bench(
    config: KernelBenchConfig, out=None, progress: bool = False, on_row: Callable[[dict], None] | None = None
) -> dict:
    """Time every (length, pattern, density); returns (and writes to ``out``) a JSON-able report.
    ``on_row`` is called with each row as soon as it is measured (streaming writers)."""
    from tqdm.auto import tqdm

    device, dtype = torch.device(config.device), DTYPES[config.dtype]
    rows = []

    def emit(row: dict) -> None:
        rows.append(row)
        if on_row is not None:
            on_row(row)

    gen = torch.Generator(device="cpu").manual_seed(config.seed)
    cells = [(n, p, d) for n in config.lengths for p in config.patterns for d in config.densities]
    bar = tqdm(total=len(cells) + len(config.lengths), desc="kernel", disable=not progress)
    for length in config.lengths:
        shapes = ((config.q_heads, length), (config.kv_heads, length), (config.kv_heads, length))
        q, k, v = (torch.randn(1, h, t, config.head_dim, generator=gen).to(device, dtype) for h, t in shapes)
        # the queries as a model's attention receives them: [B, Hq, T, D] over [B, T, Hq, D] memory
        q = q.transpose(1, 2).contiguous().transpose(1, 2)
        dense = BlockMask.causal(
            q_len=length, kv_len=length, block_q=config.block_size, block_k=config.block_size, device=device
        )
        # Everything of one length is timed in interleaved rounds (one call of each per round), so
        # a machine whose speed drifts shifts the dense reference and each pattern alike.
        fns = {("causal", None, "ours"): _ours(q, k, v, dense), ("causal", None, "sdpa"): _sdpa(q, k, v)}
        random_masks = {}
        for density in config.densities if config.partial_cost else ():
            random_masks[density] = mask = random_mask(length, config.block_size, density, device)
            fns["random", density, "ours"] = _ours(q, k, v, mask)
            fns["random", density, "partial"] = _ours(q, k, v, mask.as_partial())
        cases = []
        for pattern in config.patterns:
            for density in config.densities:
                mask, params = _pattern_mask(pattern, length, config.block_size, density, device)
                cases.append((pattern, density, mask, params))
                # the "random" pattern's mask (same seed) is already timed for the partial cost
                fns.setdefault((pattern, density, "ours"), _ours(q, k, v, mask))
                if config.flex:
                    fns[pattern, density, "flex"] = _flex(q, k, v, mask)
        times = time_interleaved(
            fns,
            config.repeats,
            device,
            lambda i, n=length: bar.set_postfix_str(f"{n}: round {i + 1}/{config.repeats}"),
        )
        dense_times = times["causal", None, "ours"]
        emit(_row(config, length, "causal", dense, "ours", dense_times, dense_times))
        emit(_row(config, length, "causal", None, "sdpa", times["causal", None, "sdpa"], dense_times))
        bar.update()
        # The partial block's cost x per target density: the random mask as built and all partial.
        costs = {
            d: partial_cost(
                m,
                statistics.median(times["random", d, "ours"]),
                statistics.median(times["random", d, "partial"]),
            )
            for d, m in random_masks.items()
        }
        for pattern, density, mask, params in cases:
            for name in ("ours", "flex") if config.flex else ("ours",):
                cost = costs.get(density)
                expected = expected_speedup(mask, dense, cost) if name == "ours" and cost else None
                row_times = times[pattern, density, name]
                emit(
                    _row(
                        config,
                        length,
                        pattern,
                        mask,
                        name,
                        row_times,
                        dense_times,
                        expected,
                        partial_cost=cost,
                        params=params,
                    )
                )
            bar.update()
    bar.close()
    report = {"config": asdict(config), **run_metadata(device), "results": rows}
    if out is not None:
        atomic_write_json(out, report)
    return report


def kernel_markdown(rows: list[dict]) -> str:
    """The report as a table; ``expected`` prices partial blocks at the row's measured cost x."""
    lines = [
        "| length | pattern | impl | density | full / partial blocks | ms (median) | speedup vs our dense "
        "| ideal | % of ideal | x (partial / full) | expected | % of expected |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        blocks = "-" if r.get("full_blocks") is None else f"{r['full_blocks']} / {r['partial_blocks']}"
        cost = "-" if r.get("partial_cost") is None else f"{r['partial_cost']:.2f}"
        expected = "-" if r.get("expected") is None else f"{r['expected']:.2f}x"
        of_expected = "-" if r.get("expected") is None else f"{r['fraction_of_expected']:.0%}"
        lines.append(
            f"| {r['length']} | {r['pattern']} | {r['impl']} | {r['density']:.3f} | {blocks} "
            f"| {r['median_ms']:.1f} | {r['speedup_vs_dense']:.2f}x | {r['ideal']:.2f}x "
            f"| {r['fraction_of_ideal']:.0%} | {cost} | {expected} | {of_expected} |"
        )
    return "\n".join(lines)

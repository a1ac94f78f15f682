"""Tile sizes of the Triton block-sparse kernel: candidates, pruning, FlexAttention's Hopper seeds.

The autotuner times at most ``MAX_TUNED`` configs per key (a short GPU session pays one compile per
config and head dim), and only the first below ``SMALL_WORK`` scores (tests, short prompts): the
candidates that divide the mask blocks, fit shared memory and registers, ranked by closeness to
FlexAttention's Hopper default for the dtype and head dim. The key holds log2 buckets of Tq and Tk,
the mask blocks, the padded head dim, the dtype and the switches that change the inner loop's cost;
results are cached on disk across processes where Triton can. Under ``TRITON_INTERPRET=1`` exactly
one config runs: 16 x 16 tiles, the smallest, so the tests walk several tiles per mask block.
"""

from __future__ import annotations

import inspect
import math
import os

import triton

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
MIN_TILE = 16  # tl.dot's smallest operand side
TILES = (16, 32, 64, 128)
SMEM_LIMIT = 227 * 1024  # bytes of shared memory one block may use on Hopper (H100/H200)
ACC_REGS = 160  # fp32 values per thread (see fits) above which ptxas starts to spill at sm_90
MAX_TUNED = 6
SMALL_WORK = 1 << 24  # Tq * Tk below which nothing is timed
# (BLOCK_M, BLOCK_N, num_warps, num_stages) by (bytes per input element, head dim): FlexAttention's
# Hopper forward defaults (torch/_inductor/template_heuristics/triton.py, h100_default_flex_config).
HOPPER_SEEDS = {
    (2, 64): (128, 128, 4, 3),
    (2, 128): (128, 64, 8, 3),
    (2, 256): (64, 32, 4, 3),
    (4, 64): (128, 32, 4, 3),
    (4, 128): (32, 64, 4, 3),
    (4, 256): (32, 32, 4, 3),
}
TUNING_KEY = [
    "q_bucket",
    "kv_bucket",
    "BLOCK_Q",
    "BLOCK_K",
    "BLOCK_D",
    "UPCAST",
    "CAUSAL",
    "HAS_SOFTCAP",
    "HAS_BIAS",
    "HAS_PAD",
]


def shared_bytes(block_m: int, block_n: int, block_d: int, elt: int, stages: int) -> int:
    """Upper estimate of one program's shared memory: the Q tile, K and V tiles per pipeline stage,
    and P as the second dot's operand."""
    return (block_m * block_d + 2 * stages * block_n * block_d + block_m * block_n) * elt


def fits(config: triton.Config, block_q: int, block_k: int, block_d: int, elt: int, q_len: int) -> bool:
    """Whether ``config`` suits this call: tiles never span two mask blocks (a block below 16 is
    padded up to one 16-wide tile), decode (Tq <= 16) takes 16-row tiles and prefill tiles of at
    least 64 x 32 (less where the blocks are smaller), shared memory fits and
    the fp32 values each thread holds stay under the spill limit."""
    m, n = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]
    if m > max(block_q, MIN_TILE) or n > max(block_k, MIN_TILE):
        return False
    if q_len <= MIN_TILE:
        if m != MIN_TILE:
            return False
    elif m < min(64, max(block_q, MIN_TILE)) or n < min(32, max(block_k, MIN_TILE)):
        return False  # prefill: tiles of at least 64 x 32 keep the tensor cores busy
    if shared_bytes(m, n, block_d, elt, config.num_stages) > SMEM_LIMIT:
        return False
    # Accumulator [m, D] and scores [m, n] in fp32 registers; fp32 inputs take the FMA dot (no
    # tensor cores), which also holds the K and V tiles in registers.
    values = m * (block_d + n) + (2 * n * block_d if elt == 4 else 0)
    return values <= ACC_REGS * 32 * config.num_warps


def seed(elt: int, block_d: int, block_q: int, block_k: int, q_len: int) -> tuple[int, int, int, int]:
    """FlexAttention's Hopper default for (dtype size, head dim), clipped to the mask blocks."""
    m, n, warps, stages = HOPPER_SEEDS[(2 if elt <= 2 else 4, min(max(block_d, 64), 256))]
    m = MIN_TILE if q_len <= MIN_TILE else min(m, max(block_q, MIN_TILE))
    return m, min(n, max(block_k, MIN_TILE)), warps, stages


def candidates() -> list[triton.Config]:
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
        for m in TILES
        for n in TILES
        for w in (4, 8)
        for s in (2, 3)
    ]


def prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """The configs to time for this call: at most ``MAX_TUNED``, the seed first; one when interpreted."""
    block_q, block_k, block_d = kwargs["BLOCK_Q"], kwargs["BLOCK_K"], kwargs["BLOCK_D"]
    elt = 4 if kwargs["UPCAST"] else named_args["Q"].element_size()
    q_len = named_args["q_len"]
    if INTERPRET:
        return [triton.Config({"BLOCK_M": MIN_TILE, "BLOCK_N": MIN_TILE}, num_warps=4, num_stages=1)]
    target = seed(elt, block_d, block_q, block_k, q_len)
    valid = [c for c in configs if fits(c, block_q, block_k, block_d, elt, q_len)]

    def distance(c: triton.Config) -> tuple[float, int]:
        m, n = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
        tiles = abs(math.log2(m / target[0])) + abs(math.log2(n / target[1]))
        # ties go to taller query tiles: each K/V tile loaded serves more queries
        return tiles + (c.num_warps != target[2]) + (c.num_stages != target[3]), -m

    ranked = sorted(valid, key=distance)
    # Below ~4K x 4K scores a launch is latency-bound and its timing noise: take the best guess.
    return ranked[:1] if q_len * named_args["kv_len"] < SMALL_WORK else ranked[:MAX_TUNED]


def _autotune_options() -> dict:
    # cache_results (timings on disk, reused by later processes) is newer than some Triton releases.
    if "cache_results" in inspect.signature(triton.autotune).parameters:
        return {"cache_results": True}
    return {}


autotune = triton.autotune(
    configs=candidates(),
    key=TUNING_KEY,
    prune_configs_by={"early_config_prune": prune},
    **_autotune_options(),
)

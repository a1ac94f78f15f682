"""Block-sparse attention in plain PyTorch: selected K/V blocks per query block, fused attention calls.

The CPU path (and the fallback on any device). Cost scales with the selected blocks; no Tq x Tk tensor.
Consecutive query blocks with the same block counts form a segment served by ONE attention call. Three
ways to feed it, cheapest first:

1. A mask covering the whole causal triangle (``dense`` on a global layer) is one fused call with
   ``is_causal``, so the flash kernel skips the masked half itself (``_causal_attention``); so are the
   leading query blocks that select every block they can see (the first ``budget`` of a top-k method),
   and any run of query blocks that select every block from a common start to their own (blocked
   attention: one causal call per block of queries; their sinks and cut first blocks are merged views).
2. Where every query block's selected blocks are one or two contiguous runs whose starts move by a fixed
   stride (sliding windows: block_q / block_k blocks per query block; sinks: 0), each run of a segment
   is an ``as_strided`` view of K/V (no copy), and its mask is the causal/window rule built once for
   the first query block and broadcast over the segment (the relative pattern is the same for all).
3. Otherwise the K/V blocks are gathered by one ``index_select`` and stacked along the batch dimension,
   into two buffers that the thread keeps between calls (``release_workspace`` frees them).

Non-causal masks (far fields over collapsed keys, ``backends/_collapse.py``) whose query blocks select
most blocks of one run ending at their last selected block take one stride-0 view of that run per
segment of query blocks with the same first block, each row's unselected blocks masked; the blocks a
row selects before its run (the pieces of a pyramid level's superblocks) are gathered and merged
(``_plan_prefix_views``); rows may differ per head.

GQA is never expanded: with a mask shared by a KV head's group, the group's queries are stacked into
one [G * block_q, D] tile (fla's ``naive.py`` grouping); with a per-query-head mask each query head
gathers from its own KV head. A causal per-query-head mask whose groups share many blocks (a selection
method's sinks and local window) runs as two masks merged by log-sum-exp: the blocks every head of a
group selects, with the group's tiles stacked, and the rest per head (``_group_split``).

Full blocks need no element mask (only an additive per-key mask for key padding, the Tk tail and padded
index slots); partial blocks get the causal/window element mask. When a segment's keys are few and its
tiles are one head's rows, full and partial blocks share one call (one mask over all keys); otherwise
they run apart, and the second part (and a second view run) is merged by log-sum-exp into the output.
Results are written straight into the output's memory, accumulated and merged in fp32. The fused op
computes in fp32, or in bf16 for a bf16 model on a CPU with native bf16 (``compute_dtype``).

The work is split in two. ``plan_gather`` reads only the BlockMask and the shapes and returns a
``GatherPlan``: which query blocks take the fused causal call, which ``ViewCall``s and which
``GatherCall``s (of full and/or partial blocks) serve the rest, and which results are merged by LSE.
``_Executor`` prepares the operands once (query tiles, padded K/V) and runs the plan's calls.

On CPU each call goes to ATen's fused flash-attention kernel
(``aten::_scaled_dot_product_flash_attention_for_cpu``, which returns the LSE, takes strided K/V and a
broadcast mask, and maps GQA heads itself). With softcap, on other devices, or if the op is missing, a
matmul/exp version chunked over keys is used. Few, large ops matter where cores are shared: each op is
an OpenMP parallel region that may wait a scheduler tick for its other threads (docs/benchmarks.md).
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from sparse_llm.kernels.block_mask import BlockMask, block_geometry
from sparse_llm.kernels.merge import merge_attention_

# fp32 elements per segment (gathered K/V + masks) and per score tile of the matmul path: 2^25 = 128 MiB.
_MAX_SCORE_ELEMENTS = 1 << 25
# Full and partial blocks share one call (one mask over all keys) up to this many keys per head dim,
# when a tile's rows are one head's block_q positions. A group's stacked tiles (G * block_q rows) never
# share: their [G * block_q, L] mask cost more to build than the merge it saves (docs/benchmarks.md).
_SHARED_CALL_KEYS_PER_DIM = 4
# A non-causal prefix segment (query blocks selecting most blocks of runs from one first block) shares a
# view of its longest run; each row's masked keys in it are at most this fraction of its own count.
_PREFIX_REST = 0.25
# Gathers of query blocks with unequal block counts share a call down to this ratio of counts (the
# padded slots are masked: at most 1/0.75 - 1 = 33 % extra keys in that call, usually far less).
_PAD_RATIO = 0.75
# A view whose mask repeats every p query blocks (strided windows) runs as p calls up to this p.
_MAX_PERIOD = 16
# A causal per-query-head mask runs the blocks all heads of a KV group select as one mask per group
# when they are at least this share of its blocks (``_group_split``).
_GROUP_SHARED_MIN = 0.25


@functools.cache
def cpu_has_native_bf16() -> bool:
    # Private probes (torch >= 2.3); without native bf16 a bf16 GEMM is emulated and slower than fp32.
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def compute_dtype(dtype: torch.dtype, op) -> torch.dtype:
    """The dtype the fused op computes the attention calls in for inputs of ``dtype``: bf16 for bf16
    inputs on a CPU with native bf16 (AMX or AVX512-BF16; ATen's op then runs its GEMMs in bf16 with
    fp32 accumulation and softmax, as sdpa does for a bf16 model, 2-4x faster than in fp32 on large
    tiles: docs/benchmarks.md), fp32 otherwise (fp32 and fp16 inputs, CPUs that emulate bf16, the
    matmul path). Outputs are accumulated and merged in fp32 either way."""
    if dtype == torch.bfloat16 and op is not None and cpu_has_native_bf16():
        return torch.bfloat16
    return torch.float32


def _fused_op(device: torch.device, softcap: float | None):
    if device.type != "cpu" or softcap is not None:
        return None
    return getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _attend(qs, k, v, bias: Tensor | None, scale: float, softcap: float | None):
    """qs [B, Hr, R, D], k, v [B, Hk, L, D] fp32, or bf16 on the fused op (any strides; Hk divides Hr:
    query head h reads K/V head h // (Hr / Hk)); bias None or an additive fp32 mask (0 / -inf)
    broadcastable to [B, Hr, R, L]. Returns (out [B, Hr, R, D] in qs's dtype, lse [B, Hr, R] fp32).
    Rows without an allowed key are left to the caller: the fused op returns lse = 0 for them (the
    matmul path -inf)."""
    b, hr, r, d = qs.shape
    hk, length = k.shape[1], k.shape[2]
    op = _fused_op(qs.device, softcap)
    if hk != hr and op is None:  # GQA on the matmul path: a KV head's query heads as one tile of rows
        g = hr // hk
        if bias is not None:
            bias = bias.expand(b, hr, r, length).reshape(b, hk, g * r, length)
        out, lse = _attend(qs.reshape(b, hk, g * r, d), k, v, bias, scale, softcap)
        return out.view(b, hr, r, d), lse.view(b, hr, r)
    step = max(1, _MAX_SCORE_ELEMENTS // (b * hr * r))
    if op is None and length > step:  # matmul path: key chunks merged by LSE bound the scores tile
        parts = [
            _attend(
                qs,
                k[:, :, s : s + step],
                v[:, :, s : s + step],
                None if bias is None else bias[..., s : s + step],
                scale,
                softcap,
            )
            for s in range(0, length, step)
        ]
        out, lse = parts[0]
        for part in parts[1:]:
            merge_attention_(out, lse, *part)
        return out, lse
    if op is not None:  # flash tiles: no [R, L] scores in memory, so no key chunks either
        return op(qs, k, v, attn_mask=bias, scale=scale)
    scores = (qs @ k.transpose(-1, -2)).mul_(scale)
    if softcap is not None:  # Gemma2 eager order: scale, cap, then mask
        scores = torch.tanh(scores.div_(softcap)).mul_(softcap)
    if bias is not None:
        scores = scores.add_(bias)
    row_max = scores.amax(-1, keepdim=True)
    row_max = torch.where(torch.isneginf(row_max), 0.0, row_max)  # empty row: exp(-inf - 0) = 0
    probs = scores.sub_(row_max).exp_()
    denom = probs.sum(-1, keepdim=True)
    out = (probs @ v).div_(denom.clamp_min(torch.finfo(torch.float32).tiny))
    return out, (row_max + denom.log()).squeeze(-1)


def _padded_rows(x: Tensor, length: int, dtype: torch.dtype) -> Tensor:
    """x [B, H, T, D] in ``dtype``, padded with zeros to ``length`` along T, returned as a [B, H, length,
    D] view of [B, length, H, D] memory: HF's query layout, so its queries usually need no copy at all."""
    b, h, t, d = x.shape
    if t == length and x.dtype == dtype and x.transpose(1, 2).is_contiguous():
        return x
    out = torch.empty(b, length, h, d, dtype=dtype, device=x.device).transpose(1, 2)
    out[:, :, :t].copy_(x)
    out[:, :, t:].zero_()
    return out


def _padded(x: Tensor, dim_len: int, length: int, dtype: torch.dtype) -> Tensor:
    """x [B, H, T, D] in ``dtype``, padded with zeros to ``length`` along T (no copy if nothing to do)."""
    if length == dim_len:
        return x.to(dtype).contiguous()
    out = torch.empty(*x.shape[:2], length, x.shape[3], dtype=dtype, device=x.device)
    out[:, :, :dim_len].copy_(x)
    out[:, :, dim_len:].zero_()
    return out


@dataclass
class _Blocks:
    """One block list of the mask (full or partial), with per-query-block facts as Python lists."""

    idx: Tensor  # [Bm, Hr, nQ, M] long
    slot_ok: Tensor  # [Bm, Hr, nQ, M] bool: the slot is below the row's count
    counts: list[int]  # max count over rows
    needs: list[bool]  # needs a key mask: unequal rows, the Tk tail, key padding or the element mask
    starts: list[int]  # first block when every row holds the same contiguous run, else -1
    elementwise: bool  # apply the causal/window element mask

    def needs_mask(self, n0: int, n1: int) -> bool:
        """Query blocks [n0, n1) in one call need a key mask: some row needs one, or rows are padded."""
        counts = self.counts[n0:n1]
        return any(self.needs[n0:n1]) or min(counts) != max(counts)


def _block_list(
    num: Tensor, idx: Tensor, n_k: int, cut_tail: bool, padding: bool, elementwise: bool
) -> _Blocks:
    """Facts of counts ``num`` [Bm, Hr, nQ] and ids ``idx`` [Bm, Hr, nQ, M] (rows already mapped to
    the row heads), computed once with vectorized ops and read back as lists."""
    count = num.amax((0, 1))
    slot_ok = torch.arange(idx.shape[-1], device=idx.device) < num[..., None]
    ragged = (num != count).flatten(0, 1).any(0)
    tail = (slot_ok & (idx == n_k - 1)).any(-1).flatten(0, 1).any(0) & cut_tail
    needs = (ragged | tail | padding | elementwise).tolist()
    same = ((idx == idx[:1, :1]) | ~slot_ok).all(-1).flatten(0, 1).all(0) & ~ragged
    steps = ((idx[0, 0, :, 1:] - idx[0, 0, :, :-1]) == 1) | ~slot_ok[0, 0, :, 1:]
    starts = torch.where(same & steps.all(-1), idx[0, 0, :, 0], -1).tolist()
    return _Blocks(idx, slot_ok, count.tolist(), needs, starts, elementwise)


def _runs(keys: list, sizes: list[int], pad_ratio: float | None = None) -> list[tuple[int, int]]:
    """Runs [n0, n1) of consecutive query blocks with equal, non-None keys whose summed ``sizes``
    (fp32 elements of gathered K/V and masks) stay within _MAX_SCORE_ELEMENTS: one call each.

    With ``pad_ratio``, keys are block counts and a run may mix counts down to ``pad_ratio`` times
    its largest: shorter rows are padded with masked slots, so a mask whose counts grow row by row
    (a fraction of each causal row) takes a few calls instead of one per query block."""
    out: list[tuple[int, int]] = []
    total = lo = hi = 0
    for n, key in enumerate(keys):
        if key is None:
            continue
        if pad_ratio is None:
            fits = out and keys[out[-1][0]] == key
        else:
            fits = out and min(lo, key) >= pad_ratio * max(hi, key)
        if out and out[-1][1] == n and fits and total + sizes[n] <= _MAX_SCORE_ELEMENTS:
            out[-1] = (out[-1][0], n + 1)
            total += sizes[n]
            if pad_ratio is not None:
                lo, hi = min(lo, key), max(hi, key)
        else:
            out.append((n, n + 1))
            total = sizes[n]
            lo = hi = key if pad_ratio is not None else 0
    return out


def _dense_prefix(block_mask: BlockMask) -> int:
    """How many leading query blocks select every block the plain causal geometry reaches, in every
    row: all of them for ``dense`` on a global layer; the first ``budget`` blocks of a top-k method."""
    reach = block_geometry(
        q_len=block_mask.q_len,
        kv_len=block_mask.kv_len,
        block_q=block_mask.block_q,
        block_k=block_mask.block_k,
        device=block_mask.device,
    )[0]
    dense_rows = (block_mask.to_dense() | ~reach).all(-1).flatten(0, 1).all(0)  # [nQ]
    if block_mask.window_start is not None:  # the fused call knows no key rule: rows it masks nothing in
        dense_rows &= block_mask.rule_blocks()[0].all(-1).all(0)
    return int(dense_rows.int().cumprod(0).sum())


def _causal_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, op) -> tuple[Tensor, Tensor]:
    """Whole causal attention in one fused call, so the flash kernel skips the masked half itself.
    ATen's ``is_causal`` is top-left aligned, ours bottom-right: with Tq < Tk the first Tk - Tq keys
    are seen by every query (one unmasked call) and the rest form a square causal block; merged by LSE.
    Computed in :func:`compute_dtype`, returned in fp32 (a caller may merge more into it)."""
    dtype = compute_dtype(q.dtype, op)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    prefix = k.shape[2] - q.shape[2]
    out, lse = op(q, k[:, :, prefix:], v[:, :, prefix:], is_causal=True, scale=scale)
    out = out.float()
    if prefix:
        merge_attention_(out, lse, *op(q, k[:, :, :prefix], v[:, :, :prefix], scale=scale))
    return out, lse


def _selected_runs(full: _Blocks, part: _Blocks, n_k: int) -> list[tuple[tuple[int, int], ...] | None]:
    """Per query block, its selected blocks (full + partial) as one or two contiguous runs
    ``((start, count), ...)`` when every mask row selects the same ones, else None (sliding windows give
    one run, sink + local window two)."""
    ids = torch.cat([torch.where(bl.slot_ok, bl.idx, n_k) for bl in (full, part)], -1).sort(-1).values
    same = (ids == ids[:1, :1]).all(-1).flatten(0, 1).all(0)  # [nQ]
    u = ids[0, 0]  # [nQ, M], ascending, n_k past the count
    count = (u < n_k).sum(-1)
    breaks = (u[:, 1:] - u[:, :-1] != 1) & (u[:, 1:] < n_k)
    cut = torch.where(breaks.any(-1), breaks.int().argmax(-1) + 1, count)  # first block of run 2
    second = u.gather(-1, cut.clamp_max(u.shape[-1] - 1)[:, None])[:, 0]
    ok = same & (breaks.sum(-1) <= 1) & (count > 0)
    rows = zip(ok.tolist(), u[:, 0].tolist(), cut.tolist(), second.tolist(), count.tolist(), strict=True)
    return [
        None if not good else ((a, c),) if c == n else ((a, c), (a2, n - c)) for good, a, c, a2, n in rows
    ]


def _strided_segments(runs: list, step: int, size: int) -> list[tuple[int, int, tuple[int, ...]]]:
    """Runs [n0, n1) of query blocks whose key runs have equal counts and starts that advance by a
    constant stride of 0 (sinks) or ``step`` blocks (windows) per query block, so each key run of the
    segment is one strided view of K/V. Returns (n0, n1, strides); ``size`` bounds ng x keys."""
    out: list[tuple[int, int, tuple[int, ...]]] = []
    for n, cur in enumerate(runs):
        if cur is None:
            continue
        if out and out[-1][1] == n and runs[n - 1] is not None:
            n0, _, strides = out[-1]
            prev = runs[n - 1]
            moved = tuple(a - p for (a, _), (p, _) in zip(cur, prev, strict=False))
            counts_equal = [c for _, c in cur] == [c for _, c in prev]
            fits = (n + 1 - n0) * sum(c for _, c in cur) <= size
            if counts_equal and fits and all(m in (0, step) for m in moved) and moved == (strides or moved):
                out[-1] = (n0, n + 1, moved)
                continue
        out.append((n, n + 1, ()))
    return out


@dataclass(frozen=True)
class Shapes:
    """Sizes of one ``gather_attention`` call (names of STYLE.md §8) and the tile layout they imply.

    q [B, Hq, Tq, D], k/v [B, Hkv, Tk, D], G = Hq // Hkv, mask heads Hm in {1, Hkv, Hq}, nQ x nK blocks of
    ``block_q`` x ``block_k``. Row heads Hr are the heads whose queries share one gather: Hq for a
    per-query-head mask (Hm = Hq, G > 1; each query head gathers from its KV head ``h // G``), else Hkv
    (a group's G query heads share its mask row). A query tile has R rows: ``block_q`` positions of one
    head, or G * ``block_q`` (position, head) pairs, HF's [B, T, Hq, D] order within the group.
    """

    b: int
    hq: int
    hkv: int
    g: int
    q_len: int
    kv_len: int
    d: int
    block_q: int
    block_k: int
    n_q: int
    n_k: int
    mask_heads: int
    per_q_head: bool
    hr: int
    r: int

    @classmethod
    def of(cls, q: Tensor, k: Tensor, block_mask: BlockMask) -> Shapes:
        b, hq, q_len, d = q.shape
        hkv, bq, hm = k.shape[1], block_mask.block_q, block_mask.kv_num_blocks.shape[1]
        g = hq // hkv
        per_q_head = hm == hq and g > 1
        return cls(
            b=b,
            hq=hq,
            hkv=hkv,
            g=g,
            q_len=q_len,
            kv_len=k.shape[2],
            d=d,
            block_q=bq,
            block_k=block_mask.block_k,
            n_q=block_mask.num_q_blocks,
            n_k=block_mask.num_kv_blocks,
            mask_heads=hm,
            per_q_head=per_q_head,
            hr=hq if per_q_head else hkv,
            r=bq if per_q_head else g * bq,
        )


@dataclass(frozen=True)
class ViewCall:
    """One attention call for query blocks [n0, n1) over key blocks [start + i * stride, + count) for the
    i-th of them: K/V are one strided view (no copy), the mask is the causal/window rule on positions.
    ``merge``: the second run of sink + local rows, merged by LSE into the first run's result."""

    n0: int
    n1: int
    start: int
    count: int
    stride: int
    merge: bool


@dataclass(frozen=True)
class CausalCall:
    """One fused ``is_causal`` call (``_causal_attention``) for query blocks [n0, n1) over the keys from
    block ``start`` to their own positions: each of them selects that run, full but for its diagonal
    block, which only the causal rule cuts. Written, never merged."""

    n0: int
    n1: int
    start: int
    merge: bool = False


@dataclass(frozen=True)
class GatherCall:
    """One attention call for query blocks [n0, n1) over their selected ``full`` and/or ``partial``
    blocks, gathered by one ``index_select`` (a slice when one query block's blocks form one run). Rows
    with fewer blocks than the call's largest count are padded with masked slots. A partial-only call
    is merged by LSE into the full blocks' result (or into an empty one)."""

    n0: int
    n1: int
    full: bool
    partial: bool
    rest: bool = False  # the blocks a non-causal prefix view leaves out (GatherPlan.rest)

    @property
    def merge(self) -> bool:
        return not self.full


@dataclass
class GatherPlan:
    """Which attention calls ``gather_attention`` makes, decided from the BlockMask and shapes alone.

    Each query block n in [0, nQ) is served by exactly one of:

    - the fused ``is_causal`` call, for n < ``causal_blocks`` (0 or at least 2 leading query blocks that
      select every block the causal geometry reaches; ``causal_blocks == nQ``: that call is all, and
      ``full``/``part`` are None, ``calls`` empty);
    - a ``CausalCall`` (written) for a run of query blocks that select every block from a common start
      to their diagonal, with ``ViewCall``s for their sinks and cut first blocks (merged);
    - ``ViewCall``s (causal, one mask row per KV head, block_q a multiple of block_k): its first key
      run (written) and the second run of sink + local rows (merged);
    - a stride-0 ``ViewCall`` (non-causal masks, any rows): one run shared by a segment of query
      blocks, each row's own blocks in it (written);
    - ``GatherCall``s: full + partial blocks in one call (written), or its full blocks (written) and
      its partial blocks (merged), each in its own call where present.

    A non-causal view covers each row's main run (its last selected blocks, holes and all); the blocks a
    row selects before it, ``rest``, are gathered by merged ``GatherCall``s (``rest=True``).

    ``calls`` lists written calls before merged ones. ``unwritten``: runs ``[n0, n1)`` of query blocks
    with no written call (no full block): they start from out = 0, lse = -inf, which is also the
    result of an empty row.
    ``full`` and ``part`` are the mask's two block lists with rows mapped to the row heads; ``rule`` is
    the mask's key rule ``(window_start [B', Tq], sink_end [B'])``, applied with the element mask.
    """

    shapes: Shapes
    causal_blocks: int
    full: _Blocks | None = None
    part: _Blocks | None = None
    calls: list[CausalCall | ViewCall | GatherCall] = field(default_factory=list)
    unwritten: list[tuple[int, int]] = field(default_factory=list)
    rule: tuple[Tensor, Tensor] | None = None
    causal: bool = True
    rest: _Blocks | None = None


def plan_gather(
    block_mask: BlockMask,
    shapes: Shapes,
    *,
    causal: bool,
    sliding_window: int | None,
    padding: bool,
    fused: bool,
) -> GatherPlan:
    """The plan for ``block_mask`` (validated, batch 1 or B, heads ``shapes.mask_heads``). ``padding``:
    some key is masked by the key padding mask; ``fused``: ATen's fused CPU op is used (``_fused_op``)."""
    s = shapes
    prefix = 0
    if causal and sliding_window is None and not padding and fused:
        prefix = _dense_prefix(block_mask)
        if prefix == s.n_q:
            return GatherPlan(s, prefix)
    dev = block_mask.device
    heads = torch.arange(s.hr, device=dev)  # row head -> mask head
    if s.mask_heads != s.hr:
        heads = torch.zeros_like(heads)
    cut_tail = s.n_k * s.block_k > s.kv_len

    def block_list(num: Tensor, idx: Tensor, elementwise: bool) -> _Blocks:
        num, idx = num[:, heads], idx[:, heads].long()
        return _block_list(num, idx, s.n_k, cut_tail, padding, elementwise)

    full = block_list(block_mask.full_kv_num_blocks, block_mask.full_kv_indices, False)
    part = block_list(block_mask.kv_num_blocks, block_mask.kv_indices, causal)
    causal_blocks = prefix if prefix > 1 else 0  # a lone dense block is left to the gathers
    alone = [n >= causal_blocks for n in range(s.n_q)]  # not yet served by a call
    views: list[CausalCall | ViewCall | GatherCall] = []
    rest = None
    if not causal:
        views, rest_counts = _plan_prefix_views(full, part, s, alone)
        if views and rest_counts.any():
            rest = _block_list(rest_counts, full.idx, s.n_k, cut_tail, padding, False)
            runs = _gather_runs(rest, [True] * s.n_q, s)
            views += [GatherCall(n0, n1, full=False, partial=False, rest=True) for n0, n1 in runs]
    if causal and sliding_window is None and not padding and fused and not s.per_q_head:
        views = _plan_causal_runs(block_mask, full, part, s, prefix, alone)
    if causal and not s.per_q_head and s.block_q % s.block_k == 0:
        if block_mask.window_start is not None:
            views += _plan_padded_views(block_mask, full, part, s, prefix, alone)
        views += _plan_views(full, part, s, prefix, alone)
    gathers = _plan_gathers(full, part, s, alone)
    written = [False] * s.n_q
    written[:causal_blocks] = [True] * causal_blocks
    for call in views + gathers:
        if not call.merge:
            written[call.n0 : call.n1] = [True] * (call.n1 - call.n0)
    calls = [c for c in views + gathers if not c.merge] + [c for c in views + gathers if c.merge]
    unwritten = _runs([None if w else True for w in written], [0] * s.n_q)
    rule = None if block_mask.window_start is None else (block_mask.window_start, block_mask.sink_end)
    return GatherPlan(s, causal_blocks, full, part, calls, unwritten, rule, causal, rest)


def _plan_prefix_views(
    full: _Blocks, part: _Blocks, s: Shapes, alone: list[bool]
) -> tuple[list[ViewCall], Tensor]:
    """Non-causal masks (far fields over collapsed keys, ``backends/_collapse.py``) whose query blocks
    select, in every row, most blocks of a run [start, end) that ends at their last selected block: the
    far keys before the local window, less a few selected blocks per head; with a far-field pyramid,
    the nearest level's run, with the fragments that a selected block leaves of its superblocks lying
    before it. A query block's ``start`` is the first block from which every row selects at least
    1 / (1 + ``_PREFIX_REST``) of the blocks up to the end. Each segment of query blocks with the same
    start takes one stride-0 view of its longest run (no copy, one call); each row's unselected blocks
    in it are masked. A segment grows while every row's masked keys stay within ``_PREFIX_REST`` of
    its own count. Rows may differ (per-head masks), unlike the other views. Marks the query blocks
    served in ``alone``; returns the calls and, per row, how many of its first selected blocks lie
    before its view (int [Bm, Hr, nQ], 0 where no view serves the query block)."""
    rest_counts = torch.zeros_like(full.slot_ok[..., 0], dtype=torch.long)
    if any(part.counts) or not any(full.counts):  # without causality every selected block is full
        return [], rest_counts
    ok, n_k = full.slot_ok, s.n_k
    picked = torch.zeros(*ok.shape[:3], n_k + 1, dtype=torch.long, device=ok.device)
    picked = picked.scatter_(-1, torch.where(ok, full.idx, n_k), 1)[..., :n_k]  # [Bm, Hr, nQ, nK]
    after = picked.flip(-1).cumsum(-1).flip(-1)  # selected blocks from j on
    hi = torch.where(ok, full.idx, -1).amax(-1).flatten(0, 1).amax(0) + 1  # [nQ]
    span = hi[:, None] - torch.arange(n_k, device=ok.device)  # blocks in [j, hi)
    fits = ((span <= after * (1 + _PREFIX_REST)) & (span > 0)).flatten(0, 1).all(0)  # [nQ, nK]
    fits &= picked.flatten(0, 1).any(0).bool()  # a view starts at a selected block
    first = torch.where(fits.any(-1), fits.int().argmax(-1), -1)  # the earliest start that fits
    least = after.gather(-1, first.clamp_min(0).expand(*after.shape[:2], -1)[..., None])[..., 0]
    before = ok & (full.idx < first[:, None])  # [Bm, Hr, nQ, M]: blocks left to the rest gathers
    lo, hi, least = first.tolist(), hi.tolist(), least.flatten(0, 1).amin(0).tolist()
    size = _MAX_SCORE_ELEMENTS // (s.b * s.hq * s.block_q * s.block_k)  # bounds ng x run blocks
    calls = []
    n = 0
    while n < s.n_q:
        span = hi[n] - lo[n]
        if not alone[n] or lo[n] < 0 or least[n] == 0:
            n += 1
            continue
        n1, longest, fewest = n + 1, span, least[n]
        while n1 < s.n_q and alone[n1] and lo[n1] == lo[n] and least[n1] > 0:
            grown, fewer = max(longest, hi[n1] - lo[n]), min(fewest, least[n1])
            if grown > fewer * (1 + _PREFIX_REST) or (n1 + 1 - n) * grown > size:
                break
            longest, fewest, n1 = grown, fewer, n1 + 1
        calls.append(ViewCall(n, n1, lo[n], longest, 0, merge=False))
        alone[n:n1] = [False] * (n1 - n)
        rest_counts[:, :, n:n1] = before[:, :, n:n1].sum(-1)
        n = n1
    return calls, rest_counts


def _causal_run_keys(block_mask: BlockMask, full: _Blocks, part: _Blocks, s: Shapes, prefix: int) -> list:
    """Per query block, ``(start, head, sink run)`` when its selection (the same in every mask row) is
    an optional sink run plus one run ``[start, diagonal]`` whose partial blocks are its first ``head``
    blocks and its diagonal block, which only the causal rule cuts; else None."""
    off, bk = s.kv_len - s.q_len, s.block_k
    if s.block_q != bk or off % bk:
        return [None] * s.n_q
    runs = _selected_runs(full, part, s.n_k)
    counts = part.slot_ok.sum(-1)  # [Bm, Hr, nQ]
    same = ((part.idx == part.idx[:1, :1]) | ~part.slot_ok).all(-1) & (counts == counts[:1, :1])
    same = same.flatten(0, 1).all(0).tolist()
    rule_ok = None if block_mask.window_start is None else block_mask.rule_blocks()[0].all(0)
    partial_rows = part.idx[0, 0].tolist()
    keys: list = [None] * s.n_q
    last = s.n_q if s.q_len % s.block_q == 0 else s.n_q - 1  # a ragged last query block is left out
    for n in range(prefix, last):
        diag = n + off // bk
        if runs[n] is None or not same[n] or sum(runs[n][-1]) - 1 != diag:
            continue
        (start, _), partial = runs[n][-1], partial_rows[n][: part.counts[n]]
        head = len(partial) - 1
        if partial[-1:] != [diag] or partial[:-1] != list(range(start, start + head)):
            continue
        if rule_ok is not None and not bool(rule_ok[n, diag]):
            continue
        keys[n] = (start, head, runs[n][0] if len(runs[n]) == 2 else None)
    return keys


def _plan_causal_runs(
    block_mask: BlockMask, full: _Blocks, part: _Blocks, s: Shapes, prefix: int, alone: list[bool]
) -> list[CausalCall | ViewCall]:
    """A ``CausalCall`` for each run of at least two query blocks past ``prefix`` with the same
    ``_causal_run_keys``, plus merged ``ViewCall``s (stride 0) for its cut first blocks and its sinks.
    Marks them served in ``alone``."""
    keys = _causal_run_keys(block_mask, full, part, s, prefix)
    calls: list[CausalCall | ViewCall] = []
    n = prefix
    while n < s.n_q:
        n1 = n + 1
        while n1 < s.n_q and keys[n] is not None and keys[n1] == keys[n]:
            n1 += 1
        if keys[n] is not None and n1 - n >= 2:
            start, head, sink = keys[n]
            calls.append(CausalCall(n, n1, start + head))
            calls += [ViewCall(n, n1, start, head, 0, merge=True)] if head else []
            calls += [ViewCall(n, n1, sink[0], sink[1], 0, merge=True)] if sink else []
            alone[n:n1] = [False] * (n1 - n)
        n = n1
    return calls


def _plan_padded_views(
    block_mask: BlockMask, full: _Blocks, part: _Blocks, s: Shapes, prefix: int, alone: list[bool]
) -> list[ViewCall]:
    """View calls for query blocks past ``prefix`` still ``alone`` under a key rule whose window runs
    end ``step`` blocks further each block but may start irregularly (strided windows off the block
    grid; on it, the same segments as ``_plan_views``): each
    segment takes one strided view of the longest run's length, extended back over blocks the key
    rule masks wholly for those query blocks (so the extension adds masked keys only, at most a third
    more), plus its common sink run (merged). Marks them served in ``alone``."""
    runs = _selected_runs(full, part, s.n_k)
    runs[:prefix] = [None] * prefix
    masked = block_mask.rule_blocks()[1].all(0)  # [nQ, nK]: the rule masks every key for every row
    step, size = s.block_q // s.block_k, _MAX_SCORE_ELEMENTS // (s.b * s.r * s.block_k)

    def fits(n0: int, n1: int, length: int) -> int | None:
        """The common run length if query blocks [n0, n1) can share one padded view, else None;
        [n0, n1 - 1) share one of ``length`` (only a longer one is checked for them again)."""
        grown = max(length, runs[n1 - 1][-1][1])
        floor = sum(runs[n0][0]) if len(runs[n0]) == 2 else 0  # never reach back into the sinks
        counts = [runs[n][-1][1] for n in range(n0, n1)]
        if min(counts) < _PAD_RATIO * grown or (n1 - n0) * grown > size:
            return None
        for n in range(n0 if grown > length else n1 - 1, n1):
            start, count = runs[n][-1]
            first = start + count - grown
            if first < floor or not bool(masked[n, first:start].all()):
                return None
        return grown

    def joins(n: int) -> bool:  # query block n continues the segment ending at n - 1
        prev, cur = runs[n - 1], runs[n]
        return (
            len(cur) == len(prev)
            and (len(cur) == 1 or cur[0] == prev[0])
            and sum(cur[-1]) - sum(prev[-1]) == step
        )

    calls: list[ViewCall] = []
    n = 0
    while n < s.n_q:
        if not alone[n] or runs[n] is None:
            n += 1
            continue
        n1, length = n + 1, runs[n][-1][1]
        while n1 < s.n_q and alone[n1] and runs[n1] is not None and joins(n1):
            grown = fits(n, n1 + 1, length)
            if grown is None:
                break
            n1, length = n1 + 1, grown
        if n1 - n >= 2:
            start, count = runs[n][-1]
            calls.append(ViewCall(n, n1, start + count - length, length, step, merge=False))
            if len(runs[n]) == 2:
                calls.append(ViewCall(n, n1, *runs[n][0], 0, merge=True))
            alone[n:n1] = [False] * (n1 - n)
        n = n1
    return calls


def _plan_views(full: _Blocks, part: _Blocks, s: Shapes, prefix: int, alone: list[bool]) -> list[ViewCall]:
    """View calls for the query blocks past ``prefix`` whose selected blocks are one or two contiguous
    runs moving by a fixed stride (windows, sink + local), in segments of at least two query blocks (a
    lone block is left to the gathers, which batch equal counts). Marks them served in ``alone``."""
    runs = _selected_runs(full, part, s.n_k)
    runs[:prefix] = [None] * prefix
    runs = [r if todo else None for r, todo in zip(runs, alone, strict=True)]  # causal runs served
    calls = []
    size = _MAX_SCORE_ELEMENTS // (s.b * s.r * s.block_k)
    for n0, n1, strides in _strided_segments(runs, s.block_q // s.block_k, size):
        if n1 - n0 < 2:
            continue
        for i, ((start, count), stride) in enumerate(zip(runs[n0], strides, strict=True)):
            calls.append(ViewCall(n0, n1, start, count, stride, merge=i > 0))
        alone[n0:n1] = [False] * (n1 - n0)
    return calls


def _block_cost(s: Shapes) -> int:
    """fp32 elements per gathered block of a call: its K, V and mask."""
    return s.b * s.hr * s.block_k * (2 * s.d + s.r)


def _gather_runs(blocks: _Blocks, todo: list[bool], s: Shapes) -> list[tuple[int, int]]:
    """Runs [n0, n1) of the query blocks in ``todo`` with blocks in ``blocks``, one gather call each:
    equal (or, down to _PAD_RATIO, padded) counts within the call's size bound."""
    keys = [c if c and todo[n] else None for n, c in enumerate(blocks.counts)]
    return _runs(keys, [c * _block_cost(s) for c in blocks.counts], _PAD_RATIO)


def _plan_gathers(full: _Blocks, part: _Blocks, s: Shapes, alone: list[bool]) -> list[GatherCall]:
    """Gather calls for the query blocks still ``alone``. A long run of query blocks with few keys shares
    one call for its full + partial blocks (one mask over all keys); the rest run full and partial
    blocks apart, each in runs of equal (or, down to _PAD_RATIO, padded) counts; a group's stacked
    tiles always run them apart."""
    cost = _block_cost(s)
    limit = max(1, _SHARED_CALL_KEYS_PER_DIM * s.d // s.block_k) if s.r <= s.block_q else 0
    facts = zip(alone, full.counts, part.counts, full.needs, part.needs, strict=True)
    both = [
        (f, p, nf, np) if todo and 0 < f and 0 < p and f + p <= limit else None
        for todo, f, p, nf, np in facts
    ]
    sizes = [(f + p) * cost for f, p in zip(full.counts, part.counts, strict=True)]
    shared = [(n0, n1) for n0, n1 in _runs(both, sizes) if n1 - n0 > 1]
    calls = [GatherCall(n0, n1, full=True, partial=True) for n0, n1 in shared]
    for n0, n1 in shared:
        alone[n0:n1] = [False] * (n1 - n0)
    for blocks, is_full in ((full, True), (part, False)):
        runs = _gather_runs(blocks, alone, s)
        calls += [GatherCall(n0, n1, full=is_full, partial=not is_full) for n0, n1 in runs]
    return calls


class _Executor:
    """Runs a GatherPlan (not whole-causal) on q, k, v: operands prepared once, then one attention call
    per planned call, each written (or merged by LSE) straight into the output's tiles."""

    def __init__(
        self, plan: GatherPlan, q, k, v, key_ok, op, *, scale, softcap, sliding_window, key_bias=None
    ):
        s = self.s = plan.shapes
        self.plan, self.op, self.scale, self.softcap, self.window = plan, op, scale, softcap, sliding_window
        self.q, self.k, self.v, self.key_ok = q, k, v, key_ok  # key_ok None or bool [B, nK * block_k]
        dev = self.dev = q.device
        self.dtype = compute_dtype(q.dtype, op)  # of the attention calls' operands
        # Query tiles qb [nQ, B, Hr, R, D] in that dtype, padded to whole blocks, rows (position, head)
        # pairs for a group: a view of HF-layout queries when Hkv = 1 (no transposing copy).
        qr = _padded_rows(q, s.n_q * s.block_q, self.dtype)  # [B, Hq, nQ * bq, D], [B, nQ * bq, Hq, D] memory
        if s.per_q_head:
            self.qb = qr.unflatten(2, (s.n_q, s.block_q)).permute(2, 0, 1, 3, 4)
            row_pos = torch.arange(s.r, device=dev)
        else:
            qb = qr.unflatten(1, (s.hkv, s.g)).unflatten(3, (s.n_q, s.block_q)).permute(3, 0, 1, 4, 2, 5)
            self.qb = qb.reshape(s.n_q, s.b, s.hr, s.r, s.d)
            row_pos = torch.arange(s.r, device=dev) // s.g
        # pos_q [nQ, R]: each tile row's key position (bottom-right alignment)
        self.pos_q = row_pos + torch.arange(s.n_q, device=dev)[:, None] * s.block_q + s.kv_len - s.q_len
        # K/V [B, Hkv, nK * bk, D], padded to whole blocks, for views; flat blocks for gathers
        length = s.n_k * s.block_k
        self.k4, self.v4 = (_padded(x, s.kv_len, length, self.dtype) for x in (k, v))
        self.kflat = self.k4.view(s.b * s.hkv * s.n_k, s.block_k, s.d)
        self.vflat = self.v4.view(s.b * s.hkv * s.n_k, s.block_k, s.d)
        self.kbias = None  # fp32 [B, Hkv, nK * bk], -inf past Tk
        if key_bias is not None:
            kb = F.pad(key_bias.float(), (0, length - s.kv_len), value=float("-inf"))
            self.kbias = kb.expand(s.b, -1, -1).contiguous()
        kv_head = torch.arange(s.hr, device=dev) // (s.g if s.per_q_head else 1)
        first_block = torch.arange(s.b, device=dev)[:, None, None] * s.hkv + kv_head[:, None]
        self.base = first_block * s.n_k  # [B, Hr, 1]: flat id of each row head's block 0
        self.ws_rows = self.sink = None
        if plan.rule is not None:  # the key rule per tile row: window starts [nQ, B', R], sink ends [B']
            ws, sink = plan.rule
            ws = F.pad(ws.long(), (0, s.n_q * s.block_q - s.q_len)).view(-1, s.n_q, s.block_q)
            self.ws_rows = ws[..., row_pos].transpose(0, 1)
            self.sink = sink.long()

    def run(self) -> tuple[Tensor, Tensor]:
        """(out [B, Hq, Tq, D] fp32, lse [B, Hq, Tq] fp32) over [B, Tq, Hq, D] memory (HF's layout)."""
        s, plan = self.s, self.plan
        out = torch.empty(s.b, s.n_q * s.block_q, s.hq, s.d, device=self.dev)
        lse = torch.empty(s.b, s.n_q * s.block_q, s.hq, device=self.dev)
        # tiles [nQ, B, Hkv, bq, G(, D)] of that memory: every call's result lands there
        acc = out.view(s.b, s.n_q, s.block_q, s.hkv, s.g, s.d).permute(1, 0, 3, 2, 4, 5)
        acc_lse = lse.view(s.b, s.n_q, s.block_q, s.hkv, s.g).permute(1, 0, 3, 2, 4)
        if plan.causal_blocks:
            o, o_lse = self._causal_tiles(CausalCall(0, plan.causal_blocks, 0))
            acc[: plan.causal_blocks].copy_(o)
            acc_lse[: plan.causal_blocks].copy_(o_lse)
        for n0, n1 in plan.unwritten:  # rows without keys: one range of `out` per run
            out[:, n0 * s.block_q : n1 * s.block_q].zero_()
            lse[:, n0 * s.block_q : n1 * s.block_q].fill_(float("-inf"))
        for call in plan.calls:
            if isinstance(call, CausalCall):
                o, o_lse = self._causal_tiles(call)
            elif isinstance(call, GatherCall):
                o, o_lse = self._gather(call)
            elif not plan.causal:
                o, o_lse = self._prefix_view(call)
            else:
                o, o_lse = self._view(call)
            n0, n1 = call.n0, call.n1
            if call.merge:
                merge_attention_(acc[n0:n1], acc_lse[n0:n1], o, o_lse)
            else:
                acc[n0:n1].copy_(o)
                acc_lse[n0:n1].copy_(o_lse)
        return out.transpose(1, 2)[:, :, : s.q_len], lse.transpose(1, 2)[:, :, : s.q_len].contiguous()

    def _causal_tiles(self, call: CausalCall) -> tuple[Tensor, Tensor]:
        """A CausalCall (query blocks [n0, n1), keys from block ``start`` to theirs) in one fused causal
        call, as tiles [n, B, Hkv, bq, G(, D)] fp32."""
        s, bq, n = self.s, self.s.block_q, call.n1 - call.n0
        k0, k1 = call.start * s.block_k, s.kv_len - s.q_len + call.n1 * bq
        q, k, v = self.q[:, :, call.n0 * bq : call.n1 * bq], self.k[:, :, k0:k1], self.v[:, :, k0:k1]
        o, lse = _causal_attention(q, k, v, self.scale, self.op)
        o = o.unflatten(1, (s.hkv, s.g)).unflatten(3, (n, bq)).permute(3, 0, 1, 4, 2, 5)
        return o, lse.unflatten(1, (s.hkv, s.g)).unflatten(3, (n, bq)).permute(3, 0, 1, 4, 2)

    def _tiles(self, o: Tensor, lse: Tensor, empty: Tensor | None, ng: int) -> tuple[Tensor, Tensor]:
        """A call's (out [ng * B, Hr, R, D], lse [ng * B, Hr, R]) as tiles [ng, B, Hkv, bq, G(, D)]
        (views); rows without an allowed key (``empty``, broadcastable to [ng, B, Hr, R]) get out = 0,
        lse = -inf (the fused op leaves lse = 0 there)."""
        s = self.s
        o, lse = o.reshape(ng, s.b, s.hr, s.r, s.d), lse.reshape(ng, s.b, s.hr, s.r)
        if empty is not None and bool(empty.any()):
            o, lse = o.masked_fill(empty[..., None], 0.0), lse.masked_fill(empty, float("-inf"))
        if s.per_q_head:  # rows are one query head's positions
            o, lse = o.unflatten(2, (s.hkv, s.g)), lse.unflatten(2, (s.hkv, s.g))
            return o.transpose(3, 4), lse.transpose(3, 4)
        return o.unflatten(3, (s.block_q, s.g)), lse.unflatten(3, (s.block_q, s.g))  # (position, head) rows

    def _run_views(self, call: ViewCall, j: int = 0, p: int = 1) -> tuple[Tensor, Tensor]:
        """K and V of a ViewCall's query blocks n0 + j, n0 + j + p, ... as [ng', B * Hkv, count * block_k,
        D] strided views of the padded K/V (no copy): query block n0 + i reads the run from block
        ``start + i * stride``."""
        s, bk = self.s, self.s.block_k
        shape = (len(range(j, call.n1 - call.n0, p)), s.b * s.hkv, call.count * bk, s.d)
        strides = (call.stride * p * bk * s.d, s.n_k * bk * s.d, s.d, 1)
        offset = (call.start + j * call.stride) * bk * s.d
        return tuple(t.as_strided(shape, strides, t.storage_offset() + offset) for t in (self.k4, self.v4))

    def _view(self, call: ViewCall) -> tuple[Tensor, Tensor]:
        """A ViewCall as tiles. Where every query block sees the same relative pattern (stride * block_k
        == block_q; under a key rule also the same window starts relative to the queries and no sink key
        in the run) the mask is built once and broadcast. A key rule whose pattern repeats every p query
        blocks (strided windows: p = stride / gcd(stride, block_q)) takes p calls, each over every p-th
        query block with one broadcast mask, instead of one mask per query block."""
        s, ng = self.s, call.n1 - call.n0
        p = self._pattern_period(call)
        if p <= 1:
            o, lse, empty = self._view_items(call, 0, 1, same_pattern=p == 1)
            return self._tiles(o, lse, empty, ng)
        o = torch.empty(ng, s.b * s.hr, s.r, s.d, device=self.dev)
        lse = torch.empty(ng, s.b * s.hr, s.r, device=self.dev)
        for j in range(p):
            o_j, lse_j, empty = self._view_items(call, j, p, same_pattern=True)
            if empty is not None and bool(empty.any()):
                empty = empty.expand(-1, s.b, s.hr, s.r).flatten(1, 2)
                o_j, lse_j = o_j.masked_fill(empty[..., None], 0.0), lse_j.masked_fill(empty, float("-inf"))
            o[j::p], lse[j::p] = o_j, lse_j
        return self._tiles(o, lse, None, ng)

    def _pattern_period(self, call: ViewCall) -> int:
        """1: every query block of the call sees the same relative mask; p > 1: the same as the query
        block p before it (up to _MAX_PERIOD); 0: neither."""
        s, bk = self.s, self.s.block_k
        if call.stride * bk != s.block_q:
            return 0
        if self.ws_rows is None:  # the causal/window rule moves with the queries
            return 1
        if int(call.start * bk) < int(self.sink.max()):  # sinks do not move with the queries
            return 0
        pos = self.pos_q[call.n0 : call.n1, None]
        rel = self.ws_rows[call.n0 : call.n1] - pos  # [ng, B', R]
        pad = pos >= s.kv_len  # the last block's padding rows: any mask will do, their results are dropped
        for p in range(1, min(_MAX_PERIOD, rel.shape[0] // 2) + 1):
            if bool(((rel[p:] == rel[:-p]) | pad[p:] | pad[:-p]).all()):
                return p
        return int(rel.shape[0] == 1)

    def _view_items(self, call: ViewCall, j: int, p: int, same_pattern: bool):
        """(out [ng', B * Hr, R, D], lse [ng', B * Hr, R], empty rows or None) of query blocks n0 + j,
        n0 + j + p, ... of a ViewCall; ``same_pattern``: they all see the first one's relative mask."""
        s, dev, bk = self.s, self.dev, self.s.block_k
        rows = slice(call.n0 + j, call.n1, p)
        ng, length = len(range(*rows.indices(s.n_q))), call.count * bk
        ks, vs = self._run_views(call, j, p)
        first = call.start + (j + torch.arange(ng, device=dev)[:, None] * p) * call.stride
        kpos = first * bk + torch.arange(length, device=dev)  # [ng, L]
        if same_pattern:
            rows = slice(rows.start, rows.start + 1)
        qpos = self.pos_q[rows]  # [ng' = 1 or ng, R]
        key = kpos[: qpos.shape[0], None, :]  # compared with the queries, no [ng', R, L] distance tensor
        allowed = key <= qpos[:, :, None]  # [ng', R, L]; also drops the Tk tail (past every query)
        if self.window is not None:
            allowed &= key > qpos[:, :, None] - self.window
        allowed = allowed[:, None, None]  # [ng', 1, 1, R or 1, L]
        if self.ws_rows is not None:
            allowed = allowed & self._rule(kpos[: qpos.shape[0], None, None, None, :], rows)
        if self.key_ok is not None:
            allowed = allowed & self.key_ok[:, kpos].transpose(0, 1)[:, :, None, None, :]  # [ng, B, 1, R, L]
        bias = empty = None
        if self.kbias is not None:  # per-key logits: [ng, B, Hkv, 1, L]; -inf keys are masked ones
            kb = self.kbias[:, :, kpos].permute(2, 0, 1, 3)[..., None, :]
            allowed = allowed & (kb > float("-inf"))
            bias, empty = torch.where(allowed, kb, float("-inf")).flatten(1, 2), ~allowed.any(-1)
        elif not bool(allowed.all()):  # additive mask in its final dtype, broadcast over ng and heads
            bias = torch.where(allowed, 0.0, float("-inf"))
            bias = bias.expand(-1, -1, s.hr, -1, -1).flatten(1, 2) if bias.shape[1] > 1 else bias[:, 0]
            empty = ~allowed.any(-1)  # [ng', B', 1, R]
        items = self.qb[call.n0 + j : call.n1 : p]
        if call.stride == 0 and bias is None and ng > 1:
            # One run (the sinks) that every row sees whole: one call with the query blocks' rows stacked
            # over one copy of it (as one short item per query block, the op ran at ~0.6x its rate).
            qs = items.permute(1, 2, 0, 3, 4).reshape(1, s.b * s.hr, ng * s.r, s.d)
            o, lse = _attend(qs, ks[:1], vs[:1], None, self.scale, self.softcap)
            o = o.reshape(s.b * s.hr, ng, s.r, s.d).transpose(0, 1)
            return o, lse.reshape(s.b * s.hr, ng, s.r).transpose(0, 1), None
        o, lse = _attend(items.reshape(ng, s.b * s.hr, s.r, s.d), ks, vs, bias, self.scale, self.softcap)
        return o, lse, empty

    def _prefix_view(self, call: ViewCall) -> tuple[Tensor, Tensor]:
        """A non-causal ViewCall (``_plan_prefix_views``) as tiles: each row attends to its own selected
        blocks of the shared run; its other blocks, keys past Tk, padding and -inf key biases are masked.
        With a per-query-head mask each query head keeps its own row of the mask, broadcast over its
        positions, and reads its KV head's view (no per-head K/V copies, no per-row mask)."""
        s, dev, bk = self.s, self.dev, self.s.block_k
        n0, n1, ng, count = call.n0, call.n1, call.n1 - call.n0, call.count
        length = count * bk
        ks, vs = self._run_views(call)
        blocks = self.plan.full
        rel = blocks.idx[:, :, n0:n1] - call.start  # rows' blocks before the view: the rest gathers'
        rel = torch.where(blocks.slot_ok[:, :, n0:n1] & (rel >= 0), rel, count)
        member = torch.zeros(*rel.shape[:3], count + 1, dtype=torch.bool, device=dev)
        member = member.scatter_(-1, rel, True)[..., :count]  # [Bm, Hr, ng, count]
        kpos = call.start * bk + torch.arange(length, device=dev)
        allowed = member.repeat_interleave(bk, -1).permute(2, 0, 1, 3) & (kpos < s.kv_len)  # [ng, Bm, Hr, L]
        if self.key_ok is not None:
            allowed = allowed & self.key_ok[None, :, None, kpos]
        if self.kbias is not None:  # per-key logits [B, Hkv, L], each row head reading its KV head's
            kb = self.kbias[:, :, kpos]
            kb = kb.repeat_interleave(s.g, 1) if s.per_q_head else kb
            allowed = allowed & (kb > float("-inf"))
            bias = torch.where(allowed, kb, float("-inf"))
        else:
            bias = torch.where(allowed, 0.0, float("-inf"))
        empty = ~allowed.any(-1)[..., None]  # [ng, B', Hr, 1]
        bias = bias.expand(ng, s.b, s.hr, length)
        # [ng, B * Hr, R, D] over K/V [ng, B * Hkv, L, D]: with a per-query-head mask, the fused op maps
        # each query head to its KV head and the mask broadcasts over the rows of a head
        qs, bias = self.qb[n0:n1].reshape(ng, s.b * s.hr, s.r, s.d), bias.reshape(ng, s.b * s.hr, 1, length)
        o, lse = _attend(qs, ks, vs, bias, self.scale, self.softcap)
        return self._tiles(o, lse, empty, ng)

    def _gather(self, call: GatherCall) -> tuple[Tensor, Tensor]:
        """A GatherCall as tiles: K/V [ng * B, Hr, L, D] gathered into a reused workspace, one additive
        mask [ng * B, Hr, R or 1, L] when some key of the call needs masking."""
        s, n0, n1 = self.s, call.n0, call.n1
        plan = self.plan
        uses = ((plan.full, call.full), (plan.part, call.partial), (plan.rest, call.rest))
        lists = [blocks for blocks, use in uses if use]
        ng, counts = n1 - n0, [max(blocks.counts[n0:n1]) for blocks in lists]
        starts = [blocks.starts[n0] for blocks in lists]
        contiguous = all(a >= 0 for a in starts) and all(
            a + c == b for a, c, b in zip(starts, counts, starts[1:], strict=False)
        )
        kb = None  # per-key logits [ng, B, Hr, 1, L] when the call has a key bias
        if ng == 1 and contiguous:  # one run of blocks shared by every row: a slice, no copy
            k0, k1 = starts[0] * s.block_k, (starts[0] + sum(counts)) * s.block_k
            ks, vs = (t[:, :, k0:k1] for t in (self.k4, self.v4))
            if self.kbias is not None:
                kb = self.kbias[None, :, :, None, k0:k1]
                kb = kb.repeat_interleave(s.g, 2) if s.per_q_head else kb
        else:  # [ng, B, Hr, c] block ids -> one index_select for the whole call
            ids = torch.cat([bl.idx[:, :, n0:n1, :c] for bl, c in zip(lists, counts, strict=True)], -1)
            # slots past a row's count are masked below; clamp them to a valid block for the gather
            flat = (self.base + ids.permute(2, 0, 1, 3).clamp(0, s.n_k - 1)).flatten()
            ks, vs = (
                torch.index_select(src, 0, flat, out=self._workspace(name, flat.numel()))
                for name, src in (("k", self.kflat), ("v", self.vflat))
            )
            ks, vs = ks.view(ng * s.b, s.hr, -1, s.d), vs.view(ng * s.b, s.hr, -1, s.d)
            if self.kbias is not None:
                kb = self.kbias.view(-1, s.block_k).index_select(0, flat).view(ng, s.b, s.hr, 1, -1)
        bias = empty = None
        if kb is not None or any(blocks.needs_mask(n0, n1) for blocks in lists):
            parts = [self._allowed_keys(blocks, n0, n1) for blocks in lists]
            rows = max(p.shape[3] for p in parts)
            allowed = torch.cat([p.expand(ng, s.b, s.hr, rows, p.shape[4]) for p in parts], -1)
            if kb is None:
                bias = torch.where(allowed, 0.0, float("-inf")).flatten(0, 1)
            else:  # -inf logits mask their keys, so rows of only such keys count as empty
                allowed = allowed & (kb > float("-inf"))
                bias = torch.where(allowed, kb, float("-inf")).flatten(0, 1)
            empty = ~allowed.any(-1)  # [ng, B, Hr, R or 1]
        o, lse = _attend(self.qb[n0:n1].flatten(0, 1), ks, vs, bias, self.scale, self.softcap)
        return self._tiles(o, lse, empty, ng)

    def _allowed_keys(self, blocks: _Blocks, n0: int, n1: int) -> Tensor:
        """bool [ng, B or 1, Hr, R or 1, L]: the keys of ``blocks``' first ``c`` slots (c = the largest
        count) that query blocks [n0, n1) may attend to."""
        s, dev, bk = self.s, self.dev, self.s.block_k
        c = max(blocks.counts[n0:n1])
        ids = blocks.idx[:, :, n0:n1, :c].permute(2, 0, 1, 3)  # [ng, Bm, Hr, c]
        if not blocks.needs_mask(n0, n1):
            return torch.ones(*ids.shape[:3], 1, c * bk, dtype=torch.bool, device=dev)
        pos = (ids[..., None] * bk + torch.arange(bk, device=dev)).flatten(-2)  # [ng, Bm, Hr, L]
        allowed = blocks.slot_ok[:, :, n0:n1, :c].permute(2, 0, 1, 3).repeat_interleave(bk, -1)
        allowed = allowed & (pos < s.kv_len)
        if self.key_ok is not None:
            allowed = allowed & self.key_ok[torch.arange(s.b, device=dev)[None, :, None, None], pos]
        allowed = allowed[..., None, :]
        if blocks.elementwise:
            dist = self.pos_q[n0:n1, None, None, :, None] - pos[..., None, :]
            allowed = allowed & (dist >= 0)
            if self.window is not None:
                allowed = allowed & (dist < self.window)
            if self.ws_rows is not None:
                allowed = allowed & self._rule(pos[..., None, :], slice(n0, n1))
        return allowed

    def _rule(self, pos: Tensor, rows: slice) -> Tensor:
        """The key rule for query blocks ``rows``: bool [ng, B', 1, R, L] from key positions ``pos``
        (broadcastable to [ng, *, *, 1, L]): key >= the row's window start, or a sink."""
        allowed = pos >= self.ws_rows[rows, :, None, :, None]
        if int(pos.min()) < int(self.sink.max()):  # some key may be a sink
            allowed |= pos < self.sink[None, :, None, None, None]
        return allowed

    def _workspace(self, name: str, n_blocks: int) -> Tensor:
        """[n_blocks, block_k, D] of this thread's kept gather buffer ``name`` (one per compute dtype)."""
        size = n_blocks * self.s.block_k * self.s.d
        buffers = _gather_buffers.__dict__
        key = (name, self.dev, self.dtype)
        if key not in buffers or buffers[key].numel() < size:
            buffers.pop(key, None)  # free the old one before the larger one is mapped
            buffers[key] = torch.empty(size, dtype=self.dtype, device=self.dev)
        return buffers[key][:size].view(n_blocks, self.s.block_k, self.s.d)


# The gathered K and V of each call land in two buffers kept per thread between calls (and layers): a
# fresh tensor per call costs more in first-touch page faults than the copy into it (glibc maps each
# allocation over 32 MiB afresh). A call's gather is bounded by _MAX_SCORE_ELEMENTS unless one query
# block alone needs more, so the buffers hold at most ~128 MiB in the usual case.
_gather_buffers = threading.local()


def release_workspace() -> None:
    """Free the gather buffers the CPU path keeps between calls on this thread (the next call maps
    them again). ``sparse_llm.unsparsify`` calls it; a memory benchmark calls it before it measures."""
    _gather_buffers.__dict__.clear()


def _group_split(block_mask: BlockMask, s: Shapes, causal: bool) -> tuple[BlockMask, BlockMask] | None:
    """A causal per-query-head mask as (the blocks every head of a KV group selects, one row per group;
    the rest, per query head), when the shared blocks are at least ``_GROUP_SHARED_MIN`` of all: the
    group's G query heads then share their tiles (G * block_q rows per call instead of block_q), which
    ATen's fused op runs ~1.3x faster per key at D = 256 on a CPU (docs/benchmarks.md, "Blocks a KV
    group shares"). Top-k methods' sinks and local window are shared by construction. Non-causal masks
    (far fields) are left whole: there the blocks no head of the group skips are most of each row, and
    the gathers of the rest cost more than the bigger tiles save (measured)."""
    if not (causal and s.per_q_head and s.n_q > 1):
        return None
    shared, rest = block_mask.split_groups(s.g)
    if shared.num_selected_blocks * s.g < _GROUP_SHARED_MIN * block_mask.num_selected_blocks:
        return None
    return shared, rest


def gather_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    block_mask: BlockMask,
    *,
    scale: float,
    causal: bool = True,
    softcap: float | None = None,
    sliding_window: int | None = None,
    key_padding_mask: Tensor | None = None,
    key_bias: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Block-sparse attention over the blocks of ``block_mask``: plan the calls, then run them.

    Inputs are validated by the dispatcher (``kernels.block_sparse_attention``, which documents the
    semantics): q [B, Hq, Tq, D], k/v [B, Hkv, Tk, D] of one float dtype, any strides; ``block_mask``
    for Tq x Tk with batch 1 or B and heads 1, Hkv or Hq; ``key_padding_mask`` None or bool [B, Tk]
    (True = a real key); ``key_bias`` None or float [B or 1, Hkv, Tk], added to the logits after scale
    and softcap (with it no fused ``is_causal`` call is planned: those take no mask). Returns
    (out [B, Hq, Tq, D] in q.dtype, a view of [B, Tq, Hq, D] memory;
    lse [B, Hq, Tq] fp32, -inf with out = 0 for rows without an allowed key).
    A causal per-query-head mask may run as two masks merged by log-sum-exp (``_group_split``).
    """
    kwargs = dict(
        scale=scale,
        causal=causal,
        softcap=softcap,
        sliding_window=sliding_window,
        key_padding_mask=key_padding_mask,
        key_bias=key_bias,
    )
    parts = _group_split(block_mask, Shapes.of(q, k, block_mask), causal)
    if parts is None:
        out, lse = _gather_fp32(q, k, v, block_mask, **kwargs)
    else:
        out, lse = _gather_fp32(q, k, v, parts[0], **kwargs)
        if parts[1].num_selected_blocks:
            merge_attention_(out, lse, *_gather_fp32(q, k, v, parts[1], **kwargs))
    return out.to(q.dtype), lse


def _gather_fp32(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    block_mask: BlockMask,
    *,
    scale: float,
    causal: bool,
    softcap: float | None,
    sliding_window: int | None,
    key_padding_mask: Tensor | None,
    key_bias: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """:func:`gather_attention` for one mask, out in fp32 (so that a second part can merge into it)."""
    shapes = Shapes.of(q, k, block_mask)
    op = _fused_op(q.device, softcap)
    padding = key_padding_mask is not None and not bool(key_padding_mask.all())
    plan = plan_gather(
        block_mask,
        shapes,
        causal=causal,
        sliding_window=sliding_window,
        padding=padding,
        fused=op is not None and key_bias is None,
    )
    if plan.causal_blocks == shapes.n_q:
        return _causal_attention(q, k, v, scale, op)
    key_ok = F.pad(key_padding_mask, (0, shapes.n_k * shapes.block_k - shapes.kv_len)) if padding else None
    run = _Executor(
        plan,
        q,
        k,
        v,
        key_ok,
        op,
        scale=scale,
        softcap=softcap,
        sliding_window=sliding_window,
        key_bias=key_bias,
    )
    return run.run()

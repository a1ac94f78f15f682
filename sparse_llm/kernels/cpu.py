"""Block-sparse attention in plain PyTorch: selected K/V blocks per query block, fused attention calls.

The CPU path (and the fallback on any device). Cost scales with the selected blocks; no Tq x Tk tensor.
Consecutive query blocks with the same block counts form a segment served by ONE attention call. Three
ways to feed it, cheapest first:

1. A mask covering the whole causal triangle (``dense`` on a global layer) is one fused call with
   ``is_causal``, so the flash kernel skips the masked half itself (``_causal_attention``).
2. Where every query block's selected blocks are one or two contiguous runs whose starts move by a fixed
   stride (sliding windows: block_q / block_k blocks per query block; sinks: 0), each run of a segment
   is an ``as_strided`` view of K/V (no copy), and its mask is the causal/window rule built once for
   the first query block and broadcast over the segment (the relative pattern is the same for all).
3. Otherwise the K/V blocks are gathered by one ``index_select`` and stacked along the batch dimension.

GQA is never expanded: with a mask shared by a KV head's group, the group's queries are stacked into
one [G * block_q, D] tile (fla's ``naive.py`` grouping); with a per-query-head mask each query head
gathers from its own KV head. Full blocks need no element mask (only an additive per-key mask for key
padding, the Tk tail and padded index slots); partial blocks get the causal/window element mask. When a
segment's keys are few, full and partial blocks share one call (one mask over all keys); otherwise they
run apart, and the second part (and a second view run) is merged by log-sum-exp into the output.
Results are written straight into the output's memory. Everything is computed in fp32.

On CPU each call goes to ATen's fused flash-attention kernel
(``aten::_scaled_dot_product_flash_attention_for_cpu``, which returns the LSE, takes strided K/V and a
broadcast mask, and maps GQA heads itself). With softcap, on other devices, or if the op is missing, a
matmul/exp version chunked over keys is used. Few, large ops matter where cores are shared: each op is
an OpenMP parallel region that may wait a scheduler tick for its other threads (docs/benchmarks.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from sparse_llm.kernels.block_mask import BlockMask, block_geometry
from sparse_llm.kernels.merge import merge_attention

# fp32 elements per segment (gathered K/V + masks) and per score tile of the matmul path: 2^25 = 128 MiB.
_MAX_SCORE_ELEMENTS = 1 << 25
# Full and partial blocks share one call (one mask over all keys) up to this many keys per head dim.
_SHARED_CALL_KEYS_PER_DIM = 4
# Gathers of query blocks with unequal block counts share a call down to this ratio of counts (the
# padded slots are masked: at most 1/0.75 - 1 = 33 % extra keys in that call, usually far less).
_PAD_RATIO = 0.75


def _fused_op(device: torch.device, softcap: float | None):
    if device.type != "cpu" or softcap is not None:
        return None
    return getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _attend(qs, k, v, bias: Tensor | None, scale: float, softcap: float | None):
    """qs [B, Hr, R, D], k, v [B, Hr, L, D] fp32 (any strides); bias None or an additive fp32 mask
    (0 / -inf) broadcastable to [B, Hr, R, L]. Returns (out [B, Hr, R, D], lse [B, Hr, R]). Rows without
    an allowed key are left to the caller: the fused op returns lse = 0 for them (the matmul path -inf)."""
    b, hr, r, _ = qs.shape
    length = k.shape[2]
    step = max(1, _MAX_SCORE_ELEMENTS // (b * hr * r))
    op = _fused_op(qs.device, softcap)
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
        for o, lse_part in parts[1:]:
            out, lse = merge_attention(out, lse, o, lse_part)
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


def _padded_rows(x: Tensor, length: int) -> Tensor:
    """fp32 x [B, H, T, D] padded with zeros to ``length`` along T, returned as a [B, H, length, D] view
    of [B, length, H, D] memory: HF's query layout, so its queries usually need no copy at all."""
    b, h, t, d = x.shape
    if t == length and x.dtype == torch.float32 and x.transpose(1, 2).is_contiguous():
        return x
    out = torch.empty(b, length, h, d, device=x.device).transpose(1, 2)
    out[:, :, :t].copy_(x)
    out[:, :, t:].zero_()
    return out


def _padded(x: Tensor, dim_len: int, length: int) -> Tensor:
    """fp32 copy of x [B, H, T, D] padded with zeros to ``length`` along T (no copy if nothing to do)."""
    if length == dim_len:
        return x.float().contiguous()
    out = torch.empty(*x.shape[:2], length, x.shape[3], device=x.device)
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


def _block_list(
    num: Tensor, idx: Tensor, n_k: int, cut_tail: bool, padding: bool, elementwise: bool, views: bool
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
    starts = torch.where(same & steps.all(-1) & views, idx[0, 0, :, 0], -1).tolist()
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
    return int(dense_rows.int().cumprod(0).sum())


def _causal_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, op) -> tuple[Tensor, Tensor]:
    """Whole causal attention in one fused call, so the flash kernel skips the masked half itself.
    ATen's ``is_causal`` is top-left aligned, ours bottom-right: with Tq < Tk the first Tk - Tq keys
    are seen by every query (one unmasked call) and the rest form a square causal block; merged by LSE."""
    q32, k32, v32 = q.float(), k.float(), v.float()
    prefix = k.shape[2] - q.shape[2]
    out, lse = op(q32, k32[:, :, prefix:], v32[:, :, prefix:], is_causal=True, scale=scale)
    if prefix:
        out, lse = merge_attention(out, lse, *op(q32, k32[:, :, :prefix], v32[:, :, :prefix], scale=scale))
    return out.to(q.dtype), lse


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
) -> tuple[Tensor, Tensor]:
    """Inputs validated by the dispatcher: q [B, Hq, Tq, D], k/v [B, Hkv, Tk, D], mask batch 1 or B,
    heads 1, Hkv or Hq. Returns (out [B, Hq, Tq, D] in q.dtype, lse [B, Hq, Tq] fp32)."""
    b, hq, q_len, d = q.shape
    hkv, kv_len = k.shape[1], k.shape[2]
    g = hq // hkv
    bq, bk = block_mask.block_q, block_mask.block_k
    n_q, n_k = block_mask.num_q_blocks, block_mask.num_kv_blocks
    hm = block_mask.kv_num_blocks.shape[1]
    dev = q.device
    per_q_head = hm == hq and g > 1
    hr = hq if per_q_head else hkv  # "row heads": heads whose queries share one gather
    r = bq if per_q_head else g * bq  # rows of one query tile
    mask_head = torch.arange(hr, device=dev) if hm == hr else torch.zeros(hr, dtype=torch.long, device=dev)
    kv_head = torch.arange(hr, device=dev) // (g if per_q_head else 1)
    op = _fused_op(dev, softcap)
    no_padding = key_padding_mask is None or bool(key_padding_mask.all())
    prefix = 0
    if causal and sliding_window is None and no_padding and op is not None:
        prefix = _dense_prefix(block_mask)
        if prefix == n_q:
            return _causal_attention(q, k, v, scale, op)

    # Query tiles [nQ, B, Hr, R, D], fp32, padded to whole blocks. A group's tile stacks its rows as
    # (position, head) pairs, the order of HF's [B, T, Hq, D] layout: a view of the queries when
    # Hkv = 1 and, below, the output is written in that layout too (no transposing copies).
    qr = _padded_rows(q, n_q * bq)  # [B, Hq, nQ * bq, D] over [B, nQ * bq, Hq, D] memory
    if per_q_head:
        qb = qr.unflatten(2, (n_q, bq)).permute(2, 0, 1, 3, 4)
        row_pos = torch.arange(r, device=dev)
    else:
        qb = qr.unflatten(1, (hkv, g)).unflatten(3, (n_q, bq)).permute(3, 0, 1, 4, 2, 5)
        qb = qb.reshape(n_q, b, hr, r, d)
        row_pos = torch.arange(r, device=dev) // g
    pos_q = row_pos + torch.arange(n_q, device=dev)[:, None] * bq + kv_len - q_len  # [nQ, R]
    # K/V fp32, padded to whole blocks: [B, Hkv, nK * bk, D] for run views, flat blocks for gathers.
    pad = n_k * bk - kv_len
    k4, v4 = _padded(k, kv_len, n_k * bk), _padded(v, kv_len, n_k * bk)
    kflat, vflat = k4.view(b * hkv * n_k, bk, d), v4.view(b * hkv * n_k, bk, d)
    key_ok = None if no_padding else F.pad(key_padding_mask, (0, pad))
    base = (torch.arange(b, device=dev)[:, None, None] * hkv + kv_head[:, None]) * n_k  # [B, Hr, 1]
    bi = torch.arange(b, device=dev)[None, :, None, None]

    buffers: dict[str, Tensor] = {}

    def workspace(name: str, n_blocks: int) -> Tensor:
        """[n_blocks, bk, d] fp32 reused by every gather of this call: a fresh large tensor per
        segment would cost more in first-touch page faults than the copy into it."""
        if name not in buffers or buffers[name].shape[0] < n_blocks:
            buffers[name] = torch.empty(n_blocks, bk, d, device=dev)
        return buffers[name][:n_blocks]

    def block_list(num: Tensor, idx: Tensor, elementwise: bool) -> _Blocks:
        num, idx = num[:, mask_head], idx[:, mask_head].long()
        return _block_list(num, idx, n_k, pad > 0, key_ok is not None, elementwise, not per_q_head)

    full = block_list(block_mask.full_kv_num_blocks, block_mask.full_kv_indices, False)
    part = block_list(block_mask.kv_num_blocks, block_mask.kv_indices, causal)

    def needs(blocks: _Blocks, n0: int, n1: int) -> bool:
        """A key mask is needed for the segment: some row needs one, or rows are padded to the max."""
        counts = blocks.counts[n0:n1]
        return any(blocks.needs[n0:n1]) or min(counts) != max(counts)

    def allowed_keys(blocks: _Blocks, n0: int, n1: int) -> Tensor:
        """bool [ng, B', Hr, R or 1, L] for the segment's keys from ``blocks``."""
        c = max(blocks.counts[n0:n1])
        ids = blocks.idx[:, :, n0:n1, :c].permute(2, 0, 1, 3)  # [ng, Bm, Hr, c]
        if not needs(blocks, n0, n1):
            return torch.ones(*ids.shape[:3], 1, c * bk, dtype=torch.bool, device=dev)
        pos = (ids[..., None] * bk + torch.arange(bk, device=dev)).flatten(-2)  # [ng, Bm, Hr, L]
        allowed = blocks.slot_ok[:, :, n0:n1, :c].permute(2, 0, 1, 3).repeat_interleave(bk, -1)
        allowed = allowed & (pos < kv_len)
        if key_ok is not None:
            allowed = allowed & key_ok[bi, pos]
        allowed = allowed[..., None, :]
        if blocks.elementwise:
            dist = pos_q[n0:n1, None, None, :, None] - pos[..., None, :]
            allowed = allowed & (dist >= 0)
            if sliding_window is not None:
                allowed = allowed & (dist < sliding_window)
        return allowed

    def as_tiles(o: Tensor, lse: Tensor, empty: Tensor | None, ng: int) -> tuple[Tensor, Tensor]:
        """A call's (out [ng * B, Hr, R, D], lse) as output tiles [ng, B, Hkv, bq, G(, D)] (views), rows
        without an allowed key set to out = 0, lse = -inf (the fused op leaves lse = 0 there)."""
        o, lse = o.reshape(ng, b, hr, r, d), lse.reshape(ng, b, hr, r)
        if empty is not None and bool(empty.any()):
            o, lse = o.masked_fill(empty[..., None], 0.0), lse.masked_fill(empty, float("-inf"))
        if per_q_head:  # rows are one query head's positions
            return o.unflatten(2, (hkv, g)).transpose(3, 4), lse.unflatten(2, (hkv, g)).transpose(3, 4)
        return o.unflatten(3, (bq, g)), lse.unflatten(3, (bq, g))  # rows are (position, head) pairs

    def view_attend(start: int, count: int, stride: int, n0: int, n1: int) -> tuple[Tensor, Tensor]:
        """One call for query blocks [n0, n1) over key blocks [start + i * stride, + count) (i = n - n0):
        K/V are a strided view, no copy. The mask is the causal/window rule on positions (a no-op on
        full blocks), built once when every query block sees the same relative pattern."""
        ng, length = n1 - n0, count * bk
        shape, strides = (ng, b * hkv, length, d), (stride * bk * d, n_k * bk * d, d, 1)
        ks, vs = (t.as_strided(shape, strides, t.storage_offset() + start * bk * d) for t in (k4, v4))
        kpos = (start + torch.arange(ng, device=dev)[:, None] * stride) * bk + torch.arange(
            length, device=dev
        )
        qpos = pos_q[n0 : n0 + 1 if stride * bk == bq else n1]  # [ng' = 1 or ng, R]
        dist = qpos[:, :, None] - kpos[: qpos.shape[0], None, :]
        allowed = dist >= 0  # [ng', R, L]; also drops the Tk tail (keys past every real query)
        if sliding_window is not None:
            allowed &= dist < sliding_window
        allowed = allowed[:, None, None]  # [ng', 1, 1, R, L]
        if key_ok is not None:
            allowed = allowed & key_ok[:, kpos].transpose(0, 1)[:, :, None, None, :]  # [ng, B, 1, R, L]
        bias = empty = None
        if not bool(allowed.all()):  # additive mask in its final dtype, broadcast over ng and heads
            bias = torch.zeros(allowed.shape, device=dev).masked_fill_(~allowed, float("-inf"))
            bias = bias.expand(-1, -1, hr, -1, -1).flatten(1, 2) if bias.shape[1] > 1 else bias[:, 0]
            empty = ~allowed.any(-1)  # [ng', B', 1, R]
        o, lse = _attend(qb[n0:n1].reshape(ng, b * hr, r, d), ks, vs, bias, scale, softcap)
        return as_tiles(o, lse, empty, ng)

    def attend(lists: list[_Blocks], n0: int, n1: int) -> tuple[Tensor, Tensor]:
        """One call over the keys of ``lists`` for query blocks [n0, n1): (out, lse) as tiles."""
        ng, counts = n1 - n0, [max(blocks.counts[n0:n1]) for blocks in lists]
        starts = [blocks.starts[n0] for blocks in lists]
        contiguous = all(s >= 0 for s in starts) and all(
            a + c == s for a, c, s in zip(starts, counts, starts[1:], strict=False)
        )
        if ng == 1 and contiguous:  # one run of blocks shared by every row: a view, no copy
            ks, vs = (t[:, :, starts[0] * bk : (starts[0] + sum(counts)) * bk] for t in (k4, v4))
        else:  # [ng, B, Hr, c] block ids -> one index_select for the whole segment
            ids = torch.cat([bl.idx[:, :, n0:n1, :c] for bl, c in zip(lists, counts, strict=True)], -1)
            # slots past a row's count are masked below; clamp them to a valid block for the gather
            flat = (base + ids.permute(2, 0, 1, 3).clamp(0, n_k - 1)).flatten()
            ks, vs = (
                torch.index_select(src, 0, flat, out=workspace(name, flat.numel())).view(ng * b, hr, -1, d)
                for name, src in (("k", kflat), ("v", vflat))
            )
        bias = empty = None
        if any(needs(blocks, n0, n1) for blocks in lists):  # one additive mask: [ng * B, Hr, R or 1, L]
            parts = [allowed_keys(blocks, n0, n1) for blocks in lists]
            rows = max(p.shape[3] for p in parts)
            allowed = torch.cat([p.expand(ng, b, hr, rows, p.shape[4]) for p in parts], -1)
            bias = torch.where(allowed, 0.0, float("-inf")).flatten(0, 1)
            empty = ~allowed.any(-1)  # [ng, B, Hr, R or 1]
        o, lse = _attend(qb[n0:n1].flatten(0, 1), ks, vs, bias, scale, softcap)
        return as_tiles(o, lse, empty, ng)

    # Query blocks whose selected blocks are one or two contiguous runs moving by a fixed stride
    # (windows, sink + local) take K/V as views: one call per run, the second merged by LSE at the end.
    main: list = []
    extra: list = []
    alone = [True] * n_q
    if prefix > 1:  # leading dense rows: one causal call instead of one call per growing count
        rows = prefix * bq
        o, o_lse = _causal_attention(
            q[:, :, :rows], k[:, :, : kv_len - q_len + rows], v[:, :, : kv_len - q_len + rows], scale, op
        )
        o = o.float().unflatten(1, (hkv, g)).unflatten(3, (prefix, bq)).permute(3, 0, 1, 4, 2, 5)
        o_lse = o_lse.unflatten(1, (hkv, g)).unflatten(3, (prefix, bq)).permute(3, 0, 1, 4, 2)
        main.append((0, prefix, o, o_lse))  # tiles [prefix, B, Hkv, bq, G(, D)] like every piece
        alone[:prefix] = [False] * prefix
    if causal and not per_q_head and bq % bk == 0:
        runs = _selected_runs(full, part, n_k)
        runs[:prefix] = [None] * prefix
        for n0, n1, strides in _strided_segments(runs, bq // bk, _MAX_SCORE_ELEMENTS // (b * r * bk)):
            if n1 - n0 < 2:  # a lone block is left to the gathers, which batch equal counts
                continue
            for pieces, (start, count), stride in zip((main, extra), runs[n0], strides, strict=False):
                pieces.append((n0, n1, *view_attend(start, count, stride, n0, n1)))
            alone[n0:n1] = [False] * (n1 - n0)
    # A long run of query blocks with few keys shares one call for its full + partial blocks; the
    # rest run full and partial blocks apart, each in runs of equal counts, merged once at the end.
    cost = b * hr * bk * (2 * d + r)
    limit = max(1, _SHARED_CALL_KEYS_PER_DIM * d // bk)
    facts = zip(alone, full.counts, part.counts, full.needs, part.needs, strict=True)
    both = [
        (f, p, nf, np) if todo and 0 < f and 0 < p and f + p <= limit else None
        for todo, f, p, nf, np in facts
    ]
    sizes = [(f + p) * cost for f, p in zip(full.counts, part.counts, strict=True)]
    shared = [(n0, n1) for n0, n1 in _runs(both, sizes) if n1 - n0 > 1]
    for n0, n1 in shared:
        alone[n0:n1] = [False] * (n1 - n0)
    main += [(n0, n1, *attend([full, part], n0, n1)) for n0, n1 in shared]
    for blocks, pieces in ((full, main), (part, extra)):
        keys = [c if c and alone[n] else None for n, c in enumerate(blocks.counts)]
        sizes = [c * cost for c in blocks.counts]
        pieces += [(n0, n1, *attend([blocks], n0, n1)) for n0, n1 in _runs(keys, sizes, _PAD_RATIO)]
    # Pieces (tiles [ng, B, Hkv, bq, G, D]) land straight in the output's memory, HF's layout
    # [B, nQ * bq, Hq, D] seen as tiles; the extra pieces merge in by LSE.
    out = torch.empty(b, n_q * bq, hq, d, device=dev)
    lse = torch.empty(b, n_q * bq, hq, device=dev)
    acc = out.view(b, n_q, bq, hkv, g, d).permute(1, 0, 3, 2, 4, 5)
    acc_lse = lse.view(b, n_q, bq, hkv, g).permute(1, 0, 3, 2, 4)
    done = [False] * n_q
    for n0, n1, o, o_lse in main:
        acc[n0:n1].copy_(o)
        acc_lse[n0:n1].copy_(o_lse)
        done[n0:n1] = [True] * (n1 - n0)
    for n in (n for n, ok in enumerate(done) if not ok):  # no key at all
        acc[n].zero_()
        acc_lse[n].fill_(float("-inf"))
    for n0, n1, o, o_lse in extra:
        o, o_lse = merge_attention(acc[n0:n1], acc_lse[n0:n1], o, o_lse)
        acc[n0:n1].copy_(o)
        acc_lse[n0:n1].copy_(o_lse)
    # [B, Hq, Tq, D] views of [B, T, Hq, D] memory: HF's attention functions return that layout
    out = out.transpose(1, 2)[:, :, :q_len].to(q.dtype)
    return out, lse.transpose(1, 2)[:, :, :q_len].contiguous()

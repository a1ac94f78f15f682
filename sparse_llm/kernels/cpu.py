"""Block-sparse attention in plain PyTorch, gathering the selected K/V blocks per query block.

The CPU path (and the fallback on any device). Cost scales with the selected blocks; no Tq x Tk tensor.
Consecutive query blocks with the same block counts form a segment served by ONE attention call: their
K/V blocks are gathered by one ``index_select`` (or taken as a view when they are one contiguous run)
and stacked along the batch dimension. GQA is never expanded: with a mask shared by a KV head's group,
the group's queries are stacked into one [G * block_q, D] tile (fla's ``naive.py`` grouping); with a
per-query-head mask each query head gathers from its own KV head. Full blocks need no element mask
(only an additive per-key mask for key padding, the Tk tail and padded index slots); partial blocks get
the causal/window element mask. When a segment's keys are few, full and partial blocks share one call
(one mask over all keys); otherwise they run apart and are merged by log-sum-exp once, at the end.
Everything is computed in fp32.

On CPU each call goes to ATen's fused flash-attention kernel
(``aten::_scaled_dot_product_flash_attention_for_cpu``, which returns the LSE; ~2.7x faster than
matmul + softmax here). With softcap, on other devices, or if the op is missing, a matmul/exp version
chunked over keys is used. Few, large ops matter on a busy 2-core machine: each op is an OpenMP
parallel region that may wait a scheduler tick for its second thread (docs/benchmarks.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from sparse_llm.kernels.block_mask import BlockMask
from sparse_llm.kernels.merge import merge_attention

# Elements per attention tile / segment (fp32): 2^25 = 128 MiB, bounds memory on 128K-token rows.
_MAX_SCORE_ELEMENTS = 1 << 25
# Full and partial blocks share one call (one mask over all keys) up to this many keys per head dim.
_SHARED_CALL_KEYS_PER_DIM = 4


def _fused_op(device: torch.device, softcap: float | None):
    if device.type != "cpu" or softcap is not None:
        return None
    return getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _attend(qs, k, v, bias: Tensor | None, scale: float, softcap: float | None, fix_empty: bool = False):
    """qs [B, Hr, R, D], k, v [B, Hr, L, D] fp32; bias None or an additive fp32 mask (0 / -inf)
    broadcastable to [B, Hr, R, L]. Returns (out [B, Hr, R, D], lse [B, Hr, R]). Rows without an
    allowed key are left to the caller (the fused op returns lse = 0 for them) unless ``fix_empty``,
    which key chunks need before their LSE merge."""
    b, hr, r, _ = qs.shape
    length = k.shape[2]
    step = max(1, _MAX_SCORE_ELEMENTS // (b * hr * r))
    if length > step:  # very long rows: key chunks merged by LSE keep the scores tile bounded
        parts = [
            _attend(qs, k[:, :, s : s + step], v[:, :, s : s + step],
                    None if bias is None else bias[..., s : s + step], scale, softcap, fix_empty=True)
            for s in range(0, length, step)
        ]  # fmt: skip
        out, lse = parts[0]
        for o, lse_part in parts[1:]:
            out, lse = merge_attention(out, lse, o, lse_part)
        return out, lse
    if fix_empty and bias is not None:
        empty = torch.isneginf(bias).all(-1)
        out, lse = _attend(qs, k, v, bias, scale, softcap)
        return out.masked_fill(empty[..., None], 0.0), lse.masked_fill(empty, float("-inf"))
    op = _fused_op(qs.device, softcap)
    if op is not None:
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


def _stack(pieces: list, n_q: int, shape: tuple[int, ...], device) -> tuple[Tensor, Tensor]:
    """Segment results [(n0, n1, out [ng, *shape], lse [ng, *shape[:-1]])] -> one [nQ, ...] pair;
    query blocks no segment covers get out 0 and lse -inf. One concatenation, not a copy per piece."""
    outs, lses, cursor = [], [], 0
    for n0, n1, o, lse in [*pieces, (n_q, n_q, None, None)]:
        if n0 > cursor:
            outs.append(torch.zeros(n0 - cursor, *shape, device=device))
            lses.append(torch.full((n0 - cursor, *shape[:-1]), float("-inf"), device=device))
        if o is not None:
            outs.append(o)
            lses.append(lse)
        cursor = n1
    return (outs[0], lses[0]) if len(outs) == 1 else (torch.cat(outs), torch.cat(lses))


def _runs(keys: list, sizes: list[int]) -> list[tuple[int, int]]:
    """Runs [n0, n1) of consecutive query blocks with equal, non-None keys whose summed ``sizes``
    (fp32 elements of gathered K/V and masks) stay within _MAX_SCORE_ELEMENTS: one call each."""
    out: list[tuple[int, int]] = []
    total = 0
    for n, key in enumerate(keys):
        if key is None:
            continue
        if out and out[-1][1] == n and keys[out[-1][0]] == key and total + sizes[n] <= _MAX_SCORE_ELEMENTS:
            out[-1] = (out[-1][0], n + 1)
            total += sizes[n]
        else:
            out.append((n, n + 1))
            total = sizes[n]
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

    # Queries fp32, padded to whole blocks, laid out [nQ, B, Hr, R, D] (R = G * bq: a group stacked).
    qb = _padded(q, q_len, n_q * bq).view(b, hkv, g, n_q, bq, d).permute(3, 0, 1, 2, 4, 5)
    qb = qb.reshape(n_q, b, hr, r, d)
    pos_q = torch.arange(r, device=dev) % bq + torch.arange(n_q, device=dev)[:, None] * bq + kv_len - q_len
    # K/V fp32, padded to whole blocks: [B, Hkv, nK * bk, D] for run views, flat blocks for gathers.
    pad = n_k * bk - kv_len
    k4, v4 = _padded(k, kv_len, n_k * bk), _padded(v, kv_len, n_k * bk)
    kflat, vflat = k4.view(b * hkv * n_k, bk, d), v4.view(b * hkv * n_k, bk, d)
    key_ok = None
    if key_padding_mask is not None and not bool(key_padding_mask.all()):
        key_ok = F.pad(key_padding_mask, (0, pad))
    base = (torch.arange(b, device=dev)[:, None, None] * hkv + kv_head[:, None]) * n_k  # [B, Hr, 1]
    bi = torch.arange(b, device=dev)[None, :, None, None]

    def block_list(num: Tensor, idx: Tensor, elementwise: bool) -> _Blocks:
        num, idx = num[:, mask_head], idx[:, mask_head].long()
        return _block_list(num, idx, n_k, pad > 0, key_ok is not None, elementwise, not per_q_head)

    full = block_list(block_mask.full_kv_num_blocks, block_mask.full_kv_indices, False)
    part = block_list(block_mask.kv_num_blocks, block_mask.kv_indices, causal)

    def allowed_keys(blocks: _Blocks, n0: int, n1: int) -> Tensor:
        """bool [ng, B', Hr, R or 1, L] for the segment's keys from ``blocks``."""
        c = blocks.counts[n0]
        ids = blocks.idx[:, :, n0:n1, :c].permute(2, 0, 1, 3)  # [ng, Bm, Hr, c]
        if not blocks.needs[n0]:
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

    def attend(lists: list[_Blocks], n0: int, n1: int) -> tuple[Tensor, Tensor]:
        """One call over the keys of ``lists`` for query blocks [n0, n1): out [ng, B, Hr, R, D], lse."""
        ng, counts = n1 - n0, [blocks.counts[n0] for blocks in lists]
        starts = [blocks.starts[n0] for blocks in lists]
        contiguous = all(s >= 0 for s in starts) and all(
            a + c == s for a, c, s in zip(starts, counts, starts[1:], strict=False)
        )
        if ng == 1 and contiguous:  # one run of blocks shared by every row: a view, no copy
            ks, vs = (t[:, :, starts[0] * bk : (starts[0] + sum(counts)) * bk] for t in (k4, v4))
        else:  # [ng, B, Hr, c] block ids -> one index_select for the whole segment
            ids = torch.cat([bl.idx[:, :, n0:n1, :c] for bl, c in zip(lists, counts, strict=True)], -1)
            flat = (base + ids.permute(2, 0, 1, 3)).flatten()
            ks = kflat.index_select(0, flat).view(ng * b, hr, -1, d)
            vs = vflat.index_select(0, flat).view(ng * b, hr, -1, d)
        bias = empty = None
        if any(blocks.needs[n0] for blocks in lists):  # one additive mask: [ng * B, Hr, R or 1, L]
            parts = [allowed_keys(blocks, n0, n1) for blocks in lists]
            rows = max(p.shape[3] for p in parts)
            allowed = torch.cat([p.expand(ng, b, hr, rows, p.shape[4]) for p in parts], -1)
            bias = torch.where(allowed, 0.0, float("-inf")).flatten(0, 1)
            empty = ~allowed.any(-1)  # [ng, B, Hr, R or 1]
        o, lse = _attend(qb[n0:n1].flatten(0, 1), ks, vs, bias, scale, softcap)
        o, lse = o.reshape(ng, b, hr, r, d), lse.reshape(ng, b, hr, r)
        if empty is not None and bool(empty.any()):  # the fused op leaves lse = 0 there
            o, lse = o.masked_fill(empty[..., None], 0.0), lse.masked_fill(empty, float("-inf"))
        return o, lse

    # A long run of query blocks with few keys shares one call for its full + partial blocks; the
    # rest run full and partial blocks apart, each in runs of equal counts, merged once at the end.
    cost = b * hr * bk * (2 * d + r)
    limit = max(1, _SHARED_CALL_KEYS_PER_DIM * d // bk)
    facts = zip(full.counts, part.counts, full.needs, part.needs, strict=True)
    both = [(f, p, nf, np) if 0 < f and 0 < p and f + p <= limit else None for f, p, nf, np in facts]
    sizes = [(f + p) * cost for f, p in zip(full.counts, part.counts, strict=True)]
    shared = [(n0, n1) for n0, n1 in _runs(both, sizes) if n1 - n0 > 1]
    alone = [True] * n_q
    for n0, n1 in shared:
        alone[n0:n1] = [False] * (n1 - n0)
    main = [(n0, n1, *attend([full, part], n0, n1)) for n0, n1 in shared]
    extra: list = []
    for blocks, pieces in ((full, main), (part, extra)):
        keys = [
            (c, need) if c and alone[n] else None
            for n, (c, need) in enumerate(zip(blocks.counts, blocks.needs, strict=True))
        ]
        pieces += [
            (n0, n1, *attend([blocks], n0, n1)) for n0, n1 in _runs(keys, [c * cost for c in blocks.counts])
        ]
    if not main and not extra:
        return torch.zeros(q.shape, dtype=q.dtype, device=dev), torch.full(
            (b, hq, q_len), float("-inf"), device=dev
        )
    stacks = [_stack(sorted(p, key=lambda x: x[0]), n_q, (b, hr, r, d), dev) for p in (main, extra) if p]
    acc, acc_lse = merge_attention(*stacks[0], *stacks[1]) if len(stacks) == 2 else stacks[0]
    # [nQ, B, Hr, R, (D)] -> [B, Hq, Tq, (D)], cast to q's dtype in the same copy
    out = torch.empty(q.shape, dtype=q.dtype, device=dev)
    out.copy_(acc.reshape(n_q, b, hq, bq, d).permute(1, 2, 0, 3, 4).flatten(2, 3)[:, :, :q_len])
    lse = acc_lse.reshape(n_q, b, hq, bq).permute(1, 2, 0, 3).flatten(2, 3)[:, :, :q_len].contiguous()
    return out, lse

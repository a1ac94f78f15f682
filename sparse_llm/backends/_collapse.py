"""Far fields over collapsed keys: each group of keys becomes one key with logit bias log n and the mean
of its values, attended through the shared kernel (``key_bias``) and merged by log-sum-exp.

A group of n keys that share one key vector k weighs ``sum_j exp(s(q, k)) v_j = n exp(s(q, k)) mean(v)``
in the softmax, so one key with bias log n and the mean value stands for it exactly: ``deltallm``'s runs
of equal held keys. With the group's mean key instead (``lightning``'s compressed far field, NSA's
compression branch, Yuan et al., arXiv 2502.11089) it is an approximation (Jensen: it underweights
groups whose keys spread).

Layout. The far keys of query block n are whole key blocks before its local window, so every far key
precedes every query of the block. Groups never straddle a key block; key block j's groups take, in
order, ``ceil(groups_j / width)`` collapsed blocks of ``width`` slots (unused slots: bias -inf). The
far BlockMask over the collapsed keys is the original far mask with each key block replaced by its
collapsed blocks, non-causal and full: its cost is the collapsed slots the queries read.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sparse_llm.backends.selection import real_keys
from sparse_llm.kernels import BlockMask, block_sparse_attention
from sparse_llm.kernels.block_mask import block_geometry
from sparse_llm.kernels.merge import merge_attention_


def far_blocks(mask: BlockMask) -> Tensor:
    """bool ``[Bm, Hm, nQ, nK]``: key blocks wholly before every query of a query block (causally full)
    that ``mask`` leaves out. For a sink + local mask with ``local_tokens >= block_size`` these are all
    the causal keys it leaves out."""
    full = block_geometry(
        q_len=mask.q_len, kv_len=mask.kv_len, block_q=mask.block_q, block_k=mask.block_k, device=mask.device
    )[1]
    return full & ~mask.to_dense()


def far_key_mask(far: Tensor, real: Tensor, block: int) -> Tensor:
    """bool ``[B, Tk]``: real keys in a key block that is far for some query block and head."""
    kv_len = real.shape[1]
    blocks = far.any(2).any(1)  # [Bm, nK]
    return real & blocks.repeat_interleave(block, -1)[:, :kv_len]


def collapsed_far_field(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    group: Tensor,
    far: Tensor,
    mask: BlockMask,
    call,
    *,
    width: int,
) -> tuple[Tensor, Tensor, dict]:
    """Attention over the far keys, one collapsed key per group: the group's first key (a run of equal
    held keys, ``deltallm``), bias log n, the mean of its values.

    Args:
        q ``[B, Hq, Tq, D]``, k/v ``[B, Hkv, Tk, D]``.
        group: long ``[B, Hkv, Tk]``: each key's group within its key block (numbered from 0 in every
            block, consecutive keys per group), -1 for keys left out (padding, non-far blocks).
        far: bool ``[Bm, Hm, nQ, nK]`` from :func:`far_blocks`; ``mask`` the exact part's BlockMask.
        width: slots per collapsed block (a power of two).

    Returns:
        ``(out [B, Hq, Tq, D], lse [B, Hq, Tq] fp32, stats)``; ``stats``: ``far_keys`` (keys grouped),
        ``far_groups`` (their groups, over batch rows and KV heads), ``far_slots`` (collapsed slots,
        unused ones included) and ``far_density`` (collapsed keys the queries read over the causal
        (query, key) pairs, the exact part's density in the same units).
    """
    (b, hkv, kv_len, d), (hq, q_len) = k.shape, q.shape[1:3]
    bk, n_k, dev = mask.block_k, mask.num_kv_blocks, q.device
    group = torch.nn.functional.pad(group, (0, n_k * bk - kv_len), value=-1).view(b, hkv, n_k, bk)
    blocks = -(-(group.amax(-1) + 1) // width)  # [B, Hkv, nK] collapsed blocks per key block
    ends = blocks.cumsum(-1)
    n_c = max(int(ends[..., -1].max()), 1)
    length = max(n_c, -(-q_len // width)) * width  # the kernel wants Tq <= Tk: pad with unread slots
    slot = torch.where(group >= 0, (ends - blocks)[..., None] * width + group, length)  # `length`: discard
    slot = slot.flatten(2)[..., :kv_len]
    used = group.flatten(2)[..., :kv_len] >= 0
    counts = torch.zeros(b, hkv, length + 1, device=dev).scatter_add_(2, slot, used.float())[..., :length]
    index = slot[..., None].expand(-1, -1, -1, d)
    zeros = torch.zeros(b, hkv, length + 1, d, device=dev)
    v_c = zeros.scatter_add(2, index, v.float())[:, :, :length] / counts.clamp_min(1)[..., None]
    first = used & (slot != torch.nn.functional.pad(slot[..., :-1], (1, 0), value=-1))
    index = torch.where(first, slot, length)[..., None].expand(-1, -1, -1, d)  # others: discard slot
    k_c = zeros.scatter(2, index, k.float())[:, :, :length]
    bias = torch.where(counts > 0, counts.log(), float("-inf"))
    # Collapsed block c of (b, h) belongs to key block searchsorted(ends, c); past the last: none (nK).
    c_idx = torch.arange(length // width, device=dev).expand(b, hkv, -1).contiguous()
    owner = torch.searchsorted(ends.contiguous(), c_idx, right=True)  # [B, Hkv, nKc]
    heads = far.shape[1] if far.shape[1] == hq and hq != hkv else hkv
    if heads != hkv:  # per-query-head far masks: each query head reads its KV head's layout
        owner = owner.repeat_interleave(hq // hkv, 1)
    far_ext = torch.nn.functional.pad(far, (0, 1)).expand(b, heads, -1, -1)  # column nK: never far
    selected = far_ext.gather(-1, owner[:, :, None, :].expand(-1, -1, far.shape[2], -1))
    out, lse, far_density = attend_collapsed(q, k_c, v_c, bias, selected, mask, call, width)
    stats = {
        "far_keys": int(used.sum()),
        "far_groups": int((group.amax(-1) + 1).sum()),
        "far_slots": int(blocks.sum()) * width,
        "far_density": far_density,
    }
    return out, lse, stats


def attend_collapsed(q, k_c, v_c, bias, selected: Tensor, mask: BlockMask, call, width: int):
    """Attention of q ``[B, Hq, Tq, D]`` over collapsed keys k_c/v_c ``[B, Hkv, S, D]`` with logit bias
    ``[B, Hkv, S]``, each query block reading the ``width``-slot blocks ``selected`` ``[Bm, Hm, nQ, nS]``
    marks (non-causal: every collapsed key precedes the block). Returns ``(out, lse, far_density)``:
    slots read over the causal (query, key) pairs of ``mask``, the exact part's density units."""
    q_len = q.shape[2]
    length = max(selected.shape[-1], -(-q_len // width)) * width  # the kernel wants Tq <= Tk
    selected = torch.nn.functional.pad(selected, (0, length // width - selected.shape[-1]))
    pad = (0, length - bias.shape[-1])
    far_mask = BlockMask.from_dense(
        selected, block_q=mask.block_q, block_k=width, q_len=q_len, kv_len=length, causal=False
    )
    out, lse = block_sparse_attention(
        q,
        torch.nn.functional.pad(k_c, (0, 0, *pad)).to(q.dtype),
        torch.nn.functional.pad(v_c, (0, 0, *pad)).to(q.dtype),
        far_mask,
        scale=call.scale,
        softcap=call.softcap,
        causal=False,
        key_bias=torch.nn.functional.pad(bias, pad, value=float("-inf")),
        return_lse=True,
    )
    reach = int(mask.reachable().sum()) * mask.block_k * selected.shape[0] * selected.shape[1]
    return out, lse, float(selected.sum()) * width / reach


FAR_GROWTH = 4  # each coarser level of a far-field pyramid groups 4x the keys of the one below
# Tokens of fine groups before the pyramid's first coarser level, the methods' default ``far_span``.
# Measured (docs/evaluations.md): fine groups over the whole context keep the needles at 4K and 8K
# (RULER, NIAH) but lose some at 16K, where a pyramid beyond 8192 tokens (or 4096) keeps them; so
# prompts up to 8192 tokens see one level, unchanged, and longer ones read far fewer mean keys.
FAR_SPAN = 8192


def far_levels(far: Tensor, mask: BlockMask, far_span: int | None) -> list[Tensor]:
    """Which far key blocks each query block reads at which coarseness: level ``l`` works in aligned
    superblocks of ``4**l`` key blocks, each collapsed into as many mean keys as one key block is at
    level 0 (so its groups are ``4**l`` times larger).

    A superblock is read at level ``l >= 1`` when every one of its blocks is far for the query block
    and it ends at least ``far_span * 4**(l - 1)`` tokens before the block's first query; each far
    block goes to the highest level that takes it, so every far key is read exactly once, more
    coarsely the farther back it lies (a query reads O(far_span / far_group * log(T / far_span)) mean
    keys instead of O(T / far_group)). ``far_span=None``: one level.

    Returns bool ``[Bm, Hm, nQ, ceil(nK / 4**l)]`` per level, level 0 first (``far``'s shape)."""
    if far_span is None:
        return [far]
    n_q, n_k = far.shape[-2:]
    first_query = torch.arange(n_q, device=far.device) * mask.block_q + mask.kv_len - mask.q_len
    top = 0
    while FAR_GROWTH ** (top + 1) <= n_k and far_span * FAR_GROWTH**top < mask.kv_len:
        top += 1
    remaining, levels = far, []
    for level in range(top, 0, -1):
        size = FAR_GROWTH**level
        n_s = -(-n_k // size)
        padded = torch.nn.functional.pad(remaining, (0, n_s * size - n_k))  # bool: pads False
        whole = padded.unflatten(-1, (n_s, size)).all(-1)
        ends = (torch.arange(n_s, device=far.device) + 1) * size * mask.block_k
        taken = whole & (ends <= (first_query - far_span * FAR_GROWTH ** (level - 1))[:, None])
        remaining = remaining & ~taken.repeat_interleave(size, -1)[..., :n_k]
        levels.append(taken)
    return [remaining, *levels[::-1]]


def pyramid_keys(k: Tensor, v: Tensor, real: Tensor, block: int, far_group: int, n_levels: int):
    """Mean keys and values of every aligned run of ``far_group * 4**l`` real keys, for each level
    ``l < n_levels`` (level ``l`` in ``ceil(nK / 4**l)`` superblocks of ``block // far_group`` slots).
    Returns per level fp32 ``(k_c, v_c [B, Hkv, S_l, D], bias [B, Hkv, S_l])``, bias log n for a slot
    of n real keys, -inf for an empty one."""
    b, hkv, kv_len, d = k.shape
    width, n_k = block // far_group, -(-kv_len // block)
    pad = n_k * block - kv_len
    w = torch.nn.functional.pad(real.float(), (0, pad))[:, None, :, None]  # [B, 1, nK * bk, 1]
    weigh = not bool(real.all())  # padded keys drop out of the sums; the tail's pad is zeros already

    def runs(x):  # one pass over the keys when nothing needs padding or weighing (no copy of them)
        x = torch.nn.functional.pad(x.float(), (0, 0, 0, pad)) if pad else x.float()
        x = x * w if weigh else x
        return x.reshape(b, -1, n_k * width, far_group, d).sum(3)

    k_sum, v_sum, count = runs(k), runs(v), w.view(b, 1, n_k * width, far_group).sum(-1)
    levels = []
    for level in range(n_levels):
        if level:  # four superblocks of the level below make one: sum runs of four slots
            extra = -count.shape[-1] % (FAR_GROWTH * width)
            k_sum, v_sum = (
                torch.nn.functional.pad(x, (0, 0, 0, extra)).unflatten(2, (-1, FAR_GROWTH)).sum(3)
                for x in (k_sum, v_sum)
            )
            count = torch.nn.functional.pad(count, (0, extra)).unflatten(2, (-1, FAR_GROWTH)).sum(3)
        bias = torch.where(count > 0, count.log(), float("-inf")).expand(b, hkv, -1)
        levels.append((k_sum / count.clamp_min(1)[..., None], v_sum / count.clamp_min(1)[..., None], bias))
    return levels


def mean_far_field(
    q: Tensor, k: Tensor, v: Tensor, mask: BlockMask, call, far_group: int, far_span: int | None = None
):
    """The keys ``mask`` leaves out (:func:`far_blocks`: whole key blocks before each query block),
    every ``far_group`` consecutive real keys collapsed into their mean key (bias log n, the mean of
    their values): NSA's compression branch, training-free. ``far_group`` is a power of two <=
    ``mask.block_k``; 1 is exact. With ``far_span`` the groups grow 4x per level with distance
    (:func:`far_levels`), one kernel call per level (each level's reads are a run per query block, which
    the CPU kernel views without copies) merged by log-sum-exp. Returns ``(out [B, Hq, Tq, D] fp32,
    lse [B, Hq, Tq] fp32, stats)``; ``stats``:
    ``far_keys`` (real keys in far blocks, over batch rows and KV heads), ``far_groups`` (non-empty
    mean keys built, every level), ``far_slots`` (slots built) and ``far_density`` (mean keys the
    queries read over the causal (query, key) pairs, the exact part's density in the same units)."""
    b, hkv, kv_len, _ = k.shape
    far = far_blocks(mask)
    real = real_keys(call.key_padding_mask, b, kv_len, k.device)
    levels = far_levels(far, mask, far_span)
    keys = pyramid_keys(k, v, real, mask.block_k, far_group, len(levels))
    width = mask.block_k // far_group
    out = lse = None
    far_density = 0.0
    for (k_c, v_c, bias), selected in zip(keys, levels, strict=True):
        if out is not None and not bool(selected.any()):
            continue
        part, part_lse, density = attend_collapsed(q, k_c, v_c, bias, selected, mask, call, width)
        far_density += density
        if out is None:
            out, lse = part.float(), part_lse
        else:
            merge_attention_(out, lse, part, part_lse)
    stats = {
        "far_keys": int(far_key_mask(far, real, mask.block_k).sum()) * hkv,
        "far_groups": sum(int((bias > float("-inf")).sum()) for _, _, bias in keys),
        "far_slots": sum(bias.numel() for _, _, bias in keys),
        "far_density": far_density,
    }
    return out, lse, stats


def merge_reference(lse_near, out_near, lse_far, out_far):
    """Written-out log-sum-exp merge of two parts ``[B, Hkv, G, Tq(, D)]``; returns ``[B, Hq, Tq, D]``."""
    lse = torch.logaddexp(lse_near, lse_far)
    safe = torch.where(torch.isneginf(lse), 0.0, lse)
    out = torch.exp(lse_near - safe)[..., None] * out_near + torch.exp(lse_far - safe)[..., None] * out_far
    return out.flatten(1, 2)


def mean_far_reference(q, k, v, far, scale, group, softcap, key_padding_mask):
    """(lse, out) of the compressed far field, written out: per query, each run of ``group`` positions
    holding n > 0 of its far keys scores ``cap(scale q . mean k) + log n`` and carries the mean value
    (means over the run's real keys, all far together since far keys come in whole key blocks)."""
    (b, hq, _, _), (_, hkv, kv_len, d) = q.shape, k.shape
    pad = -kv_len % group
    real = torch.ones(b, kv_len, dtype=torch.bool) if key_padding_mask is None else key_padding_mask
    w = torch.nn.functional.pad(real, (0, pad)).to(k.dtype).view(b, 1, -1, group, 1)

    def runs(x):
        return torch.nn.functional.pad(x, (0, 0, 0, pad)).view(b, hkv, -1, group, d)

    count = w.sum(3).clamp_min(1)
    k_mean, v_mean = (runs(k) * w).sum(3) / count, (runs(v) * w).sum(3) / count  # [B, Hkv, nG, D]
    n = torch.nn.functional.pad(far, (0, pad)).unflatten(-1, (-1, group)).sum(-1)  # [B, Hkv, G, Tq, nG]
    s = torch.einsum("bhgqd,bhkd->bhgqk", q.unflatten(1, (hkv, hq // hkv)), k_mean) * scale
    s = s if softcap is None else softcap * torch.tanh(s / softcap)
    logits = torch.where(n > 0, s + n.to(s.dtype).log(), float("-inf"))
    lse = logits.logsumexp(-1)
    return lse, logits.softmax(-1).nan_to_num(0.0) @ v_mean[:, :, None]


def near_reference(q, k, v, near, scale, softcap):
    """Written-out softmax over the keys ``near`` ``[B, Hkv, G, Tq, Tk]`` allows: (scores before the
    softcap ``[B, Hkv, G, Tq, Tk]``, lse, out ``[B, Hkv, G, Tq, D]``), rows without keys lse -inf, out 0."""
    hq, hkv = q.shape[1], k.shape[1]
    s = torch.einsum("bhgqd,bhkd->bhgqk", q.unflatten(1, (hkv, hq // hkv)), k) * scale
    capped = s if softcap is None else softcap * torch.tanh(s / softcap)
    lse = capped.masked_fill(~near, float("-inf")).logsumexp(-1)
    out = capped.masked_fill(~near, float("-inf")).softmax(-1).nan_to_num(0.0) @ v[:, :, None]
    return s, lse, out


def pyramid_levels_reference(far: Tensor, mask: BlockMask, far_span: int) -> Tensor:
    """long ``[Bm, Hm, nQ, nK]``: the level at which each far block is read (-1: not far), written out
    block by block: the highest ``l`` whose aligned superblock of ``4**l`` key blocks is far throughout
    and ends ``far_span * 4**(l - 1)`` tokens or more before the query block (level 0 always fits)."""
    level = torch.full(far.shape, -1, dtype=torch.long)
    n_k = far.shape[-1]
    for bm, hm, n, j in far.nonzero().tolist():
        first_query = n * mask.block_q + mask.kv_len - mask.q_len
        level[bm, hm, n, j], size = 0, FAR_GROWTH
        while size <= n_k:
            lo = j // size * size
            end_token = (lo + size) * mask.block_k
            whole = lo + size <= n_k and bool(far[bm, hm, n, lo : lo + size].all())
            if whole and end_token <= first_query - far_span * size // FAR_GROWTH:
                level[bm, hm, n, j] = size.bit_length() // 2  # log4(size)
            size *= FAR_GROWTH
    return level


def selection_far_reference(
    q, k, v, mask: BlockMask, scale, far_group, softcap=None, key_padding_mask=None, far_span=None
):
    """Slow, written-out attention over ``mask``'s blocks plus :func:`mean_far_field` over every other
    causal real key, for tests: q ``[B, Hq, Tq, D]``, k/v ``[B, Hkv, Tk, D]``; returns ``[B, Hq, Tq, D]``.
    With ``far_span``, each far block's keys in runs of ``far_group * 4**l`` at its level ``l``
    (:func:`pyramid_levels_reference`), all levels merged by log-sum-exp."""
    from sparse_llm.kernels.reference import element_mask

    (_, hq, q_len, _), (_, hkv, kv_len, _) = q.shape, k.shape
    heads = dict(num_q_heads=hq, num_kv_heads=hkv, key_padding_mask=key_padding_mask)
    geometry = dict(block_q=mask.block_q, block_k=mask.block_k, q_len=q_len, kv_len=kv_len)
    causal = BlockMask.causal(**geometry)
    near = element_mask(mask, **heads)
    far = element_mask(causal, **heads) & ~near
    _, lse, out = near_reference(q, k, v, near, scale, softcap)
    parts = [(far, far_group)]  # (far keys, group size) per level
    if far_span is not None:
        level = pyramid_levels_reference(far_blocks(mask), mask, far_span)
        parts = [
            (
                far & element_mask(BlockMask.from_dense(level == lv, **geometry), **heads),
                far_group * FAR_GROWTH**lv,
            )
            for lv in range(int(level.max()) + 1)
        ]
    for at_level, group in parts:
        lse_far, out_far = mean_far_reference(q, k, v, at_level, scale, group, softcap, key_padding_mask)
        out = merge_reference(lse, out, lse_far, out_far).unflatten(1, (hkv, -1))
        lse = torch.logaddexp(lse, lse_far)
    return out.flatten(1, 2)

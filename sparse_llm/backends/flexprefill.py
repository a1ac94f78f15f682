"""``flexprefill``: per-head, per-input adaptive blocks (FlexPrefill, Lai et al., arXiv 2502.20766).

Training-free; exact inside the kept blocks. The last ``window`` queries of each query head attend
every key exactly (fp32, causal, bottom-right aligned, padding excluded), giving two distributions:
vertical ``v_j`` (mean attention to key ``j`` over the window rows) and slash ``s_o`` (mean mass at
offset ``o = query position - key position``). If the pooled estimate ``softmax(mean(window q) .
blockmean(K)^T * scale)`` lies within ``D = sqrt(JSD) < tau`` (nats, so ``D <= 0.83``) of the
block-pooled ``v``, the head is **query-aware**: each query block keeps the fewest key blocks holding
``gamma`` of its pooled attention estimate (block-causal): the mean over its queries of
``softmax(mean(q's sub-block) . blockmean(K)^T * scale)``, each query stood for by the mean of its
``query_pool`` consecutive queries (``query_pool = block_size``: the paper's one mean query per
block, ``softmax(blockmean(Q) . blockmean(K)^T * scale)``). Otherwise it is
**vertical-slash**: the fewest key blocks holding ``gamma`` of ``v``, for every query block that sees
them, and the fewest offset bins (``block_size`` offsets each) holding ``gamma`` of ``s``, plus bin 0,
on every block pair holding a token pair at one of their offsets (the token band is covered: up to 3
key blocks per query block and bin). The sink and local blocks are always added; past ``budget``
tokens per query block they stay and the highest scores fill the rest (query-aware: the pooled
probability; vertical-slash: the key block's ``v`` mass + the ``s`` mass of the bins touching the pair).

Args (besides ``budget``, ``sink_tokens``, ``local_tokens``, ``dense_tail_blocks``, ``block_size``):
    gamma: attention mass to cover, in (0, 1] (default 0.9); 1 keeps every block.
    tau: distance below which a head is query-aware, >= 0; 0 = all vertical-slash. Default 1.0: above
        the largest distance sqrt(ln 2), so every head is query-aware and the observation window is
        skipped. The paper's 0.1 made every head of Gemma3-270M's global layers vertical-slash (their
        distances at 8K: 0.21-0.52), and one vertical-slash head per layer already doubles the
        perplexity of copying mid-prompt (each query needs its own far context; the window's pattern
        serves the prompt's end), while needle retrieval is unchanged (docs/evaluations.md).
    window: observation queries, tokens (default None = ``block_size``; at most Tq).
    query_pool: queries per pooled query of the query-aware estimate, a divisor of ``block_size``
        (default None = min(16, block_size)). One mean query per block (the paper) is the softmax
        of an average, which a few strongly peaked queries dominate; averaging the softmaxes of
        sub-block means keeps what each part of the block looks for. Perplexity of the second half
        of the 8K code texts against dense (docs/evaluations.md): 1.082 / 1.120 with one mean per
        block, 1.076 / 1.087 with 16.

Differs from the paper's code: ``gamma`` applies to block-pooled masses (it counts tokens, then
blocks of a hard-coded 128); query-aware heads cover ``gamma`` per query block (it keeps ``gamma *
nQ`` of the whole pooled map) of an estimate pooled over runs of ``query_pool`` queries (it: one
mean query per block); a slash bin covers every key block its offsets touch (it: one);
``min_budget`` becomes the forced sink + local blocks, ``max_budget`` the per-row ``budget``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from sparse_llm.backends.base import BudgetedMethod, LayerCall, register_method
from sparse_llm.backends.selection import block_means, key_blocks_with_real_keys, reachable_blocks
from sparse_llm.kernels import BlockMask

NEG_INF = float("-inf")
QUERY_POOL = 16  # default queries per pooled query (docs/evaluations.md: 8, 16 and 32 measure alike)
MAX_DISTANCE = math.sqrt(math.log(2))  # the largest sqrt(JSD) in nats: tau above it = all query-aware


@register_method
@dataclass
class FlexPrefill(BudgetedMethod):
    """Args: gamma (0.9), tau (1.0: every head query-aware), window (None = block_size), query_pool
    (None = 16), budget (tokens per query block incl. sinks and window, 2048), sink_tokens (64), local_tokens
    (512); see the module docstring."""

    name = "flexprefill"
    description = "FlexPrefill: per-head query-aware or vertical-slash blocks up to attention mass gamma."
    exact_params = {**BudgetedMethod.exact_params, "gamma": 1.0}

    gamma: float = 0.9
    tau: float = 1.0
    window: int | None = None
    query_pool: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if not _is_number(self.gamma) or not 0 < self.gamma <= 1:
            raise ValueError(f"gamma must be a number in (0, 1], got {self.gamma!r}")
        if not _is_number(self.tau) or not 0 <= self.tau < math.inf:
            raise ValueError(f"tau must be a finite number >= 0, got {self.tau!r}")
        if self.window is not None and (
            not isinstance(self.window, int) or isinstance(self.window, bool) or self.window <= 0
        ):
            raise ValueError(f"window must be None (= block_size) or a positive int, got {self.window!r}")
        p = self.query_pool
        if p is not None and (isinstance(p, bool) or not isinstance(p, int) or p < 1 or self.block_size % p):
            raise ValueError(
                f"query_pool must be None (= min({QUERY_POOL}, block_size)) or a divisor of block_size "
                f"({self.block_size}), got {p!r}"
            )

    def block_mask(self, q, k, v, call: LayerCall) -> BlockMask:
        (q_len, kv_len), bs, pad = (q.shape[2], k.shape[2]), self.block_size, call.key_padding_mask
        n_k = -(-kv_len // bs)
        real = key_blocks_with_real_keys(pad, kv_len, bs)  # [B or 1, nK]: blocks with a real key
        real = torch.ones(1, n_k, dtype=torch.bool, device=q.device) if real is None else real
        k_means = block_means(k, bs, pad)  # [B, Hkv, nK, D]

        visible = reachable_blocks(q_len, kv_len, bs, call.sliding_window, q.device)
        visible = visible & real[:, None, None, :]  # [B or 1, 1, nQ, nK]
        q_valid = None if pad is None else pad[:, -q_len:]
        pool = self.query_pool or min(QUERY_POOL, bs)
        pooled = pooled_estimate(q, k_means, call, bs, pool, q_valid, visible)
        selected, scores = _cover(pooled, self.gamma), pooled
        if self.tau <= MAX_DISTANCE:  # some heads may be vertical-slash: look at the observation window
            vs_selected, vs_score, query_aware = self._vertical_slash(q, k, call, k_means, real)
            aware = query_aware[:, :, None, None]
            selected = torch.where(aware, selected, vs_selected)
            scores = torch.where(aware, scores, vs_score)
        selected = selected & real[:, None, None, :]
        forced = self.forced_blocks(q, k, call) & real[:, None, None, :]
        scores = scores.masked_fill(~selected, NEG_INF).masked_fill(forced, math.inf)
        kept = BlockMask.from_topk(
            scores,
            self.budget_blocks,
            block_q=bs,
            block_k=bs,
            q_len=q_len,
            kv_len=kv_len,
            sliding_window=call.sliding_window,
        ).to_dense()
        return self.mask_from_blocks(kept & (scores > NEG_INF), q, k, call)

    def _vertical_slash(self, q, k, call: LayerCall, k_means: Tensor, real: Tensor):
        """(selected bool, score) ``[B, Hq, nQ, nK]`` of the vertical-slash pattern, and the
        query-aware heads ``[B, Hq]`` bool (pattern distance below ``tau``)."""
        q_len, kv_len, bs = q.shape[2], k.shape[2], self.block_size
        n_q, n_k = -(-q_len // bs), -(-kv_len // bs)
        window = self.window or bs
        vertical, slash = window_profiles(q, k, call, window)
        v_blocks, s_bins = _block_sums(vertical, bs), _block_sums(slash, bs)  # [B, Hq, nK] each
        query_aware = pattern_distance(q, k_means, call, window, v_blocks, real) < self.tau
        # Mass up to gamma, the diagonal bin always (the sink block is forced by the caller).
        v_keep = _cover(v_blocks, self.gamma)
        s_keep = _cover(s_bins, self.gamma)
        s_keep[..., 0] = True
        # Token offsets over block pair (n, m) span [d_min, d_max]: the bins [lo, hi) touch the pair.
        q_lo = torch.arange(n_q, device=q.device) * bs + kv_len - q_len
        k_lo = torch.arange(n_k, device=q.device) * bs
        d_max = (q_lo + bs - 1).clamp(max=kv_len - 1)[:, None] - k_lo
        d_min = q_lo[:, None] - (k_lo + bs - 1).clamp(max=kv_len - 1)
        hi = (d_max.div(bs, rounding_mode="floor") + 1).clamp_min(0)
        lo = torch.minimum(d_min.clamp_min(0) // bs, hi)
        selected = v_keep[:, :, None, :] | (_bin_range_sums(s_keep.float(), lo, hi) > 0.5)
        score = v_blocks[:, :, None, :] + _bin_range_sums(s_bins, lo, hi)
        return selected, score, query_aware


def pooled_estimate(
    q: Tensor,
    k_means: Tensor,
    call: LayerCall,
    block: int,
    pool: int,
    q_valid: Tensor | None,
    visible: Tensor,
) -> Tensor:
    """The query-aware estimate of each query block's attention over key blocks, ``[B, Hq, nQ, nK]`` fp32.

    q ``[B, Hq, Tq, D]``; k_means ``[B, Hkv, nK, D]`` block means of the keys; q_valid ``[B, Tq]`` bool
    or None (real queries); visible bool ``[B or 1, 1, nQ, nK]``, the key blocks a query block may
    see. Each run of ``pool`` queries is stood for by its mean query, whose softmax over the visible
    block means is weighted by its real queries: a row is the mean over the block's real queries (sums
    to 1; 0 for a block without real queries or visible blocks).
    """
    (b, hq, q_len, d), hkv = q.shape, k_means.shape[1]
    n_q, n_k, per = -(-q_len // block), k_means.shape[2], block // pool
    means = block_means(q, pool, q_valid)  # [B, Hq, ceil(Tq / pool), D]
    means = torch.nn.functional.pad(means, (0, 0, 0, n_q * per - means.shape[2]))
    means = means.view(b, hkv, hq // hkv, n_q * per, d)
    logits = _softcap_((means @ k_means[:, :, None].transpose(-1, -2)).mul_(call.scale), call.softcap)
    probs = logits.view(b, hq, n_q, per, n_k).masked_fill_(~visible[:, :, :, None], NEG_INF)
    probs = probs.softmax(-1).nan_to_num_(0.0)
    real = torch.ones(1, q_len, device=q.device) if q_valid is None else q_valid.float()
    counts = torch.nn.functional.pad(real, (0, n_q * block - q_len)).view(-1, n_q, per, pool).sum(-1)
    weights = counts / counts.sum(-1, keepdim=True).clamp_min(1.0)  # [B or 1, nQ, per]
    return (probs * weights[:, None, :, :, None]).sum(3)


def window_profiles(q: Tensor, k: Tensor, call: LayerCall, window: int) -> tuple[Tensor, Tensor]:
    """Vertical and slash profiles of the last ``min(window, Tq)`` queries, each ``[B, Hq, Tk]`` fp32.

    q ``[B, Hq, Tq, D]``, k ``[B, Hkv, Tk, D]`` (the group's query heads share their KV head, K is not
    repeated). ``vertical[..., j]``: mean attention to key ``j``; ``slash[..., o]``: mean attention to
    the key ``o`` positions before its query. Each window row is a softmax over its real, causally
    visible keys, so both profiles sum to 1 (0 for a row without real keys).
    """
    (b, hq, q_len, d), (_, hkv, kv_len, _) = q.shape, k.shape
    w = min(window, q_len)
    obs = q[:, :, -w:].float().reshape(b, hkv, (hq // hkv) * w, d)
    logits = _softcap_((obs @ k.float().transpose(-1, -2)).mul_(call.scale), call.softcap)  # [B, Hkv, Gw, Tk]
    # rel[i, j] = (position of window query i) - j: key j's offset from query i, or the key at offset j.
    rel = kv_len - w + torch.arange(w, device=q.device)[:, None] - torch.arange(kv_len, device=q.device)
    hidden = (rel < 0).repeat(hq // hkv, 1)
    if call.key_padding_mask is not None:
        hidden = hidden | ~call.key_padding_mask[:, None, None, :]
    attn = logits.masked_fill_(hidden, NEG_INF).softmax(-1).nan_to_num_(0.0).view(b, hq, w, kv_len)
    del logits  # in-place steps and this keep the peak at two [B, Hq, w, Tk] fp32 tensors
    slash = attn.gather(-1, rel.clamp_min(0).expand(b, hq, w, kv_len)).mul_(rel >= 0)
    return attn.mean(2), slash.mean(2)


def pattern_distance(
    q: Tensor, k_means: Tensor, call: LayerCall, window: int, v_blocks: Tensor, real: Tensor
) -> Tensor:
    """sqrt(JSD) in nats between the pooled estimate and the true block-pooled vertical profile, ``[B, Hq]``.

    q ``[B, Hq, Tq, D]``; k_means ``[B, Hkv, nK, D]`` block means of the keys (padding excluded);
    v_blocks ``[B, Hq, nK]`` the block sums of the vertical profile; real ``[B or 1, nK]`` bool, blocks
    holding a real key. The estimate is ``softmax(mean(window q) . k_means^T * scale)`` over real blocks.
    """
    (b, hq, q_len, d), hkv = q.shape, k_means.shape[1]
    q_mean = q[:, :, -min(window, q_len) :].float().mean(2).view(b, hkv, hq // hkv, 1, d)
    logits = _softcap_((q_mean @ k_means[:, :, None].transpose(-1, -2)).mul_(call.scale), call.softcap)
    est = logits.view(b, hq, -1).masked_fill(~real[:, None, :], NEG_INF).softmax(-1)
    mid = (est + v_blocks) / 2
    jsd = sum(torch.xlogy(p, p) - torch.xlogy(p, mid) for p in (est, v_blocks)).sum(-1) / 2
    return jsd.clamp_min(0.0).sqrt()


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _softcap_(x: Tensor, cap: float | None) -> Tensor:
    """``cap * tanh(x / cap)`` in place (``x`` unchanged without a cap)."""
    return x if cap is None else x.div_(cap).tanh_().mul_(cap)


def _block_sums(x: Tensor, block: int) -> Tensor:
    """Sums of ``x`` ``[..., T]`` over runs of ``block`` entries, ``[..., ceil(T / block)]``."""
    x = x.float() if x.dtype == torch.bool else x
    return torch.nn.functional.pad(x, (0, -x.shape[-1] % block)).unflatten(-1, (-1, block)).sum(-1)


def _cover(mass: Tensor, gamma: float) -> Tensor:
    """bool mask of the fewest entries of ``mass`` ``[..., N]`` (largest first, ties to the lower
    index) whose sum reaches ``gamma`` of the row total; ``gamma >= 1`` keeps every entry."""
    if gamma >= 1:
        return torch.ones_like(mass, dtype=torch.bool)
    ranked, order = torch.sort(mass, dim=-1, descending=True, stable=True)
    keep = ranked.cumsum(-1) - ranked < gamma * mass.sum(-1, keepdim=True)
    return torch.zeros_like(keep).scatter_(-1, order, keep)


def _bin_range_sums(x: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    """``x[..., lo:hi].sum(-1)`` per block pair: x ``[B, H, nO]``, lo/hi ``[nQ, nK]`` -> ``[B, H, nQ, nK]``"""
    b, h, _ = x.shape
    prefix = torch.nn.functional.pad(x.cumsum(-1), (1, 0))
    ends = prefix.gather(-1, torch.cat([hi.flatten(), lo.flatten()]).expand(b, h, -1))
    return (ends[..., : hi.numel()] - ends[..., hi.numel() :]).view(b, h, *lo.shape)

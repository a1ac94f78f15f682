"""``lightning``: exact sink + local blocks, an approximate far field for every other key: compressed
mean keys (the default) or the Taylor linear-attention reference.

A training-free hybrid in the spirit of Lightning Attention (Qin et al., arXiv 2401.04658: exact
intra-block attention, linear attention carried across blocks in a running state) with the Taylor
feature map of Based (Arora et al., arXiv 2402.18668), which approximates ``exp(s)`` by
``1 + s + s^2/2``.

Exact: each query block attends its sink and local blocks through the shared kernel (the same blocks
as ``streaming`` with the same ``sink_tokens``/``local_tokens``/``block_size``), returning its LSE.

Approximate (the far field): every other causal, real key ``j`` of query ``i`` gets the weight
``exp(m) * taylor(t * (s_ij - m))`` instead of ``exp(s_ij)``, with ``s = scale * q.k``,
``taylor(x) = 1 + x + x^2/2`` (order 2) or ``1 + x`` (order 1), and ``m`` the mean far score of that
query. Expanding around the mean (not 0) is what makes the approximation usable on real scores: the
error depends on the spread of the far scores, not on their size, and ``exp(m)`` keeps the far
part on the same scale as the exact part. At order 2 every weight is positive (``1 + x + x^2/2 >= 1/2``)
and the weights sum to ``n * (1 + t^2 var/2) * exp(m)``; at order 1 single weights can be negative
but they sum to exactly ``n * exp(m)`` (the linear term vanishes at the mean). With a soft-cap ``c``
the expansion point becomes ``c * tanh(m / c)`` and the slope ``t = 1 - tanh(m / c)^2`` (the cap
linearized at ``m``); without one ``t = 1``. The far part is returned as ``(out, lse)`` in the
kernel's convention and merged by log-sum-exp. Peaked far attention (a retrieval target outside the
window) is not captured: the far field is a smooth, moment-matched summary of the distant keys.

Compressed far field (``far_keys="mean"``, the default): NSA's compression branch (Yuan et al., arXiv
2502.11089) without training. Each run of ``far_group`` far keys (within a key block) becomes one key,
their mean, with logit bias log n (n real keys in the run) and the mean of their values, attended
through the shared kernel (``key_bias``, ``_collapse.py``) and merged by log-sum-exp: it costs
``1 / far_group`` of exact attention over the far keys, and is exact when a run's keys are equal. A
run whose keys spread is underweighted (Jensen: ``exp(q . mean k) <= mean exp(q . k)``); peaked
attention on one far key is blurred over its run, but a run still stands out when its keys do.

Cost of the Taylor form: key blocks are folded, in order, into running sums of ``1``, ``k`` and
``k (x) k`` (each also times ``v``); each query block reads the state of the keys before its local
window, which grows monotonically. That is linear in the length, with no ``Tq x Tk`` tensor, but
the order-2 state has ``D (D + 1) / 2 * D`` entries per KV head: per token ~``D^3`` multiply-adds,
which exceeds exact attention's ``Tk * D`` below ``Tk ~ D^2`` tokens (4K for D = 64, 64K for
D = 256). Order 1 costs ``D^2`` per token. No far field has a sliding window: the patch runs
windowed layers dense.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sparse_llm.backends._collapse import (
    FAR_SPAN,
    mean_far_field,
    mean_far_reference,
    merge_reference,
    near_reference,
)
from sparse_llm.backends.base import (
    WHOLE_PROMPT,
    LayerCall,
    SparseMethod,
    check_far_group,
    register_method,
    require_positive,
)
from sparse_llm.backends.selection import first_real_key, real_keys
from sparse_llm.backends.streaming import sink_window_mask
from sparse_llm.kernels import BlockMask

FAR_KEYS = ("mean", "taylor", "none")


@register_method
@dataclass
class Lightning(SparseMethod):
    """Args: far_keys (``"mean"`` default: compressed far keys; ``"taylor"``: the Taylor linear
    attention reference; ``"none"`` = exact sink + local only), far_group (far keys per mean key,
    a power of two <= block_size, default 4), far_span (8192; tokens after which the groups grow 4x
    per level, as in the selection methods' far field; None: never), taylor_order (2 default, or 1),
    sink_tokens (64), local_tokens (1024; at least ``block_size``, so far keys precede every query of
    a block).
    ``layer_stats()`` has the far field's size per layer (``attention_stats`` reports it)."""

    name = "lightning"
    description = (
        "Hybrid (approximate): exact sink + local blocks, compressed mean keys (or Taylor linear "
        "attention) over the other keys."
    )
    # Exact only when the window covers the prompt (no far keys): the Taylor far field never is.
    exact_params = {"local_tokens": WHOLE_PROMPT}
    small_params = {"block_size": 16, "sink_tokens": 16, "local_tokens": 32}
    renamed_params = {"far_field": "far_keys"}  # ``far_field`` is now the hook of every method

    far_keys: str = "mean"
    far_group: int = 4
    far_span: int | None = FAR_SPAN
    taylor_order: int = 2
    sink_tokens: int = 64
    local_tokens: int = 1024

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.far_keys not in FAR_KEYS:
            raise ValueError(f"far_keys must be one of {FAR_KEYS}, got {self.far_keys!r}")
        check_far_group(self.far_group, self.block_size, self.far_span)
        if self.taylor_order not in (1, 2) or isinstance(self.taylor_order, bool):
            raise ValueError(f"taylor_order must be 1 or 2, got {self.taylor_order!r}")
        require_positive(sink_tokens=self.sink_tokens, local_tokens=self.local_tokens)
        if self.local_tokens < self.block_size:
            raise ValueError(
                f"local_tokens ({self.local_tokens}) must be >= block_size ({self.block_size}) so that "
                "every far key precedes the whole query block"
            )

    def block_mask(self, q, k, v, call: LayerCall) -> BlockMask:
        """The exactly attended blocks: sinks plus the local window (as ``streaming``)."""
        return sink_window_mask(q, k, call, self.block_size, self.sink_tokens, self.local_tokens)

    def far_field(self, q, k, v, mask: BlockMask, call: LayerCall):
        """The Taylor far field over every causal, real key outside the sink and local blocks."""
        if self.far_keys == "none":
            return None
        if call.sliding_window is not None:
            raise NotImplementedError("lightning's far field has no sliding window (the patch runs it dense)")
        if self.far_keys == "mean":
            out, lse, stats = mean_far_field(q, k, v, mask, call, self.far_group, self.far_span)
            self.layer_stats()[call.layer_idx] = stats
            return out, lse
        return taylor_far_field(
            q,
            k,
            v,
            scale=call.scale,
            softcap=call.softcap,
            key_padding_mask=call.key_padding_mask,
            block_size=self.block_size,
            sink_tokens=self.sink_tokens,
            local_tokens=self.local_tokens,
            order=self.taylor_order,
        )


def _square_features(x: torch.Tensor) -> torch.Tensor:
    """``phi(x)`` with ``phi(a) . phi(b) = (a . b)^2``: products ``x_i x_j`` for ``i <= j``, off-diagonal
    ones times sqrt(2). ``[..., D] -> [..., D (D + 1) / 2]``."""
    d = x.shape[-1]
    i, j = torch.triu_indices(d, d, device=x.device)
    weight = torch.where(i == j, 1.0, 2.0**0.5).to(x.dtype)
    return x[..., i] * x[..., j] * weight


def taylor_far_field(
    q, k, v, *, scale, block_size, sink_tokens, local_tokens, order=2, softcap=None, key_padding_mask=None
):
    """The far field of :class:`Lightning` as ``(out [B, Hq, Tq, D] fp32, lse [B, Hq, Tq] fp32)``.

    q ``[B, Hq, Tq, D]``, k/v ``[B, Hkv, Tk, D]``; ``key_padding_mask`` ``[B, Tk]`` bool (True = real).
    The far keys of query block ``n`` are the real keys in key blocks before its local window, minus
    the sink blocks (exactly the causal keys ``BlockMask.sink_window`` leaves out when ``local_tokens
    >= block_size``). Rows without far keys give out 0 and lse -inf.
    """
    (b, hq, q_len, d), (_, hkv, kv_len, dv) = q.shape, v.shape
    g, bs, dev = hq // hkv, block_size, q.device
    root = scale**0.5  # q~ . k~ = scale * q . k
    qs = q.float().view(b, hkv, g, q_len, d) * root
    ks = k.float() * root
    real = real_keys(key_padding_mask, b, kv_len, dev)
    start = first_real_key(key_padding_mask)
    start = torch.zeros(b, dtype=torch.long, device=dev) if start is None else start.to(dev)
    block = torch.arange(kv_len, device=dev) // bs
    sink = (block * bs < start[:, None] + sink_tokens) & ((block + 1) * bs > start[:, None])
    keep = (real & ~sink).float()[:, None, :, None]  # [B, 1, Tk, 1]
    # Keys are centred on their mean (per row and head) so the moments stay small: the mean score is
    # then q~ . center + a correction, with no cancellation between large terms.
    center = (ks * real[:, None, :, None]).sum(2) / real.sum(1).clamp_min(1)[:, None, None]
    kc = (ks - center[:, :, None]) * keep
    vk = v.float() * keep
    n_q = -(-q_len // bs)
    q_end = torch.clamp(torch.arange(1, n_q + 1) * bs, max=q_len) - 1 + kv_len - q_len
    first_local = torch.clamp(torch.div(q_end - local_tokens + 1, bs, rounding_mode="floor"), min=0)

    z0 = torch.zeros(b, 1, device=dev)  # far key count (shared by heads)
    s0 = torch.zeros(b, hkv, dv, device=dev)
    z1 = torch.zeros(b, hkv, d, device=dev)
    s1 = torch.zeros(b, hkv, d, dv, device=dev)
    f2 = d * (d + 1) // 2 if order == 2 else 0
    z2 = torch.zeros(b, hkv, f2, device=dev)
    s2 = torch.zeros(b, hkv, f2, dv, device=dev)
    out = torch.zeros(b, hkv, g, q_len, dv, device=dev)
    lse = torch.full((b, hkv, g, q_len), float("-inf"), device=dev)
    done = 0
    for n in range(n_q):
        upto = min(int(first_local[n]) * bs, kv_len)
        for lo in range(done, upto, bs):  # fold the new far key blocks into the running state
            hi = min(lo + bs, upto)
            kb, vb = kc[:, :, lo:hi], vk[:, :, lo:hi]
            z0 += keep[:, 0, lo:hi, 0].sum(-1, keepdim=True)
            s0 += vb.sum(2)
            z1 += kb.sum(2)
            s1 += kb.transpose(-1, -2) @ vb
            if order == 2:
                fb = _square_features(kb)
                z2 += fb.sum(2)
                s2 += fb.transpose(-1, -2) @ v.float()[:, :, lo:hi]  # fb is 0 on non-far keys
        done = max(done, upto)
        if upto == 0:
            continue
        rows = slice(n * bs, min((n + 1) * bs, q_len))
        state = (z0, s0, z1, s1, z2, s2)
        out[:, :, :, rows], lse[:, :, :, rows] = _read_far_state(
            qs[:, :, :, rows], center, state, order, softcap
        )
    return out.flatten(1, 2), lse.flatten(1, 2)


def _read_far_state(qn, center, state, order, softcap):
    """The far field ``(out [B, Hkv, G, n, Dv], lse [B, Hkv, G, n])`` of the scaled queries ``qn``
    ``[B, Hkv, G, n, D]`` of one query block, from the running sums ``state`` over its far keys."""
    z0, s0, z1, s1, z2, s2 = state
    count = z0[:, :, None, None]  # [B, 1, 1, 1]
    has = count > 0
    count = count.clamp_min(1.0)
    u1 = qn @ z1[:, :, None, :, None]  # [B, Hkv, G, n, 1]: sum over far keys of q~ . (k~ - center)
    mu = u1[..., 0] / count  # mean far score minus q~ . center
    m = (qn @ center[:, :, None, :, None])[..., 0] + mu  # mean far score
    slope = torch.ones_like(m)
    if softcap is not None:
        th = torch.tanh(m / softcap)
        m, slope = softcap * th, 1 - th * th
    # weight(u) = taylor(t (u - mu)) = a + coef * u (+ t^2/2 * u^2), with u = q~ . (k~ - center)
    a, coef = 1 - slope * mu, slope
    if order == 2:
        a, coef = a + (slope * mu) ** 2 / 2, slope - slope * slope * mu
    num = (qn @ s1[:, :, None]) * coef[..., None]  # [B, Hkv, G, n, Dv]
    den = u1[..., 0] * coef
    if order == 2:
        fq = _square_features(qn)
        half = slope * slope / 2
        num += (fq @ s2[:, :, None]) * half[..., None]
        den = den + (fq @ z2[:, :, None, :, None])[..., 0] * half
    num += a[..., None] * s0[:, :, None, None, :]
    den = den + a * count
    # den >= count > 0 in exact arithmetic (mean weight 1 + t^2 var / 2); the clamp guards rounding.
    den = den.clamp_min(torch.finfo(torch.float32).tiny)
    out = torch.where(has[..., None], num / den[..., None], 0.0)
    return out, torch.where(has, m + den.log(), float("-inf"))


def lightning_reference(
    q,
    k,
    v,
    *,
    scale,
    block_size,
    sink_tokens,
    local_tokens,
    order=2,
    far_field=True,
    far_keys="taylor",
    far_group=4,
    softcap=None,
    key_padding_mask=None,
):
    """Slow, obviously right :class:`Lightning` for tests: every far weight written out, ``Tq x Tk``.

    q ``[B, Hq, Tq, D]``, k/v ``[B, Hkv, Tk, D]`` (fp64 for a ground truth); returns ``[B, Hq, Tq, D]``.
    ``far_keys="mean"``: each query's far keys in runs of ``far_group`` positions, one mean key each.
    """
    from sparse_llm.kernels.reference import element_mask

    (_, hq, q_len, _), (_, hkv, kv_len, _) = q.shape, k.shape
    geo = dict(q_len=q_len, kv_len=kv_len, block_q=block_size, block_k=block_size)
    exact = BlockMask.sink_window(
        **geo, sink_tokens=sink_tokens, local_tokens=local_tokens, kv_start=first_real_key(key_padding_mask)
    )
    heads = dict(num_q_heads=hq, num_kv_heads=hkv, key_padding_mask=key_padding_mask)
    near = element_mask(exact, **heads)
    far = element_mask(BlockMask.causal(**geo), **heads) & ~near
    if not far_field:
        far = torch.zeros_like(far)
    s, lse_near, out_near = near_reference(q, k, v, near, scale, softcap)
    if far_keys == "mean":
        lse_far, out_far = mean_far_reference(q, k, v, far, scale, far_group, softcap, key_padding_mask)
        return merge_reference(lse_near, out_near, lse_far, out_far)
    n_far = far.sum(-1)
    m = (s * far).sum(-1) / n_far.clamp_min(1)
    slope = torch.ones_like(m)
    if softcap is not None:
        slope = 1 - torch.tanh(m / softcap) ** 2
    x = slope[..., None] * (s - m[..., None])
    weight = (1 + x + x * x / 2 if order == 2 else 1 + x) * far
    den = weight.sum(-1).clamp_min(torch.finfo(q.dtype).tiny)  # rows without far keys: 0 / tiny
    shift = m if softcap is None else softcap * torch.tanh(m / softcap)
    lse_far = torch.where(n_far > 0, shift + den.log(), float("-inf"))
    out_far = (weight @ v[:, :, None]) / den[..., None]
    return merge_reference(lse_near, out_near, lse_far, out_far)

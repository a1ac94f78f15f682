"""``lla``: local linear attention over the blocks a base method selects.

Local Linear Attention (Zuo et al., arXiv 2510.01450) reads softmax attention as a local-constant
(Nadaraya-Watson) regression of the values on the keys at the query, and replaces it by a local
*linear* one: per query ``q`` it fits ``v ~ b + W (k - q)`` with the softmax weights ``p_j`` and a
ridge penalty, and outputs the intercept ``b``. Solving the weighted least squares gives::

    k_bar = sum_j p_j k_j,   C = sum_j p_j (k_j - k_bar)(k_j - k_bar)^T,   z = (C + ridge I)^-1 (k_bar - q)
    o     = sum_j p_j (1 - (k_j - k_bar) . z) v_j

i.e. softmax attention plus a correction along the keys' weighted covariance. The paper writes the
penalty as ``lambda ||W||_F^2`` on unnormalized kernel weights ``w_j``; with ``p = w / sum(w)`` that
is ``ridge = 2 lambda / sum_j w_j``. We take ``ridge`` on the normalized weights, in squared key units,
because ``sum_j exp(s_j)`` has no fixed scale. ``ridge -> inf`` gives ``z -> 0`` and softmax attention.

What is exact and what is not: ``o`` is computed exactly (up to fp32 rounding) over the keys of the
base method's BlockMask (``base``/``base_params``, any registered method: ``"dense"`` for all causal
keys, ``"streaming"`` for sinks + a local window, a selection method...). It is training-free: the
model was trained with softmax, so LLA changes its outputs and ``ridge`` sets how far. Queries of a
dot-product model do not lie among its keys, so the fit extrapolates far from ``k_bar`` and a small
ridge is destructive. Measured on Gemma3-270M (600 essay tokens, base ``"dense"``, CPU fp32):
perplexity 22.71 with softmax; with LLA 439 (ridge 1), 41.2 (100), 22.91 (1e3), 22.64 (1e4),
22.71 (1e6). Hence the default ``ridge=1e4``; small ridges (~1) suit models trained with LLA.

Two solvers, chosen by ``solver``:

``"tilt"`` (default, two passes of the shared kernel over the base's blocks: twice its attention cost).
The first Neumann term of the solve, ``z = (k_bar - q) / ridge``, and the correction
``sum_j p_j ((k_j - k_bar) . z) v_j`` read as a derivative: tilting the softmax weights by
``exp(-k_j . z)`` changes the output by minus that correction, to first order in z. The tilt is a
moved query, ``q - z / scale``, so LLA is ``attention(q - (k_bar - q) / (ridge * scale))`` with
``k_bar = attention(q, values = keys)``. Error against the exact solve: the dropped Neumann terms,
relative ``|C| / ridge``, and the tilt's second order, ``~ |z|^2`` times the keys' third moments; at
the default ridge both are far below the correction itself (no soft-cap: under 1 % of the correction
at ridge 1e3 on unit-scale keys, falling as 1/ridge; tests/test_approx_backends.py). With a soft-cap
the tilt moves the capped logits by ``cap'(s_j) k_j . z`` instead of ``k_j . z``: harmless where the
cap does not bite (Gemma2's 50), but the correction is a difference of two larger terms, so a
biting cap (5 on unit-variance scores) leaves ~75 % of it wrong; use "cholesky" there.

``"cholesky"`` (the reference): per query block, the selected key blocks are gathered and the weights
materialized (``block_size x selected`` per head), the covariance costs ``O(selected * D^2)`` per
query and the batched Cholesky solve ``O(D^3)`` per query (fp32); memory is bounded by one query
block at a time. Exact at any ridge, far slower than attention over the same keys.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from sparse_llm.backends.base import LayerCall, SparseMethod, exact_attention, get_method, register_method
from sparse_llm.backends.selection import real_keys
from sparse_llm.kernels import BlockMask

SOLVERS = ("tilt", "cholesky")
_KEY_CHUNK = 128  # keys per covariance GEMM: bounds the [chunk, D (D + 1) / 2] outer products


@register_method
@dataclass
class LLA(SparseMethod):
    """Args: ridge (> 0, default 1e4; larger = closer to softmax), base (a registered method that
    picks the blocks, default ``"streaming"``), base_params (that method's parameters; its
    ``block_size`` defaults to this method's), solver (``"tilt"``: two kernel passes, accurate at
    large ridges; ``"cholesky"``: the exact per-query solve, the reference)."""

    name = "lla"
    description = "Local linear attention (training-free): local-linear regression over a base's blocks."
    # Softmax over every causal key up to the 1/ridge correction (~1e-8 relative, below fp32 rounding).
    exact_params = {"ridge": 1e8, "base": "dense"}
    small_params = {"block_size": 16, "base_params": {"sink_tokens": 16, "local_tokens": 32}}

    ridge: float = 1e4
    base: str = "streaming"
    base_params: dict = field(default_factory=dict)
    solver: str = "tilt"

    def __post_init__(self) -> None:
        super().__post_init__()
        if (
            not isinstance(self.ridge, (int, float))
            or isinstance(self.ridge, bool)
            or not math.isfinite(self.ridge)
            or self.ridge <= 0
        ):
            raise ValueError(f"ridge must be a finite number > 0, got {self.ridge!r}")
        if not isinstance(self.base_params, dict):
            raise ValueError(
                f"base_params must be a dict of the base method's parameters, got {self.base_params!r}"
            )
        if self.solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}, got {self.solver!r}")
        if self.base == self.name:
            raise ValueError("base must be a selection method, not 'lla' itself")
        self._base = get_method(self.base, **{"block_size": self.block_size, **self.base_params})

    def block_mask(self, q, k, v, call: LayerCall) -> BlockMask:
        return self._base.block_mask(q, k, v, call)

    def attend(self, q, k, v, call: LayerCall) -> tuple[torch.Tensor, BlockMask]:
        """The one method that overrides ``attend``: LLA replaces softmax attention over the selected
        keys (the kernel's exact part) by a regression over those same keys, so there is no exact
        part to merge a far field with; keys outside the mask are not attended."""
        mask = self.block_mask(q, k, v, call)
        if self.solver == "tilt":
            return tilted_local_linear_attention(q, k, v, mask, call, ridge=self.ridge), mask
        return local_linear_attention(q, k, v, mask, call, ridge=self.ridge), mask


def tilted_local_linear_attention(q, k, v, mask: BlockMask, call: LayerCall, *, ridge: float) -> torch.Tensor:
    """LLA with ``solver="tilt"`` (module docstring): two passes of the shared kernel over ``mask``.

    Same arguments and result as :func:`local_linear_attention`. Half-precision inputs are tilted in
    fp32: the query moves by ~1/ridge of its size, below bf16's resolution.
    """
    dtype = q.dtype
    if dtype != torch.float32:
        q, k, v = q.float(), k.float(), v.float()
    k_bar = exact_attention(q, k, k, mask, call)  # sum_j p_j k_j per query
    # q - (k_bar - q) / (ridge * scale), in place in one pass: k_bar + (1 + c) (q - k_bar)
    tilted = k_bar.lerp_(q, 1.0 + 1.0 / (ridge * call.scale))
    return exact_attention(tilted, k, v, mask, call).to(dtype)


def local_linear_attention(q, k, v, mask: BlockMask, call: LayerCall, *, ridge: float) -> torch.Tensor:
    """LLA (module docstring) over ``mask``'s blocks, one query block at a time.

    q ``[B, Hq, Tq, D]``, k/v ``[B, Hkv, Tk, D]``; the mask may have batch 1 or B and heads 1, Hkv or
    Hq. Causality (bottom-right), ``call.sliding_window``, ``call.softcap`` and
    ``call.key_padding_mask`` apply as in the kernel. Returns ``[B, Hq, Tq, D]`` in q's dtype; a query
    with no allowed key gets 0.
    """
    (b, hq, q_len, d), (_, hkv, kv_len, dv) = q.shape, v.shape
    g, dev = hq // hkv, q.device
    qf, kf, vf = q.float().view(b, hkv, g, q_len, d), k.float(), v.float()
    real = real_keys(call.key_padding_mask, b, kv_len, dev)
    # C and z are shift-invariant: centring keys and queries on the real keys' mean keeps the
    # second moments small, so sum p k k^T - k_bar k_bar^T does not cancel large terms.
    center = (kf * real[:, None, :, None]).sum(2) / real.sum(1).clamp_min(1)[:, None, None]
    kc = kf - center[:, :, None]
    qc = qf - center[:, :, None, None]
    dense = mask.to_dense()  # [Bm, Hm, nQ, nK]
    bq, bk = mask.block_q, mask.block_k
    out = torch.zeros(b, hkv, g, q_len, dv, device=dev)
    iu, ju = torch.triu_indices(d, d, device=dev)
    diagonal = (iu == ju).nonzero().flatten()
    position = torch.zeros(d, d, dtype=torch.long, device=dev)
    position[iu, ju] = torch.arange(iu.numel(), device=dev)
    symmetric = torch.maximum(position, position.T).flatten()  # (i, j) -> its upper-triangle entry
    for n in range(mask.num_q_blocks):
        rows = dense[:, :, n]  # [Bm, Hm, nK]
        blocks = rows.flatten(0, 1).any(0).nonzero().flatten()
        if blocks.numel() == 0:
            continue
        keys = (blocks[:, None] * bk + torch.arange(bk, device=dev)).flatten()
        keys = keys[keys < kv_len]
        lo, hi = n * bq, min((n + 1) * bq, q_len)
        pos = torch.arange(lo, hi, device=dev) + kv_len - q_len
        allowed = (keys[None, :] <= pos[:, None])[None, None, None]  # [1, 1, 1, n, S]
        if call.sliding_window is not None:
            allowed = allowed & (keys[None, :] > pos[:, None] - call.sliding_window)
        sel = rows[:, :, keys // bk]  # [Bm, Hm, S]
        sel = sel.view(sel.shape[0], hkv, g, 1, -1) if sel.shape[1] == hq else sel[:, :, None, None]
        allowed = allowed & sel & real[:, keys][:, None, None, None]
        scores = (qf[:, :, :, lo:hi] @ kf[:, :, None, keys].transpose(-1, -2)) * call.scale
        if call.softcap is not None:
            scores = call.softcap * torch.tanh(scores / call.softcap)
        p = scores.masked_fill(~allowed, float("-inf")).softmax(-1).nan_to_num(0.0)  # [B, Hkv, G, n, S]
        ks, vs = kc[:, :, None, keys], vf[:, :, None, keys]  # [B, Hkv, 1, S, D]
        out_v = p @ vs
        k_bar = p @ ks  # [B, Hkv, G, n, D]
        # sum_j p_j k_j k_j^T as one GEMM per key chunk over the upper triangle of k k^T (symmetric)
        upper = torch.zeros(b, hkv, g * (hi - lo), iu.numel(), device=dev)
        flat_p = p.flatten(2, 3)
        for c0 in range(0, keys.numel(), _KEY_CHUNK):
            kk = ks[:, :, 0, c0 : c0 + _KEY_CHUNK]
            upper += flat_p[..., c0 : c0 + _KEY_CHUNK] @ (kk[..., iu] * kk[..., ju])
        upper = upper.view(b, hkv, g, hi - lo, -1) - k_bar[..., iu] * k_bar[..., ju]
        upper[..., diagonal] += ridge
        cov = upper[..., symmetric].unflatten(-1, (d, d))  # C + ridge I, both triangles
        rhs = (k_bar - qc[:, :, :, lo:hi])[..., None]
        chol, info = torch.linalg.cholesky_ex(cov)
        z = torch.cholesky_solve(rhs, chol)
        if bool((info > 0).any()):  # rounding made C + ridge I indefinite (tiny ridge): LU instead
            bad = info > 0
            z[bad] = torch.linalg.solve(cov[bad], rhs[bad])
        z = z[..., 0]  # [B, Hkv, G, n, D]
        # sum_j p_j ((k_j - k_bar) . z) v_j, with k_bar . z taken as the p-mean of the k_j . z row itself:
        # the same rounding on both sides, so a query with one key (k_j = k_bar) gets exactly 0.
        kz = z @ ks.transpose(-1, -2)  # [B, Hkv, G, n, S]
        kz = kz - (p * kz).sum(-1, keepdim=True)
        correction = (p * kz) @ vs
        out[:, :, :, lo:hi] = out_v - correction
    return out.flatten(1, 2).to(q.dtype)


def lla_reference(
    q, k, v, mask: BlockMask, *, scale, ridge, softcap=None, sliding_window=None, key_padding_mask=None
):
    """Slow, obviously right LLA for tests: dense ``Tq x Tk x D`` tensors and ``torch.linalg.solve``.

    Same arguments as :func:`local_linear_attention` (fp64 inputs for a ground truth).
    """
    from sparse_llm.kernels.reference import element_mask

    (_, hq, _, d), hkv = q.shape, k.shape[1]
    allowed = element_mask(
        mask,
        num_q_heads=hq,
        num_kv_heads=hkv,
        sliding_window=sliding_window,
        key_padding_mask=key_padding_mask,
        device=q.device,
    )
    qg = q.unflatten(1, (hkv, hq // hkv))
    scores = torch.einsum("bhgqd,bhkd->bhgqk", qg, k) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    p = scores.masked_fill(~allowed, float("-inf")).softmax(-1).nan_to_num(0.0)
    k_bar = torch.einsum("bhgqk,bhkd->bhgqd", p, k)
    diff = k[:, :, None, None] - k_bar[..., None, :]  # [B, Hkv, G, Tq, Tk, D]
    cov = torch.einsum("bhgqk,bhgqkd,bhgqke->bhgqde", p, diff, diff)
    z = torch.linalg.solve(cov + ridge * torch.eye(d, dtype=q.dtype), (k_bar - qg)[..., None])[..., 0]
    weight = p * (1 - torch.einsum("bhgqkd,bhgqd->bhgqk", diff, z))
    return torch.einsum("bhgqk,bhkd->bhgqd", weight, v).flatten(1, 2)

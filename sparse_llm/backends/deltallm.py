"""``deltallm``: exact sink + local attention, delta-thresholded ("held") keys everywhere else.

DeltaLLM (Qi, Gao, Ren, Chen, arXiv 2507.19608; no official code, implemented from the paper)
exploits temporal sparsity: consecutive keys of a head change little, so only large changes are
propagated. Per key channel, a key is replaced by a *held* key that moves only when
the key has drifted more than a threshold from it (the delta-network rule of Gao et al.'s DeltaRNN)::

    K~_0 = K_0,    K~_t = K_t   where |K_t - K~_{t-1}| > theta * sigma,   else K~_{t-1}

elementwise, with ``sigma`` the standard deviation of that (batch row, KV head, channel) over the
real keys. The delta ``dK_t = K_t - K~_{t-1}`` is zero wherever the key is held, so a delta product
``q . dK_t`` is sparse; we store that fraction per layer in :attr:`DeltaLLM.last_delta_sparsity`.
Thresholding the delta against the held key (not against ``K_{t-1}``) bounds the error of every held
key by ``theta * sigma`` per channel; summing thresholded raw deltas would let sub-threshold changes
accumulate without bound. ``theta = 0`` gives held keys equal to the keys bit for bit.

What is exact and what is approximate: every query attends its sink and local blocks (the first
``sink_tokens`` real tokens and the ``local_tokens`` ending at its query block, rounded out to whole
blocks, as ``streaming``) with the true keys. All other causal keys are attended with their held keys
and the true values; one softmax spans both parts (two kernel calls merged by their log-sum-exp), so
only the scores of far keys are approximate. Soft-capping and padding are honoured in both parts.

Speed: a speedup would come from computing far scores incrementally from the sparse deltas (and from
skipping key blocks whose held keys did not change). This implementation does not: it runs the far
part densely through the kernel with held keys, so it emulates DeltaLLM's quality at dense cost (plus
a sequential scan over Tk to build the held keys, run again at every step when ``decode="sparse"``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from sparse_llm.backends.base import (
    LayerCall,
    SparseMethod,
    exact_attention,
    register_method,
    require_positive,
)
from sparse_llm.backends.selection import first_real_key, real_keys
from sparse_llm.backends.streaming import sink_window_mask
from sparse_llm.kernels import BlockMask


@register_method
@dataclass
class DeltaLLM(SparseMethod):
    """Args: theta (threshold in key standard deviations, default 0.6; 0 = exact dense attention),
    local_tokens (exact recent window; default None = max(256, 5% of Tk)), sink_tokens (exact first
    tokens, default 64).

    After each call, ``last_delta_sparsity[layer_idx]`` holds the fraction of zero key deltas (held
    channels) over that layer's real keys, batch and KV heads pooled; it is not a parameter.
    """

    name = "deltallm"
    description = "DeltaLLM (approximate): exact sink + local window, held (delta-thresholded) far keys."
    # theta 0 holds no key, so any window is exact; a small one makes the held-key (far) part run.
    exact_params = {"theta": 0.0, "sink_tokens": 16, "local_tokens": 32}
    small_params = {"block_size": 16, "sink_tokens": 16, "local_tokens": 32}

    theta: float = 0.6
    local_tokens: int | None = None
    sink_tokens: int = 64

    def __post_init__(self) -> None:
        super().__post_init__()
        if (
            not isinstance(self.theta, (int, float))
            or isinstance(self.theta, bool)
            or not math.isfinite(self.theta)
            or self.theta < 0
        ):
            raise ValueError(f"theta must be a finite number >= 0, got {self.theta!r}")
        require_positive(sink_tokens=self.sink_tokens)
        if self.local_tokens is not None:
            require_positive(local_tokens=self.local_tokens)
        self.last_delta_sparsity: dict[int, float] = {}

    def window(self, kv_len: int) -> int:
        """The exact local window in tokens for ``kv_len`` keys."""
        return self.local_tokens if self.local_tokens is not None else max(256, math.ceil(0.05 * kv_len))

    def block_mask(self, q, k, v, call: LayerCall) -> BlockMask:
        """The exactly attended blocks: sinks plus the local window (as ``streaming``)."""
        return sink_window_mask(q, k, call, self.block_size, self.sink_tokens, self.window(k.shape[2]))

    def far_field(self, q, k, v, mask: BlockMask, call: LayerCall):
        """Kernel attention with held keys over the blocks ``mask`` leaves out (computed densely, so
        the density reported is that of the exact part)."""
        held, changed = held_keys(k, self.theta, call.key_padding_mask)
        counted = _delta_positions(call.key_padding_mask, k)
        if bool(counted.any()):
            zero = (~changed & counted[:, None, :, None]).sum() / (counted.sum() * k.shape[1] * k.shape[3])
            self.last_delta_sparsity[call.layer_idx] = float(zero)
        far = BlockMask.from_dense(
            ~mask.to_dense(),
            block_q=mask.block_q,
            block_k=mask.block_k,
            q_len=mask.q_len,
            kv_len=mask.kv_len,
            sliding_window=call.sliding_window,
        )
        return exact_attention(q, held.to(k.dtype), v, far, call, return_lse=True)


def _delta_positions(key_padding_mask: torch.Tensor | None, k: torch.Tensor) -> torch.Tensor:
    """bool ``[B, Tk]``: real keys that have a real predecessor (where a delta is defined)."""
    b, _, kv_len, _ = k.shape
    real = real_keys(key_padding_mask, b, kv_len, k.device)
    prev = torch.nn.functional.pad(real[:, :-1], (1, 0), value=False)
    return real & prev


def held_keys(
    k: torch.Tensor, theta: float, key_padding_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The held keys of the delta rule (module docstring) and where they were updated.

    Args:
        k: ``[B, Hkv, Tk, D]`` keys, any float dtype.
        theta: threshold in standard deviations of each (batch row, head, channel) over real keys.
        key_padding_mask: ``[B, Tk]`` bool, True = real; the scan restarts at the first real key.

    Returns:
        ``(held [B, Hkv, Tk, D] float32, changed [B, Hkv, Tk, D] bool)``; ``changed`` is True where
        the held key took the current key's value (always at padding and at the first real key).
    """
    kf = k.float()
    b, h, kv_len, d = kf.shape
    real = real_keys(key_padding_mask, b, kv_len, k.device)
    weight = real[:, None, :, None].float()
    count = weight.sum(2).clamp_min(1.0)
    mean = (kf * weight).sum(2) / count
    std = (((kf - mean[:, :, None]) ** 2 * weight).sum(2) / count).sqrt()
    threshold = theta * std  # [B, Hkv, D]
    restart = ~_delta_positions(key_padding_mask, k)  # [B, Tk]
    held = torch.empty_like(kf)
    changed = torch.empty(b, h, kv_len, d, dtype=torch.bool, device=k.device)
    current = kf[:, :, 0]
    # Sequential by nature (each step compares with the last held value); vectorized over B, Hkv, D.
    for t in range(kv_len):
        key = kf[:, :, t]
        update = ((key - current).abs() > threshold) | restart[:, t, None, None]
        current = torch.where(update, key, current)
        held[:, :, t] = current
        changed[:, :, t] = update
    return held, changed


def deltallm_reference(
    q, k, v, *, theta, scale, sink_tokens, local_tokens, block_size, softcap=None, key_padding_mask=None
):
    """Slow, obviously right DeltaLLM for tests: a Python loop for the held keys, dense scores.

    q ``[B, Hq, Tq, D]``, k/v ``[B, Hkv, Tk, D]`` (fp64 for a ground truth); returns ``[B, Hq, Tq, D]``
    in q's dtype. Far keys (causal, real, outside the exact sink + local blocks) score against held keys.
    """
    from sparse_llm.kernels.reference import element_mask

    (b, hq, q_len, d), (_, hkv, kv_len, _) = q.shape, k.shape
    real = [[True] * kv_len for _ in range(b)] if key_padding_mask is None else key_padding_mask.tolist()
    rows = k.tolist()
    held = [[[list(r) for r in rows[i][j]] for j in range(hkv)] for i in range(b)]
    for i in range(b):
        idx = [t for t in range(kv_len) if real[i][t]]
        for j in range(hkv):
            for c in range(d):
                vals = [rows[i][j][t][c] for t in idx]
                mean = sum(vals) / max(len(vals), 1)
                thr = theta * math.sqrt(sum((x - mean) ** 2 for x in vals) / max(len(vals), 1))
                cur = None
                for t in range(kv_len):
                    x = rows[i][j][t][c]
                    if not real[i][t] or t == 0 or not real[i][t - 1] or abs(x - cur) > thr:
                        cur = x
                    held[i][j][t][c] = cur
    held = torch.tensor(held, dtype=k.dtype)
    geo = dict(q_len=q_len, kv_len=kv_len, block_q=block_size, block_k=block_size)
    exact = BlockMask.sink_window(
        **geo, sink_tokens=sink_tokens, local_tokens=local_tokens, kv_start=first_real_key(key_padding_mask)
    )
    heads = dict(num_q_heads=hq, num_kv_heads=hkv, key_padding_mask=key_padding_mask)
    near = element_mask(exact, **heads)  # [B|1, Hkv, 1, Tq, Tk]
    allowed = element_mask(BlockMask.causal(**geo), **heads)
    qg = q.unflatten(1, (hkv, hq // hkv))
    scores = (
        torch.where(
            near,
            torch.einsum("bhgqd,bhkd->bhgqk", qg, k),
            torch.einsum("bhgqd,bhkd->bhgqk", qg, held),
        )
        * scale
    )
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1).nan_to_num(0.0)
    return torch.einsum("bhgqk,bhkd->bhgqd", probs, v).flatten(1, 2)

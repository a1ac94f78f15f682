"""``deltallm``: exact sink + local attention, delta-thresholded ("held") keys everywhere else.

DeltaLLM (Qi, Gao, Ren, Chen, arXiv 2507.19608; no official code, implemented from the paper)
exploits temporal sparsity: consecutive keys of a head change little, so only large changes are
propagated. Two forms, chosen by ``hold``:

``hold="key"`` (default, the fast form): whole key vectors are held. Within each key block, a key
joins the run of the last held key while its drift from it is at most ``theta``; otherwise it starts a
new run and is held itself. The drift is measured where it matters, in logits: the RMS over the
layer's queries (of the key's KV head, padding excluded) of ``scale * q . (k - k_held)``, i.e.
``sqrt(d^T M d)`` with ``M = scale^2 E[q q^T]``. A key that moves only along directions the queries
do not probe is held; one that moves along a direction they weigh heavily is not (the paper's
thresholds are per channel; per-channel standard deviations as the metric formed about as many runs
at 1.0 as this one at 2.0, with higher perplexity: docs/evaluations.md). The n keys of a run then
share one key vector, so the run collapses exactly to one key with logit bias log n and the mean of
its values (``_collapse.py``, through the kernel's ``key_bias``): the far part costs the runs, not
the keys, and gets cheaper as the delta sparsity grows. Runs restart at every key block so that each
query block's far keys are whole collapsed blocks.

``hold="channel"`` (the paper's rule, kept as the reference): per key channel, a key is replaced by a
*held* key that moves only when the key has drifted more than a threshold from it (the delta-network
rule of Gao et al.'s DeltaRNN)::

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

Speed: ``hold="channel"`` runs the far part densely through the kernel with held keys (DeltaLLM's
quality at dense cost, plus a sequential scan over Tk to build the held keys, run again at every step
when ``decode="sparse"``). ``hold="key"`` reads one collapsed key per run (a key block's runs padded
to a multiple of a sixteenth of a block: 4 slots at block_size 64) after a vectorized run search (Gram
matrices of the key blocks, then one host pass over the chain of held keys).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from sparse_llm.backends._collapse import collapsed_far_field, far_blocks, far_key_mask
from sparse_llm.backends.base import (
    LayerCall,
    SparseMethod,
    exact_attention,
    register_method,
    require_positive,
)
from sparse_llm.backends.selection import first_real_key, group_rows, real_keys
from sparse_llm.backends.streaming import sink_window_mask
from sparse_llm.kernels import BlockMask

HOLDS = ("key", "channel")
# Default threshold per form: "key" in logits (RMS over the queries), "channel" in each channel's
# standard deviations. Measured on Gemma3-270M at 8K (docs/evaluations.md): the logit drift at 2.0
# forms about as many runs as the per-channel RMS drift at 1.0 did, with lower perplexity.
THETA = {"key": 2.0, "channel": 0.6}
# Collapsed blocks per key block at most: a key block's runs take sixteenths of it (slots of 4 at
# block_size 64), so its padding (unused slots, computed and masked) averages 1.5 slots. Quarters of a
# block (slots of 16) padded 12-42 % of the far slots on the 8K essays; sixteenths took deltallm's
# attention from 0.94x to 0.82x dense's at the same runs and outputs (docs/benchmarks.md).
_SLOTS_PER_BLOCK = 16


@register_method
@dataclass
class DeltaLLM(SparseMethod):
    """Args: hold (``"key"``: whole held keys, runs collapsed, the fast form; ``"channel"``: the
    paper's per-channel rule, far part dense), theta (the threshold: with "key" the RMS logit error of a
    held key over the layer's queries, with "channel" each channel's drift in its standard deviations;
    default None = 2.0 for "key", 0.6 for "channel"; 0 = exact dense attention), local_tokens (exact
    recent window; default None = max(256, 5% of Tk); at least ``block_size`` with ``hold="key"``),
    sink_tokens (exact first tokens, default 64).

    After each call, ``last_delta_sparsity[layer_idx]`` holds the fraction of zero key deltas (held
    channels, or held whole keys with "key") over that layer's far keys (all real keys for
    "channel"), batch and KV heads pooled; it is not a parameter. ``layer_stats()`` has the far
    field's size per layer (``attention_stats`` reports it).
    """

    name = "deltallm"
    description = "DeltaLLM (approximate): exact sink + local window, held (delta-thresholded) far keys."
    # theta 0 holds no key, so any window is exact; a small one makes the held-key (far) part run.
    exact_params = {"theta": 0.0, "sink_tokens": 16, "local_tokens": 64}
    small_params = {"block_size": 16, "sink_tokens": 16, "local_tokens": 32}

    hold: str = "key"
    theta: float | None = None
    local_tokens: int | None = None
    sink_tokens: int = 64

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.hold not in HOLDS:
            raise ValueError(f"hold must be one of {HOLDS}, got {self.hold!r}")
        if self.theta is None:
            self.theta = THETA[self.hold]
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
            if self.hold == "key" and self.local_tokens < self.block_size:
                raise ValueError(
                    f"local_tokens ({self.local_tokens}) must be >= block_size ({self.block_size}) with "
                    "hold='key', so that every far key precedes the whole query block"
                )
        self.last_delta_sparsity: dict[int, float] = {}

    def window(self, kv_len: int) -> int:
        """The exact local window in tokens for ``kv_len`` keys."""
        if self.local_tokens is not None:
            return self.local_tokens
        return max(256, self.block_size, math.ceil(0.05 * kv_len))

    def block_mask(self, q, k, v, call: LayerCall) -> BlockMask:
        """The exactly attended blocks: sinks plus the local window (as ``streaming``)."""
        return sink_window_mask(q, k, call, self.block_size, self.sink_tokens, self.window(k.shape[2]))

    def far_field(self, q, k, v, mask: BlockMask, call: LayerCall):
        """Kernel attention with held keys over the blocks ``mask`` leaves out: one collapsed key per
        run (``hold="key"``), or every key densely (``"channel"``)."""
        if self.hold == "key":
            return self._collapsed_far_field(q, k, v, mask, call)
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

    def _collapsed_far_field(self, q, k, v, mask: BlockMask, call: LayerCall):
        if call.sliding_window is not None:
            raise NotImplementedError(
                "deltallm's collapsed far field has no sliding window (the patch runs it dense)"
            )
        far = far_blocks(mask)
        real = real_keys(call.key_padding_mask, k.shape[0], k.shape[2], k.device)
        keys = far_key_mask(far, real, mask.block_k)
        runs = held_key_runs(k, query_moment(q, k.shape[1], call), self.theta, keys, mask.block_k)
        out, lse, stats = collapsed_far_field(
            q, k, v, runs, far, mask, call, width=max(1, mask.block_k // _SLOTS_PER_BLOCK)
        )
        if stats["far_keys"]:
            self.last_delta_sparsity[call.layer_idx] = 1.0 - stats["far_groups"] / stats["far_keys"]
        self.layer_stats()[call.layer_idx] = stats
        return out, lse


def query_moment(q: torch.Tensor, num_kv_heads: int, call: LayerCall) -> torch.Tensor:
    """``M = scale^2 E[q q^T]`` fp32 ``[B, Hkv, D, D]`` over each KV head's query heads and real queries
    (q ``[B, Hq, Tq, D]``; the queries are the last Tq of the key padding mask's positions): ``d^T M d``
    is the mean squared change of the logits when a key moves by ``d``."""
    b, hq, q_len, _ = q.shape
    g = hq // num_kv_heads
    # The sum does not depend on the row order: HF's (a view when Hkv = 1; a head-major copy took as
    # long as the GEMM).
    qg = group_rows(q.float(), num_kv_heads)
    count = torch.full((b, 1, 1, 1), float(g * q_len), device=q.device)
    if call.key_padding_mask is not None:
        valid = call.key_padding_mask[:, -q_len:].float()
        qg = qg * valid.repeat_interleave(g, 1)[:, None, :, None]
        count = count * valid.mean(1).view(b, 1, 1, 1)
    return qg.transpose(-1, -2) @ qg * (call.scale**2 / count.clamp_min(1.0))


def held_key_runs(k: torch.Tensor, moment: torch.Tensor, theta: float, keys: torch.Tensor, block: int):
    """Runs of whole held keys (``hold="key"``, module docstring), per key block.

    Args:
        k: ``[B, Hkv, Tk, D]``; moment: ``[B, Hkv, D, D]`` from :func:`query_moment`; theta: the RMS
            logit drift threshold; keys: bool ``[B, Tk]``, the keys to group (the others get -1);
            block: key block size (runs restart at each block).

    Returns:
        long ``[B, Hkv, Tk]``: each key's run within its block, numbered from 0 (the run's first key
        is the held key), -1 for keys not grouped.
    """
    b, h, kv_len, d = k.shape
    n_k = -(-kv_len // block)
    x = torch.nn.functional.pad(k.float(), (0, 0, 0, n_k * block - kv_len)).view(b, h, n_k, block, d)
    x = x - x.mean(3, keepdim=True)  # drifts are differences within a block: centring keeps terms small
    xm = (x.view(b, h, n_k * block, d) @ moment).view(b, h, n_k, block, d)
    sq = (x * xm).sum(-1)  # k^T M k
    drift = sq[..., :, None] + sq[..., None, :] - 2 * x @ xm.transpose(-1, -2)  # [.., a, t]: d^T M d
    later = torch.ones(block, block, dtype=torch.bool, device=k.device).triu(1)
    moved = (drift > theta * theta) & later  # key t (> a) left the run held at key a
    # next_start[a]: the first key after a that leaves a's run (block: none); one extra entry for the end
    next_start = torch.where(moved.any(-1), moved.int().argmax(-1), block)
    next_start = torch.cat([next_start, next_start.new_full((*next_start.shape[:-1], 1), block)], -1)
    grouped = torch.nn.functional.pad(keys, (0, n_k * block - kv_len)).view(b, 1, n_k, block)
    start = torch.where(grouped.any(-1), grouped.int().argmax(-1), block).expand(b, h, n_k)
    # Follow each block's chain of held keys on the host: a few thousand integer steps, where tensor
    # ops would pay a parallel-region wake-up per step.
    rows, cols = [], []
    for i, (chain, key) in enumerate(
        zip(next_start.flatten(0, 2).tolist(), start.flatten().tolist(), strict=True)
    ):
        while key < block:
            rows.append(i)
            cols.append(key)
            key = chain[key]
    held = torch.zeros(b * h * n_k, block, dtype=torch.bool, device=k.device)
    held[torch.tensor(rows, dtype=torch.long), torch.tensor(cols, dtype=torch.long)] = True
    held = held.view(b, h, n_k, block)
    run = held.cumsum(-1) - 1
    run = torch.where(grouped & (run >= 0), run, -1)
    return run.flatten(2)[..., :kv_len]


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


def _reference_stds(keys: list, idx: list[int], d: int) -> list[float]:
    """Per-channel population standard deviation of one head's keys (``[Tk][D]`` lists) over the
    positions ``idx``."""
    stds = []
    for c in range(d):
        vals = [keys[t][c] for t in idx]
        mean = sum(vals) / max(len(vals), 1)
        stds.append(math.sqrt(sum((x - mean) ** 2 for x in vals) / max(len(vals), 1)))
    return stds


def _reference_held_whole(
    keys: list, real: list, queries: list, scale: float, theta: float, block: int, sink_end: int
) -> list:
    """``hold="key"`` for one head: a far key takes the key that opened its run; a run restarts at each
    key block and at the first key whose logits differ from its run's first key's by more than theta,
    RMS over ``queries`` (the real queries of the head's query group, ``[N][D]`` lists)."""
    d = len(keys[0]) if keys else 0
    held = [list(r) for r in keys]
    anchor = None
    for t in range(len(keys)):
        if (t // block) * block < sink_end or not real[t]:  # sink blocks and padding hold nothing (never far)
            anchor = None
            continue
        if t % block == 0:  # runs restart at every key block
            anchor = None
        if anchor is not None:
            moved = [keys[t][c] - keys[anchor][c] for c in range(d)]
            logits = [scale * sum(qc * mc for qc, mc in zip(q, moved, strict=True)) for q in queries]
            drift = sum(x * x for x in logits) / max(len(logits), 1)
            anchor = anchor if drift <= theta * theta else None
        anchor = t if anchor is None else anchor
        held[t] = list(keys[anchor])
    return held


def _reference_held_channels(keys: list, real: list, stds: list, theta: float) -> list:
    """``hold="channel"`` for one head: per channel, the held value moves to the key's only when they
    differ by more than theta * std; it restarts at padding and where the previous key is padding."""
    held = [list(r) for r in keys]
    for c in range(len(stds)):
        thr = theta * stds[c]
        cur = None
        for t in range(len(keys)):
            x = keys[t][c]
            if not real[t] or t == 0 or not real[t - 1] or abs(x - cur) > thr:
                cur = x
            held[t][c] = cur
    return held


def _reference_held_keys(
    q: torch.Tensor,
    k: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    scale: float,
    theta: float,
    hold: str,
    block: int,
    sink_tokens: int,
) -> list:
    """The held keys ``[B][Hkv][Tk][D]`` (nested lists) of either form, one Python loop per head."""
    (b, hq, q_len, _), (_, hkv, kv_len, _) = q.shape, k.shape
    real = [[True] * kv_len for _ in range(b)] if key_padding_mask is None else key_padding_mask.tolist()
    held = []
    for i, (keys_b, real_b) in enumerate(zip(k.tolist(), real, strict=True)):
        idx = [t for t, r in enumerate(real_b) if r]
        sink_end = (idx[0] if idx else len(real_b)) + sink_tokens
        held.append([])
        for h, keys in enumerate(keys_b):
            if hold == "key":
                group = range(h * (hq // hkv), (h + 1) * (hq // hkv))
                rows = [t for t in range(q_len) if real_b[kv_len - q_len + t]]
                queries = [q[i, j, t].tolist() for j in group for t in rows]
                held[-1].append(_reference_held_whole(keys, real_b, queries, scale, theta, block, sink_end))
            else:
                stds = _reference_stds(keys, idx, k.shape[3])
                held[-1].append(_reference_held_channels(keys, real_b, stds, theta))
    return held


def deltallm_reference(
    q,
    k,
    v,
    *,
    theta,
    scale,
    sink_tokens,
    local_tokens,
    block_size,
    hold="channel",
    softcap=None,
    key_padding_mask=None,
):
    """Slow, obviously right DeltaLLM for tests: a Python loop for the held keys, dense scores.

    q ``[B, Hq, Tq, D]``, k/v ``[B, Hkv, Tk, D]`` (fp64 for a ground truth); returns ``[B, Hq, Tq, D]``
    in q's dtype. Far keys (causal, real, outside the exact sink + local blocks) score against held keys:
    per channel (``hold="channel"``) or whole keys restarting at each key block (``"key"``).
    """
    from sparse_llm.kernels.reference import element_mask

    (_, hq, q_len, _), (_, hkv, kv_len, _) = q.shape, k.shape
    held = _reference_held_keys(q, k, key_padding_mask, scale, theta, hold, block_size, sink_tokens)
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

"""Block-level helpers shared by the selection methods (vectorized over batch, heads and blocks)."""

from __future__ import annotations

import torch

from sparse_llm.kernels.block_mask import block_geometry
from sparse_llm.kernels.cpu import cpu_has_native_bf16

# Scorers split a prompt's query blocks into this many chunks, each scored against the keys it can
# see: the causal upper triangle then costs ~1/16 of the full score matrix instead of 1/2.
CAUSAL_CHUNKS = 8


def scoring_dtype(x: torch.Tensor) -> torch.dtype:
    """dtype of a selection's scoring matmuls (block estimates, not attention) for inputs like ``x``.

    ``x.dtype``, except float32 on a CPU with native bfloat16 arithmetic (AVX512-BF16 or AMX): there
    the scores are computed and reduced in bfloat16 (fp32 accumulation inside each dot product and
    sum). On this project's reference CPU (AMD EPYC, AVX512-BF16) a bf16 scoring GEMM takes ~0.3x
    the fp32 time and each pass over the scores half the memory traffic. Each logit keeps ~3
    significant digits (relative error 2^-8), far below the gaps that rank key blocks; the attention
    over the selected blocks stays exact in the input dtype. GPU inputs score in their own dtype.
    """
    if x.dtype == torch.float32 and x.device.type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return x.dtype


def logits_nt(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``x @ y^T`` for x ``[..., M, K]`` and y ``[..., N, K]`` (same leading shape), ``[..., M, N]``.

    On CPU one 2-D GEMM per leading index: for a row slice of y (the keys a chunk of queries can
    see) ``torch.matmul`` copies the transposed operand first in bfloat16, which took as long as the
    GEMM itself. Elsewhere one batched matmul.
    """
    if x.device.type != "cpu":
        return x @ y.transpose(-1, -2)
    lead, (m, kd), n = x.shape[:-2], x.shape[-2:], y.shape[-2]
    xs, ys = x.reshape(-1, m, kd), y.reshape(-1, n, kd)
    out = torch.empty(xs.shape[0], m, n, dtype=x.dtype, device=x.device)
    for i in range(xs.shape[0]):
        torch.mm(xs[i], ys[i].T, out=out[i])
    return out.view(*lead, m, n)


def real_keys(key_padding_mask: torch.Tensor | None, batch: int, kv_len: int, device) -> torch.Tensor:
    """bool ``[B, Tk]``, True = real key: ``key_padding_mask`` on ``device``, or all True without one."""
    if key_padding_mask is None:
        return torch.ones(batch, kv_len, dtype=torch.bool, device=device)
    return key_padding_mask.to(device)


def first_real_key(key_padding_mask: torch.Tensor | None) -> torch.Tensor | None:
    """Index of the first real (non-padding) key per batch row, ``[B]``; None without padding.

    With left padding a sequence's sink tokens start after its padding, not at position 0.
    """
    if key_padding_mask is None:
        return None
    return key_padding_mask.to(torch.int8).argmax(dim=1)


def block_means(x: torch.Tensor, block: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of ``x`` ``[B, H, T, D]`` over blocks of ``block`` tokens along T, ``[B, H, nT, D]`` fp32.

    ``valid`` ``[B, T]`` bool excludes padding tokens from the mean; a ragged last block is averaged
    over the tokens it holds.
    """
    b, h, t, d = x.shape
    n = -(-t // block)
    pad = n * block - t
    if valid is None:  # no weights: sum in fp32 straight from x (no fp32 copy of x, no product)
        xs = x if pad == 0 else torch.nn.functional.pad(x, (0, 0, 0, pad))
        sums = xs.view(b, h, n, block, d).sum(3, dtype=torch.float32)
        counts = torch.full((n, 1), float(block), device=x.device)
        counts[-1] = block - pad
        return sums / counts
    weight = valid[:, None, :, None].to(torch.float32)
    xs = torch.nn.functional.pad(x.float() * weight, (0, 0, 0, pad)).view(b, h, n, block, d).sum(3)
    counts = torch.nn.functional.pad(weight, (0, 0, 0, pad)).view(b, 1, n, block, 1).sum(3)
    return xs / counts.clamp_min(1.0)


def check_probes(probes: object, block_size: int) -> None:
    """Raise a ValueError unless ``probes`` (single queries per query block) is an int in [0, block_size]."""
    if not isinstance(probes, int) or isinstance(probes, bool) or not 0 <= probes <= block_size:
        raise ValueError(f"probes must be an int in [0, block_size={block_size}], got {probes!r}")


def probe_queries(
    q: torch.Tensor, block: int, probes: int, valid: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Representative queries of each query block: its mean query and ``probes`` single queries.

    q ``[B, H, Tq, D]``; ``valid`` ``[B, Tq]`` bool drops padding queries from the mean. The single
    queries are evenly spaced and end at the block's last query (the one that sees the most keys;
    for the prompt's last block, the query that predicts the first generated token). Returns
    (queries ``[B, H, nQ, 1 + probes, D]`` fp32, query index ``[nQ, 1 + probes]`` int64), where the
    mean query is indexed as the block's last query.
    """
    t = q.shape[2]
    n = -(-t // block)
    start = torch.arange(n, device=q.device)[:, None] * block
    last = torch.clamp(start + block - 1, max=t - 1)
    offsets = torch.arange(1, probes + 1, device=q.device) * block // probes - 1
    index = torch.cat([last, torch.minimum(start + offsets, last)], dim=1)  # [nQ, 1 + probes]
    singles = q[:, :, index[:, 1:].flatten()].float().unflatten(2, (n, probes))
    return torch.cat([block_means(q, block, valid)[:, :, :, None], singles], dim=3), index


def group_rows(x: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """x ``[B, Hq, T, D]`` as ``[B, Hkv, T * G, D]``: each KV group's rows as (position, query head)
    pairs, in HF's ``[B, T, Hq, D]`` memory order, so that for HF's queries it is a view, not a copy,
    when Hkv = 1 (a head-major reshape copies them). Row ``t * G + j`` is position t of the group's
    head j; a ``[B, T]`` row mask matches it after ``repeat_interleave(G, 1)``."""
    b, hq, t, d = x.shape
    g = hq // num_kv_heads
    rows = x.transpose(1, 2).unflatten(2, (num_kv_heads, g)).transpose(1, 2)  # [B, Hkv, T, G, D]
    return rows.reshape(b, num_kv_heads, t * g, d)


HEADS = ("query", "group")  # a selection per query head, or one per KV group (``group_scores``)


def check_heads(heads: str) -> None:
    if heads not in HEADS:
        raise ValueError(f"heads must be one of {HEADS}, got {heads!r}")


def group_scores(scores: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """Per-query-head block scores ``[B, Hq, nQ, nK]`` (log attention weights or shares, comparable
    across heads) as one row per KV group ``[B, Hkv, nQ, nK]``: the largest over the group's query
    heads, so a block that one head needs keeps that head's score (NSA shares its selection within a
    GQA group in the same way, by the group's summed importance). A group-shared mask lets the CPU
    kernel run the group's heads as one tile: ~0.85x the attention time at equal density at 8K on
    Gemma3-270M, for up to +1.8 % perplexity (docs/evaluations.md, "One block set per KV group")."""
    b, hq, n_q, n_k = scores.shape
    if hq == num_kv_heads:
        return scores
    return scores.view(b, num_kv_heads, hq // num_kv_heads, n_q, n_k).amax(2)


def prefer_late_ties(scores: torch.Tensor) -> torch.Tensor:
    """Block scores ``[..., nK]`` re-expressed as their rank (higher = better) with equal scores
    ordered towards the later block, so exact ties never fall back to the lowest block index.

    The order of distinct scores is kept; -inf stays -inf (never selected)."""
    n_k = scores.shape[-1]
    flipped = scores.float().flip(-1)  # a stable descending sort then puts later blocks first on ties
    order = torch.sort(flipped, dim=-1, descending=True, stable=True).indices
    places = torch.arange(n_k, device=scores.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(-1, order, places)
    return (n_k - rank).flip(-1).float().masked_fill(scores == float("-inf"), float("-inf"))


def key_blocks_with_real_keys(
    key_padding_mask: torch.Tensor | None, kv_len: int, block: int
) -> torch.Tensor | None:
    """bool ``[B, nK]``: key blocks holding at least one real (non-padding) key; None without padding."""
    if key_padding_mask is None:
        return None
    n_k = -(-kv_len // block)
    padded = torch.nn.functional.pad(key_padding_mask, (0, n_k * block - kv_len))
    return padded.view(-1, n_k, block).any(-1)


def reachable_blocks(q_len: int, kv_len: int, block: int, sliding_window: int | None, device) -> torch.Tensor:
    """bool ``[nQ, nK]``: key blocks holding a key that some query of the query block may attend
    (causal, bottom-right aligned, within ``sliding_window``), square ``block``-token blocks."""
    return block_geometry(
        q_len=q_len, kv_len=kv_len, block_q=block, block_k=block, sliding_window=sliding_window, device=device
    )[0]

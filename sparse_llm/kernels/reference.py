"""Slow, obviously right block-sparse attention: materializes the masked Tq x Tk scores.

For tests and debugging only. With ``upcast=False`` it computes in the input dtype (PyTorch's own
error at that precision, the baseline of the tolerance rule); with ``upcast=True`` in fp32. Callers
wanting an fp64 ground truth pass fp64 inputs. GQA reshapes the queries into groups (fla's
``naive.py``) instead of repeating K/V.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sparse_llm.kernels.block_mask import BlockMask


def element_mask(
    block_mask: BlockMask,
    *,
    num_q_heads: int,
    num_kv_heads: int,
    causal: bool = True,
    sliding_window: int | None = None,
    key_padding_mask: Tensor | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """bool [B|1, Hkv, G, Tq, Tk]: True where query (b, hq = hkv * G + g, i) may attend key j."""
    q_len, kv_len, g = block_mask.q_len, block_mask.kv_len, num_q_heads // num_kv_heads
    dense = block_mask.to_dense().to(device)  # [B, H, nQ, nK]
    dense = dense.repeat_interleave(block_mask.block_q, 2)[:, :, :q_len]
    dense = dense.repeat_interleave(block_mask.block_k, 3)[..., :kv_len]
    h = dense.shape[1]
    if h == num_q_heads:
        dense = dense.unflatten(1, (num_kv_heads, g))
    else:  # H is 1 or Hkv: every query head of a group shares the row
        dense = dense.unsqueeze(2)
    pos_q = torch.arange(q_len, device=device)[:, None] + (kv_len - q_len)
    pos_k = torch.arange(kv_len, device=device)[None, :]
    allowed = torch.ones(q_len, kv_len, dtype=torch.bool, device=device)
    if causal:
        allowed &= pos_k <= pos_q
    if sliding_window is not None:
        allowed &= pos_k > pos_q - sliding_window
    mask = dense & allowed
    if block_mask.window_start is not None:  # the key rule (BlockMask docstring), per batch row
        ws, sink = block_mask.window_start.to(device), block_mask.sink_end.to(device)
        rule = (pos_k[None] >= ws[:, :, None]) | (pos_k[None] < sink[:, None, None])  # [B', Tq, Tk]
        mask = mask & rule[:, None, None]
    if key_padding_mask is not None:
        mask = mask & key_padding_mask.to(device)[:, None, None, None, :]
    return mask


def reference_attention(
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
    return_lse: bool = False,
    upcast: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Same contract as :func:`sparse_llm.kernels.block_sparse_attention`, computed densely.

    q [B, Hq, Tq, D], k/v [B, Hkv, Tk, D]; returns out [B, Hq, Tq, D] in the compute dtype (input
    dtype, or fp32 with ``upcast``) and, with ``return_lse``, lse [B, Hq, Tq] fp32 (fp64 for fp64 inputs;
    -inf on empty rows). ``key_bias`` [B|1, Hkv, Tk] is added after scale and softcap, in the compute
    dtype; -inf keys count as masked.
    """
    if upcast:
        q, k, v = q.float(), k.float(), v.float()
    b, hq, q_len, d = q.shape
    hkv = k.shape[1]
    mask = element_mask(
        block_mask,
        num_q_heads=hq,
        num_kv_heads=hkv,
        causal=causal,
        sliding_window=sliding_window,
        key_padding_mask=key_padding_mask,
        device=q.device,
    )
    qg = q.unflatten(1, (hkv, hq // hkv))  # [B, Hkv, G, Tq, D]
    scores = torch.einsum("bhgqd,bhkd->bhgqk", qg, k) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    if key_bias is not None:
        scores = scores + key_bias.to(scores.dtype)[:, :, None, None, :]
    scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # rows with no key: 0, not NaN
    out = torch.einsum("bhgqk,bhkd->bhgqd", probs, v).flatten(1, 2)
    if return_lse:
        return out, lse.flatten(1, 2).to(torch.promote_types(lse.dtype, torch.float32))
    return out

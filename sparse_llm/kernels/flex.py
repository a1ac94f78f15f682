"""``impl="flex"``: PyTorch FlexAttention (``torch.nn.attention.flex_attention``) on our BlockMask.

The two masks share a layout (per query-block row a count ``kv_num_blocks [B, H, nQ]`` and indices
``kv_indices [B, H, nQ, maxK]``, plus the full-block pair), so the conversion pads the index rows to
``nK`` entries (flex reads them that wide; entries past the count are ignored). Element masking is
the ``mask_mod``: bottom-right causal, the sliding window, the mask's key rule, key padding, and
block membership itself. Flex's compiled kernel skips unselected blocks and applies ``mask_mod`` to
partial ones only; its eager path ignores the block lists and applies ``mask_mod`` everywhere, so
membership inside ``mask_mod`` keeps both exact. Softcap and ``key_bias`` are the ``score_mod``.

On CUDA the call is compiled (``torch.compile``; eager flex would materialize Tq x Tk scores); on
other devices it runs eagerly (CPU compiled flex cannot return the LSE), which only tests use.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from sparse_llm.kernels.block_mask import BlockMask

if TYPE_CHECKING:
    from torch.nn.attention.flex_attention import BlockMask as FlexBlockMask

# Every distinct shape or mask setting compiles once (dynamic=False); a sweep over lengths and head
# dims passes dynamo's default of 8, after which flex would fall back to its dense eager path.
_RECOMPILE_LIMIT = 64


def _pick(t: Tensor, b: Tensor) -> Tensor:
    """Row b of a [B' ...] tensor whose batch B' is 1 (shared) or B."""
    return t[0] if t.shape[0] == 1 else t[b]


def to_flex_block_mask(
    mask: BlockMask,
    *,
    num_q_heads: int,
    causal: bool = True,
    sliding_window: int | None = None,
    key_padding_mask: Tensor | None = None,
) -> FlexBlockMask:
    """Our ``BlockMask`` as FlexAttention's, with the element mask of
    :func:`sparse_llm.kernels.block_sparse_attention` (same arguments) as its ``mask_mod``.

    Flex broadcasts mask heads only from 1, so a mask with H = Hkv < Hq is copied to Hq rows. Key
    padding applies inside full blocks too, so with padding every block becomes partial.
    """
    from torch.nn.attention.flex_attention import BlockMask as FlexBlockMask

    if key_padding_mask is not None:
        mask = mask.as_partial()
    n_k, offset, heads = mask.num_kv_blocks, mask.kv_len - mask.q_len, mask.kv_num_blocks.shape[1]
    group = num_q_heads // heads if heads not in (1, num_q_heads) else 1
    dense = mask.to_dense()  # [B, H, nQ, nK]
    rule = (mask.window_start, mask.sink_end) if mask.window_start is not None else None

    def mask_mod(b, h, q_idx, kv_idx):
        head = h // group if heads > 1 else 0
        ok = _pick(dense, b)[head, q_idx // mask.block_q, kv_idx // mask.block_k]
        pos = q_idx + offset  # bottom-right: queries are the last q_len of kv_len positions
        if causal:
            ok = ok & (kv_idx <= pos)
        if sliding_window is not None:
            ok = ok & (kv_idx > pos - sliding_window)
        if rule is not None:
            ok = ok & ((kv_idx >= _pick(rule[0], b)[q_idx]) | (kv_idx < _pick(rule[1], b)))
        if key_padding_mask is not None:
            ok = ok & key_padding_mask[b, kv_idx]
        return ok

    def rows(t: Tensor) -> Tensor:
        t = F.pad(t, (0, n_k - t.shape[-1])) if t.dim() == 4 else t
        return t.repeat_interleave(group, dim=1) if group > 1 else t

    return FlexBlockMask.from_kv_blocks(
        rows(mask.kv_num_blocks),
        rows(mask.kv_indices),
        rows(mask.full_kv_num_blocks),
        rows(mask.full_kv_indices),
        BLOCK_SIZE=(mask.block_q, mask.block_k),
        mask_mod=mask_mod,
        seq_lengths=(mask.q_len, mask.kv_len),
    )


def _score_mod(softcap: float | None, key_bias: Tensor | None, group: int):
    """Softcap (Gemma2 order: scale, cap, then bias) and key_bias [B or 1, Hkv, Tk], or None."""
    if softcap is None and key_bias is None:
        return None

    def score_mod(score, b, h, q_idx, kv_idx):
        if softcap is not None:
            score = softcap * torch.tanh(score / softcap)
        if key_bias is not None:
            score = score + _pick(key_bias, b)[h // group, kv_idx].to(score.dtype)
        return score

    return score_mod


@functools.cache
def _compiled():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _kernel_options(q: Tensor, mask: BlockMask) -> dict | None:
    """Flex's tiles must divide the mask blocks: below its Hopper default (the seed our own kernel
    tunes from), ask for tiles that do."""
    if not q.is_cuda or q.shape[2] <= 16:  # decode goes to flex's own decoding kernel
        return None
    from sparse_llm.kernels.triton_tuning import seed

    block_m, block_n, _, _ = seed(q.element_size(), q.shape[-1], mask.block_q, mask.block_k, q.shape[2])
    if mask.block_q >= block_m and mask.block_k >= block_n:
        return None
    return {"BLOCK_M": min(block_m, mask.block_q), "BLOCK_N": min(block_n, mask.block_k)}


def flex_block_sparse_attention(
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
    flex_mask: FlexBlockMask | None = None,
) -> tuple[Tensor, Tensor]:
    """Same contract as the Triton launcher: q [B, Hq, Tq, D], k/v [B, Hkv, Tk, D] (validated by the
    dispatcher). ``flex_mask``: ``block_mask`` already converted by :func:`to_flex_block_mask` with
    the same arguments (the kernel bench converts once, outside its timing). Returns (out [B, Hq,
    Tq, D] in q.dtype, lse [B, Hq, Tq] fp32, natural log; a row with no key gives out 0, lse -inf)."""
    from torch.nn.attention import flex_attention as flex

    hq, hkv = q.shape[1], k.shape[1]
    if flex_mask is None:
        flex_mask = to_flex_block_mask(
            block_mask,
            num_q_heads=hq,
            causal=causal,
            sliding_window=sliding_window,
            key_padding_mask=key_padding_mask,
        )
    compiled = q.is_cuda and not torch.compiler.is_compiling()
    kwargs = dict(
        score_mod=_score_mod(softcap, key_bias, hq // hkv),
        block_mask=flex_mask,
        scale=scale,
        enable_gqa=hq != hkv,
        kernel_options=_kernel_options(q, block_mask),
    )
    if "return_aux" in inspect.signature(flex.flex_attention).parameters:
        kwargs["return_aux"] = flex.AuxRequest(lse=True)
    else:  # torch < 2.9
        kwargs["return_lse"] = True
    if compiled:
        limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
        with torch._dynamo.config.patch(**{limit: _RECOMPILE_LIMIT}):
            out, aux = _compiled()(q, k, v, **kwargs)
    else:
        with warnings.catch_warnings():  # the eager path's "called without torch.compile()": intended here
            warnings.simplefilter("ignore", UserWarning)
            out, aux = flex.flex_attention(q, k, v, **kwargs)
    lse = aux if isinstance(aux, Tensor) else aux.lse
    empty = torch.isneginf(lse)
    return out.masked_fill(empty[..., None], 0.0), lse.float()

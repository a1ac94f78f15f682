"""Block-sparse attention kernels: one BlockMask, one dispatcher, one merge.

``block_sparse_attention`` runs the Triton kernel on CUDA and the gather path (``cpu.py``) elsewhere;
``reference_attention`` is the dense oracle for tests. Importing this package has no side effects and
does not import triton.
"""

from __future__ import annotations

import functools
import logging
import os
import warnings

import torch
from torch import Tensor

from sparse_llm.kernels.block_mask import BlockMask
from sparse_llm.kernels.cpu import release_workspace
from sparse_llm.kernels.merge import merge_attention, merge_attention_
from sparse_llm.kernels.reference import reference_attention
from sparse_llm.names import DTYPES

__all__ = [
    "BlockMask",
    "block_sparse_attention",
    "forward_only",
    "merge_attention",
    "merge_attention_",
    "reference_attention",
    "release_workspace",
]

logger = logging.getLogger(__name__)

IMPLS = ("auto", "triton", "cpu", "flex", "reference")
_TRITON_MAX_HEAD_DIM = 256
_warned: set[str] = set()


@functools.cache
def _triton_kernel():
    """The Triton launcher, or None when triton cannot be imported (imported on first use only)."""
    try:
        from sparse_llm.kernels.triton_attention import triton_block_sparse_attention
    except ImportError as err:
        logger.debug("triton unavailable (%s): CUDA inputs use the gather path", err)
        return None
    return triton_block_sparse_attention


def _warn_once(key: str, message: str, *args) -> None:
    if key not in _warned:
        _warned.add(key)
        logger.warning(message, *args)


def _validate(
    q, k, v, block_mask, scale, causal, softcap, sliding_window, key_padding_mask, impl, key_bias=None
) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in DTYPES.values():
            raise TypeError(f"{name} has dtype {t.dtype}; allowed: {', '.join(DTYPES)}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D ([B, H, T, D]), got shape {tuple(t.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    (b, hq, q_len, d), (bk, hkv, kv_len, dk) = q.shape, k.shape
    if k.shape != v.shape:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    if bk != b or dk != d:
        raise ValueError(f"q [B={b}, D={d}] and k/v [B={bk}, D={dk}] must agree on batch and head dim")
    if hkv < 1 or hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({hkv})")
    if q_len < 1 or q_len > kv_len:
        raise ValueError(f"need 1 <= Tq <= Tk (queries are the last Tq keys), got Tq={q_len}, Tk={kv_len}")
    if not isinstance(block_mask, BlockMask):
        raise TypeError(f"block_mask must be a BlockMask, got {type(block_mask).__name__}")
    if (block_mask.q_len, block_mask.kv_len) != (q_len, kv_len):
        raise ValueError(
            f"block_mask was built for q_len={block_mask.q_len}, kv_len={block_mask.kv_len}, "
            f"but q/k have Tq={q_len}, Tk={kv_len}"
        )
    mb, mh = block_mask.kv_num_blocks.shape[:2]
    if mb not in (1, b):
        raise ValueError(f"block_mask batch ({mb}) must be 1 or B ({b})")
    if mh not in (1, hkv, hq):
        raise ValueError(f"block_mask heads ({mh}) must be 1, Hkv ({hkv}) or Hq ({hq})")
    if block_mask.device != q.device:
        raise ValueError(f"block_mask is on {block_mask.device} but q is on {q.device}")
    if block_mask.window_start is not None and not causal:
        raise ValueError("a block_mask with a key rule (window_start, sink_end) needs causal=True")
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, Tensor) or key_padding_mask.dtype != torch.bool:
            raise TypeError("key_padding_mask must be a bool tensor [B, Tk] (True = real token)")
        if tuple(key_padding_mask.shape) != (b, kv_len):
            raise ValueError(
                f"key_padding_mask has shape {tuple(key_padding_mask.shape)}, expected ({b}, {kv_len})"
            )
        if key_padding_mask.device != q.device:
            raise ValueError(f"key_padding_mask is on {key_padding_mask.device} but q is on {q.device}")
    _validate_key_bias(key_bias, q, k)
    if scale is not None and (not isinstance(scale, (int, float)) or isinstance(scale, bool) or scale <= 0):
        raise ValueError(f"scale must be a positive number, got {scale!r}")
    if softcap is not None and (
        not isinstance(softcap, (int, float)) or isinstance(softcap, bool) or softcap <= 0
    ):
        raise ValueError(f"softcap must be None or a positive number, got {softcap!r}")
    if sliding_window is not None:
        if not isinstance(sliding_window, int) or isinstance(sliding_window, bool) or sliding_window < 1:
            raise ValueError(f"sliding_window must be None or an int >= 1, got {sliding_window!r}")
        if not causal:
            raise ValueError("sliding_window requires causal=True")
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")


def _validate_key_bias(key_bias, q: Tensor, k: Tensor) -> None:
    if key_bias is None:
        return
    if not isinstance(key_bias, Tensor) or key_bias.dtype not in (torch.float32, q.dtype):
        raise TypeError(f"key_bias must be a float32 or {q.dtype} tensor [B, Hkv, Tk], got {key_bias!r:.80}")
    (b, hkv, kv_len, _) = k.shape
    if key_bias.dim() != 3 or key_bias.shape[0] not in (1, b) or tuple(key_bias.shape[1:]) != (hkv, kv_len):
        raise ValueError(
            f"key_bias has shape {tuple(key_bias.shape)}, expected ({b} or 1, {hkv}, {kv_len}) = [B, Hkv, Tk]"
        )
    if key_bias.device != q.device:
        raise ValueError(f"key_bias is on {key_bias.device} but q is on {q.device}")
    if bool((torch.isnan(key_bias) | (key_bias == float("inf"))).any()):
        raise ValueError("key_bias must not hold NaN or +inf (-inf masks a key)")


class _ForwardOnly(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fn, *tensors):
        with torch.no_grad():
            return fn(*tensors)

    @staticmethod
    def backward(ctx, *grads):
        raise NotImplementedError(
            "sparse-llm attention has no backward pass (it is inference-only); run the model under "
            "torch.no_grad() or torch.inference_mode(), or use block_sparse_attention(..., "
            "impl='reference') where gradients are needed"
        )


def forward_only(fn, *tensors: Tensor):
    """``fn(*tensors)`` computed as under ``torch.no_grad()``, even for inputs that require grad
    (model parameters do in a plain script): the same outputs, and NotImplementedError if a backward
    pass reaches them."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return _ForwardOnly.apply(fn, *tensors)
    return fn(*tensors)


def _resolve_impl(impl: str, q: Tensor) -> str:
    """The implementation that runs: "auto" picks Triton on CUDA, else the gather path ("cpu")."""
    if impl == "auto":
        impl = "triton" if q.is_cuda and q.shape[-1] <= _TRITON_MAX_HEAD_DIM and _triton_kernel() else "cpu"
        logger.debug("block_sparse_attention: %s path for %s tensors", impl, q.device.type)
    if impl == "triton":
        # CUDA tensors, or any tensors under triton's own interpreter switch (tests).
        if not (q.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
            raise ValueError("impl='triton' needs CUDA tensors (or TRITON_INTERPRET=1); use 'cpu' or 'auto'")
        if _triton_kernel() is None:
            raise ValueError("impl='triton' needs the `triton` package: pip install triton")
        if q.shape[-1] > _TRITON_MAX_HEAD_DIM:
            _warn_once(
                "head_dim", "head dim %d > %d: using the gather path", q.shape[-1], _TRITON_MAX_HEAD_DIM
            )
            return "cpu"
    return impl


def _run(
    impl: str, q: Tensor, k: Tensor, v: Tensor, block_mask: BlockMask, kwargs: dict
) -> tuple[Tensor, Tensor]:
    """(out in q's dtype, lse) from one resolved implementation: the kernels run forward-only, the
    dense reference upcast to fp32."""
    if impl == "reference":
        out, lse = reference_attention(q, k, v, block_mask, return_lse=True, upcast=True, **kwargs)
        return out.to(q.dtype), lse
    if impl == "triton":
        kernel = _triton_kernel()
    elif impl == "flex":
        from sparse_llm.kernels.flex import flex_block_sparse_attention as kernel
    else:
        from sparse_llm.kernels.cpu import gather_attention as kernel
    return forward_only(lambda q, k, v: kernel(q, k, v, block_mask, **kwargs), q, k, v)


def block_sparse_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    block_mask: BlockMask,
    *,
    scale: float | None = None,
    causal: bool = True,
    softcap: float | None = None,
    sliding_window: int | None = None,
    key_padding_mask: Tensor | None = None,
    key_bias: Tensor | None = None,
    return_lse: bool = False,
    impl: str = "auto",
    backend: str | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Exact attention restricted to the blocks ``block_mask`` selects.

    Args:
        q: [B, Hq, Tq, D]; k, v: [B, Hkv, Tk, D] (HF's attention-function layout); one dtype among
            float16, bfloat16, float32; one device. Any strides.
        block_mask: a :class:`BlockMask` with q_len = Tq, kv_len = Tk, batch 1 or B, heads 1, Hkv or Hq.
        scale: multiplies q.k; default D**-0.5.
        causal: key j allowed for query i iff j <= i + Tk - Tq (bottom-right alignment: the queries are
            the last Tq of the Tk positions; e.g. Tq=1 sees every key).
        softcap: if set, scores become ``softcap * tanh(scale * q.k / softcap)`` before masking (Gemma2).
        sliding_window: w; query at position p sees keys in [p - w + 1, p] (HF semantics; needs causal).
        key_padding_mask: bool [B, Tk], True = real token; False keys are never attended (left padding).
        key_bias: float [B or 1, Hkv, Tk] (fp32 or the input dtype): added to the logits of key j for
            every query head reading KV head h, after scale and softcap and before masking and the
            softmax; it enters the LSE. -inf masks a key. A run of n keys collapsed to one carries
            log n (deltallm, lightning's compressed far field).
        return_lse: also return the log-sum-exp.
        impl: the implementation: "auto" (Triton on CUDA when triton imports, else the gather path),
            "triton", "cpu" (the gather path, any device), "flex" (PyTorch FlexAttention on the same
            blocks: compiled on CUDA, eager elsewhere, which only tests use), "reference" (dense; tests).
        backend: deprecated name of ``impl`` (a DeprecationWarning); "backend" now means a method.

    GQA: query head hq reads KV head ``hq // (Hq // Hkv)``; a mask with H = Hkv is shared by that group.
    Element masking applies to partial blocks; full blocks are taken whole. A mask's key rule
    (``BlockMask.window_start``/``sink_end``: sinks plus a per-query window start; needs causal) is
    part of that element mask. If the mask was classified for another geometry
    (``is_causal``/``sliding_window``), every block is treated as partial.
    Inputs may require grad (the forward runs as under ``torch.no_grad()``); calling backward through
    the "triton", "cpu" or "flex" kernel raises NotImplementedError.

    Returns:
        out [B, Hq, Tq, D] in q's dtype, and with ``return_lse`` lse [B, Hq, Tq] float32: the natural
        log of the row's softmax normalizer over the scaled (capped) scores of its allowed keys. A row
        with no allowed key gives out = 0 and lse = -inf, never NaN.
    """
    if backend is not None:
        warnings.warn("block_sparse_attention: backend= is now impl=", DeprecationWarning, stacklevel=2)
        impl = backend
    _validate(q, k, v, block_mask, scale, causal, softcap, sliding_window, key_padding_mask, impl, key_bias)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if (block_mask.is_causal, block_mask.sliding_window) != (causal, sliding_window):
        logger.debug("block_mask geometry differs from the call's: treating every block as partial")
        block_mask = block_mask.as_partial()
    kwargs = dict(
        scale=float(scale),
        causal=causal,
        softcap=softcap,
        sliding_window=sliding_window,
        key_padding_mask=key_padding_mask,
    )
    if key_bias is not None:
        kwargs["key_bias"] = key_bias
    out, lse = _run(_resolve_impl(impl, q), q, k, v, block_mask, kwargs)
    return (out, lse) if return_lse else out

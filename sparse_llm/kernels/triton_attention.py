"""Triton block-sparse attention forward (CUDA; also runs under ``TRITON_INTERPRET=1`` on CPU tensors).

Layout follows fla: ``@triton.jit`` kernel -> launcher (strides, tiles, grid) -> public function.
One program per (query tile, b * Hq + hq). It walks its BlockMask row: the full blocks without an
element mask, then the partial ones with the causal/window mask (and the mask's key rule), with the
flash-attention online softmax in fp32 (base-2 exponent, converted to a natural-log LSE at the end).

Tile limits are handled here, never put on callers: the head dim is padded to a power of two >= 16
with masked loads; query/key tiles are mask blocks split into (or padded up to) 16..64-wide tiles.
Every load and store is masked (the interpreter does not check out-of-bounds stores). Offsets inside
one (b, h) slice are int32: Tk * stride_t must stay below 2**31.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from sparse_llm.kernels.block_mask import BlockMask

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _configs() -> list[triton.Config]:
    if _INTERPRET:  # the interpreter cannot time configs: exactly one
        return [triton.Config({}, num_warps=4, num_stages=1)]
    return [triton.Config({}, num_warps=w, num_stages=s) for w in (4, 8) for s in (2, 3)]


@triton.jit
def _tanh(x):
    # libdevice is unavailable under the interpreter; a short series avoids 1 - e^{-2|x|} cancellation.
    ax = tl.abs(x)
    e = tl.exp(-2.0 * ax)
    x2 = x * x
    small = ax * (1.0 + x2 * (-0.3333333333333333 + x2 * (0.13333333333333333 - x2 * 0.05396825396825397)))
    t = tl.where(ax < 0.125, small, (1.0 - e) / (1.0 + e))
    return tl.where(x < 0, -t, t)


@triton.jit
def _tile(
    acc,
    m_i,
    l_i,
    q,
    k_ptr,
    v_ptr,
    kpm_ptr,
    key0,
    pos_q,
    offs_d,
    d_ok,
    stride_kt,
    stride_kd,
    stride_vt,
    stride_vd,
    kv_len,
    scale,
    softcap,
    window,
    ws,
    sink,
    BLOCK_N: tl.constexpr,
    COLS: tl.constexpr,
    PARTIAL: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_PAD: tl.constexpr,
    HAS_RULE: tl.constexpr,
    UPCAST: tl.constexpr,
):
    cols = tl.arange(0, BLOCK_N)
    offs_n = key0 + cols
    col_ok = (cols < COLS) & (offs_n < kv_len)
    k = tl.load(
        k_ptr + offs_n[None, :] * stride_kt + offs_d[:, None] * stride_kd,
        mask=col_ok[None, :] & d_ok[:, None],
        other=0.0,
    )
    if UPCAST:
        qk = tl.dot(q, k.to(tl.float32), input_precision="ieee")
    else:
        qk = tl.dot(q, k)
    if HAS_SOFTCAP:  # Gemma2 eager order: scale, cap, then mask
        s = softcap * _tanh(qk * scale / softcap) * 1.4426950408889634
    else:
        s = qk * (scale * 1.4426950408889634)
    allowed = col_ok[None, :]
    if HAS_PAD:
        allowed = allowed & (tl.load(kpm_ptr + offs_n, mask=col_ok, other=0) != 0)[None, :]
    if PARTIAL and CAUSAL:
        dist = pos_q[:, None] - offs_n[None, :]
        allowed = allowed & (dist >= 0)
        if HAS_WINDOW:
            allowed = allowed & (dist < window)
        if HAS_RULE:  # key rule: j >= the row's window start, or a sink
            allowed = allowed & ((offs_n[None, :] >= ws[:, None]) | (offs_n[None, :] < sink))
    s = tl.where(allowed, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # empty so far: exp2(-inf - 0) = 0, not NaN
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(
        v_ptr + offs_n[:, None] * stride_vt + offs_d[None, :] * stride_vd,
        mask=col_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    if UPCAST:
        pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
    else:
        pv = tl.dot(p.to(v.dtype), v)
    return acc * alpha[:, None] + pv, m_new, l_i


@triton.autotune(configs=_configs(), key=["BLOCK_M", "BLOCK_N", "BLOCK_D", "UPCAST", "HAS_SOFTCAP"])
@triton.jit
def _block_sparse_fwd(
    Q,
    K,
    V,
    Out,
    Lse,
    KPM,
    WS,
    SinkEnd,
    FullNum,
    FullIdx,
    PartNum,
    PartIdx,
    sqb,
    sqh,
    sqt,
    sqd,
    skb,
    skh,
    skt,
    skd,
    svb,
    svh,
    svt,
    svd,
    sob,
    soh,
    sot,
    sod,
    s_pad_b,
    s_rule_b,
    s_num_b,
    s_num_h,
    s_num_q,
    s_fi_b,
    s_fi_h,
    s_fi_q,
    s_pi_b,
    s_pi_h,
    s_pi_q,
    num_q_heads,
    group,
    mask_head_div,
    q_len,
    kv_len,
    head_dim,
    scale,
    softcap,
    window,
    BLOCK_Q: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SUB_Q: tl.constexpr,
    SUB_K: tl.constexpr,
    ROWS: tl.constexpr,
    COLS: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_PAD: tl.constexpr,
    HAS_RULE: tl.constexpr,
    UPCAST: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // num_q_heads
    hq = pid_bh % num_q_heads
    hkv = hq // group
    hm = hq // mask_head_div  # mask row head: hq (H = Hq), hq // G (H = Hkv) or 0 (H = 1)
    n = pid_m // SUB_Q
    rows = tl.arange(0, BLOCK_M)
    offs_m = n * BLOCK_Q + (pid_m % SUB_Q) * BLOCK_M + rows
    row_ok = (rows < ROWS) & (offs_m < q_len)
    pos_q = offs_m + (kv_len - q_len)  # bottom-right alignment
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim

    b64 = b.to(tl.int64)
    q_ptr = Q + b64 * sqb + hq.to(tl.int64) * sqh
    q = tl.load(
        q_ptr + offs_m[:, None] * sqt + offs_d[None, :] * sqd, mask=row_ok[:, None] & d_ok[None, :], other=0.0
    )
    if UPCAST:
        q = q.to(tl.float32)
    k_ptr = K + b64 * skb + hkv.to(tl.int64) * skh
    v_ptr = V + b64 * svb + hkv.to(tl.int64) * svh
    kpm_ptr = KPM + b64 * s_pad_b
    ws = tl.zeros([BLOCK_M], dtype=tl.int32)
    sink = 0
    if HAS_RULE:
        ws = tl.load(WS + b * s_rule_b * q_len + offs_m, mask=row_ok, other=0)
        sink = tl.load(SinkEnd + b * s_rule_b)

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)

    n_full = tl.load(FullNum + b * s_num_b + hm * s_num_h + n * s_num_q)
    full_row = FullIdx + b * s_fi_b + hm * s_fi_h + n * s_fi_q
    for i in range(0, n_full):
        blk = tl.load(full_row + i)
        for j in range(SUB_K):
            acc, m_i, l_i = _tile(
                acc,
                m_i,
                l_i,
                q,
                k_ptr,
                v_ptr,
                kpm_ptr,
                blk * BLOCK_K + j * BLOCK_N,
                pos_q,
                offs_d,
                d_ok,
                skt,
                skd,
                svt,
                svd,
                kv_len,
                scale,
                softcap,
                window,
                ws,
                sink,
                BLOCK_N,
                COLS,
                False,
                CAUSAL,
                HAS_WINDOW,
                HAS_SOFTCAP,
                HAS_PAD,
                HAS_RULE,
                UPCAST,
            )
    n_part = tl.load(PartNum + b * s_num_b + hm * s_num_h + n * s_num_q)
    part_row = PartIdx + b * s_pi_b + hm * s_pi_h + n * s_pi_q
    for i in range(0, n_part):
        blk = tl.load(part_row + i)
        for j in range(SUB_K):
            acc, m_i, l_i = _tile(
                acc,
                m_i,
                l_i,
                q,
                k_ptr,
                v_ptr,
                kpm_ptr,
                blk * BLOCK_K + j * BLOCK_N,
                pos_q,
                offs_d,
                d_ok,
                skt,
                skd,
                svt,
                svd,
                kv_len,
                scale,
                softcap,
                window,
                ws,
                sink,
                BLOCK_N,
                COLS,
                True,
                CAUSAL,
                HAS_WINDOW,
                HAS_SOFTCAP,
                HAS_PAD,
                HAS_RULE,
                UPCAST,
            )

    has_key = l_i > 0.0
    out = acc / tl.where(has_key, l_i, 1.0)[:, None]  # empty row: acc = 0 -> out = 0
    lse = tl.where(has_key, (m_i + tl.log2(tl.where(has_key, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    o_ptr = Out + b64 * sob + hq.to(tl.int64) * soh
    tl.store(
        o_ptr + offs_m[:, None] * sot + offs_d[None, :] * sod,
        out.to(Out.dtype.element_ty),
        mask=row_ok[:, None] & d_ok[None, :],
    )
    tl.store(Lse + pid_bh.to(tl.int64) * q_len + offs_m, lse, mask=row_ok)


def _tile_sizes(block: int, cap: int) -> tuple[int, int, int]:
    """(tile, sub-tiles per mask block, valid rows/cols per tile) for a power-of-two mask block."""
    tile = min(max(block, 16), cap)
    return tile, max(block // tile, 1), min(block, tile)


def _constants(q: Tensor, block_mask: BlockMask, causal, softcap, sliding_window, key_padding_mask) -> dict:
    """The kernel's compile-time arguments: tile sizes (from the mask's blocks and D) and switches."""
    block_d = max(16, triton.next_power_of_2(q.shape[-1]))
    upcast = _INTERPRET or q.dtype == torch.float32
    wide = block_d >= 256  # smaller tiles keep D=256 (fp32 above all) inside registers and SRAM
    block_m, sub_q, rows = _tile_sizes(block_mask.block_q, 32 if wide and upcast else 64)
    block_n, sub_k, cols = _tile_sizes(block_mask.block_k, 32 if wide else 64)
    return dict(
        BLOCK_Q=block_mask.block_q,
        BLOCK_K=block_mask.block_k,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        SUB_Q=sub_q,
        SUB_K=sub_k,
        ROWS=rows,
        COLS=cols,
        CAUSAL=causal,
        HAS_WINDOW=sliding_window is not None,
        HAS_SOFTCAP=softcap is not None,
        HAS_PAD=key_padding_mask is not None,
        HAS_RULE=block_mask.window_start is not None,
        UPCAST=upcast,
    )


def triton_block_sparse_attention(
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
) -> tuple[Tensor, Tensor]:
    """Inputs validated by the dispatcher: q [B, Hq, Tq, D], k/v [B, Hkv, Tk, D], mask batch 1 or B,
    heads 1, Hkv or Hq. Returns (out [B, Hq, Tq, D] in q.dtype, lse [B, Hq, Tq] fp32)."""
    b, hq, q_len, d = q.shape
    hkv, kv_len = k.shape[1], k.shape[2]
    mb, mh = block_mask.kv_num_blocks.shape[:2]
    constants = _constants(q, block_mask, causal, softcap, sliding_window, key_padding_mask)

    # The interpreter's fp32 -> bf16/fp16 cast truncates (its round-to-nearest mishandles mantissa
    # carries): under it the kernel stores fp32 and torch rounds. On GPU the store rounds to nearest.
    out = torch.empty(b, hq, q_len, d, dtype=torch.float32 if _INTERPRET else q.dtype, device=q.device)
    lse = torch.empty(b, hq, q_len, dtype=torch.float32, device=q.device)
    num_f, num_p = block_mask.full_kv_num_blocks.contiguous(), block_mask.kv_num_blocks.contiguous()
    idx_f, idx_p = block_mask.full_kv_indices.contiguous(), block_mask.kv_indices.contiguous()
    kpm = num_f if key_padding_mask is None else key_padding_mask.to(torch.uint8).contiguous()
    rule = block_mask.window_start is not None
    ws = block_mask.window_start.contiguous() if rule else num_f  # [B', Tq] int32 (unread without a rule)
    sink_end = block_mask.sink_end.contiguous() if rule else num_f
    rule_batch_stride = 1 if rule and ws.shape[0] > 1 else 0  # in units of rows: b * stride * Tq

    def batch_stride(t: Tensor) -> int:  # a batch-1 mask is shared by every batch row
        return 0 if mb == 1 else t.stride(0)

    grid = (block_mask.num_q_blocks * constants["SUB_Q"], b * hq)
    _block_sparse_fwd[grid](
        q,
        k,
        v,
        out,
        lse,
        kpm,
        ws,
        sink_end,
        num_f,
        idx_f,
        num_p,
        idx_p,
        *q.stride(),
        *k.stride(),
        *v.stride(),
        *out.stride(),
        0 if key_padding_mask is None else kpm.stride(0),
        rule_batch_stride,
        batch_stride(num_f),
        num_f.stride(1),
        num_f.stride(2),
        batch_stride(idx_f),
        idx_f.stride(1),
        idx_f.stride(2),
        batch_stride(idx_p),
        idx_p.stride(1),
        idx_p.stride(2),
        hq,
        hq // hkv,
        hq // mh,
        q_len,
        kv_len,
        d,
        float(scale),
        float(softcap or 1.0),
        int(sliding_window or 0),
        **constants,
    )
    return out.to(q.dtype), lse

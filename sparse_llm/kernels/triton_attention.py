"""Triton block-sparse attention forward (CUDA; also runs under ``TRITON_INTERPRET=1`` on CPU tensors).

Layout follows fla: ``@triton.jit`` kernel -> launcher (strides, tiles, grid) -> public function.
One program per (query tile, b * Hq + hq[, key split]). It walks its BlockMask row as FlexAttention
does: one flat loop over the ``n_blocks * SUB_K`` key tiles of the full blocks (no element mask),
then one over the partial blocks (causal/window mask and the mask's key rule), each tile's key
offset read from the index list, so Triton's software pipeliner sees a single loop. The inner loop
is FA2's: online softmax in fp32 with the scale folded into the base-2 exponent, ``acc = tl.dot(p,
v, acc)``, and compile-time flags that drop bounds masks on tiles that need none.

Tile sizes are autotuned (``triton_tuning.py``); tile limits are handled here, never put on callers:
the head dim is padded to a power of two >= 16 with masked loads; query/key tiles are mask blocks
split into (or padded up to) 16..128-wide tiles. Every load and store is masked unless a flag proves
it in bounds. Offsets are 64-bit where they can pass 2**31 (token bases); in-tile offsets are int32.
Decode (Tq <= one tile) splits each row's key tiles across programs (flash-decoding) and merges the
partial results by log-sum-exp.

The kernel's steps (loading a K/V tile, scoring, the partial-block mask, the online-softmax update)
are ``@triton.jit`` helpers, which the compiler inlines. The signatures with dozens of scalar
arguments are grouped by role under ``# fmt: skip`` instead of one argument a line.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl
from torch import Tensor

from sparse_llm.kernels.block_mask import BlockMask
from sparse_llm.kernels.triton_tuning import INTERPRET, MIN_TILE, autotune

LOG2E = 1.4426950408889634
# Decode split-KV: enough programs to fill a GPU several times over, each walking >= 1024 keys.
_TARGET_PROGRAMS = 512
_MIN_SPLIT_KEYS = 1024
_MAX_SPLITS = 64


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
def _load_kv_tile(k_ptr, v_ptr, key0, cols, col_ok, offs_d, d_ok, skt, skd, svt, svd, EVEN: tl.constexpr):
    """K^T [BLOCK_D, BLOCK_N] and V [BLOCK_N, BLOCK_D] of the key tile starting at ``key0``; bounds
    masks unless ``EVEN`` proves the tile inside Tk and the head dim."""
    k_tile = k_ptr + key0.to(tl.int64) * skt
    v_tile = v_ptr + key0.to(tl.int64) * svt
    if EVEN:
        k = tl.load(k_tile + cols[None, :] * skt + offs_d[:, None] * skd)
        v = tl.load(v_tile + cols[:, None] * svt + offs_d[None, :] * svd)
    else:
        k = tl.load(
            k_tile + cols[None, :] * skt + offs_d[:, None] * skd,
            mask=col_ok[None, :] & d_ok[:, None],
            other=0.0,
        )
        v = tl.load(
            v_tile + cols[:, None] * svt + offs_d[None, :] * svd,
            mask=col_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
    return k, v


@triton.jit
def _scores(
    q,
    k,
    kb_ptr,
    offs_n,
    col_ok,
    s_kb_t,
    qk_scale,
    cap_in,
    cap_out,
    UPCAST: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    """Base-2 logits [BLOCK_M, BLOCK_N] of one tile before masking, in Gemma2's eager order: scale,
    softcap, then the key bias."""
    if UPCAST:
        qk = tl.dot(q, k.to(tl.float32), input_precision="ieee")
    else:
        qk = tl.dot(q, k)
    if HAS_SOFTCAP:
        s = cap_out * _tanh(qk * cap_in)
    else:
        s = qk * qk_scale
    if HAS_BIAS:  # -inf bias masks the key
        s += (
            tl.load(kb_ptr + offs_n.to(tl.int64) * s_kb_t, mask=col_ok, other=0.0).to(tl.float32)
            * 1.4426950408889634
        )
    return s


@triton.jit
def _partial_allowed(
    allowed, pos_q, offs_n, ws, sink, window, HAS_WINDOW: tl.constexpr, HAS_RULE: tl.constexpr
):
    """``allowed`` [BLOCK_M, BLOCK_N] narrowed to a partial block's element mask: causal (bottom-right
    positions ``pos_q``), the sliding window, and the mask's key rule."""
    dist = pos_q[:, None] - offs_n[None, :]
    allowed = allowed & (dist >= 0)
    if HAS_WINDOW:
        allowed = allowed & (dist < window)
    if HAS_RULE:  # key rule: j >= the row's window start, or a sink
        allowed = allowed & ((offs_n[None, :] >= ws[:, None]) | (offs_n[None, :] < sink))
    return allowed


@triton.jit
def _online_softmax(acc, m_i, l_i, s, v, UPCAST: tl.constexpr):
    """FA2's update of the accumulator, the running max ``m_i`` and normalizer ``l_i`` (base 2, fp32)
    by one tile of logits ``s`` and values ``v``."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # empty so far: exp2(-inf - 0) = 0, not NaN
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if UPCAST:
        acc = tl.dot(p, v.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, m_new, l_i


@triton.jit
def _attend_tiles(
    acc, m_i, l_i, q, row_ptr, lo, hi,
    k_ptr, v_ptr, kb_ptr, kpm_ptr, pos_q, ws, sink, offs_d, d_ok,
    skt, skd, svt, svd, s_kb_t, kv_len, qk_scale, cap_in, cap_out, window,
    BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, SUB_K: tl.constexpr, COLS: tl.constexpr,
    PARTIAL: tl.constexpr, EVEN_K: tl.constexpr, EVEN_D: tl.constexpr, CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_PAD: tl.constexpr, HAS_RULE: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """Key tiles lo..hi of one index row (tile t = sub-tile t % SUB_K of block row[t // SUB_K])."""
    cols = tl.arange(0, BLOCK_N)
    for t in range(lo, hi):
        key0 = tl.load(row_ptr + t // SUB_K) * BLOCK_K + (t % SUB_K) * BLOCK_N
        offs_n = key0 + cols
        col_ok = (cols < COLS) & (offs_n < kv_len)
        k, v = _load_kv_tile(
            k_ptr, v_ptr, key0, cols, col_ok, offs_d, d_ok, skt, skd, svt, svd, EVEN_K and EVEN_D
        )
        s = _scores(
            q, k, kb_ptr, offs_n, col_ok, s_kb_t, qk_scale, cap_in, cap_out, UPCAST, HAS_SOFTCAP, HAS_BIAS
        )
        if (PARTIAL or HAS_PAD) or not EVEN_K:  # in-bounds full blocks of real keys take no mask
            allowed = col_ok[None, :]
            if HAS_PAD:
                allowed = allowed & (tl.load(kpm_ptr + offs_n, mask=col_ok, other=0) != 0)[None, :]
            if PARTIAL and CAUSAL:
                allowed = _partial_allowed(allowed, pos_q, offs_n, ws, sink, window, HAS_WINDOW, HAS_RULE)
            s = tl.where(allowed, s, float("-inf"))
        acc, m_i, l_i = _online_softmax(acc, m_i, l_i, s, v, UPCAST)
    return acc, m_i, l_i


@triton.jit
def _program_tile(
    num_bh, SUB_Q: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr
):
    """(b * Hq + hq, query block n, first query row q0) of this program. Heads vary fastest, so one
    query tile's heads run side by side; under causal the last query tiles, which attend the most
    keys, start first."""
    pid = tl.program_id(0)
    pid_bh = pid % num_bh
    tile = pid // num_bh
    if CAUSAL:
        tile = tl.num_programs(0) // num_bh - 1 - tile
    n = tile // SUB_Q
    return pid_bh, n, n * BLOCK_Q + (tile % SUB_Q) * BLOCK_M


@triton.jit
def _split_range(n_tiles, split, n_splits):
    """This program's share [lo, hi) of a row's ``n_tiles`` key tiles cut into ``n_splits`` equal parts
    (decode split-KV; one part otherwise)."""
    per_split = tl.cdiv(n_tiles, n_splits)
    lo = split * per_split
    return lo, tl.minimum(lo + per_split, n_tiles)


@triton.jit
def _load_q(q_ptr, rows, row_ok, offs_d, d_ok, sqt, sqd, UPCAST: tl.constexpr):
    """The query tile [BLOCK_M, BLOCK_D], fp32 under ``UPCAST``; rows past Tq and padded dims read 0."""
    q = tl.load(
        q_ptr + rows[:, None] * sqt + offs_d[None, :] * sqd, mask=row_ok[:, None] & d_ok[None, :], other=0.0
    )
    if UPCAST:
        q = q.to(tl.float32)
    return q


@triton.jit
def _normalize(acc, m_i, l_i):
    """(out [BLOCK_M, BLOCK_D], natural-log LSE [BLOCK_M]) from the online-softmax state; a row with no
    allowed key gives 0 and -inf."""
    has_key = l_i > 0.0
    out = acc / tl.where(has_key, l_i, 1.0)[:, None]  # empty row: acc = 0 -> out = 0
    lse = tl.where(has_key, (m_i + tl.log2(tl.where(has_key, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    return out, lse


@autotune
@triton.jit
def _block_sparse_fwd(
    Q, K, V, Out, Lse,
    KeyBias, KPM, WS, SinkEnd, FullNum, FullIdx, PartNum, PartIdx,
    sqb, sqh, sqt, sqd, skb, skh, skt, skd, svb, svh, svt, svd, sob, soh, sos, sot, sod,
    s_kb_b, s_kb_h, s_kb_t, s_pad_b, s_rule_b,
    s_num_b, s_num_h, s_num_q, s_fi_b, s_fi_h, s_fi_q, s_pi_b, s_pi_h, s_pi_q,
    num_bh, num_q_heads, group, mask_head_div, q_len, kv_len, head_dim, n_splits,
    qk_scale, cap_in, cap_out, window,
    q_bucket, kv_bucket,  # autotune key only: log2 length buckets
    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    EVEN_K: tl.constexpr, EVEN_D: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_PAD: tl.constexpr, HAS_RULE: tl.constexpr,
    UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """One query tile of one (b, hq) over its key split: the mask row's full blocks, then its partial
    ones, then the normalized output and LSE (arguments: see ``_mask_args``, ``_scalar_args`` and
    ``_switches``)."""
    # Tiles per mask block and valid rows/cols per tile (a block below 16 is padded up to one tile).
    SUB_Q = (BLOCK_Q + BLOCK_M - 1) // BLOCK_M
    SUB_K = (BLOCK_K + BLOCK_N - 1) // BLOCK_N
    ROWS = BLOCK_Q // SUB_Q
    COLS = BLOCK_K // SUB_K
    split = tl.program_id(1)
    pid_bh, n, q0 = _program_tile(num_bh, SUB_Q, BLOCK_Q, BLOCK_M, CAUSAL)
    if q0 >= q_len:
        return
    b = pid_bh // num_q_heads
    hq = pid_bh % num_q_heads
    hkv = hq // group
    hm = hq // mask_head_div  # mask row head: hq (H = Hq), hq // G (H = Hkv) or 0 (H = 1)
    rows = tl.arange(0, BLOCK_M)
    offs_m = q0 + rows
    row_ok = (rows < ROWS) & (offs_m < q_len)
    pos_q = offs_m + (kv_len - q_len)  # bottom-right alignment
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim

    b64, hq64, hkv64 = b.to(tl.int64), hq.to(tl.int64), hkv.to(tl.int64)
    q_ptr = Q + b64 * sqb + hq64 * sqh + q0.to(tl.int64) * sqt
    q = _load_q(q_ptr, rows, row_ok, offs_d, d_ok, sqt, sqd, UPCAST)
    k_ptr = K + b64 * skb + hkv64 * skh
    v_ptr = V + b64 * svb + hkv64 * svh
    kb_ptr = KeyBias + b64 * s_kb_b + hkv64 * s_kb_h
    kpm_ptr = KPM + b64 * s_pad_b
    ws = tl.zeros([BLOCK_M], dtype=tl.int32)
    sink = 0
    if HAS_RULE:
        ws = tl.load(WS + b64 * s_rule_b * q_len + offs_m, mask=row_ok, other=0)
        sink = tl.load(SinkEnd + b * s_rule_b)

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    for part in tl.static_range(2):  # full blocks (no element mask), then partial ones
        if part == 0:
            num = tl.load(FullNum + b * s_num_b + hm * s_num_h + n * s_num_q)
            row = FullIdx + b * s_fi_b + hm * s_fi_h + n * s_fi_q
        else:
            num = tl.load(PartNum + b * s_num_b + hm * s_num_h + n * s_num_q)
            row = PartIdx + b * s_pi_b + hm * s_pi_h + n * s_pi_q
        lo, hi = _split_range(num * SUB_K, split, n_splits)
        acc, m_i, l_i = _attend_tiles(
            acc, m_i, l_i, q, row, lo, hi,
            k_ptr, v_ptr, kb_ptr, kpm_ptr, pos_q, ws, sink, offs_d, d_ok,
            skt, skd, svt, svd, s_kb_t, kv_len, qk_scale, cap_in, cap_out, window,
            BLOCK_K, BLOCK_N, SUB_K, COLS, part == 1, EVEN_K, EVEN_D, CAUSAL,
            HAS_WINDOW, HAS_SOFTCAP, HAS_BIAS, HAS_PAD, HAS_RULE, UPCAST,
        )  # fmt: skip

    out, lse = _normalize(acc, m_i, l_i)
    o_ptr = Out + b64 * sob + hq64 * soh + split.to(tl.int64) * sos + q0.to(tl.int64) * sot
    tl.store(
        o_ptr + rows[:, None] * sot + offs_d[None, :] * sod,
        out.to(Out.dtype.element_ty),
        mask=row_ok[:, None] & d_ok[None, :],
    )
    lse_ptr = Lse + (pid_bh.to(tl.int64) * n_splits + split) * q_len
    tl.store(lse_ptr + offs_m, lse, mask=row_ok)


def kernel_dtypes(dtype: torch.dtype, interpret: bool) -> tuple[bool, torch.dtype]:
    """(UPCAST, the dtype the kernel stores) for inputs of ``dtype``. On GPU, bf16/fp16 inputs take
    the tensor-core branch (half-precision dots, fp32 accumulation, the store rounding to nearest);
    fp32 inputs are upcast (IEEE fp32 dots). The interpreter's bf16 arithmetic and fp32 -> bf16/fp16
    cast are wrong (the cast truncates), so under it everything is upcast and stored in fp32, and
    torch rounds."""
    if interpret:
        return True, torch.float32
    return dtype == torch.float32, dtype


def _bucket(n: int) -> int:
    """log2 length bucket of the autotune key: one tuning per doubling of Tq or Tk."""
    return max(n - 1, 1).bit_length()


def num_splits(q_len: int, kv_len: int, programs: int) -> int:
    """Key splits per row: only when Tq fits one 16-row tile (decode) and the grid is too small."""
    if q_len > MIN_TILE:
        return 1
    return max(1, min(_MAX_SPLITS, triton.cdiv(_TARGET_PROGRAMS, programs), kv_len // _MIN_SPLIT_KEYS))


def _merge_splits(out: Tensor, lse: Tensor) -> tuple[Tensor, Tensor]:
    """out [B, Hq, S, Tq, D], lse [B, Hq, S, Tq] of S disjoint key splits -> one (out, lse)."""
    total = torch.logsumexp(lse, dim=2)
    safe = torch.where(torch.isneginf(total), torch.zeros_like(total), total)  # all empty: weights 0
    weights = torch.exp(lse - safe.unsqueeze(2))
    return (out * weights.unsqueeze(-1)).sum(2), total


def check_offsets(*tensors: Tensor) -> None:
    """Tile bases are 64-bit in the kernel, offsets inside a tile int32: up to 128 token strides plus
    256 head-dim strides. Raise clearly instead of launching where those could overflow."""
    for t in tensors:
        inner = 128 * abs(t.stride(-2)) + 256 * abs(t.stride(-1))
        if inner >= 2**31:
            raise ValueError(
                f"a [.., T, D] tensor with strides {tuple(t.stride())} has in-tile offsets beyond int32; "
                "pass a contiguous tensor or the [B, T, H, D] layout"
            )


def _mask_args(
    block_mask: BlockMask, key_padding_mask: Tensor | None, key_bias: Tensor | None
) -> tuple[list[Tensor], list[int]]:
    """The kernel's mask-side pointers (``KeyBias`` .. ``PartIdx``) and strides (``s_kb_b`` ..
    ``s_pi_q``). Index lists are made contiguous; a batch-1 mask or bias is shared by every batch row
    (batch stride 0); a tensor whose switch is off is stood in for by ``full_kv_num_blocks`` (unread)."""
    num_f, num_p = block_mask.full_kv_num_blocks.contiguous(), block_mask.kv_num_blocks.contiguous()
    idx_f, idx_p = block_mask.full_kv_indices.contiguous(), block_mask.kv_indices.contiguous()
    kpm = num_f if key_padding_mask is None else key_padding_mask.to(torch.uint8).contiguous()
    rule = block_mask.window_start is not None
    ws = block_mask.window_start.contiguous() if rule else num_f  # [B', Tq] int32
    sink_end = block_mask.sink_end.contiguous() if rule else num_f
    bias = num_f if key_bias is None else key_bias
    bias_strides = (
        (0, 0, 0) if key_bias is None else (0 if bias.shape[0] == 1 else bias.stride(0), *bias.stride()[1:])
    )
    shared = num_p.shape[0] == 1

    def row_strides(t: Tensor) -> tuple[int, int, int]:  # [B', H, nQ(, maxK)]: batch, head, query block
        return 0 if shared else t.stride(0), t.stride(1), t.stride(2)

    strides = [
        *bias_strides,
        0 if key_padding_mask is None else kpm.stride(0),
        1 if rule and ws.shape[0] > 1 else 0,  # in units of rows: b * stride * Tq
        *row_strides(num_f),
        *row_strides(idx_f),
        *row_strides(idx_p),
    ]
    return [bias, kpm, ws, sink_end, num_f, idx_f, num_p, idx_p], strides


def _scalar_args(
    q: Tensor,
    k: Tensor,
    block_mask: BlockMask,
    n_split: int,
    scale: float,
    softcap: float | None,
    sliding_window: int | None,
) -> list[int | float]:
    """The kernel's ``num_bh`` .. ``kv_bucket``: sizes, head maps, scale and softcap folded into base-2
    constants, the window, and the autotune key's length buckets."""
    b, hq, q_len, d = q.shape
    hkv, kv_len = k.shape[1], k.shape[2]
    cap = float(softcap or 1.0)
    heads = [b * hq, hq, hq // hkv, hq // block_mask.kv_num_blocks.shape[1]]
    sizes = [q_len, kv_len, d, n_split]
    constants = [float(scale) * LOG2E, float(scale) / cap, cap * LOG2E, int(sliding_window or 0)]
    return [*heads, *sizes, *constants, _bucket(q_len), _bucket(kv_len)]


def _switches(
    q: Tensor,
    k: Tensor,
    block_mask: BlockMask,
    *,
    causal: bool,
    softcap: float | None,
    sliding_window: int | None,
    key_padding_mask: Tensor | None,
    key_bias: Tensor | None,
    upcast: bool,
) -> dict:
    """The kernel's compile-time arguments other than the autotuned tiles (``BLOCK_M``, ``BLOCK_N``)."""
    d, kv_len = q.shape[-1], k.shape[2]
    block_d = max(MIN_TILE, triton.next_power_of_2(d))
    return dict(
        BLOCK_Q=block_mask.block_q,
        BLOCK_K=block_mask.block_k,
        BLOCK_D=block_d,
        EVEN_K=kv_len % block_mask.block_k == 0 and block_mask.block_k >= MIN_TILE,
        EVEN_D=block_d == d,
        CAUSAL=causal,
        HAS_WINDOW=sliding_window is not None,
        HAS_SOFTCAP=softcap is not None,
        HAS_BIAS=key_bias is not None,
        HAS_PAD=key_padding_mask is not None,
        HAS_RULE=block_mask.window_start is not None,
        UPCAST=upcast,
    )


def _grid(block_mask: BlockMask, num_bh: int, n_split: int):
    """Programs: (query tiles of BLOCK_M rows x B * Hq, key splits); the tile height is autotuned."""

    def grid(meta: dict) -> tuple[int, int]:
        return (block_mask.num_q_blocks * triton.cdiv(block_mask.block_q, meta["BLOCK_M"]) * num_bh, n_split)

    return grid


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
    key_bias: Tensor | None = None,
    splits: int | None = None,
    upcast: bool | None = None,
) -> tuple[Tensor, Tensor]:
    """Inputs validated by the dispatcher: q [B, Hq, Tq, D], k/v [B, Hkv, Tk, D], mask batch 1 or B,
    heads 1, Hkv or Hq; key_bias float [B or 1, Hkv, Tk] added to the scaled (capped) logits before
    masking (-inf masks the key). Tests only: ``splits`` overrides the decode split count, and
    ``upcast=False`` runs the half-precision branch on fp32 inputs (see :func:`kernel_dtypes`).
    Returns (out [B, Hq, Tq, D] in q.dtype, lse [B, Hq, Tq] fp32)."""
    check_offsets(q, k, v)
    b, hq, q_len, d = q.shape
    n_split = splits or num_splits(q_len, k.shape[2], block_mask.num_q_blocks * b * hq)
    default_upcast, out_dtype = kernel_dtypes(q.dtype, INTERPRET)
    upcast = default_upcast if upcast is None else upcast
    out_dtype = torch.float32 if n_split > 1 else out_dtype  # split rows are merged by torch in fp32
    out = torch.empty(b, hq, n_split, q_len, d, dtype=out_dtype, device=q.device)
    lse = torch.empty(b, hq, n_split, q_len, dtype=torch.float32, device=q.device)
    mask_tensors, mask_strides = _mask_args(block_mask, key_padding_mask, key_bias)
    strides = [*q.stride(), *k.stride(), *v.stride(), *out.stride()]
    scalars = _scalar_args(q, k, block_mask, n_split, scale, softcap, sliding_window)
    switches = _switches(
        q,
        k,
        block_mask,
        causal=causal,
        softcap=softcap,
        sliding_window=sliding_window,
        key_padding_mask=key_padding_mask,
        key_bias=key_bias,
        upcast=upcast,
    )
    guard = torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext()
    with guard:  # the launch goes to q's GPU (layers on cuda:1 under device_map="auto")
        _block_sparse_fwd[_grid(block_mask, b * hq, n_split)](
            q, k, v, out, lse, *mask_tensors, *strides, *mask_strides, *scalars, **switches
        )
    if n_split > 1:
        merged, lse = _merge_splits(out, lse)
        return merged.to(q.dtype), lse
    return out.squeeze(2).to(q.dtype), lse.squeeze(2)

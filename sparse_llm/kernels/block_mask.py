"""BlockMask: which key blocks each query block attends to (FlexAttention's vocabulary).

Geometry (bottom-right alignment, as flash-attention and HF use when Tq < Tk): query ``i`` sits at
absolute position ``p = kv_len - q_len + i``. Query block ``n`` holds queries
``[n * block_q, (n + 1) * block_q)``, key block ``m`` holds keys ``[m * block_k, (m + 1) * block_k)``.
Causal: key ``j`` is allowed iff ``j <= p``. Sliding window ``w`` (HF ``sliding_window_overlay``):
additionally ``j > p - w``, i.e. ``j`` in ``[p - w + 1, p]``.

Per row ``(b, h, n)`` a count plus padded, ascending indices, split in two disjoint sets:
``kv_*`` = PARTIAL blocks (the kernel applies the element causal/window mask), ``full_kv_*`` = FULL
blocks (entirely inside the allowed region, no element mask). Entries past the count are 0.
B is 1 (shared by the batch) or B; H is 1, Hkv (query head ``hq`` uses row ``hq // (Hq // Hkv)``)
or Hq. ``is_causal``/``sliding_window`` record the geometry the full/partial split was made for.

Optional key rule, a per-query generalization of the sliding window (causal masks only):
``window_start`` int32 [B', Tq] and ``sink_end`` int32 [B'], B' = 1 or the mask's B. Query ``i`` of
row ``b`` may attend key ``j`` only if ``j >= window_start[b, i]`` or ``j < sink_end[b]`` (sinks,
then a window whose start each query sets: strided and blocked neighborhoods). The kernel applies it
with the element mask of partial blocks; a block is full only if the rule allows all of it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor


def _check_block_size(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value <= 0 or value & (value - 1):
        raise ValueError(f"{name} must be a positive power of two, got {value}")


def _check_geometry(q_len: int, kv_len: int, causal: bool, sliding_window: int | None) -> None:
    for name, value in (("q_len", q_len), ("kv_len", kv_len)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if q_len > kv_len:
        raise ValueError(f"q_len ({q_len}) must be <= kv_len ({kv_len}): queries are the last keys")
    if sliding_window is not None:
        if not isinstance(sliding_window, int) or isinstance(sliding_window, bool) or sliding_window < 1:
            raise ValueError(f"sliding_window must be None or an int >= 1, got {sliding_window!r}")
        if not causal:
            raise ValueError("sliding_window requires causal=True")


def _grid(
    q_len: int, kv_len: int, block_q: int, block_k: int, causal: bool, window: int | None
) -> tuple[int, int]:
    """Validate the geometry; return (nQ, nK)."""
    _check_block_size("block_q", block_q)
    _check_block_size("block_k", block_k)
    _check_geometry(q_len, kv_len, causal, window)
    return -(-q_len // block_q), -(-kv_len // block_k)


def block_geometry(
    *,
    q_len: int,
    kv_len: int,
    block_q: int,
    block_k: int,
    causal: bool = True,
    sliding_window: int | None = None,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor]:
    """(reachable, full), both bool [nQ, nK]: blocks with at least one / only allowed (query, key) pairs.

    Over a block pair the distance ``p - j`` covers the integer interval [q_lo - k_hi, q_hi - k_lo];
    a pair is allowed iff that distance lies in [0, w - 1] (w = inf without a window).
    """
    n_q, n_k = -(-q_len // block_q), -(-kv_len // block_k)
    offset = kv_len - q_len
    q_lo = torch.arange(n_q, device=device) * block_q + offset
    q_hi = torch.clamp(q_lo + block_q - 1, max=kv_len - 1)
    k_lo = torch.arange(n_k, device=device) * block_k
    k_hi = torch.clamp(k_lo + block_k - 1, max=kv_len - 1)
    d_min = q_lo[:, None] - k_hi[None, :]
    d_max = q_hi[:, None] - k_lo[None, :]
    if not causal:
        every = torch.ones(n_q, n_k, dtype=torch.bool, device=device)
        return every, every
    w = kv_len + 1 if sliding_window is None else sliding_window
    return (d_max >= 0) & (d_min <= w - 1), (d_min >= 0) & (d_max <= w - 1)


def key_rule_blocks(
    window_start: Tensor, sink_end: Tensor, q_len: int, kv_len: int, block_q: int, block_k: int
) -> tuple[Tensor, Tensor]:
    """(allows_all, masks_all), bool [B', nQ, nK]: blocks whose every key the key rule allows for
    every query of the block / masks for every query of the block.

    Query i's masked keys are the gap [sink_end, window_start[i]); over a query block the union of
    the gaps is [sink_end, max window_start) and their intersection [sink_end, min window_start).
    """
    n_q, n_k = -(-q_len // block_q), -(-kv_len // block_k)
    ws = window_start.long()
    if n_q * block_q > q_len:  # repeating the last query leaves each block's max and min as they are
        ws = torch.cat([ws, ws[:, -1:].expand(-1, n_q * block_q - q_len)], 1)
    ws = ws.view(ws.shape[0], n_q, block_q)
    ws_max, ws_min = ws.amax(-1)[..., None], ws.amin(-1)[..., None]  # [B', nQ, 1]
    k_lo = torch.arange(n_k, device=ws.device) * block_k
    k_hi = torch.clamp(k_lo + block_k, max=kv_len)  # one past the block's last key
    sink = sink_end.long()[:, None, None]
    allows_all = torch.maximum(k_lo, sink) >= torch.minimum(k_hi, ws_max)  # block misses the gaps' union
    masks_all = (k_lo >= sink) & (k_hi <= ws_min)  # block inside every gap
    return allows_all, masks_all


def _check_rule(window_start, sink_end, q_len: int, batch: int, causal: bool, device) -> None:
    if (window_start is None) != (sink_end is None):
        raise ValueError("window_start and sink_end go together: give both or neither")
    if window_start is None:
        return
    if not causal:
        raise ValueError("window_start/sink_end require causal=True")
    for name, t, ndim in (("window_start", window_start, 2), ("sink_end", sink_end, 1)):
        if not isinstance(t, Tensor) or t.dtype != torch.int32 or t.dim() != ndim:
            raise ValueError(f"{name} must be an int32 tensor with {ndim} dims, got {t!r:.80}")
        if t.shape[0] not in (1, batch) or t.device != torch.device(device):
            raise ValueError(
                f"{name} has batch {t.shape[0]} on {t.device}; expected 1 or {batch}, on {device}"
            )
    if window_start.shape != (sink_end.shape[0], q_len):
        raise ValueError(
            f"window_start has shape {tuple(window_start.shape)}, expected ({sink_end.shape[0]}, {q_len})"
        )


def _rows_from_dense(selected: Tensor) -> tuple[Tensor, Tensor]:
    """bool [B, H, nQ, nK] -> (int32 counts [B, H, nQ], int32 ascending indices [B, H, nQ, maxK])."""
    counts = selected.sum(-1, dtype=torch.int32)
    max_k = max(int(counts.max()) if counts.numel() else 0, 1)
    # A stable sort of "not selected" puts the selected block ids first, in ascending order.
    order = torch.argsort((~selected).to(torch.int8), dim=-1, stable=True)[..., :max_k]
    valid = torch.arange(max_k, device=selected.device) < counts[..., None]
    return counts, torch.where(valid, order, 0).to(torch.int32)


def _dense_from_rows(counts: Tensor, indices: Tensor, n_k: int) -> Tensor:
    valid = torch.arange(indices.shape[-1], device=indices.device) < counts[..., None]
    target = torch.where(valid, indices.long(), n_k)
    dense = torch.zeros(*counts.shape, n_k + 1, dtype=torch.bool, device=counts.device)
    return dense.scatter_(-1, target, True)[..., :n_k]


@dataclass(frozen=True)
class BlockMask:
    """Block-sparse attention pattern; see the module docstring for the geometry.

    Fields: ``kv_num_blocks`` int32 [B, H, nQ] and ``kv_indices`` int32 [B, H, nQ, maxK] (partial
    blocks); ``full_kv_num_blocks`` int32 [B, H, nQ] and ``full_kv_indices`` int32 [B, H, nQ, maxKf]
    (full blocks); ``block_q``, ``block_k`` (powers of two); ``q_len`` (Tq), ``kv_len`` (Tk);
    ``is_causal``, ``sliding_window`` (the geometry used to classify full vs partial); optional
    ``window_start`` int32 [B', Tq] and ``sink_end`` int32 [B'] (the key rule, module docstring).
    """

    kv_num_blocks: Tensor
    kv_indices: Tensor
    full_kv_num_blocks: Tensor
    full_kv_indices: Tensor
    block_q: int
    block_k: int
    q_len: int
    kv_len: int
    is_causal: bool = True
    sliding_window: int | None = None
    window_start: Tensor | None = None
    sink_end: Tensor | None = None

    def __post_init__(self) -> None:
        _check_block_size("block_q", self.block_q)
        _check_block_size("block_k", self.block_k)
        _check_geometry(self.q_len, self.kv_len, self.is_causal, self.sliding_window)
        tensors = {
            "kv_num_blocks": (self.kv_num_blocks, 3),
            "kv_indices": (self.kv_indices, 4),
            "full_kv_num_blocks": (self.full_kv_num_blocks, 3),
            "full_kv_indices": (self.full_kv_indices, 4),
        }
        for name, (t, ndim) in tensors.items():
            if not isinstance(t, Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dtype != torch.int32 or t.dim() != ndim:
                raise ValueError(f"{name} must be an int32 tensor with {ndim} dims, got {t.dtype} {t.shape}")
        rows = (*self.kv_num_blocks.shape[:2], self.num_q_blocks)
        for name in ("kv_num_blocks", "full_kv_num_blocks"):
            if tuple(getattr(self, name).shape) != rows:
                raise ValueError(f"{name} has shape {tuple(getattr(self, name).shape)}, expected {rows}")
        for name in ("kv_indices", "full_kv_indices"):
            if tuple(getattr(self, name).shape[:3]) != rows or getattr(self, name).shape[3] < 1:
                raise ValueError(
                    f"{name} has shape {tuple(getattr(self, name).shape)}, expected {rows} + (maxK>=1,)"
                )
        if len({t.device for t, _ in tensors.values()}) != 1:
            raise ValueError("all BlockMask tensors must be on the same device")
        _check_rule(
            self.window_start, self.sink_end, self.q_len, rows[0], self.is_causal, self.kv_num_blocks.device
        )

    # ----------------------------------------------------------------- constructors
    @classmethod
    def from_dense(
        cls,
        block_matrix: Tensor,
        *,
        block_q: int,
        block_k: int,
        q_len: int,
        kv_len: int,
        causal: bool = True,
        sliding_window: int | None = None,
        window_start: Tensor | None = None,
        sink_end: Tensor | None = None,
    ) -> BlockMask:
        """From a bool [B, H, nQ, nK] block selection; blocks the geometry fully masks are dropped.

        With the key rule (``window_start`` int32 [B', Tq], ``sink_end`` int32 [B'], B' = 1 or B),
        blocks it masks for every query of the block are dropped too, and a block is full only if the
        rule allows all of it. A rule that masks no key (every ``window_start <= sink_end``) is left
        out, so the kernel keeps its plain causal shortcuts."""
        n_q, n_k = _grid(q_len, kv_len, block_q, block_k, causal, sliding_window)
        if not isinstance(block_matrix, Tensor) or block_matrix.dtype != torch.bool:
            raise TypeError("block_matrix must be a bool tensor [B, H, nQ, nK]")
        if block_matrix.dim() != 4 or tuple(block_matrix.shape[2:]) != (n_q, n_k):
            raise ValueError(
                f"block_matrix has shape {tuple(block_matrix.shape)}, expected [B, H, {n_q}, {n_k}] "
                f"for q_len={q_len}, kv_len={kv_len}, block_q={block_q}, block_k={block_k}"
            )
        reach, full = block_geometry(
            q_len=q_len,
            kv_len=kv_len,
            block_q=block_q,
            block_k=block_k,
            causal=causal,
            sliding_window=sliding_window,
            device=block_matrix.device,
        )
        selected = block_matrix & reach
        _check_rule(window_start, sink_end, q_len, block_matrix.shape[0], causal, block_matrix.device)
        if window_start is not None and bool((window_start > sink_end[:, None]).any()):
            allows_all, masks_all = key_rule_blocks(window_start, sink_end, q_len, kv_len, block_q, block_k)
            selected = selected & ~masks_all[:, None]
            full = full & allows_all[:, None]
        else:
            window_start = sink_end = None
        num, idx = _rows_from_dense(selected & ~full)
        full_num, full_idx = _rows_from_dense(selected & full)
        return cls(
            num,
            idx,
            full_num,
            full_idx,
            block_q,
            block_k,
            q_len,
            kv_len,
            causal,
            sliding_window,
            window_start,
            sink_end,
        )

    @classmethod
    def causal(
        cls,
        *,
        q_len: int,
        kv_len: int,
        block_q: int,
        block_k: int,
        batch: int = 1,
        heads: int = 1,
        device: torch.device | str | None = None,
        sliding_window: int | None = None,
    ) -> BlockMask:
        """Every reachable block (density 1.0): exact causal (windowed) attention."""
        n_q, n_k = _grid(q_len, kv_len, block_q, block_k, True, sliding_window)
        every = torch.ones(batch, heads, n_q, n_k, dtype=torch.bool, device=device)
        return cls.from_dense(
            every, block_q=block_q, block_k=block_k, q_len=q_len, kv_len=kv_len, sliding_window=sliding_window
        )

    @classmethod
    def sink_window(
        cls,
        *,
        q_len: int,
        kv_len: int,
        block_q: int,
        block_k: int,
        sink_tokens: int,
        local_tokens: int,
        batch: int = 1,
        heads: int = 1,
        device: torch.device | str | None = None,
        sliding_window: int | None = None,
        kv_start: Tensor | None = None,
    ) -> BlockMask:
        """StreamingLLM (Xiao et al. 2023): key blocks overlapping the first ``sink_tokens`` keys plus
        those overlapping the ``local_tokens`` keys ending at each query block's last position.

        ``kv_start`` (int ``[B]``, optional) is each row's first real key: with left padding a row's
        sinks are its first real tokens, not position 0. It sets the batch size of the mask."""
        for name, value in (("sink_tokens", sink_tokens), ("local_tokens", local_tokens)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        n_q, n_k = _grid(q_len, kv_len, block_q, block_k, True, sliding_window)
        q_end = torch.clamp(torch.arange(1, n_q + 1, device=device) * block_q, max=q_len) - 1 + kv_len - q_len
        k_blk = torch.arange(n_k, device=device)
        start = torch.zeros(1, dtype=torch.long, device=device) if kv_start is None else kv_start.to(device)
        # [B', nK]: blocks overlapping [start, start + sink_tokens)
        sink = (k_blk * block_k < start[:, None] + sink_tokens) & ((k_blk + 1) * block_k > start[:, None])
        local = (k_blk[None, :] + 1) * block_k > q_end[:, None] - local_tokens + 1
        local &= local_tokens > 0
        batch = batch if kv_start is None else kv_start.shape[0]
        dense = (sink[:, None, None, :] | local).expand(batch, heads, n_q, n_k)
        return cls.from_dense(
            dense, block_q=block_q, block_k=block_k, q_len=q_len, kv_len=kv_len, sliding_window=sliding_window
        )

    @classmethod
    def from_topk(
        cls,
        block_scores: Tensor,
        k: int,
        *,
        block_q: int,
        block_k: int,
        q_len: int,
        kv_len: int,
        sliding_window: int | None = None,
    ) -> BlockMask:
        """The ``k`` highest-scoring reachable blocks per row of float [B, H, nQ, nK] scores.

        Ties go to the lower block index (stable sort), so every device picks the same blocks.
        """
        if not isinstance(k, int) or isinstance(k, bool) or k < 0:
            raise ValueError(f"k must be an int >= 0, got {k!r}")
        if (
            not isinstance(block_scores, Tensor)
            or not block_scores.is_floating_point()
            or block_scores.dim() != 4
        ):
            raise TypeError("block_scores must be a floating tensor [B, H, nQ, nK]")
        _grid(q_len, kv_len, block_q, block_k, True, sliding_window)
        reach, _ = block_geometry(
            q_len=q_len,
            kv_len=kv_len,
            block_q=block_q,
            block_k=block_k,
            sliding_window=sliding_window,
            device=block_scores.device,
        )
        if tuple(block_scores.shape[2:]) != tuple(reach.shape):
            raise ValueError(
                f"block_scores has shape {tuple(block_scores.shape)}, expected [B, H, *{tuple(reach.shape)}]"
            )
        scores = block_scores.float().masked_fill(~reach, float("-inf"))
        order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]
        picked = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, order, True) & reach
        return cls.from_dense(
            picked,
            block_q=block_q,
            block_k=block_k,
            q_len=q_len,
            kv_len=kv_len,
            sliding_window=sliding_window,
        )

    # ----------------------------------------------------------------- queries
    @property
    def num_q_blocks(self) -> int:
        return -(-self.q_len // self.block_q)

    @property
    def num_kv_blocks(self) -> int:
        return -(-self.kv_len // self.block_k)

    @property
    def num_selected_blocks(self) -> int:
        """Selected (partial + full) blocks summed over all rows."""
        return int(self.kv_num_blocks.sum()) + int(self.full_kv_num_blocks.sum())

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(B, H, nQ, nK) of the dense block matrix."""
        return (*self.kv_num_blocks.shape, self.num_kv_blocks)

    @property
    def device(self) -> torch.device:
        return self.kv_num_blocks.device

    def to_dense(self) -> Tensor:
        """bool [B, H, nQ, nK]: partial or full blocks."""
        n_k = self.num_kv_blocks
        return _dense_from_rows(self.kv_num_blocks, self.kv_indices, n_k) | _dense_from_rows(
            self.full_kv_num_blocks, self.full_kv_indices, n_k
        )

    def reachable(self) -> Tensor:
        """bool [nQ, nK]: blocks the causal (window) geometry leaves at least one allowed pair in."""
        return block_geometry(
            q_len=self.q_len,
            kv_len=self.kv_len,
            block_q=self.block_q,
            block_k=self.block_k,
            causal=self.is_causal,
            sliding_window=self.sliding_window,
            device=self.device,
        )[0]

    def rule_blocks(self) -> tuple[Tensor, Tensor]:
        """:func:`key_rule_blocks` of this mask's key rule (which must be set)."""
        m = self
        return key_rule_blocks(m.window_start, m.sink_end, m.q_len, m.kv_len, m.block_q, m.block_k)

    def density(self) -> float:
        """Selected blocks / reachable blocks, over all rows, in [0, 1] (``causal()`` gives 1.0)."""
        rows = self.kv_num_blocks.numel() // max(self.num_q_blocks, 1)
        return self.num_selected_blocks / (rows * int(self.reachable().sum()))

    def as_partial(self) -> BlockMask:
        """Same selection with every block partial (element mask everywhere): valid for any geometry."""
        dense = self.to_dense()
        return self._with_blocks(dense, torch.zeros_like(dense))

    def _with_blocks(self, partial: Tensor, full: Tensor) -> BlockMask:
        """This mask's geometry and key rule over other blocks: bool [B, H', nQ, nK] partial and full
        selections (disjoint, classified by the caller)."""
        num, idx = _rows_from_dense(partial)
        full_num, full_idx = _rows_from_dense(full)
        return replace(
            self, kv_num_blocks=num, kv_indices=idx, full_kv_num_blocks=full_num, full_kv_indices=full_idx
        )

    def split_groups(self, group: int) -> tuple[BlockMask, BlockMask]:
        """``(shared, rest)``: the blocks that all ``group`` consecutive heads of a row select, as a mask
        with one head per group (H / group heads), and every other selected block, per head (H heads).
        Together they select each of this mask's blocks exactly once, with its full/partial class (a
        block is shared-full only if it is full in every head of the group) and its key rule. H must be
        a multiple of ``group``."""
        heads = self.kv_num_blocks.shape[1]
        if not isinstance(group, int) or group < 1 or heads % group:
            raise ValueError(f"group must be a positive int dividing the mask's {heads} heads, got {group!r}")
        n_k = self.num_kv_blocks
        full = _dense_from_rows(self.full_kv_num_blocks, self.full_kv_indices, n_k)
        part = _dense_from_rows(self.kv_num_blocks, self.kv_indices, n_k)
        shared = (full | part).unflatten(1, (heads // group, group)).all(2)
        shared_full = shared & full.unflatten(1, (heads // group, group)).all(2)
        others = ~shared.repeat_interleave(group, 1)
        shared_mask = self._with_blocks(shared & ~shared_full, shared_full)
        return shared_mask, self._with_blocks(part & others, full & others)

    def validate(self) -> BlockMask:
        """Check contents (counts in range, indices in range, ascending, no duplicates, partial and full
        disjoint, no unreachable block, full blocks truly full); raises ValueError, returns self."""
        n_k, reach, full = (
            self.num_kv_blocks,
            *block_geometry(
                q_len=self.q_len,
                kv_len=self.kv_len,
                block_q=self.block_q,
                block_k=self.block_k,
                causal=self.is_causal,
                sliding_window=self.sliding_window,
                device=self.device,
            ),
        )
        dense = []
        for kind, num, idx in (
            ("partial", self.kv_num_blocks, self.kv_indices),
            ("full", self.full_kv_num_blocks, self.full_kv_indices),
        ):
            if bool(((num < 0) | (num > idx.shape[-1])).any()):
                raise ValueError(f"{kind} counts must lie in [0, {idx.shape[-1]}]")
            valid = torch.arange(idx.shape[-1], device=idx.device) < num[..., None]
            if bool((valid & ((idx < 0) | (idx >= n_k))).any()):
                raise ValueError(f"{kind} indices must lie in [0, {n_k})")
            if bool((valid[..., 1:] & (idx[..., 1:] <= idx[..., :-1])).any()):
                raise ValueError(f"{kind} indices must be strictly ascending (sorted, no duplicates)")
            dense.append(_dense_from_rows(num, idx, n_k))
        if bool((dense[0] & dense[1]).any()):
            raise ValueError("a block is listed as both partial and full")
        if bool(((dense[0] | dense[1]) & ~reach).any()):
            raise ValueError("a selected block is fully masked by the causal/window geometry (future block)")
        if self.window_start is not None:
            full = full & self.rule_blocks()[0][:, None]
        if bool((dense[1] & ~full).any()):
            raise ValueError("a block listed as full needs an element mask: list it as partial")
        return self

    def to(self, device: torch.device | str) -> BlockMask:
        names = (
            "kv_num_blocks",
            "kv_indices",
            "full_kv_num_blocks",
            "full_kv_indices",
            "window_start",
            "sink_end",
        )
        return replace(
            self, **{n: None if getattr(self, n) is None else getattr(self, n).to(device) for n in names}
        )

    def to_string(self, max_rows: int = 32, max_cols: int = 64) -> str:
        """Text picture of row (b=0, h=0): '#' full, '+' partial, '.' unselected, ' ' unreachable."""
        dense_p = _dense_from_rows(self.kv_num_blocks[0, 0], self.kv_indices[0, 0], self.num_kv_blocks)
        dense_f = _dense_from_rows(
            self.full_kv_num_blocks[0, 0], self.full_kv_indices[0, 0], self.num_kv_blocks
        )
        reach = self.reachable()
        lines = []
        for n in range(min(self.num_q_blocks, max_rows)):
            chars = [
                "#" if dense_f[n, m] else "+" if dense_p[n, m] else "." if reach[n, m] else " "
                for m in range(min(self.num_kv_blocks, max_cols))
            ]
            lines.append("".join(chars))
        return "\n".join(lines)

    def __repr__(self) -> str:
        b, h, n_q, n_k = self.shape
        window = "" if self.sliding_window is None else f", sliding_window={self.sliding_window}"
        window += "" if self.window_start is None else ", key rule (window_start, sink_end)"
        return (
            f"BlockMask(B={b}, H={h}, nQ={n_q}, nK={n_k}, block_q={self.block_q}, block_k={self.block_k}, "
            f"q_len={self.q_len}, kv_len={self.kv_len}, is_causal={self.is_causal}{window}, "
            f"density={self.density():.3f}, device={self.device})"
        )

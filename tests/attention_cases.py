"""Shared kernel test cases and the tolerance rule (flash-attention's, STYLE.md section 4).

Tolerance rule. ``truth`` is the reference one precision above the input: fp32 on upcast inputs for
bf16/fp16, fp64 for fp32 (an fp32 truth for fp32 inputs would equal ``pt`` and demand bit equality).
``pt`` is the same reference in the input dtype: the error PyTorch itself makes at that precision.
``floor`` is twice the fp32 rounding noise of ``truth``, taken as ``2 * eps(fp32) * max|truth|`` (the
spacing of fp32 numbers at the largest value, doubled). Flash-attention's ``check_tensor_vs_ref``
measures the noise as ``|(t + 0.3) - 0.3 - t|``, which can be exactly 0 on a few values (one
decode row); the eps form is the bound that measurement estimates. A kernel passes when
``max|out - truth| <= factor * max|pt - truth| + floor`` with factor 2, or 3 with softcap.
The LSE is checked the same way on rows that have a key, and the -inf (empty row) pattern exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import pytest
import torch

from sparse_llm.kernels import BlockMask, reference_attention
from sparse_llm.kernels.block_mask import block_geometry
from sparse_llm.names import DTYPES


@dataclass(frozen=True)
class Case:
    tq: int
    tk: int
    hq: int = 2
    hkv: int = 1
    d: int = 64
    b: int = 1
    block_q: int = 32
    block_k: int = 32
    mask: str = "random"  # causal | random | sink | empty_rows | full_rows | single | group
    mask_heads: str = "kv"  # "1" | "kv" | "q"
    mask_batch: int | None = None  # None: B; 1: shared by the batch
    softcap: float | None = None
    window: int | None = None
    dtype: str = "float32"
    left_pad: tuple[int, ...] = ()  # padded keys at the start of each batch row
    causal: bool = True
    transposed: bool = False  # q/k/v as views of [B, T, H, D] tensors, as HF passes them
    mask_window: bool = True  # False: the mask is classified without the call's window
    key_rule: bool = False  # a BlockMask key rule: sinks + per-query window starts (varying, per row)
    seed: int = 0

    def but(self, **changes) -> Case:
        return replace(self, **changes)


def build(case: Case, device: str | torch.device = "cpu") -> tuple[torch.Tensor, ...]:
    """(q, k, v, block_mask, kwargs for block_sparse_attention / reference_attention)."""
    gen = torch.Generator().manual_seed(case.seed)
    dtype = DTYPES[case.dtype]

    def rand(h: int, t: int) -> torch.Tensor:
        x = torch.randn(case.b, t, h, case.d, generator=gen)
        return x.transpose(1, 2) if case.transposed else x.transpose(1, 2).contiguous()

    q, k, v = rand(case.hq, case.tq), rand(case.hkv, case.tk), rand(case.hkv, case.tk)
    if case.softcap is not None:  # scores (q.k / sqrt(D)) get std ~ softcap, so the cap really bites
        q = q * case.softcap
    heads = {"1": 1, "kv": case.hkv, "q": case.hq}[case.mask_heads]
    mb = case.b if case.mask_batch is None else case.mask_batch
    window = case.window if case.mask_window else None
    geo = dict(q_len=case.tq, kv_len=case.tk, block_q=case.block_q, block_k=case.block_k)
    n_q, n_k = -(-case.tq // case.block_q), -(-case.tk // case.block_k)
    if case.mask == "causal":
        mask = BlockMask.causal(**geo, batch=mb, heads=heads, sliding_window=window)
    elif case.mask == "sink":
        mask = BlockMask.sink_window(
            **geo,
            sink_tokens=case.block_k,
            local_tokens=2 * case.block_k,
            batch=mb,
            heads=heads,
            sliding_window=window,
        )
    else:
        dense = torch.rand(mb, heads, n_q, n_k, generator=gen) < 0.5
        if case.mask == "empty_rows":
            dense[..., ::2, :] = False
        elif case.mask == "full_rows":
            dense[..., ::2, :] = True
        elif case.mask == "single":
            reach = block_geometry(**geo, causal=case.causal, sliding_window=window)[0].float()
            pick = torch.multinomial(reach.expand(mb * heads, n_q, n_k).reshape(-1, n_k), 1, generator=gen)
            dense = torch.zeros(mb * heads * n_q, n_k, dtype=torch.bool).scatter_(1, pick, True)
            dense = dense.view(mb, heads, n_q, n_k)
        elif case.mask == "group":  # a selection method's: sinks and window in every head, others random
            sink_local = BlockMask.sink_window(
                **geo, sink_tokens=case.block_k, local_tokens=2 * case.block_k, batch=mb, heads=heads
            )
            dense |= sink_local.to_dense()
        mask = BlockMask.from_dense(dense, **geo, causal=case.causal, sliding_window=window)
    if case.key_rule:
        rule = key_rule(case, mask.shape[0])
        mask = BlockMask.from_dense(mask.to_dense(), **geo, causal=case.causal, sliding_window=window, **rule)
    kwargs = dict(scale=case.d**-0.5, causal=case.causal, softcap=case.softcap, sliding_window=case.window)
    if case.left_pad:
        kpm = torch.ones(case.b, case.tk, dtype=torch.bool)
        for row, pad in enumerate(case.left_pad):
            kpm[row, :pad] = False
        kwargs["key_padding_mask"] = kpm.to(device)
    to = dict(device=device, dtype=dtype)
    return q.to(**to), k.to(**to), v.to(**to), mask.to(device), kwargs


def key_rule(case: Case, batch: int) -> dict:
    """A key rule for ``from_dense`` (BlockMask docstring): sinks 5 tokens past each row's padding and
    window starts 9 to 45 keys behind each query, changing every 11 positions, a different phase per
    row, so partial blocks are cut anywhere."""
    pos = torch.arange(case.tk - case.tq, case.tk)
    rows = torch.arange(batch)[:, None]
    window_start = pos - 9 - 12 * ((pos // 11 + rows) % 4)
    pads = torch.tensor([case.left_pad[r] if r < len(case.left_pad) else 0 for r in range(batch)])
    return dict(window_start=window_start.to(torch.int32), sink_end=(pads + 5).to(torch.int32))


def case_id(case: Case) -> str:
    parts = [
        f"tq{case.tq}-tk{case.tk}",
        f"h{case.hq}-{case.hkv}",
        f"d{case.d}",
        f"b{case.b}",
        f"bq{case.block_q}-bk{case.block_k}",
        case.mask,
        f"mh{case.mask_heads}",
        case.dtype,
    ]
    parts += ["mb1"] if case.mask_batch == 1 else []
    parts += [f"cap{case.softcap:g}"] if case.softcap else []
    parts += [f"win{case.window}"] if case.window else []
    parts += ["nowinmask"] if case.window and not case.mask_window else []
    parts += ["pad" + "_".join(map(str, case.left_pad))] if case.left_pad else []
    parts += ["noncausal"] if not case.causal else []
    parts += ["keyrule"] if case.key_rule else []
    parts += ["hflayout"] if case.transposed else []
    return "-".join(parts)


def params(cases: list[Case], *marks) -> list:
    return [pytest.param(c, id=case_id(c), marks=marks) for c in cases]


def rounding_floor(truth: torch.Tensor) -> float:
    """Twice the fp32 rounding noise of ``truth``: 2 * eps(fp32) * max|truth|."""
    return 2.0 * torch.finfo(torch.float32).eps * truth.abs().max().item() if truth.numel() else 0.0


def assert_within_rule(name: str, got, truth, pt, factor: float) -> None:
    """max|got - truth| <= factor * max|pt - truth| + floor (see the module docstring)."""
    if truth.numel() == 0:
        return
    err = (got.double() - truth.double()).abs().max().item()
    err_pt = (pt.double() - truth.double()).abs().max().item()
    bound = factor * err_pt + rounding_floor(truth)
    assert err <= bound, (
        f"{name}: max error {err:.3e} > {factor} * pytorch error {err_pt:.3e} + floor = {bound:.3e}"
    )


def truth_and_pt(q, k, v, mask, kwargs):
    """(truth, pt) reference (out, lse) pairs, on CPU."""
    q, k, v, mask = q.cpu(), k.cpu(), v.cpu(), mask.to("cpu")
    kwargs = {key: (val.cpu() if isinstance(val, torch.Tensor) else val) for key, val in kwargs.items()}
    hi = torch.float64 if q.dtype == torch.float32 else torch.float32
    truth = reference_attention(q.to(hi), k.to(hi), v.to(hi), mask, return_lse=True, **kwargs)
    pt = reference_attention(q, k, v, mask, return_lse=True, **kwargs)
    return truth, pt


def check_attention(out, lse, q, k, v, mask, kwargs) -> None:
    """Assert the tolerance rule on out and lse, the empty-row pattern, dtypes and shapes."""
    (t_out, t_lse), (p_out, p_lse) = truth_and_pt(q, k, v, mask, kwargs)
    out, lse = out.cpu(), lse.cpu()
    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.shape == q.shape[:3] and lse.dtype == torch.float32
    assert not torch.isnan(out).any() and not torch.isnan(lse).any(), "NaN in output"
    empty = torch.isneginf(t_lse)
    assert torch.equal(torch.isneginf(lse), empty), "empty-row (-inf LSE) pattern differs"
    assert torch.isfinite(lse[~empty]).all()
    assert (out[empty] == 0).all(), "rows without keys must be 0"
    factor = 3.0 if kwargs.get("softcap") else 2.0
    assert_within_rule("out", out, t_out, p_out, factor)
    assert_within_rule("lse", lse[~empty], t_lse[~empty], p_lse[~empty], factor)


BASE = Case(tq=113, tk=203, hq=4, hkv=2, d=64, block_q=32, block_k=32)

# The shared grid: every kernel runs it (CPU path here, Triton on CUDA); ids name the shape.
GRID = [
    Case(tq=1, tk=77, hq=4, hkv=1, block_q=16, block_k=16),  # decode, MQA
    Case(tq=1, tk=77, hq=2, hkv=2, mask="causal", dtype="bfloat16"),
    Case(tq=63, tk=63, hq=2, hkv=2, d=128, mask="causal"),
    Case(tq=63, tk=100, hq=4, hkv=4, d=128, block_q=16, block_k=64, mask="empty_rows"),
    BASE,
    BASE.but(dtype="bfloat16"),
    BASE.but(dtype="float16", mask="full_rows"),
    BASE.but(mask_heads="q"),
    BASE.but(mask_heads="q", dtype="bfloat16", d=256, block_q=16),
    BASE.but(mask_heads="1", mask="single"),
    BASE.but(mask_batch=1, b=2, left_pad=(0, 29), hq=4, hkv=1),
    BASE.but(b=2, left_pad=(17, 0), mask="causal", dtype="bfloat16"),
    BASE.but(softcap=20.0, tk=130),
    BASE.but(softcap=50.0, dtype="bfloat16", hq=2, hkv=1),
    BASE.but(window=37, mask="causal", tk=250),
    BASE.but(window=37, dtype="bfloat16", block_q=16, block_k=64),
    BASE.but(window=50, mask_window=False),
    BASE.but(causal=False),
    BASE.but(transposed=True, mask="sink"),
    BASE.but(key_rule=True, mask="full_rows", b=2, left_pad=(0, 29), mask_heads="q"),
    BASE.but(key_rule=True, mask="causal", tq=1, dtype="bfloat16", block_q=16, block_k=16),
    BASE.but(block_q=64, block_k=16, d=256, hq=4, hkv=1, mask="sink"),
    Case(tq=1023, tk=1024, hq=2, hkv=1, d=64, block_q=64, block_k=64, mask="sink"),
    Case(tq=1023, tk=1024, hq=4, hkv=1, d=128, block_q=128, block_k=128, mask="causal", dtype="bfloat16"),
]

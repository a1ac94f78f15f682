"""The Triton launcher's logic without a GPU: tile pruning, the dtype branch, decode splits, offset
checks, and the kernel compiled ahead of time for Hopper (sm_90) with Triton's bundled ptxas.

The compile check runs the whole lowering a GPU would (TTIR -> TTGIR -> PTX -> cubin) on the bf16
tensor-core branch, which the interpreter cannot run, and reads what it produced: shared memory
against our pruning model and the chip's limit, wgmma (``warp_group_dot``) dots, and async copies in
the key loops (software pipelining). The JIT's specialization is mimicked: unit strides are
constants and the other integer arguments and pointers divisible by 16. Whether the code computes
the right numbers in bf16 is left to the ``cuda`` tests.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")


@pytest.fixture(scope="module")
def launch():
    from sparse_llm.kernels import triton_attention, triton_tuning

    return triton_attention, triton_tuning


def _pruned(tuning, elt: int, d: int, block: int, q_len: int):
    q = torch.empty(1, dtype={2: torch.bfloat16, 4: torch.float32}[elt])
    kwargs = dict(BLOCK_Q=block, BLOCK_K=block, BLOCK_D=d, UPCAST=elt == 4)
    return tuning.prune(tuning.candidates(), {"Q": q, "q_len": q_len, "kv_len": max(q_len, 32768)}, **kwargs)


@pytest.mark.parametrize("elt", [2, 4], ids=["bf16", "fp32"])
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("block, q_len", [(128, 32768), (64, 4096), (16, 1024), (128, 1)])
def test_pruned_configs_divide_blocks_and_fit_the_chip(launch, monkeypatch, elt, d, block, q_len):
    import triton

    _, tuning = launch
    monkeypatch.setattr(tuning, "INTERPRET", False)
    configs = _pruned(tuning, elt, d, block, q_len)
    assert 1 <= len(configs) <= tuning.MAX_TUNED
    for c in configs:
        m, n = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
        assert block % m == 0 and block % n == 0
        assert tuning.shared_bytes(m, n, d, elt, c.num_stages) <= tuning.SMEM_LIMIT
        assert m == 16 if q_len <= 16 else m >= min(64, block)
    m, n, warps, stages = tuning.seed(elt, d, block, block, q_len)
    seed = triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=warps, num_stages=stages)
    if tuning.fits(seed, block, block, d, elt, q_len):  # FlexAttention's default, clipped, is timed first
        first = configs[0]
        assert (first.kwargs, first.num_warps, first.num_stages) == (seed.kwargs, warps, stages)


def test_small_problems_time_nothing(launch, monkeypatch):
    _, tuning = launch
    monkeypatch.setattr(tuning, "INTERPRET", False)
    q = torch.empty(1, dtype=torch.bfloat16)
    kwargs = dict(BLOCK_Q=128, BLOCK_K=128, BLOCK_D=64, UPCAST=False)
    (config,) = tuning.prune(tuning.candidates(), {"Q": q, "q_len": 2048, "kv_len": 4096}, **kwargs)
    assert config.kwargs == {"BLOCK_M": 128, "BLOCK_N": 64}  # the seed (128, 128) spills: see fits


def test_interpreter_runs_one_16x16_config(launch, monkeypatch):
    _, tuning = launch
    monkeypatch.setattr(tuning, "INTERPRET", True)
    (config,) = _pruned(tuning, 2, 128, 128, 4096)
    assert (config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]) == (16, 16)


def test_dtype_branches(launch):
    kernel, _ = launch
    assert kernel.kernel_dtypes(torch.bfloat16, False) == (False, torch.bfloat16)
    assert kernel.kernel_dtypes(torch.float16, False) == (False, torch.float16)
    assert kernel.kernel_dtypes(torch.float32, False) == (True, torch.float32)
    assert kernel.kernel_dtypes(torch.bfloat16, True) == (True, torch.float32)


def test_decode_splits_only_small_grids(launch):
    kernel, _ = launch
    assert kernel.num_splits(1, 131072, 32) == 16  # 32 heads: 16 x 32 = 512 programs, 8K keys each
    assert kernel.num_splits(1, 131072, 1) == 64
    assert kernel.num_splits(1, 2048, 32) == 2
    assert kernel.num_splits(1, 500, 32) == 1
    assert kernel.num_splits(17, 131072, 32) == 1  # prefill: the query tiles fill the GPU


def test_in_tile_offsets_beyond_int32_raise(launch):
    kernel, _ = launch
    kernel.check_offsets(torch.empty(1, 131072, 32, 128, device="meta").transpose(1, 2))  # HF layout, 128K
    huge = torch.empty_strided((1, 1, 2, 64), (0, 0, 2**24, 1), device="meta")
    with pytest.raises(ValueError, match="beyond int32"):
        kernel.check_offsets(huge)


SM90_CASES = [
    pytest.param("bf16", 64, {}, id="bf16-d64"),
    pytest.param("bf16", 128, {}, id="bf16-d128"),
    pytest.param("bf16", 256, {}, id="bf16-d256"),
    pytest.param("bf16", 128, {"q_len": 1}, id="bf16-d128-decode"),
    pytest.param(
        "fp16",
        128,
        dict(
            EVEN_K=False,
            EVEN_D=False,
            HAS_WINDOW=True,
            HAS_SOFTCAP=True,
            HAS_BIAS=True,
            HAS_PAD=True,
            HAS_RULE=True,
        ),
        id="fp16-d128-every-switch",
    ),
]


def _compile_sm90(launch, dtype: str, d: int, flags: dict):
    """The first pruned config for a 32K prefill with 128-blocks, compiled for sm_90."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel, tuning = launch
    elt = 2 if dtype != "fp32" else 4
    q_len = flags.pop("q_len", 32768)
    config = _pruned(tuning, elt, d, 128, q_len)[0]
    fn = kernel._block_sparse_fwd.fn
    names = fn.arg_names
    constants = dict(BLOCK_Q=128, BLOCK_K=128, BLOCK_D=d, EVEN_K=True, EVEN_D=True, CAUSAL=True)
    constants.update(HAS_WINDOW=False, HAS_SOFTCAP=False, HAS_BIAS=False, HAS_PAD=False, HAS_RULE=False)
    constants.update(UPCAST=dtype == "fp32", **config.kwargs, **flags)
    constants.update({s: 1 for s in ("sqd", "skd", "svd", "sod", "s_kb_t")})  # unit strides
    pointers = dict.fromkeys(("Q", "K", "V", "Out"), f"*{dtype}")
    pointers.update(Lse="*fp32", KeyBias="*fp32", KPM="*u8")
    pointers.update(dict.fromkeys(("WS", "SinkEnd", "FullNum", "FullIdx", "PartNum", "PartIdx"), "*i32"))
    floats = {"qk_scale", "cap_in", "cap_out"}
    signature = {
        a: "constexpr" if a in constants else pointers.get(a, "fp32" if a in floats else "i32") for a in names
    }
    aligned = [
        a for a in names if signature[a].startswith("*") or (signature[a] == "i32" and a.startswith("s"))
    ]
    source = ASTSource(
        fn,
        signature,
        constexprs={(names.index(a),): v for a, v in constants.items()},
        attrs={(names.index(a),): [["tt.divisibility", 16]] for a in aligned},
    )
    options = dict(num_warps=config.num_warps, num_stages=config.num_stages)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
    return compiled, config, elt


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU runs the real kernel in the cuda tests")
@pytest.mark.parametrize("dtype, d, flags", SM90_CASES)
def test_kernel_compiles_for_sm90(launch, monkeypatch, dtype, d, flags):
    _, tuning = launch
    monkeypatch.setattr(tuning, "INTERPRET", False)
    decode = flags.get("q_len") == 1
    compiled, config, elt = _compile_sm90(launch, dtype, d, dict(flags))
    m, n = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]
    assert (
        compiled.metadata.shared <= tuning.shared_bytes(m, n, d, elt, config.num_stages) <= tuning.SMEM_LIMIT
    )
    ttgir = compiled.asm["ttgir"]
    if not decode:  # 16-row decode tiles are below wgmma's 64 rows: mma.sync
        assert ttgir.count("ttng.warp_group_dot ") >= 4, "QK^T and PV on wgmma in both key loops"
    assert ttgir.count("ttg.async_copy_global_to_local") >= 4, "K and V prefetched in both key loops"
    assert compiled.asm["cubin"]

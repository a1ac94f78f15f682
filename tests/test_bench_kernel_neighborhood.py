"""``sparse-llm bench kernel``'s neighborhood patterns and its expected speedup (partial blocks priced
apart from full ones). No timing is asserted: only the masks, the cost model and the report."""

from __future__ import annotations

import json

import pytest
import torch

from sparse_llm.bench.kernel import (
    NEIGHBORHOODS,
    expected_speedup,
    neighborhood_mask,
    partial_cost,
    random_mask,
)
from sparse_llm.cli import main
from sparse_llm.kernels import BlockMask
from sparse_llm.kernels.flex import to_flex_block_mask
from sparse_llm.kernels.reference import element_mask

ON_GRID = ("nbh_aligned", "nbh_blocked")


@pytest.mark.parametrize("pattern", list(NEIGHBORHOODS))
def test_neighborhood_patterns_hit_the_density_and_only_off_grid_ones_cut_blocks(pattern):
    mask, params = neighborhood_mask(pattern, 4096, 64, 0.25, "cpu")
    mask.validate()
    assert abs(mask.density() - 0.25) < 0.03, (pattern, mask.density(), params)
    diagonal = mask.num_q_blocks  # Tq = Tk: one causal-diagonal (partial) block per query block
    partial = int(mask.kv_num_blocks.sum())
    if pattern in ON_GRID:
        assert partial == diagonal and params["window"] % 64 == 0 and params["stride"] % 64 == 0
    else:
        assert partial > diagonal, f"{pattern} {params}: no block cut off the diagonal"
    if pattern in ("nbh_blocked", "nbh_halo"):
        assert params["stride"] == params["window"]


def test_partial_cost_inverts_the_block_cost_model():
    mask = random_mask(2048, 64, 0.3, "cpu")
    full, part = int(mask.full_kv_num_blocks.sum()), int(mask.kv_num_blocks.sum())
    c, x = 1e-4, 1.7
    assert partial_cost(mask, c * (full + x * part), c * x * (full + part)) == pytest.approx(x)


def test_expected_speedup_is_the_ideal_at_equal_costs_and_below_it_when_partial_blocks_cost_more():
    dense = BlockMask.causal(q_len=4096, kv_len=4096, block_q=64, block_k=64)
    aligned, _ = neighborhood_mask("nbh_aligned", 4096, 64, 0.25, "cpu")
    cut, _ = neighborhood_mask("nbh_strided", 4096, 64, 0.25, "cpu")
    for mask in (aligned, cut):
        assert expected_speedup(mask, dense, 1.0) == pytest.approx(1 / mask.density())
    # Partial blocks at 3x: the cut pattern (a larger partial share than dense) loses more.
    assert expected_speedup(cut, dense, 3.0) / (1 / cut.density()) < expected_speedup(aligned, dense, 3.0) / (
        1 / aligned.density()
    )
    assert expected_speedup(dense, dense, 3.0) == 1.0


def test_flex_mask_mod_applies_the_key_rule():
    mask, _ = neighborhood_mask("nbh_strided", 512, 32, 0.3, "cpu")
    flex = to_flex_block_mask(mask, num_q_heads=1)
    q_idx, kv_idx = torch.arange(512)[:, None], torch.arange(512)[None, :]
    ours = element_mask(mask, num_q_heads=1, num_kv_heads=1)[0, 0, 0]
    selected = element_mask(mask.as_partial(), num_q_heads=1, num_kv_heads=1, causal=False)[0, 0, 0]
    assert torch.equal(flex.mask_mod(0, 0, q_idx, kv_idx) & selected, ours)


def test_bench_kernel_reports_the_expected_speedup_for_neighborhood_patterns(tmp_path, capsys):
    out = tmp_path / "kernel.json"
    args = ["bench", "kernel", "--lengths", "512", "--densities", "0.4", "--heads", "2,1", "--head-dim", "32"]
    args += ["--block-size", "32", "--repeats", "1", "--quiet", "--out", str(out)]
    assert main([*args, "--patterns", "nbh_aligned,nbh_sliding,nbh_halo"]) == 0
    rows = json.loads(out.read_text())["results"]
    sparse = [r for r in rows if r["pattern"].startswith("nbh_")]
    assert [r["pattern"] for r in sparse] == ["nbh_aligned", "nbh_sliding", "nbh_halo"]
    for r in sparse:
        assert r["full_blocks"] + r["partial_blocks"] > 0 and r["partial_cost"] > 0
        assert r["expected"] > 0 and r["fraction_of_expected"] == pytest.approx(
            r["speedup_vs_dense"] / r["expected"]
        )
        assert r["params"]["window"] >= r["params"]["stride"] >= 1
    table = capsys.readouterr().out
    assert "| expected | % of expected |" in table and "| 512 | nbh_halo | ours |" in table

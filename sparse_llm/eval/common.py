"""What every evaluation shares: model and method options, the method loop, greedy generation.

A run compares methods side by side on one loaded model: ``"sdpa"`` is the unpatched Hugging Face
model, any other name a registered method applied with :func:`sparse_llm.sparse_attention` for the
duration of one sample (so a crash never leaves the model patched).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

import sparse_llm
from sparse_llm.measure import measure_peak, synchronize
from sparse_llm.models import load_any
from sparse_llm.names import DTYPES
from sparse_llm.patches.compat import cache_kwarg
from sparse_llm.results import config_hash

BASELINE = "sdpa"


def comma_list(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def json_object(text: str) -> dict:
    """The argparse type of every JSON option (``--method-params``, ``--grid``): a JSON object, else
    an error that quotes the value and says what is wrong with it."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not valid JSON ({err}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object {{...}}, got {text!r}")
    return value


@dataclass
class MethodSpec:
    """One compared method: a registered name (or ``"sdpa"``) and its parameters."""

    name: str
    params: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        if not self.params:
            return self.name
        return f"{self.name}[{','.join(f'{k}={v}' for k, v in sorted(self.params.items()))}]"


def method_specs(methods, method_params: dict | None = None) -> list[MethodSpec]:
    """Validated specs, in order, duplicates dropped; unknown methods or parameters raise ValueError."""
    method_params = dict(method_params or {})
    names = list(dict.fromkeys(methods))
    if not names:
        raise ValueError("no method given; use e.g. --methods sdpa,dense,dhsa")
    unknown = set(method_params) - set(names)
    if unknown:
        raise ValueError(f"method parameters given for methods not run: {sorted(unknown)}; methods: {names}")
    specs = []
    for name in names:
        params = dict(method_params.get(name, {}))
        if name == BASELINE:
            if params:
                raise ValueError("the sdpa baseline takes no parameters")
        else:
            sparse_llm.get_method(name, **params)  # unknown names and bad parameters fail here
        specs.append(MethodSpec(name, params))
    return specs


@contextlib.contextmanager
def applied(model, spec: MethodSpec) -> Iterator[None]:
    """The model with ``spec``'s attention for the duration of the block (``sdpa``: unchanged)."""
    if spec.name == BASELINE:
        yield
        return
    with sparse_llm.sparse_attention(model, spec.name, **spec.params):
        yield


@torch.inference_mode()
def greedy_generate(model, input_ids: torch.Tensor, max_new_tokens: int, eos_token_id=None) -> torch.Tensor:
    """Greedy continuation ids ``[B, <= max_new_tokens]`` of ``input_ids`` ``[B, T]``."""
    out = model.generate(
        input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=eos_token_id,
        pad_token_id=eos_token_id,
    )
    return out[:, input_ids.shape[1] :]


def add_common_arguments(parser: argparse.ArgumentParser, default_methods: str = "sdpa,dense") -> None:
    """``--model --device --dtype --methods --method-params --out --resume --quiet``."""
    parser.add_argument("--model", default="gemma3-270m", help="embedded model name or HF model path/name")
    parser.add_argument("--device", default="cpu", help="where the model runs: cpu, cuda, cuda:N")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="the model's dtype")
    parser.add_argument(
        "--methods",
        type=comma_list,
        default=comma_list(default_methods),
        help="comma-separated registered methods; 'sdpa' is the unpatched model",
    )
    parser.add_argument(
        "--method-params",
        type=json_object,
        default={},
        help='JSON per method, e.g. \'{"dhsa": {"budget": 1024}}\'',
    )
    parser.add_argument("--out", default=None, help="results folder (default: results/<task>-<config hash>)")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def load_model(args) -> tuple:
    """``(model, tokenizer)`` from the common arguments."""
    return load_any(args.model, device=args.device, dtype=DTYPES[args.dtype])


def default_out(task: str, config: dict) -> str:
    return f"results/{task}-{config_hash(config)}"


def show_progress(args) -> bool:
    return not getattr(args, "quiet", False) and sys.stderr.isatty()


@dataclass
class Generation:
    """One prompt's greedy answer: ``ids`` ``[1, <= max_new_tokens]`` int64, the seconds of the prefill
    alone, and the density of that prefill and of its far field (None when the model was not
    sparsified; see :func:`sparse_llm.attention_stats`)."""

    ids: torch.Tensor
    prefill_s: float
    density: float | None
    peak_mem_bytes: int | None = None  # with measure_memory: peak memory of the prefill above its start
    far_density: float | None = None


@torch.inference_mode()
def prefill_and_generate(
    model,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    *,
    sparse: bool,
    measure_memory: bool = False,
    prefill_chunk: int | None = None,
) -> Generation:
    """Timed prefill of ``input_ids`` ``[1, T]`` (KV cache, ``logits_to_keep=1``), then greedy decoding
    from that cache, so the prompt is processed once (as in :mod:`sparse_llm.demo`).

    ``sparse``: read the prefill's density from :func:`sparse_llm.attention_stats` (before decoding
    replaces its masks). The prefill is timed once (warming up is the caller's job): a measurement
    beside a score, not a benchmark (``sparse_llm.bench`` reports medians of repeated runs).
    ``measure_memory``: also sample the prefill's peak memory (:func:`sparse_llm.measure.measure_peak`).
    ``prefill_chunk``: tokens per forward through the cache (:func:`sparse_llm.prefill`); None: one.
    """
    synchronize(input_ids.device)
    start = time.perf_counter()
    peak = None

    def run():
        return sparse_llm.prefill(model, input_ids, prefill_chunk)

    if measure_memory:
        out, peak = measure_peak(run, input_ids.device)
    else:
        out = run()
    synchronize(input_ids.device)
    prefill_s = time.perf_counter() - start
    stats = sparse_llm.attention_stats(model)["prefill"] if sparse else {}
    density, far_density = stats.get("density"), stats.get("far_density")
    first = out.logits[:, -1:].argmax(-1)
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    if max_new_tokens == 1 or first.item() in eos:
        return Generation(first, prefill_s, density, peak, far_density)
    name = cache_kwarg(model)
    prompt = torch.cat([input_ids, first], dim=1)
    generated = model.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=max_new_tokens - 1,
        do_sample=False,
        **{name: getattr(out, name)},
    )
    return Generation(generated[:, input_ids.shape[1] :], prefill_s, density, peak, far_density)

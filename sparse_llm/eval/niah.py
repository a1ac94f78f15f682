"""``sparse-llm eval niah``: needle-in-a-haystack retrieval over a context length x depth grid.

The needle test of gkamradt/LLMTest_NeedleInAHaystack and RULER's single needle: a sentence holding
a value is hidden at a depth of a long filler text, and the model is asked for it. Each grid cell
(length, depth, method) is one sample: the prompt (exactly ``length`` tokens, see
:func:`sparse_llm.eval.haystack.build_needle_prompt`) is built once per (length, depth) and every
method answers it, with a timed prefill and greedy decoding from its KV cache.

Scores per cell: exact match (:func:`~sparse_llm.eval.haystack.score_answer`: the answer occurs as
a whole word) and :func:`rouge1_recall` of the answer in the reply. ``results.json`` holds accuracy
per method, overall and per length, and the grid; ``niah.png`` the classic heatmap
(:func:`sparse_llm.eval.plots.plot_niah`).

``protocol="ruler"`` runs RULER's niah_single instead (:mod:`sparse_llm.eval.ruler`): its template,
a seeded key and value per (length, depth), 128 answer tokens, and accuracy from its
``string_match_all`` (recorded beside exact match and ROUGE-1).
"""

from __future__ import annotations

import functools
import json
import logging
import re
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from sparse_llm.eval import ruler
from sparse_llm.eval.common import (
    BASELINE,
    DTYPES,
    add_common_arguments,
    applied,
    comma_list,
    default_out,
    method_specs,
    prefill_and_generate,
    show_progress,
)
from sparse_llm.eval.haystack import NEEDLES, Needle, NeedlePrompt, build_needle_prompt, score_answer
from sparse_llm.eval.plots import plot_niah
from sparse_llm.models import check_fits_context, load_any, max_positions
from sparse_llm.results import RESULTS_FILE, ResultsStore
from sparse_llm.texts import REPEAT_FILLER, load_haystack_text

logger = logging.getLogger(__name__)

HAYSTACKS = ("essays", "repeat")
PROTOCOLS = ("default", "ruler")
METRICS = {"default": "exact_match", "ruler": "string_match_all"}  # the score behind accuracy
DEFAULT_MAX_NEW_TOKENS = {"default": 16, "ruler": ruler.TOKENS_TO_GENERATE}
MIN_DEFAULT_LENGTH = 1024
DEFAULT_DEPTHS = tuple(i / 10 for i in range(11))


@dataclass
class NiahConfig:
    """A needle-in-a-haystack grid.

    Args:
        model: embedded model name (``sparse-llm models``) or Hugging Face path/name.
        device, dtype: where and in which precision the model runs (dtype: a key of ``DTYPES``).
        methods: registered methods to compare; ``"sdpa"`` is the unpatched model.
        method_params: per-method parameters, e.g. ``{"dhsa": {"budget": 1024}}``.
        lengths: prompt lengths in tokens. Default: powers of two from 1024 up to ``max_length``
            capped by the model's context (``max_position_embeddings - max_new_tokens``), with that
            cap added when it is not a power of two. Lengths above the context raise ``ValueError``.
        max_length: upper end of the default lengths.
        depths: needle depths, fractions of the haystack in [0, 1] (default 0, 0.1, ..., 1).
        needle: a preset of :data:`~sparse_llm.eval.haystack.NEEDLES` (``passkey``, ``city``); set
            ``needle_text``, ``question`` and ``answer`` (and optionally ``answer_prefix``, which
            starts the reply) for a custom needle, which is then named ``custom``.
        haystack: ``essays`` (Paul Graham essays), ``repeat`` (the passkey test's repeated filler)
            or the path of a UTF-8 text file (repeated if too short).
        max_new_tokens: greedy tokens generated per answer (default 16; 128 under ``ruler``).
        chat_template: wrap prompts in the tokenizer's chat template when it has one.
        prefill_chunk: tokens per forward of the prefill through the KV cache (chunked prefill,
            :func:`sparse_llm.prefill`); None: the whole prompt in one forward.
        protocol: ``default`` (the needle above, scored by exact match) or ``ruler``: RULER's
            niah_single (:mod:`sparse_llm.eval.ruler`; ``repeat`` = niah_single_1, ``essays`` =
            niah_single_2), its needle drawn per cell, scored by ``string_match_all``. It draws its
            own needle, so ``needle`` is then ``"ruler"`` and a custom needle is an error.
        seed: the seed of RULER's draws (default 42, RULER's); ``ruler`` only.
    """

    model: str = "gemma3-270m"
    device: str = "cpu"
    dtype: str = "float32"
    methods: tuple[str, ...] = ("sdpa", "dense", "streaming", "block_topk")
    method_params: dict[str, dict] = field(default_factory=dict)
    lengths: tuple[int, ...] | None = None
    max_length: int = 8192
    depths: tuple[float, ...] = DEFAULT_DEPTHS
    needle: str | None = None
    needle_text: str | None = None
    question: str | None = None
    answer: str | None = None
    answer_prefix: str = ""
    haystack: str = "essays"
    max_new_tokens: int | None = None
    chat_template: bool = True
    prefill_chunk: int | None = None
    protocol: str = "default"
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, got {self.protocol!r}")
        if self.max_new_tokens is None:
            self.max_new_tokens = DEFAULT_MAX_NEW_TOKENS[self.protocol]
        self.methods = tuple(self.methods)
        method_specs(self.methods, self.method_params)  # unknown methods/parameters fail here
        for name in ("max_length", "max_new_tokens", "prefill_chunk"):
            value = getattr(self, name)
            if name == "prefill_chunk" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.lengths is not None:
            bad = [n for n in self.lengths if isinstance(n, bool) or not isinstance(n, int) or n < 1]
            if bad or not self.lengths:
                raise ValueError(f"lengths must be positive ints (tokens), got {self.lengths!r}")
            self.lengths = tuple(sorted(set(self.lengths)))
        bad = [
            d
            for d in self.depths
            if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0 <= d <= 1
        ]
        if bad or not self.depths:
            raise ValueError(f"depths must be fractions in [0, 1] (e.g. 0.5 for 50%), got {self.depths!r}")
        self.depths = tuple(sorted({float(d) for d in self.depths}))
        if self.protocol == "ruler":
            self._check_ruler_needle()
        else:
            self._check_needle()
        if not isinstance(self.haystack, str) or not self.haystack.strip():
            raise ValueError(
                f"haystack must be one of {HAYSTACKS} or a text file path, got {self.haystack!r}"
            )

    def _check_ruler_needle(self) -> None:
        self.seed = ruler.SEED if self.seed is None else self.seed
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an int, got {self.seed!r}")
        custom = (self.needle_text, self.question, self.answer, self.answer_prefix or None)
        if self.needle not in (None, "ruler") or any(x is not None for x in custom):
            raise ValueError(
                "protocol 'ruler' draws its own needle (RULER's key and value per cell): "
                "give no needle, needle text, question, answer or answer prefix"
            )
        self.needle = "ruler"

    def _check_needle(self) -> None:
        if self.seed is not None:
            raise ValueError("seed draws RULER's needles: it needs protocol='ruler'")
        self.needle = "passkey" if self.needle is None else self.needle
        if any(x is not None for x in (self.needle_text, self.question, self.answer)):
            if None in (self.needle_text, self.question, self.answer):
                raise ValueError("a custom needle needs all of needle_text, question and answer")
            if self.needle not in ("passkey", "custom"):  # passkey: the default, not a choice
                raise ValueError(
                    f"give either the preset needle {self.needle!r} or a custom needle, not both"
                )
            self.needle = "custom"
        elif self.needle not in NEEDLES:
            hint = " (drawn by --protocol ruler)" if self.needle == "ruler" else ""
            raise ValueError(
                f"unknown needle {self.needle!r}{hint}; presets: {', '.join(NEEDLES)}, "
                "or a custom one with --needle-text/--question/--answer"
            )
        self.the_needle()  # a custom needle must contain its answer

    def the_needle(self, length: int | None = None, depth: float | None = None) -> Needle:
        """The needle of the cell (length, depth); under ``ruler`` each cell draws its own."""
        if self.protocol == "ruler":
            if length is None or depth is None:
                raise ValueError("RULER's needle is drawn per cell: give its length and depth")
            return ruler.draw_needle(self.seed, length, depth)
        if self.needle != "custom":
            return NEEDLES[self.needle]
        return Needle(self.needle_text, self.question, self.answer, self.answer_prefix)

    def haystack_text(self) -> str:
        """The filler text; a missing file raises ``FileNotFoundError``, an empty one ``ValueError``."""
        if self.haystack == "essays":
            return load_haystack_text()
        if self.haystack == "repeat":
            return REPEAT_FILLER
        if not Path(self.haystack).expanduser().is_file():
            raise FileNotFoundError(
                f"haystack file not found: {self.haystack} (use essays, repeat or a text file path)"
            )
        return load_haystack_text(self.haystack)

    def load(self) -> tuple[tuple[int, ...], torch.nn.Module, object]:
        """``(lengths, model, tokenizer)``: :meth:`grid_lengths` for the model's context, read from its
        config before the model loads (a length past it fails at once), then the model and tokenizer."""
        lengths = self.grid_lengths(max_positions(self.model))
        model, tokenizer = load_any(self.model, device=self.device, dtype=DTYPES[self.dtype])
        if tokenizer is None:
            raise ValueError(f"model {self.model!r} has no tokenizer; a needle test needs one")
        return lengths, model, tokenizer

    def build_prompt(self, tokenizer, text: str, length: int, depth: float) -> NeedlePrompt:
        """The prompt of the cell (length, depth) over the haystack ``text``, in this protocol."""
        return build_needle_prompt(
            tokenizer,
            context_tokens=length,
            depth=depth,
            needle=self.the_needle(length, depth),
            haystack=text,
            chat_template=self.chat_template,
            layout=ruler.layout(self.haystack) if self.protocol == "ruler" else None,
        )

    def grid_lengths(self, max_positions: int | None) -> tuple[int, ...]:
        """The lengths to run on a model with ``max_positions`` positions (None: no known limit)."""
        if self.lengths is not None:
            check_fits_context(self.lengths, max_positions, answer_tokens=self.max_new_tokens)
            return self.lengths
        limit = None if max_positions is None else max_positions - self.max_new_tokens
        top = self.max_length if limit is None else min(self.max_length, limit)
        if top < 1:
            raise ValueError(f"the model's context ({max_positions}) leaves no room for a prompt")
        out = []
        n = MIN_DEFAULT_LENGTH
        while n <= top:
            out.append(n)
            n *= 2
        return tuple(out) if out and out[-1] == top else (*out, top)


def run_fields(config: NiahConfig) -> dict:
    """The config's fields for a results folder; ``prefill_chunk`` only when set, ``protocol`` and
    ``seed`` only under ``ruler``, so that the folders (and config hashes) of other runs stay what
    they were before these options existed."""
    fields = asdict(config)
    if fields["prefill_chunk"] is None:
        del fields["prefill_chunk"]
    if fields["protocol"] == "default":
        del fields["protocol"], fields["seed"]
    return fields


def score_reply(reply: str, answer: str, protocol: str = "default") -> dict:
    """The scores of one reply: ``exact_match`` and ``rouge1_recall``, and under ``ruler`` its
    ``string_match_all`` (which is then the score behind accuracy, :data:`METRICS`)."""
    scores = {"exact_match": score_answer(reply, answer), "rouge1_recall": rouge1_recall(answer, reply)}
    if protocol == "ruler":
        scores["string_match_all"] = ruler.string_match_all(reply, [answer])
    return scores


def depth_key(depth: float) -> str:
    """``0.5`` -> ``"50"``, ``0.125`` -> ``"12.5"`` (the depth in percent, in sample ids and grids)."""
    return f"{round(depth * 100, 4):g}"


def sample_id(length: int, depth: float, method: str) -> str:
    return f"L{length}-d{depth_key(depth)}-{method}"


def rouge1_recall(reference: str, generated: str) -> float:
    """ROUGE-1 recall: the fraction of the reference's unigrams that the generated text contains.

    Both texts are lowercased and split into word tokens (``\\w+``: letters, digits, underscore);
    each reference unigram counts at most as often as it occurs in the generated text (clipped
    counts, as in Lin 2004 and ``rouge-score``, without stemming). For ``"71432"`` it is 1.0 when
    the reply holds that number as a word and 0.0 otherwise; for multi-word answers it gives partial
    credit. Raises ``ValueError`` if the reference has no word tokens.
    """
    ref = Counter(re.findall(r"\w+", reference.lower()))
    if not ref:
        raise ValueError(f"the reference {reference!r} has no word tokens")
    gen = Counter(re.findall(r"\w+", generated.lower()))
    return sum(min(count, gen[word]) for word, count in ref.items()) / sum(ref.values())


def _mean(values) -> float | None:
    values = [float(v) for v in values if v is not None]
    return sum(values) / len(values) if values else None


def summarize(records: list[dict], lengths, depths, specs, protocol: str = "default") -> dict:
    """Scores of the grid's records: per method, accuracy (the protocol's metric, :data:`METRICS`:
    exact match, or RULER's string_match_all) overall and per length, mean ROUGE-1 recall, mean
    density, mean prefill seconds per length, and the grid of that metric ``{length: {depth %:
    score}}`` (0 or 1 for one needle). Cells not run yet are left out (``cells`` counts those done)."""
    metric = METRICS[protocol]
    by_id = {r["id"]: r for r in records}
    methods = {}
    for spec in specs:
        cells = {(n, d): by_id.get(sample_id(n, d, spec.name)) for n in lengths for d in depths}
        done = [r for r in cells.values() if r is not None]
        per_length = {n: [r for (m, _), r in cells.items() if m == n and r is not None] for n in lengths}
        methods[spec.name] = {
            "label": spec.label,
            "params": spec.params,
            "cells": len(done),
            "accuracy": _mean(r[metric] for r in done),
            "accuracy_by_length": {str(n): _mean(r[metric] for r in rs) for n, rs in per_length.items()},
            "rouge1_recall": _mean(r["rouge1_recall"] for r in done),
            "density": _mean(r["density"] for r in done),
            "prefill_s_by_length": {
                str(n): _mean(r["prefill_s"] for r in rs) for n, rs in per_length.items()
            },
            "grid": {
                str(n): {depth_key(d): _cell(r[metric]) for (m, d), r in cells.items() if m == n and r}
                for n in lengths
            },
        }
    total = len(lengths) * len(depths) * len(specs)
    done = sum(m["cells"] for m in methods.values())
    return {"cells": done, "cells_total": total, "protocol": protocol, "metric": metric, "methods": methods}


def _cell(score) -> int | float:
    """A grid cell: 0/1 for a bool or a whole score, else the fraction."""
    return int(score) if isinstance(score, bool) or float(score).is_integer() else float(score)


def markdown_table(scores: dict) -> str:
    """Accuracy per method (rows) and length (columns), with the mean density, as a markdown table."""
    methods = scores["methods"]
    lengths = list(next(iter(methods.values()))["accuracy_by_length"]) if methods else []

    def fmt(x, digits=2):
        return "-" if x is None else f"{x:.{digits}f}"

    lines = [
        "| method | density | " + " | ".join(f"{n} tok" for n in lengths) + " | all |",
        "|---|---|" + "---|" * (len(lengths) + 1),
    ]
    for m in methods.values():
        cells = [fmt(m["accuracy_by_length"][n]) for n in lengths]
        lines.append(
            f"| {m['label']} | {fmt(m['density'], 3)} | " + " | ".join(cells) + f" | {fmt(m['accuracy'])} |"
        )
    return "\n".join(lines)


def _run_cell(model, tokenizer, p, length: int, depth: float, spec, config: NiahConfig) -> dict:
    """One grid cell: greedy answer to the needle prompt ``p`` under ``spec``, scored, as a record."""
    with applied(model, spec):
        gen = prefill_and_generate(
            model,
            p.input_ids.to(model.device),
            config.max_new_tokens,
            sparse=spec.name != BASELINE,
            prefill_chunk=config.prefill_chunk,
        )
    reply = tokenizer.decode(gen.ids[0], skip_special_tokens=True)
    return {
        "id": sample_id(length, depth, spec.name),
        "length": length,
        "depth": depth,
        "needle_depth": p.needle_depth,
        "needle_span": list(p.needle_span),
        "method": spec.name,
        "label": spec.label,
        "params": spec.params,
        "protocol": config.protocol,
        "needle": p.needle_text,
        "generated": reply,
        "answer": p.answer,
        **score_reply(reply, p.answer, config.protocol),
        "prefill_s": gen.prefill_s,
        "density": gen.density,
        "far_density": gen.far_density,
    }


def run_niah(
    config: NiahConfig, out: str | Path | None = None, resume: bool = False, progress: bool | None = None
) -> dict:
    """Run the grid of ``config``, writing a results folder and its heatmap.

    Args:
        config: the grid and model.
        out: results folder (default ``results/niah-<config hash>``); an existing one needs ``resume``.
        resume: continue an interrupted run in ``out``: cells already in its ``samples.jsonl`` are
            not run again (the configuration must be the same).
        progress: a progress bar over cells; default: when stderr is a terminal.

    Returns ``{"folder", "config", "scores", "plot"}`` (``scores`` as in ``results.json``).

    Every input is checked before the folder is created: unknown methods or parameters, a bad
    haystack (``FileNotFoundError`` / ``ValueError``), lengths beyond the model's context or too short
    for the needle and question (``ValueError``).
    """
    specs = method_specs(config.methods, config.method_params)
    text = config.haystack_text()
    lengths, model, tokenizer = config.load()
    depths = config.depths

    @functools.lru_cache(maxsize=1)  # the check below builds the first cell's prompt
    def prompt(length: int, depth: float):
        return config.build_prompt(tokenizer, text, length, depth)

    prompt(lengths[0], depths[0])  # the shortest length must hold intro, needle and question
    run_config = {"task": "niah", **run_fields(config), "lengths": list(lengths), "depths": list(depths)}
    store = ResultsStore(out or default_out("niah", run_config), run_config, resume=resume)

    total = len(lengths) * len(depths) * len(specs)
    done = total - len(store.pending(sample_id(n, d, s.name) for n in lengths for d in depths for s in specs))
    show = sys.stderr.isatty() if progress is None else progress
    warmed = False
    with tqdm(total=total, initial=done, desc="niah", unit="cell", disable=not show) as bar:
        for length in lengths:
            for depth in depths:
                pending = [s for s in specs if not store.done(sample_id(length, depth, s.name))]
                if not pending:
                    continue
                p = prompt(length, depth)
                input_ids = p.input_ids.to(model.device)
                if not warmed:  # untimed warm-up of threads and allocator
                    with torch.inference_mode():
                        model(input_ids[:, :32])
                    warmed = True
                for spec in pending:
                    bar.set_postfix_str(f"L={length} d={depth_key(depth)}% {spec.name}")
                    record = _run_cell(model, tokenizer, p, length, depth, spec, config)
                    store.add(record)
                    logger.debug(
                        "%s: %r (correct: %s)", record["id"], record["generated"], record["exact_match"]
                    )
                    bar.update()
    scores = summarize(store.records(), lengths, depths, specs, config.protocol)
    store.write_results(scores, device=config.device)
    png = plot_niah(store.folder)
    logger.info("niah: %d cells in %s, heatmap %s", total, store.folder, png)
    return {"folder": str(store.folder), "config": run_config, "scores": scores, "plot": str(png)}


def _lengths(text: str) -> tuple[int, ...]:
    """``"1k,4096"`` -> ``(1024, 4096)``."""
    out = []
    for part in comma_list(text.lower()):
        try:
            out.append(int(part[:-1]) * 1024 if part.endswith("k") else int(part))
        except ValueError:
            raise ValueError(f"bad length {part!r}: use integers or 'Nk'") from None
    return tuple(out)


def _depths(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in comma_list(text))
    except ValueError:
        raise ValueError(f"bad depths {text!r}: use fractions in [0, 1], e.g. 0.1,0.5,0.9") from None


def add_arguments(parser) -> None:
    add_common_arguments(parser, default_methods="sdpa,dense,streaming,block_topk")
    parser.add_argument(
        "--lengths", type=str, default=None, help="e.g. 1k,4k (default: powers of two from 1K)"
    )
    parser.add_argument("--max-length", type=int, default=8192, help="largest default length (tokens)")
    parser.add_argument(
        "--depths",
        type=str,
        default=None,
        help="needle depths as fractions, e.g. 0.1,0.5 (default 0..1 by 0.1)",
    )
    parser.add_argument("--needle", default=None, help=f"preset: {', '.join(NEEDLES)} (default passkey)")
    parser.add_argument(
        "--needle-text", default=None, help="custom needle sentence (with --question --answer)"
    )
    parser.add_argument("--question", default=None, help="the question that asks for a custom needle's value")
    parser.add_argument("--answer", default=None, help="the value the needle text holds")
    parser.add_argument("--answer-prefix", default="", help="text that starts the model's reply")
    parser.add_argument("--haystack", default="essays", help="essays, repeat, or a text file path")
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="greedy answer tokens (default 16; 128, RULER's, with --protocol ruler)",
    )
    parser.add_argument(
        "--prefill-chunk",
        type=int,
        default=None,
        help="prefill the prompt through the KV cache this many tokens at a time (default: at once)",
    )
    parser.add_argument(
        "--protocol",
        choices=PROTOCOLS,
        default="default",
        help="ruler: RULER's niah_single (its template, a seeded key and 7-digit value per cell, "
        "string_match_all score, 128 answer tokens; --haystack repeat = niah_single_1, essays = "
        "niah_single_2) instead of the needle above (default %(default)s)",
    )
    parser.add_argument(
        "--seed", type=int, default=None, help="seed of RULER's key and value draws (default 42, RULER's)"
    )
    parser.add_argument(
        "--no-chat-template",
        dest="chat_template",
        action="store_false",
        help="plain-text prompts: do not wrap them in the tokenizer's chat template (by default they are "
        "wrapped when the tokenizer has one)",
    )
    parser.add_argument("--plot-only", action="store_true", help="redraw niah.png of the --out folder")


def run_from_args(args) -> int:
    if args.plot_only:
        if not args.out:
            raise ValueError("--plot-only needs --out <results folder>")
        png = plot_niah(args.out)
        results = Path(args.out) / RESULTS_FILE
        if results.is_file():
            print(markdown_table(json.loads(results.read_text())["scores"]))
        print(f"heatmap: {png}")
        return 0
    config = config_from_args(args, methods=args.methods, method_params=args.method_params)
    result = run_niah(config, out=args.out, resume=args.resume, progress=show_progress(args))
    print(markdown_table(result["scores"]))
    print(f"results: {result['folder']}  heatmap: {result['plot']}")
    return 0


def config_from_args(args, **overrides) -> NiahConfig:
    """The NIAH grid of parsed ``eval niah`` / ``eval sweep`` flags (the flags both commands share)."""
    return NiahConfig(
        model=args.model,
        device=args.device,
        dtype=args.dtype,
        lengths=_lengths(args.lengths) if args.lengths else None,
        max_length=args.max_length,
        depths=_depths(args.depths) if args.depths else DEFAULT_DEPTHS,
        needle=args.needle,
        needle_text=args.needle_text,
        question=args.question,
        answer=args.answer,
        answer_prefix=args.answer_prefix,
        haystack=args.haystack,
        max_new_tokens=args.max_new_tokens,
        chat_template=args.chat_template,
        prefill_chunk=args.prefill_chunk,
        protocol=args.protocol,
        seed=args.seed,
        **overrides,
    )

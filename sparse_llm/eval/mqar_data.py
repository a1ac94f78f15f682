"""MQAR data (multi-query associative recall, Arora et al. 2023, "Zoology"), seeded and offline.

An MQAR sequence lists ``N`` key-value pairs, then queries every key again later; recall is scored
at each query. :func:`make_mqar` draws Zoology's ``multiquery_ar`` layout as token ids: the tiny
model's training batches and evaluation sets (:mod:`sparse_llm.eval.mqar_train`). For a pretrained
LM, :func:`build_llm_prompts` writes the same pairs as text, one prompt per query that ends in
``"<key>:"``, and :func:`first_number` reads the value back out of the model's answer. Equal
arguments give identical data. The runners, plot and CLI are in :mod:`sparse_llm.eval.mqar`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

# LLM prompts: the pairs as "key: value" lines, neutral filler up to T tokens, then "key:" to complete.
INTRO = "Remember the value of each key.\n"
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
EVAL_SEED = 1 << 62  # evaluation sets use seeds from here on; training batches stay below
_DISTINCT_CHUNK = 1 << 22  # elements of the random matrix drawn at once when sampling distinct tokens


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _distinct(gen: torch.Generator, rows: int, low: int, high: int, k: int) -> torch.Tensor:
    """``[rows, k]`` int64: per row ``k`` distinct tokens drawn uniformly from ``[low, high)``."""
    out = []
    step = max(1, _DISTINCT_CHUNK // (high - low))
    for start in range(0, rows, step):
        n = min(step, rows - start)
        # The top-k of i.i.d. uniforms is a uniformly random k-subset, in random order.
        out.append(torch.rand(n, high - low, generator=gen).topk(k, dim=1).indices + low)
    return torch.cat(out)


def gap_probabilities(space: int, power_a: float = 0.01) -> torch.Tensor:
    """Zoology's query-gap law: ``p(g) ~ (g + 1) ** (power_a - 1)`` for ``g < space``, float64 ``[space]``."""
    p = power_a * torch.arange(1, space + 1, dtype=torch.float64) ** (power_a - 1)
    return p / p.sum()


def make_mqar(
    num_examples: int,
    seq_len: int,
    num_pairs: int,
    vocab_size: int = 8192,
    power_a: float = 0.01,
    seed: int = 0,
    noise: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multi-query associative recall examples in the layout of Zoology's ``multiquery_ar``.

    Each example (``T = seq_len``, ``N = num_pairs``, ``V = vocab_size``):

    * positions ``0 .. 2N-1``: ``k1 v1 k2 v2 ... kN vN``, ``N`` distinct keys from ``[1, V // 2)``
      and ``N`` distinct values from ``[V // 2, V)``;
    * each key is queried once, at position ``2N + 2g``: ``N`` distinct gaps ``g`` drawn without
      replacement from ``0 .. (T - 2N) // 2 - 1`` with probability ``~ (g + 1) ** (power_a - 1)``
      (:func:`gap_probabilities`; 0.01 strongly favours queries soon after the pairs, 1.0 is uniform);
      key ``i`` goes to the ``i``-th gap drawn;
    * every other position is a noise token uniform over ``[0, V)`` (``noise=True``, Zoology's
      ``random_non_queries``; noise may repeat a key) or 0.

    Returns ``(inputs, labels)``, both int64 ``[num_examples, T]``. ``labels`` is aligned with the
    model's outputs (already shifted, as in Zoology): at a query position it holds the token that must
    come next, the queried key's value; -100 elsewhere. Equal arguments give identical tensors.

    Raises ``ValueError`` when a count is not a positive int, ``T < 4N`` (the queries need ``N``
    distinct slots after the pairs), the key range ``[1, V // 2)`` holds fewer than ``N`` tokens, or
    ``power_a <= 0``.
    """
    _check_int("num_examples", num_examples, 1)
    _check_int("seq_len", seq_len, 1)
    _check_int("num_pairs", num_pairs, 1)
    _check_int("vocab_size", vocab_size, 2)
    _check_int("seed", seed, 0)
    if isinstance(power_a, bool) or not isinstance(power_a, (int, float)) or not 0 < power_a < math.inf:
        raise ValueError(f"power_a must be a positive number, got {power_a!r}")
    if 4 * num_pairs > seq_len:
        raise ValueError(
            f"(T={seq_len}, N={num_pairs}) does not fit: the pairs take 2N tokens and the N queries need "
            f"N distinct even slots after them, so T >= 4N = {4 * num_pairs}"
        )
    half = vocab_size // 2
    if half - 1 < num_pairs:
        raise ValueError(
            f"vocab_size={vocab_size} has {max(half - 1, 0)} key tokens [1, {half}), fewer than "
            f"num_pairs={num_pairs}; use vocab_size >= {2 * num_pairs + 2}"
        )
    gen = torch.Generator().manual_seed(seed)
    keys = _distinct(gen, num_examples, 1, half, num_pairs)
    values = _distinct(gen, num_examples, half, vocab_size, num_pairs)
    context = 2 * num_pairs
    space = (seq_len - context) // 2
    probs = gap_probabilities(space, power_a).expand(num_examples, space)
    positions = context + 2 * torch.multinomial(probs, num_pairs, replacement=False, generator=gen)

    inputs = torch.zeros(num_examples, seq_len, dtype=torch.long)
    labels = torch.full((num_examples, seq_len), -100, dtype=torch.long)
    inputs[:, 0:context:2] = keys
    inputs[:, 1:context:2] = values
    inputs.scatter_(1, positions, keys)
    labels.scatter_(1, positions, values)
    if noise:
        free = torch.ones(num_examples, seq_len, dtype=torch.bool)
        free[:, :context] = False
        free.scatter_(1, positions, False)
        inputs = torch.where(free, torch.randint(vocab_size, (num_examples, seq_len), generator=gen), inputs)
    return inputs, labels


@dataclass(frozen=True)
class LLMPrompt:
    """One query as a text prompt: ``input_ids`` ``[1, T]`` int64 ending in ``"<key>:"``."""

    input_ids: torch.Tensor
    key: int
    value: int
    example: int
    query: int


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def build_llm_prompts(
    tokenizer, seq_len: int, num_pairs: int, num_examples: int, vocab_size: int = 8192, seed: int = 0
) -> list[LLMPrompt]:
    """MQAR as text: ``num_examples * num_pairs`` prompts of exactly ``seq_len`` tokens.

    Pairs come from :func:`make_mqar` (keys ``[1, V/2)``, values ``[V/2, V)``, written as decimal
    numbers). A prompt is ``[BOS] INTRO``, the pairs as ``"key: value"`` lines, repeated neutral filler
    (the passkey test's) up to ``seq_len`` tokens, then ``"\\n<key>:"``; the model completes the value.
    One prompt per query, each key once, in the order of Zoology's query positions. Unlike Zoology's
    power-law gaps, every query sits at the end of a ``T``-token prompt, so ``T`` is the length that
    sparse attention sees and the distance to the pair grows with ``T``; the answer format repeats the
    pair lines, which gives a base model a fair chance (it only has to copy).

    Raises ``ValueError`` if intro, pairs and query take more than ``seq_len`` tokens.
    """
    inputs, labels = make_mqar(num_examples, 4 * num_pairs, num_pairs, vocab_size, seed=seed, noise=False)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    head = bos + _ids(tokenizer, INTRO)
    filler = _ids(tokenizer, FILLER)
    prompts = []
    for e in range(num_examples):
        keys, values = inputs[e, 0 : 2 * num_pairs : 2].tolist(), inputs[e, 1 : 2 * num_pairs : 2].tolist()
        pairs = [t for k, v in zip(keys, values, strict=True) for t in _ids(tokenizer, f"{k}: {v}\n")]
        order = [inputs[e, p].item() for p in (labels[e] != -100).nonzero().flatten().tolist()]
        for j, key in enumerate(order):
            query = _ids(tokenizer, f"\n{key}:")
            room = seq_len - len(head) - len(pairs) - len(query)
            if room < 0:
                raise ValueError(
                    f"(T={seq_len}, N={num_pairs}) does not fit this tokenizer: intro, {num_pairs} pair "
                    f"lines and the query take {seq_len - room} tokens; raise T or lower N"
                )
            fill = (filler * (room // len(filler) + 1))[:room]
            ids = torch.tensor([head + pairs + fill + query], dtype=torch.long)
            prompts.append(LLMPrompt(ids, key, values[keys.index(key)], e, j))
    return prompts


def first_number(text: str) -> str | None:
    """The first run of digits in ``text`` (the model's answer), or None."""
    found = re.search(r"\d+", text)
    return found.group(0) if found else None

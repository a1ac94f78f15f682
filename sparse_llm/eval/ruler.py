"""RULER's single-needle protocol: niah_single_1 (repeat haystack) and niah_single_2 (essays).

Hsieh et al. 2024, "RULER: What's the Real Context Size of Your Long-Context Language Models?";
the strings and draws follow NVIDIA/RULER ``scripts/data/synthetic/niah.py`` and ``constants.py``,
which lm-eval's ``tasks/ruler`` (``niah_utils.py``, ``prepare_niah.py``, ``common_utils.py``)
reproduces. One needle, one value, one query, so RULER's template is in its singular form (it turns
"Some special magic numbers are hidden" into "A special magic number is hidden"), while the needle
keeps the plural ("One of the special magic numbers for ...").

- Key: ``adjective-noun`` drawn uniformly from wonderwords' lists (:func:`~sparse_llm.texts.ruler_key_words`);
  value: a uniform 7-digit number (``randint(10**6, 10**7 - 1)``), key drawn first as in RULER. Each
  (seed, length, depth) cell has its own seeded draw, the same in ``eval niah`` and ``eval sweep``.
- Haystack: ``repeat`` (RULER's "noise"/"repeat") is the filler repeated one copy per line, the
  needle on a line of its own; ``essays`` (or a text file) is sentences joined by spaces.
- Prompt: intro, newline, haystack, newline, question; the answer prefix follows after a space
  (plain text) or starts the assistant turn (chat template).
- Score: :func:`string_match_all`, the fraction of the reference values found in the reply as
  substrings, case-insensitive, after RULER's clean-up of control characters.
- RULER generates 128 tokens (``tokens_to_generate``), greedy.
"""

from __future__ import annotations

import random
import re

from sparse_llm.eval.haystack import Needle, PromptLayout
from sparse_llm.texts import ruler_key_words

SEED = 42  # RULER's RANDOM_SEED
TOKENS_TO_GENERATE = 128
INTRO = (
    "A special magic number is hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the number afterwards."
)
NEEDLE = "One of the special magic numbers for {key} is: {value}."
QUESTION = "What is the special magic number for {key} mentioned in the provided text?"
ANSWER_PREFIX = "The special magic number for {key} mentioned in the provided text is"
TASKS = {"repeat": "niah_single_1", "essays": "niah_single_2"}  # our haystack name -> RULER's task


def layout(haystack: str) -> PromptLayout:
    """RULER's layout for ``haystack`` (``repeat``: one filler copy per line; else sentences)."""
    if haystack == "repeat":
        return PromptLayout(INTRO, "\n", "\n", " ", joiner="\n", split=False)
    return PromptLayout(INTRO, "\n", "\n", " ", joiner=" ", split=True)


def draw_needle(seed: int, length: int, depth: float) -> Needle:
    """The needle of the cell (``length`` tokens, ``depth``): a seeded key and 7-digit value."""
    rng = random.Random(f"ruler-niah-single/{seed}/{length}/{float(depth)!r}")
    adjectives, nouns = ruler_key_words()
    key = f"{rng.choice(adjectives)}-{rng.choice(nouns)}"
    value = str(rng.randint(10**6, 10**7 - 1))
    return Needle(
        text=NEEDLE.format(key=key, value=value),
        question=QUESTION.format(key=key),
        answer=value,
        answer_prefix=ANSWER_PREFIX.format(key=key),
    )


def string_match_all(reply: str, references: list[str]) -> float:
    """RULER's score of one reply: the fraction of ``references`` that occur in it (substrings,
    case-insensitive), after its clean-up (strip, control characters to newlines, strip).

    ``"... is 4619832."`` scores 1.0 for ``["4619832"]``, and so does ``"46198321"``; a reply with
    one of two values scores 0.5. Raises ``ValueError`` for no references.
    """
    if not references:
        raise ValueError("string_match_all needs at least one reference")
    reply = re.sub(r"[\x00-\x1f]", "\n", reply.strip()).strip().lower()
    return sum(r.lower() in reply for r in references) / len(references)

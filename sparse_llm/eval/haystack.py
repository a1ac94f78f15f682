"""Needle-in-a-haystack prompts over the offline texts of :mod:`sparse_llm.texts`.

A prompt is assembled from token ids, not from text that is tokenized again, so its length is exactly
``context_tokens``: ``[intro] [haystack sentences, with the needle sentence inserted at a sentence
boundary] [question] [answer prefix]``, wrapped in the tokenizer's chat template when it has one.
Every sentence is tokenized on its own with its leading space, the way it appears in running text.
A :class:`PromptLayout` sets the intro and the separators (:mod:`sparse_llm.eval.ruler` has RULER's).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import torch

from sparse_llm.texts import load_haystack_text

logger = logging.getLogger(__name__)

_PLACEHOLDER = "@@SPARSE_LLM_HAYSTACK@@"
# Wording of the passkey-retrieval task (Mohtashami & Jaggi 2023, "Landmark Attention"), paraphrased.
INTRO = (
    "There is an important piece of information hidden inside a lot of irrelevant text. "
    "Find it and memorize it. I will ask you about it."
)


@dataclass(frozen=True)
class Needle:
    """A sentence hidden in the haystack and the question that retrieves it.

    ``answer_prefix`` starts the model's reply (after the chat template's assistant header, if any),
    so that a base model answers in place instead of continuing the essay; it may be empty.
    """

    text: str
    question: str
    answer: str
    answer_prefix: str = ""

    def __post_init__(self) -> None:
        for field in ("text", "question", "answer"):
            value = getattr(self, field)
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"Needle.{field} must be a non-empty string, got {value!r}")
        if self.answer not in self.text:
            raise ValueError(f"Needle.answer {self.answer!r} does not occur in Needle.text {self.text!r}")


NEEDLES: dict[str, Needle] = {
    # Passkey retrieval (Landmark Attention): the value is stated twice, which a 270M model can find.
    "passkey": Needle(
        text="The pass key is 71432. Remember it. 71432 is the pass key.",
        question="What is the pass key?",
        answer="71432",
        answer_prefix="The pass key is",
    ),
    # RULER's single-needle form: a keyed 7-digit number, stated once.
    "city": Needle(
        text="The special magic number for Chicago is 4619832.",
        question="What is the special magic number for Chicago?",
        answer="4619832",
        answer_prefix="The special magic number for Chicago is",
    ),
}


@dataclass(frozen=True)
class PromptLayout:
    """The text around and between the haystack's pieces.

    The user turn reads ``intro + before + haystack + after + question``; without a chat template,
    ``answer_sep + answer_prefix`` follows the question (with one, the answer prefix starts the
    assistant turn). ``split``: cut the haystack text into sentences; False: the whole text is one
    piece, repeated (RULER's repeat haystack, one copy per line). Pieces, the needle included, are
    joined by ``joiner``.
    """

    intro: str = INTRO
    before: str = "\n\n"
    after: str = "\n\n"
    answer_sep: str = "\n"
    joiner: str = " "
    split: bool = True


@dataclass
class NeedlePrompt:
    """A tokenized needle-in-a-haystack prompt.

    Attributes:
        input_ids: ``[1, T]`` int64 token ids, ``T == context_tokens``.
        answer: the value a correct reply contains (see :func:`score_answer`).
        depth: the requested needle depth in [0, 1] (0 = start of the haystack, 1 = its end).
        context_tokens: ``T``, the total prompt length in tokens (template, question and needle included).
        needle_span: ``(start, end)`` token positions of the needle sentence in ``input_ids``.
        needle_depth: the depth actually used: haystack tokens before the needle / all haystack tokens.
        needle_text: the needle sentence.
    """

    input_ids: torch.Tensor
    answer: str
    depth: float
    context_tokens: int
    needle_span: tuple[int, int]
    needle_depth: float
    needle_text: str = ""


def split_sentences(text: str) -> list[str]:
    """Whitespace-normalized sentences of ``text`` (a split after ``.``, ``!`` or ``?`` and a space)."""
    text = re.sub(r"\s+", " ", text).strip()
    # The essays lost the newlines between paragraphs ("...mistakes.If you had..."): restore the space.
    text = re.sub(r"(?<=[a-z][.!?])(?=[A-Z][a-z])", " ", text)
    text = re.sub(r"(?<=\b[12]\d\d\d)(?=[A-Z])", " ", text)  # and after the date heading each essay
    return [s for s in re.split(r"(?<=[.!?])\s+|(?<=[.!?][\"')\]])\s+", text) if s]


def encode(tokenizer, text: str, *, specials: bool) -> list[int]:
    """Token ids of ``text``; with ``specials``, a leading BOS but no trailing EOS/SEP."""
    ids = list(tokenizer(text, add_special_tokens=specials)["input_ids"])
    if specials:  # keep a leading BOS, but not an EOS/SEP that some post-processors append
        special = set(tokenizer.all_special_ids) - {tokenizer.bos_token_id}
        while ids and ids[-1] in special:
            ids.pop()
    return ids


def _frame(
    tokenizer, needle: Needle, chat_template: bool, layout: PromptLayout
) -> tuple[list[int], list[int]]:
    """Token ids before and after the haystack: intro, then question and answer prefix."""
    if chat_template and getattr(tokenizer, "chat_template", None):
        content = f"{layout.intro}{layout.before}{_PLACEHOLDER}{layout.after}{needle.question}"
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
        if text.count(_PLACEHOLDER) != 1:
            raise ValueError("the tokenizer's chat template does not keep the user message verbatim")
        before, after = text.split(_PLACEHOLDER)
        # The rendered template carries its own special tokens (BOS included), as in apply_chat_template.
        return encode(tokenizer, before, specials=False), encode(
            tokenizer, after + needle.answer_prefix, specials=False
        )
    if chat_template:
        logger.debug("tokenizer has no chat template: building a plain-text prompt")
    # The passkey test's own layout: question, then the reply begins on the next line. For
    # gemma3-270m it beat "Question: ...\nAnswer: ..." lines on the repeated filler at 4K tokens
    # (7 vs 5 of 7 depths), though not on essays at 1K tokens (5 vs 8 of 11).
    after = f"{layout.after}{needle.question}"
    after = f"{after}{layout.answer_sep}{needle.answer_prefix}" if needle.answer_prefix else after
    before = f"{layout.intro}{layout.before}"
    return encode(tokenizer, before, specials=True), encode(tokenizer, after, specials=False)


def _haystack_sentences(
    tokenizer, sentences: list[str], min_tokens: int, joiner: str = " "
) -> list[list[int]]:
    """Token ids of the first sentences (each after ``joiner``) totalling ``>= min_tokens``.

    The sentences are cycled through if the text is too short.
    """
    out: list[list[int]] = []
    total, step = 0, 64
    while total < min_tokens:
        chunk = [sentences[j % len(sentences)] for j in range(len(out), len(out) + step)]
        for ids in tokenizer([joiner + s for s in chunk], add_special_tokens=False)["input_ids"]:
            if len(out) == len(sentences):
                logger.debug("haystack text is shorter than %d tokens: repeating it", min_tokens)
            out.append(list(ids))
            total += len(ids)
            if total >= min_tokens:
                break
        step = min(2 * step, 4096)
    return out


def _checked_needle(context_tokens: object, depth: object, needle: str | Needle) -> Needle:
    """The :class:`Needle` that ``needle`` names, after checking the prompt's length and depth."""
    if isinstance(context_tokens, bool) or not isinstance(context_tokens, int) or context_tokens <= 0:
        raise ValueError(f"context_tokens must be a positive int, got {context_tokens!r}")
    if isinstance(depth, bool) or not isinstance(depth, (int, float)) or not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be a number in [0, 1], got {depth!r}")
    if isinstance(needle, str):
        if needle not in NEEDLES:
            raise ValueError(f"unknown needle {needle!r}; presets: {', '.join(NEEDLES)} (or pass a Needle)")
        return NEEDLES[needle]
    return needle


def build_needle_prompt(
    tokenizer,
    *,
    context_tokens: int,
    depth: float,
    needle: str | Needle = "passkey",
    haystack: str | None = None,
    chat_template: bool = True,
    layout: PromptLayout | None = None,
) -> NeedlePrompt:
    """Build a needle-in-a-haystack prompt of exactly ``context_tokens`` tokens.

    Args:
        tokenizer: a Hugging Face tokenizer.
        context_tokens: total prompt length ``T`` in tokens, including intro, needle, question, answer
            prefix and chat template; the haystack is truncated (mid-sentence at its end) to fit.
        depth: where the needle goes, as a fraction of the haystack tokens in [0, 1]; it is placed at
            the sentence boundary nearest to that point (so within one sentence of it).
        needle: a key of :data:`NEEDLES` or a :class:`Needle`.
        haystack: the filler text, e.g. :data:`sparse_llm.texts.REPEAT_FILLER`; default
            :func:`~sparse_llm.texts.load_haystack_text`. It is repeated if too short.
        chat_template: wrap the prompt in the tokenizer's chat template when it has one.
        layout: intro and separators (default ``PromptLayout()``: :data:`INTRO`, blank lines around
            the haystack, sentences joined by spaces).

    Raises ``ValueError`` for a bad depth or length (e.g. too short to hold the needle and question)
    or an unknown needle name.
    """
    needle = _checked_needle(context_tokens, depth, needle)
    layout = PromptLayout() if layout is None else layout
    text = load_haystack_text() if haystack is None else haystack
    sentences = split_sentences(text) if layout.split else [text.strip()] if text.strip() else []
    if not sentences:
        raise ValueError("haystack text is empty")

    before, after = _frame(tokenizer, needle, chat_template, layout)
    needle_ids = encode(tokenizer, layout.joiner + needle.text, specials=False)
    budget = context_tokens - len(before) - len(after) - len(needle_ids)
    if budget < 1:
        raise ValueError(
            f"context_tokens={context_tokens} is too short: intro, needle and question alone take "
            f"{context_tokens - budget} tokens"
        )

    # A small margin covers the first sentence losing its leading joiner below.
    pieces = _haystack_sentences(tokenizer, sentences, budget + 8, layout.joiner)
    starts = [0]
    for ids in pieces[:-1]:
        starts.append(starts[-1] + len(ids))
    boundaries = [s for s in starts if s <= budget]
    k = min(range(len(boundaries)), key=lambda j: (abs(boundaries[j] - depth * budget), j))
    # The first sentence of the context follows the intro's separator: it has no leading joiner.
    if k == 0:
        needle_ids = encode(tokenizer, needle.text, specials=False)
    else:
        pieces[0] = encode(tokenizer, sentences[0], specials=False)
    hay_before = [t for ids in pieces[:k] for t in ids]
    hay_after = [t for ids in pieces[k:] for t in ids]
    room = context_tokens - len(before) - len(after) - len(needle_ids) - len(hay_before)
    hay_after = hay_after[: max(room, 0)]
    ids = before + hay_before + needle_ids + hay_after + after
    if len(ids) != context_tokens:  # only if the margin could not cover a retokenized first sentence
        raise RuntimeError(f"internal error: built {len(ids)} tokens instead of {context_tokens}")
    start = len(before) + len(hay_before)
    hay_total = len(hay_before) + len(hay_after)
    return NeedlePrompt(
        input_ids=torch.tensor([ids], dtype=torch.long),
        answer=needle.answer,
        depth=float(depth),
        context_tokens=context_tokens,
        needle_span=(start, start + len(needle_ids)),
        needle_depth=len(hay_before) / hay_total if hay_total else 0.0,
        needle_text=needle.text,
    )


def score_answer(generated: str, answer: str) -> bool:
    """True if ``answer`` occurs in ``generated`` as a whole word (case-insensitive).

    "The pass key is 71432." matches "71432"; "714320" and "171432" do not.
    """
    if not isinstance(generated, str) or not isinstance(answer, str):
        raise TypeError(
            f"score_answer takes two strings, got {type(generated).__name__}, {type(answer).__name__}"
        )
    if not answer.strip():
        raise ValueError("answer must be a non-empty string")
    pattern = rf"(?<!\w){re.escape(answer.strip())}(?!\w)"
    return re.search(pattern, generated, flags=re.IGNORECASE) is not None

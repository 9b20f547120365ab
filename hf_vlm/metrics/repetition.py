"""Repetition score: how much of a generated report repeats itself.

Why: a small language model that has not learned to stop falls into loops such as
"左肺上叶左肺上叶左肺上叶…". Such outputs can still collect decent BLEU-1 and ROUGE-L (they
contain the right characters), so the loop has to be measured on its own and surfaced as a
warning. The score is seq-rep-n (Welleck et al., 2020, "Neural text generation with
unlikelihood training"): the share of n-grams in a report that are repeats of an n-gram
seen earlier in the same report, ``1 - unique_ngrams / total_ngrams``.

With character tokens and n=4, a normal Chinese CT report scores roughly 0-0.2 (some phrases
such as "肺上叶见" legitimately recur); a loop scores close to 1. Reports shorter than n
tokens score 0.
"""

from __future__ import annotations

from collections.abc import Sequence

from .tokenize import tokenize

DEFAULT_N = 4
DEFAULT_THRESHOLD = 0.5  # seq-rep-4 at or above this is reported as a likely loop


def repetition_score(tokens: Sequence[str], n: int = DEFAULT_N) -> float:
    """seq-rep-n of one token list: share of its n-grams that already occurred earlier."""
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def text_repetition(text: str, n: int = DEFAULT_N, granularity: str = "char") -> float:
    """seq-rep-n of a raw report, tokenised with the metric tokenizer."""
    return repetition_score(tokenize(text, granularity), n)


def corpus_repetition(
    texts: Sequence[str],
    n: int = DEFAULT_N,
    granularity: str = "char",
    threshold: float = DEFAULT_THRESHOLD,
) -> dict:
    """Mean and max seq-rep-n over reports, and which reports look like loops.

    Returns ``{"repetition": mean, "repetition_max": max, "repetition_flagged": count,
    "repetition_flagged_indices": [...]}``; indices refer to positions in ``texts``.
    """
    scores = [text_repetition(t, n, granularity) for t in texts]
    flagged = [i for i, s in enumerate(scores) if s >= threshold]
    return {
        "repetition": sum(scores) / len(scores) if scores else 0.0,
        "repetition_max": max(scores) if scores else 0.0,
        "repetition_flagged": len(flagged),
        "repetition_flagged_indices": flagged,
    }

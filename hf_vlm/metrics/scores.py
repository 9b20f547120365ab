"""Corpus BLEU-1..4, ROUGE-L and CIDEr-D on pre-tokenised reports.

Why own implementations: the captioning / report-generation literature quotes the numbers
of the COCO caption toolkit (pycocoevalcap), whose formulas differ from sacrebleu's in small,
documented ways (tiny smoothing constants, ROUGE-L with beta=1.2, CIDEr-D's IDF taken from the
evaluated references). pycocoevalcap itself needs Java for its tokenizer and METEOR/SPICE and
is unmaintained, so the formulas are re-implemented here and tests/test_metrics.py checks them
against pycocoevalcap and sacrebleu to 1e-6.

All functions take token lists (see hf_vlm.metrics.tokenize), never raw strings:
``hypotheses[i]`` is a list of tokens, ``references[i]`` a list of one or more token lists.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Sequence

Tokens = Sequence[str]

# pycocoevalcap's BLEU constants: keep a zero-match order at ~0 without dividing by zero.
_TINY = 1e-15
_SMALL = 1e-9


def ngram_counts(tokens: Tokens, max_n: int = 4) -> Counter:
    """Counts of all 1..max_n-grams (tuples) of one token list."""
    counts: Counter = Counter()
    for n in range(1, max_n + 1):
        for i in range(len(tokens) - n + 1):
            counts[tuple(tokens[i : i + n])] += 1
    return counts


def _check_pairs(hypotheses: Sequence[Tokens], references: Sequence[Sequence[Tokens]]) -> None:
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference sets")
    for i, refs in enumerate(references):
        if len(refs) == 0:
            raise ValueError(f"report {i} has no reference")


def corpus_bleu(hypotheses: Sequence[Tokens], references: Sequence[Sequence[Tokens]], max_n: int = 4) -> list[float]:
    """Corpus BLEU-1..max_n exactly as pycocoevalcap's ``Bleu`` (option "closest").

    n-gram matches are clipped by the maximum count over the references of each report and
    summed over the corpus; the effective reference length of a report is the reference
    length closest to the hypothesis length (ties: the shorter); one brevity penalty
    ``exp(1 - r/c)`` is applied to the corpus when c < r. BLEU-k is the geometric mean of the
    1..k precisions, each ``(matches + 1e-15) / (guesses + 1e-9)`` (pycocoevalcap's constants,
    not a real smoothing: an order with no match drives BLEU-k to ~0).
    """
    _check_pairs(hypotheses, references)
    correct = [0] * max_n
    guess = [0] * max_n
    test_len = ref_len = 0
    for hyp, refs in zip(hypotheses, references):
        max_ref: dict[tuple, int] = {}
        for ref in refs:
            for gram, count in ngram_counts(ref, max_n).items():
                if count > max_ref.get(gram, 0):
                    max_ref[gram] = count
        for gram, count in ngram_counts(hyp, max_n).items():
            correct[len(gram) - 1] += min(count, max_ref.get(gram, 0))
        for k in range(max_n):
            guess[k] += max(0, len(hyp) - k)
        test_len += len(hyp)
        ref_len += min((abs(len(r) - len(hyp)), len(r)) for r in refs)[1]

    scores, product = [], 1.0
    for k in range(max_n):
        product *= (correct[k] + _TINY) / (guess[k] + _SMALL)
        scores.append(product ** (1.0 / (k + 1)))
    ratio = (test_len + _TINY) / (ref_len + _SMALL)
    if ratio < 1:
        scores = [s * math.exp(1 - 1 / ratio) for s in scores]
    return scores


def lcs_length(a: Tokens, b: Tokens) -> int:
    """Length of the longest common subsequence (one-row dynamic programme, O(len(a)*len(b)))."""
    if len(a) < len(b):
        a, b = b, a
    row = [0] * (len(b) + 1)
    for x in a:
        prev_diag = 0
        for j, y in enumerate(b, start=1):
            keep = row[j]
            row[j] = prev_diag + 1 if x == y else max(row[j], row[j - 1])
            prev_diag = keep
    return row[-1]


def rouge_l(hypothesis: Tokens, references: Sequence[Tokens], beta: float = 1.2) -> float:
    """Sentence ROUGE-L as pycocoevalcap's ``Rouge``: F-measure with beta=1.2 built from the
    best LCS precision and the best LCS recall over the references (maximised separately).
    An empty hypothesis or reference scores 0."""
    precisions, recalls = [0.0], [0.0]
    for ref in references:
        if hypothesis and ref:
            lcs = lcs_length(ref, hypothesis)
            precisions.append(lcs / len(hypothesis))
            recalls.append(lcs / len(ref))
    p, r = max(precisions), max(recalls)
    if p == 0 or r == 0:
        return 0.0
    return (1 + beta**2) * p * r / (r + beta**2 * p)


def corpus_rouge_l(
    hypotheses: Sequence[Tokens], references: Sequence[Sequence[Tokens]], beta: float = 1.2
) -> tuple[float, list[float]]:
    """Mean sentence ROUGE-L over the corpus and the per-report scores."""
    _check_pairs(hypotheses, references)
    per_report = [rouge_l(h, refs, beta) for h, refs in zip(hypotheses, references)]
    return (sum(per_report) / len(per_report) if per_report else 0.0), per_report


def cider_d(
    hypotheses: Sequence[Tokens], references: Sequence[Sequence[Tokens]], n: int = 4, sigma: float = 6.0
) -> tuple[float, list[float]]:
    """CIDEr-D as pycocoevalcap 1.2's ``Cider`` scorer computes it (which *is* CIDEr-D).

    - TF-IDF vectors per n-gram order 1..n; the IDF is ``log(N) - log(max(1, df))`` where N is
      the number of reports and df the number of reports whose *reference set* contains the
      n-gram. The IDF therefore comes from the evaluated reference corpus: scores depend on
      the whole evaluation set, and a corpus of one report scores 0 (every IDF is log 1 = 0).
    - similarity per reference: clipped dot product ``sum min(h, r) * r`` over the norms of the
      unclipped vectors, times the length penalty ``exp(-(len_h - len_r)^2 / (2 sigma^2))``;
      averaged over orders, averaged over references, times 10.
    """
    _check_pairs(hypotheses, references)
    ref_counts = [[ngram_counts(r, n) for r in refs] for refs in references]
    doc_freq: Counter = Counter()
    for counts in ref_counts:
        doc_freq.update({gram for c in counts for gram in c})
    log_n = math.log(float(len(references))) if references else 0.0

    def vectors(counts: Counter) -> tuple[list[dict], list[float]]:
        vec: list[dict] = [defaultdict(float) for _ in range(n)]
        norm = [0.0] * n
        for gram, tf in counts.items():
            weight = tf * (log_n - math.log(max(1.0, doc_freq[gram])))
            vec[len(gram) - 1][gram] = weight
            norm[len(gram) - 1] += weight * weight
        return vec, [math.sqrt(x) for x in norm]

    per_report = []
    for hyp, refs, counts in zip(hypotheses, references, ref_counts):
        h_vec, h_norm = vectors(ngram_counts(hyp, n))
        total = 0.0
        for ref, rc in zip(refs, counts):
            r_vec, r_norm = vectors(rc)
            penalty = math.exp(-((len(hyp) - len(ref)) ** 2) / (2 * sigma**2))
            for k in range(n):
                dot = sum(min(w, r_vec[k][g]) * r_vec[k][g] for g, w in h_vec[k].items())
                if h_norm[k] != 0 and r_norm[k] != 0:
                    dot /= h_norm[k] * r_norm[k]
                total += dot * penalty
        per_report.append(10.0 * total / n / len(refs))
    return (sum(per_report) / len(per_report) if per_report else 0.0), per_report

"""One entry point that scores generated reports the way hf_vlm reports them everywhere.

Why one function: the trainer's eval loop, `hf-vlm eval` and the local `evaluate` modules must
quote the same numbers for the same reports, at the same stated granularity. Scores are
fractions in [0, 1] except CIDEr-D, which keeps the COCO toolkit's ×10 scale (0..10).
METEOR is not provided: its reference implementation is Java and its synonym/stem modules
are English-only, so a Chinese METEOR would not be comparable to published numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .findings import FindingsTable, findings_scores
from .repetition import DEFAULT_N, DEFAULT_THRESHOLD, corpus_repetition
from .scores import cider_d, corpus_bleu, corpus_rouge_l
from .tokenize import GRANULARITIES, describe_tokenization, tokenize

METRIC_NAMES = (
    "bleu_1",
    "bleu_2",
    "bleu_3",
    "bleu_4",
    "rouge_l",
    "cider_d",
    "findings_precision",
    "findings_recall",
    "findings_f1",
    "repetition",
)


def as_reference_lists(
    predictions: Sequence[str], references: Sequence[str] | Sequence[Sequence[str]]
) -> list[list[str]]:
    """Accept one reference string per report or a list of references per report."""
    if isinstance(predictions, str) or isinstance(references, str):
        raise TypeError("predictions and references must be lists of reports, not a single string")
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    out = []
    for i, refs in enumerate(references):
        refs = [refs] if isinstance(refs, str) else [r for r in refs]
        if not refs:
            raise ValueError(f"report {i} has an empty reference list")
        out.append(["" if r is None else str(r) for r in refs])
    return out


def compute_report_metrics(
    predictions: list[str],
    references: list[str] | list[list[str]],
    granularity: str = "char",
    findings_table: FindingsTable | dict | str | Path | None = None,
    keep_punct: bool = False,
    repetition_n: int = DEFAULT_N,
    repetition_threshold: float = DEFAULT_THRESHOLD,
) -> dict:
    """Score generated reports against references.

    Args:
        predictions: one generated report per image.
        references: one reference report per image, or a list of references per image.
        granularity: "char" (default, the convention for Chinese) or "word" (jieba).
        findings_table: a FindingsTable, a dict, a YAML/JSON path, or None for the default
            Chinese chest-CT table.
        keep_punct: keep punctuation marks as tokens (default: removed).

    Returns a dict with bleu_1..bleu_4, rouge_l, cider_d (0..10), findings_precision /
    recall / f1 (micro) and their findings_macro_* versions, repetition (mean seq-rep-4),
    repetition_max, repetition_flagged (reports at or above the loop threshold), n_reports,
    granularity and tokenization (a one-line description of the tokens used).
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    refs = as_reference_lists(predictions, references)
    preds = ["" if p is None else str(p) for p in predictions]
    if not preds:
        raise ValueError("no reports to score")
    hyp_tokens = [tokenize(p, granularity, keep_punct) for p in preds]
    ref_tokens = [[tokenize(r, granularity, keep_punct) for r in rs] for rs in refs]

    bleu = corpus_bleu(hyp_tokens, ref_tokens, max_n=4)
    rouge, _ = corpus_rouge_l(hyp_tokens, ref_tokens)
    cider, _ = cider_d(hyp_tokens, ref_tokens)
    result: dict = {f"bleu_{k + 1}": float(b) for k, b in enumerate(bleu)}
    result["rouge_l"] = float(rouge)
    result["cider_d"] = float(cider)
    result.update(findings_scores(preds, refs, findings_table))
    rep = corpus_repetition(preds, n=repetition_n, granularity=granularity, threshold=repetition_threshold)
    result.update({k: v for k, v in rep.items() if k != "repetition_flagged_indices"})
    result["n_reports"] = len(preds)
    result["granularity"] = granularity
    result["tokenization"] = describe_tokenization(granularity, keep_punct)
    return result


def format_table(metrics: dict) -> str:
    """Plain-text table for the console; the granularity line comes first on purpose."""
    labels = {
        "bleu_1": "BLEU-1",
        "bleu_2": "BLEU-2",
        "bleu_3": "BLEU-3",
        "bleu_4": "BLEU-4",
        "rouge_l": "ROUGE-L",
        "cider_d": "CIDEr-D (x10 scale)",
        "findings_precision": "Findings P (micro)",
        "findings_recall": "Findings R (micro)",
        "findings_f1": "Findings F1 (micro)",
        "findings_macro_f1": "Findings F1 (macro)",
        "repetition": "Repetition (seq-rep-4)",
        "repetition_flagged": "Looping reports",
        "n_reports": "Reports",
    }
    lines = [f"Granularity: {metrics.get('tokenization', metrics.get('granularity'))}"]
    width = max(len(v) for v in labels.values())
    for key, label in labels.items():
        if key in metrics:
            value = metrics[key]
            shown = f"{value:.4f}" if isinstance(value, float) else str(value)
            lines.append(f"  {label:<{width}}  {shown}")
    lines.append(
        "  (METEOR not provided: no Java-free, Chinese-capable implementation comparable to published numbers)"
    )
    return "\n".join(lines)

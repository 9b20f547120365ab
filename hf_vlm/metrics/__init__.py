"""Offline metrics for Chinese radiology reports: BLEU-1..4, ROUGE-L, CIDEr-D, findings-F1,
repetition.

Why a package of its own: `evaluate.load("bleu")` needs the Hub, and the common English
tooling scores Chinese wrongly (rouge-score deletes CJK characters). Everything here runs
offline, is character-level by default, and states its granularity. See docs/metrics.md.

    >>> from hf_vlm.metrics import compute_report_metrics
    >>> compute_report_metrics(["右肺下叶见结节"], ["右肺下叶见一结节"])["rouge_l"]  # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path

from .findings import Fact, FindingsTable, extract_facts, findings_scores, load_findings_table
from .repetition import corpus_repetition, repetition_score, text_repetition
from .report_metrics import METRIC_NAMES, compute_report_metrics, format_table
from .scores import cider_d, corpus_bleu, corpus_rouge_l, lcs_length, rouge_l
from .tokenize import describe_tokenization, normalize, tokenize, tokenize_joined

#: names accepted by load_metric -> folder under hf_vlm/metrics_modules
LOCAL_METRICS = {
    "bleu": "report_bleu",
    "rouge": "report_rouge",
    "rouge_l": "report_rouge",
    "cider": "report_cider",
    "cider_d": "report_cider",
    "findings": "report_findings",
}
MODULES_DIR = Path(__file__).resolve().parent.parent / "metrics_modules"


def local_metric_path(name: str) -> Path:
    """Path of the local `evaluate` module for ``name`` ("bleu", "report_bleu", ...)."""
    folder = LOCAL_METRICS.get(name, name)
    path = MODULES_DIR / folder / f"{folder}.py"
    if not path.is_file():
        raise ValueError(
            f"unknown local metric {name!r}; choose from {sorted(set(LOCAL_METRICS) | set(LOCAL_METRICS.values()))}"
        )
    return path


def load_metric(name: str, **kwargs):
    """`evaluate.load` on the module shipped inside hf_vlm: no Hub access, works with
    HF_HUB_OFFLINE=1. ``kwargs`` go to `evaluate.load` (e.g. ``keep_in_memory=True``)."""
    import evaluate

    return evaluate.load(str(local_metric_path(name)), **kwargs)


__all__ = [
    "Fact",
    "FindingsTable",
    "LOCAL_METRICS",
    "METRIC_NAMES",
    "cider_d",
    "compute_report_metrics",
    "corpus_bleu",
    "corpus_repetition",
    "corpus_rouge_l",
    "describe_tokenization",
    "extract_facts",
    "findings_scores",
    "format_table",
    "lcs_length",
    "load_findings_table",
    "load_metric",
    "local_metric_path",
    "normalize",
    "repetition_score",
    "rouge_l",
    "text_repetition",
    "tokenize",
    "tokenize_joined",
]

"""Local `evaluate` module: CIDEr-D for Chinese reports (pycocoevalcap formula).

The IDF is computed over the references passed to one ``compute`` call, so the score depends
on the whole evaluation set: compute it once over the full set, never per batch and averaged
(a single report always scores 0). Load with ``hf_vlm.metrics.load_metric("cider")``.
"""

import datasets
import evaluate

from hf_vlm.metrics import cider_d, describe_tokenization, tokenize
from hf_vlm.metrics.report_metrics import as_reference_lists

_DESCRIPTION = """CIDEr-D (sigma=6 length penalty, clipped TF-IDF n-gram cosine, n=1..4, x10) as the
COCO caption toolkit's Cider scorer; IDF from the evaluated reference corpus; character tokens
by default."""

_KWARGS = """
Args:
    predictions: list of generated reports.
    references: list of reference reports, or list of lists (several references per report).
    granularity: "char" (default) or "word" (jieba).
    keep_punct: keep punctuation as tokens (default False).
Returns: cider_d (0..10 scale), granularity, tokenization.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class ReportCider(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="Vedantam et al., CIDEr, CVPR 2015",
            inputs_description=_KWARGS,
            features=[
                datasets.Features(
                    {"predictions": datasets.Value("string"), "references": datasets.Sequence(datasets.Value("string"))}
                ),
                datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")}),
            ],
        )

    def _compute(self, predictions, references, granularity="char", keep_punct=False):
        refs = as_reference_lists(predictions, references)
        hyps = [tokenize(p, granularity, keep_punct) for p in predictions]
        ref_tokens = [[tokenize(r, granularity, keep_punct) for r in rs] for rs in refs]
        score, _ = cider_d(hyps, ref_tokens)
        return {
            "cider_d": float(score),
            "granularity": granularity,
            "tokenization": describe_tokenization(granularity, keep_punct),
        }

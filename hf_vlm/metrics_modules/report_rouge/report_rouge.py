"""Local `evaluate` module: ROUGE-L for Chinese reports (pycocoevalcap formula, beta=1.2).

Why not `evaluate.load("rouge")`: it needs the Hub, and its rouge-score tokenizer deletes CJK
characters, so Chinese ROUGE comes out as 0. Load this one with
``hf_vlm.metrics.load_metric("rouge")``.
"""

import datasets
import evaluate

from hf_vlm.metrics import corpus_rouge_l, describe_tokenization, tokenize
from hf_vlm.metrics.report_metrics import as_reference_lists

_DESCRIPTION = """ROUGE-L F-measure (beta=1.2, best LCS precision and recall over the references,
averaged over reports) as the COCO caption toolkit, on character tokens by default."""

_KWARGS = """
Args:
    predictions: list of generated reports.
    references: list of reference reports, or list of lists (several references per report).
    granularity: "char" (default) or "word" (jieba).
    keep_punct: keep punctuation as tokens (default False).
Returns: rouge_l (0..1), granularity, tokenization.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class ReportRouge(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="Lin, ROUGE, 2004; Chen et al., Microsoft COCO Captions, 2015",
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
        score, _ = corpus_rouge_l(hyps, ref_tokens)
        return {
            "rouge_l": float(score),
            "granularity": granularity,
            "tokenization": describe_tokenization(granularity, keep_punct),
        }

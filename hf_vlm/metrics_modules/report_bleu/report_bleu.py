"""Local `evaluate` module: corpus BLEU-1..4 for Chinese reports (pycocoevalcap formulas).

Shipped inside hf_vlm so that `evaluate.load` never needs the Hub (`evaluate.load("bleu")`
fails offline). Load it with ``hf_vlm.metrics.load_metric("bleu")``. The numbers come from
hf_vlm.metrics, so they equal `hf-vlm eval` and the trainer's eval metrics.
"""

import datasets
import evaluate

from hf_vlm.metrics import corpus_bleu, describe_tokenization, tokenize
from hf_vlm.metrics.report_metrics import as_reference_lists

_DESCRIPTION = """Corpus BLEU-1..4 as the COCO caption toolkit (closest reference length, one corpus
brevity penalty), on character tokens by default (each CJK character a token, "12mm" one token,
punctuation removed). The output states the granularity."""

_KWARGS = """
Args:
    predictions: list of generated reports.
    references: list of reference reports, or list of lists (several references per report).
    granularity: "char" (default) or "word" (jieba).
    keep_punct: keep punctuation as tokens (default False).
Returns: bleu_1, bleu_2, bleu_3, bleu_4 (0..1), granularity, tokenization.
Example:
    >>> bleu = hf_vlm.metrics.load_metric("bleu")
    >>> bleu.compute(predictions=["右肺下叶见结节"], references=["右肺下叶见一结节"])["bleu_1"]
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class ReportBleu(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="Papineni et al., BLEU, ACL 2002; Chen et al., Microsoft COCO Captions, 2015",
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
        scores = corpus_bleu(hyps, ref_tokens, max_n=4)
        result = {f"bleu_{k + 1}": float(s) for k, s in enumerate(scores)}
        result.update(granularity=granularity, tokenization=describe_tokenization(granularity, keep_punct))
        return result

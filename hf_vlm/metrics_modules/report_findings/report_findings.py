"""Local `evaluate` module: findings precision/recall/F1 for Chinese CT reports.

Extracts (side, lobe, segment, finding, size_mm) facts from each report with a keyword table
(hf_vlm.metrics.findings) and compares prediction and reference. Load with
``hf_vlm.metrics.load_metric("findings")``.
"""

import datasets
import evaluate

from hf_vlm.metrics import findings_scores
from hf_vlm.metrics.report_metrics import as_reference_lists

_DESCRIPTION = """Findings-level precision/recall/F1 (micro and macro) of the facts stated in
generated reports versus references. Catches the wrong side/lobe/size that n-gram metrics
reward when a model copies a fluent template."""

_KWARGS = """
Args:
    predictions: list of generated reports.
    references: list of reference reports, or list of lists (the best-F1 reference is used).
    findings_table: None (default Chinese chest-CT table), a dict, or a YAML/JSON path.
Returns: findings_precision/recall/f1 (micro), findings_macro_precision/recall/f1,
    findings_n_pred, findings_n_ref, findings_n_match.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class ReportFindings(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS,
            features=[
                datasets.Features(
                    {"predictions": datasets.Value("string"), "references": datasets.Sequence(datasets.Value("string"))}
                ),
                datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")}),
            ],
        )

    def _compute(self, predictions, references, findings_table=None):
        return findings_scores(predictions, as_reference_lists(predictions, references), findings_table)

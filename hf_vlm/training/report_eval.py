"""Report metrics during training: generate for a fixed eval subset at every evaluation.

Why a callback and not `compute_metrics`: the Trainer's evaluation loop runs a teacher-forced
forward pass, and its prediction step for a decoder-only model would generate *after* the
reference answer. Reports must be generated from the image and prompt alone, so
`ReportEvalCallback.on_evaluate` does that itself and writes its scores into the Trainer's
`metrics` dict in place. The Trainer calls `on_evaluate` before it compares checkpoints
(`_determine_best_metric` reads the same dict object), so `metric_for_best_model=
"eval_findings_f1"` with `load_best_model_at_end=True` keeps the checkpoint that states the
findings best, not the one with the lowest loss. `eval_findings_f1_cider` (findings_f1 +
1e-3 x CIDEr-D) breaks ties between checkpoints with equal findings-F1 (CIDEr-D is 0..10,
so the tie-break adds at most 0.01; on a small subset one finding more or less can move
findings-F1 by less than that, which is why it is a separate key you opt into).

Every process generates the same subset (greedy, deterministic), so under DDP all ranks
hold the metric the Trainer compares; logs and the samples file come from rank 0 only.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
from collections.abc import Sequence

from transformers import TrainerCallback

from ..data.collator import IGNORE_INDEX
from ..metrics import compute_report_metrics
from ..metrics.repetition import DEFAULT_THRESHOLD, text_repetition

logger = logging.getLogger(__name__)

DEFAULT_GENERATE_KWARGS = {"max_new_tokens": 128, "do_sample": False, "num_beams": 1}


def select_eval_rows(dataset, num_rows: int = 32, seed: int = 0) -> list[dict]:
    """A fixed random subset of a decoded caption dataset (rows with images/prompt/caption).

    Use `hf_vlm.data.dataset.with_image_transform(load_caption_dataset(csv))`: the same subset
    is scored at every evaluation, so the numbers are comparable across steps.
    """
    indices = sorted(random.Random(seed).sample(range(len(dataset)), min(num_rows, len(dataset))))
    return [
        {"images": r["images"], "prompt": r.get("prompt") or None, "caption": r["caption"]}
        for r in (dataset[i] for i in indices)
    ]


def _combined_key(metric: str, tie_break: str) -> str:
    return f"eval_{metric}_{tie_break.split('_')[0]}"


class ReportEvalCallback(TrainerCallback):
    """Generate reports for `eval_rows` at each evaluation and add report metrics in place.

    Args:
        eval_rows: list of `{"images": [PIL.Image, ...], "prompt": str | None, "caption": str}`.
        processor: the `MambaVLMProcessor` the model trains with.
        num_samples_to_log: reports logged next to their ground truth at each evaluation.
        generate_kwargs: passed to `model.generate` (default greedy, 128 new tokens).
        metric_for_best: metric (without prefix) that the combined key is built on.
        tie_break: metric added with weight `tie_break_weight` to form the combined key.
        batch_size: studies generated per `generate` call.
        metric_kwargs: passed to `compute_report_metrics` (granularity, findings_table …).
    """

    def __init__(
        self,
        eval_rows: Sequence[dict],
        processor,
        num_samples_to_log: int = 4,
        generate_kwargs: dict | None = None,
        metric_for_best: str = "findings_f1",
        tie_break: str = "cider_d",
        tie_break_weight: float = 1e-3,
        batch_size: int = 8,
        metric_kwargs: dict | None = None,
    ):
        if not eval_rows:
            raise ValueError("ReportEvalCallback needs at least one eval row")
        for i, row in enumerate(eval_rows):
            missing = [k for k in ("images", "caption") if k not in row]
            if missing:
                raise ValueError(f"eval row {i} has no {missing}: rows are {{'images', 'prompt', 'caption'}}")
        self.eval_rows = list(eval_rows)
        self.processor = processor
        self.num_samples_to_log = num_samples_to_log
        self.generate_kwargs = {**DEFAULT_GENERATE_KWARGS, **(generate_kwargs or {})}
        self.metric_for_best, self.tie_break, self.tie_break_weight = metric_for_best, tie_break, tie_break_weight
        self.combined_key = _combined_key(metric_for_best, tie_break)
        self.batch_size = batch_size
        self.metric_kwargs = metric_kwargs or {}
        self.last_reports: list[str] = []

    def generate(self, model) -> list[str]:
        from ..inference import generate_reports

        return generate_reports(
            model,
            self.processor,
            [r["images"] for r in self.eval_rows],
            [r.get("prompt") or None for r in self.eval_rows],
            batch_size=self.batch_size,
            **self.generate_kwargs,
        )

    def score(self, reports: list[str]) -> dict[str, float]:
        """`eval_`-prefixed numeric report metrics plus the combined best-model key."""
        raw = compute_report_metrics(reports, [r["caption"] for r in self.eval_rows], **self.metric_kwargs)
        scores = {
            f"eval_{k}": float(v) for k, v in raw.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        best, tie = scores.get(f"eval_{self.metric_for_best}"), scores.get(f"eval_{self.tie_break}")
        if best is None or tie is None:
            raise KeyError(
                f"metric_for_best={self.metric_for_best!r} / tie_break={self.tie_break!r} are not report "
                f"metrics; choose from {sorted(k[5:] for k in scores)}"
            )
        scores[self.combined_key] = best + self.tie_break_weight * tie
        return scores

    def on_evaluate(self, args, state, control, metrics=None, model=None, **kwargs):
        if model is None or metrics is None:
            return control
        reports = self.generate(model)
        self.last_reports = reports
        scores = self.score(reports)
        metrics.update(scores)  # in place: the Trainer picks the best checkpoint from this dict
        if (
            state.log_history
            and state.log_history[-1].get("step") == state.global_step
            and any(k.startswith("eval_") for k in state.log_history[-1])
        ):
            state.log_history[-1].update(scores)  # the eval entry was logged before on_evaluate ran
        if state.is_world_process_zero:
            self._report(args, state, reports, scores)
        return control

    def _report(self, args, state, reports: list[str], scores: dict[str, float]) -> None:
        step = state.global_step
        logger.info(
            "Step %d report metrics: %s",
            step,
            ", ".join(
                f"{k[5:]}={v:.4f}" for k, v in scores.items() if not math.isnan(v) and not k.endswith("n_reports")
            ),
        )
        for report, row in list(zip(reports, self.eval_rows))[: self.num_samples_to_log]:
            logger.info("  generated: %s\n  reference: %s", report or "(empty)", row["caption"])
        if args.output_dir:
            os.makedirs(args.output_dir, exist_ok=True)
            path = os.path.join(args.output_dir, f"samples_step_{step}.jsonl")
            with open(path, "w", encoding="utf-8") as handle:
                for report, row in zip(reports, self.eval_rows):
                    handle.write(
                        json.dumps(
                            {
                                "step": step,
                                "prompt": row.get("prompt"),
                                "generated": report,
                                "reference": row["caption"],
                                "repetition": round(text_repetition(report), 4),
                            },
                            ensure_ascii=False,
                        )
                        + "\n"
                    )
        flagged = int(scores.get("eval_repetition_flagged", 0))
        if flagged:
            example = max(reports, key=text_repetition)
            logger.warning(
                "Step %d: %d of %d generated reports look like loops (seq-rep-4 >= %.1f), e.g. %r. The model has not "
                "learned to stop or repeats phrases: check that the answer's EOS is supervised, train longer, or "
                "generate with repetition_penalty=1.2 / no_repeat_ngram_size=4.",
                step,
                flagged,
                len(reports),
                DEFAULT_THRESHOLD,
                example[:60],
            )


def make_compute_metrics(tokenizer, ignore_index: int = IGNORE_INDEX, **metric_kwargs):
    """`compute_metrics` for a Trainer whose prediction step returns *generated* ids.

    The stock prediction step of a decoder-only model returns teacher-forced logits (or, with
    `predict_with_generate`, tokens generated after the reference), so this fits only a
    trainer that generates from the prompt; `ReportEvalCallback` is the main path.
    """
    import numpy as np

    def compute_metrics(eval_pred) -> dict[str, float]:
        predictions, labels = eval_pred.predictions, eval_pred.label_ids
        predictions = predictions[0] if isinstance(predictions, tuple) else predictions
        pad = tokenizer.pad_token_id
        predictions = np.where(predictions == ignore_index, pad, predictions)
        labels = np.where(labels == ignore_index, pad, labels)
        preds = [t.strip() for t in tokenizer.batch_decode(predictions, skip_special_tokens=True)]
        refs = [t.strip() for t in tokenizer.batch_decode(labels, skip_special_tokens=True)]
        raw = compute_report_metrics(preds, refs, **metric_kwargs)
        return {k: float(v) for k, v in raw.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}

    return compute_metrics


__all__ = ["ReportEvalCallback", "make_compute_metrics", "select_eval_rows", "DEFAULT_GENERATE_KWARGS"]

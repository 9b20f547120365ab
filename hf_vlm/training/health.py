"""Is training healthy? A loss-band verdict per log, and a probe of whether the image matters.

* `LossHealthCallback` compares the caption loss with the band users learned the hard way
  (start 3-8, target 0.5-1.0, never sustained < 0.1) and writes a `loss_verdict` into the
  log, so the CSV and console say what a number means.
* `VisionProbe` measures the caption loss with the true images and with images shuffled
  within the batch. A model that ignores the image scores the same on both: its reports
  are generic text and no generation metric will reveal why.
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Iterable

import torch

from .guards import Guard

logger = logging.getLogger(__name__)


class LossHealthCallback(Guard):
    """Adds `loss_verdict` to each training log; warns once on a sustained suspiciously low loss."""

    name = "LossHealth"

    def __init__(self, band=(3.0, 8.0, 0.5, 1.0), suspicious: float = 0.1, patience: int = 3):
        super().__init__(action="warn")
        self.start_low, self.start_high, self.target_low, self.target_high = band
        self.suspicious, self.patience = suspicious, patience
        self.low_logs = 0
        self.warned = False

    def verdict(self, loss: float) -> str:
        if not math.isfinite(loss):
            return f"loss {loss}: non-finite"
        if loss < self.suspicious:
            self.low_logs += 1
            if self.low_logs >= self.patience:
                return (
                    f"loss {loss:.3g} sustained < {self.suspicious} for {self.low_logs} logs: suspicious - "
                    "check label masking / data leakage"
                )
            return f"loss {loss:.3g} < {self.suspicious}: suspicious if sustained"
        self.low_logs = 0
        if loss > self.start_high:
            return f"loss {loss:.3g} above the start band {self.start_low:g}-{self.start_high:g}: check LR and data"
        if loss >= self.start_low:
            return f"loss {loss:.3g} in the start band {self.start_low:g}-{self.start_high:g}: normal early on"
        if loss > self.target_high:
            return f"loss {loss:.3g} descending toward the target {self.target_low:g}-{self.target_high:g}"
        if loss >= self.target_low:
            return f"loss {loss:.3g} in the target band {self.target_low:g}-{self.target_high:g}: healthy"
        return f"loss {loss:.3g} below the target band: watch eval_loss for overfitting"

    def annotate_logs(self, args, state, logs) -> None:
        loss = logs.get("loss")
        if loss is None:
            return
        logs["loss_verdict"] = self.verdict(float(loss))
        if self.low_logs >= self.patience and not self.warned:
            self.warned = True
            self.trip(
                f"step {state.global_step}: {logs['loss_verdict']}. A caption loss this low on report text "
                "usually means the answer is visible to the model (prompt/visual tokens supervised, reports "
                "duplicated between prompt and answer, or eval rows in the training set).",
                stop=False,
            )


def _shift_images(images: torch.Tensor, rows: int, previous: torch.Tensor | None) -> torch.Tensor | None:
    """Give each row another row's images: roll by one row (a derangement), or use the previous batch."""
    n = images.shape[0]
    if rows >= 2 and n % rows == 0:
        return torch.roll(images, shifts=n // rows, dims=0)
    if previous is not None and previous.shape == images.shape:
        return previous
    return None


class VisionProbe(Guard):
    """At evaluation: `eval_vision_gap` = loss(shuffled images) - loss(true images); ~0 = blind."""

    name = "VisionProbe"

    def __init__(self, min_gap: float = 0.01, max_batches: int = 4):
        super().__init__(action="warn")
        self.min_gap, self.max_batches = min_gap, max_batches
        self.last: dict[str, float] | None = None

    @torch.no_grad()
    def probe(
        self, model, batches: Iterable[dict], prepare=lambda b: b, context=contextlib.nullcontext
    ) -> dict[str, float] | None:
        """Mean caption loss with true and shifted images over the first `max_batches` batches."""
        true_losses, shuffled_losses, previous = [], [], None
        was_training = model.training
        model.eval()
        try:
            for i, batch in enumerate(batches):
                if i >= self.max_batches:
                    break
                batch = prepare(batch)
                key = "vision_features" if batch.get("vision_features") is not None else "pixel_values"
                if batch.get(key) is None or batch.get("labels") is None:
                    continue
                shifted = _shift_images(batch[key], batch["labels"].shape[0], previous)
                previous = batch[key]
                if shifted is None:
                    continue
                with context():
                    true_losses.append(float(model(**batch).loss))
                    shuffled_losses.append(float(model(**{**batch, key: shifted}).loss))
        finally:
            model.train(was_training)
        if not true_losses:
            return None
        true_loss, shuffled_loss = sum(true_losses) / len(true_losses), sum(shuffled_losses) / len(shuffled_losses)
        self.last = {
            "vision_gap": shuffled_loss - true_loss,
            "vision_loss_true": true_loss,
            "vision_loss_shuffled": shuffled_loss,
        }
        return self.last

    def check(self, result: dict[str, float] | None, step: int) -> None:
        if result is None or result["vision_gap"] >= self.min_gap:
            return
        if self.trips:  # said once per run; the gap stays in the log and the CSV
            logger.info("[hf_vlm %s] step %d: eval_vision_gap still %.4f", self.name, step, result["vision_gap"])
            return
        self.trip(
            f"step {step}: eval_vision_gap = {result['vision_gap']:.4f} (caption loss with true images "
            f"{result['vision_loss_true']:.4f} vs shuffled {result['vision_loss_shuffled']:.4f}): the model is "
            "blind to the image - its reports do not depend on the picture (expected only at the very start of "
            "Stage 1; the gap must grow as the bridge aligns). What to do: check visual_std in "
            "the log (collapsed features?), that the bridge is trainable and its LR > 0, that a Stage 1 "
            "checkpoint with a near-zero proxy loss was not used (restart with from_scratch), and train the "
            "alignment longer before trusting generation metrics.",
            stop=False,
        )


__all__ = ["LossHealthCallback", "VisionProbe"]

"""Does the loss depend on the image? Two probes of the caption loss with true vs other images.

A model that ignores the image scores the same with the true images and with another row's:
its reports are generic text and no generation metric will reveal why. Fixed loss bands cannot
tell this apart (templated captions legitimately reach ~0.01 when the model sees; a stuck
frozen LM sits "in the start band" forever), the image dependence can (docs/architecture.md,
"Fixed loss bands mislead"). The verdict built on it lives in `verdict.py`.

* `TrainVisionProbe`: every `vision_probe_steps` (and on the first batch of a run), on the
  current training batch, without gradients: `train_vision_gap` and `train_vision_gap_rel`.
* `VisionProbe`: at evaluation, over the first eval batches: `eval_vision_gap`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable

import torch

from .guards import Guard

logger = logging.getLogger(__name__)


STUDY_KEYS = ("slice_counts", "slice_z")  # travel with a study's slices when images are shifted


def _shift_images(batch: dict, key: str, previous: dict | None) -> dict | None:
    """Give each row another row's images: the batch's studies rolled by one (a derangement), or the
    previous batch's. Returns the entries to override (`key`, and for studies `slice_counts` /
    `slice_z`, which move with their slices), or None when no other image exists.

    `batch[key]` holds every slice of every row in row order (`(sum S, ...)`), so the roll is by
    whole studies, as `slice_counts` splits them. Rolling the flat tensor by `N // rows` (what this
    did before) was right only when every study has the same S: with `all` sampling (S = 22-42)
    it spliced slices of two studies into one, or fell back to a constant image, and the probe
    reported a gap of 0.1-0.3 on a model whose loss did not depend on the study at all."""
    images, rows = batch[key], batch["labels"].shape[0]
    counts = batch.get("slice_counts")
    if rows >= 2:
        if counts is None:
            if images.shape[0] % rows:
                return None
            return {key: torch.roll(images, shifts=images.shape[0] // rows, dims=0)}
        order = [(i + 1) % rows for i in range(rows)]
        sizes = [int(c) for c in counts.tolist()]
        studies = images.split(sizes)
        out = {key: torch.cat([studies[i] for i in order]), "slice_counts": counts[order]}
        if batch.get("slice_z") is not None:
            z = batch["slice_z"].split(sizes)
            out["slice_z"] = torch.cat([z[i] for i in order])
        return out
    same_kind = previous is not None and previous[key].shape[1:] == images.shape[1:]
    if same_kind and (counts is not None or previous[key].shape == images.shape):
        return previous  # a study of any S (it brings its own counts and z); a 2-D image of the same shape
    return None


def _probe_images(batch: dict, key: str) -> dict:
    """The entries `_shift_images` may override, as the batch holds them (for the next batch's probe)."""
    return {k: batch[k] for k in (key, *STUDY_KEYS) if batch.get(k) is not None}


def _spread(images: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """Mean |image - other image| (0 exactly when every image is the same); studies of different S:
    the mean |difference| of each one's per-slice means, as the slices no longer pair up."""
    if images.shape == other.shape:
        return (images.float() - other.float()).abs().mean()
    return (images.float().mean() - other.float().mean()).abs()


def _image_key(batch: dict) -> str:
    return "vision_features" if batch.get("vision_features") is not None else "pixel_values"


class TrainVisionProbe(Guard):
    """Caption loss of the current training batch with its own vs other rows' images, no gradients.

    Runs on the first micro-batch of every `every`-th optimizer step and on the first batch of a
    run (`train()` or a resume), so a gap exists before the first plateau can be judged. Both
    losses are computed in eval mode (same dropout state), so the gap is the image's effect only.
    With one row per batch the callback keeps the previous batch's images; when no other image
    of the same shape exists it uses a constant image (the batch mean), so that every process
    produces the same metric keys (they are averaged across processes by the trainer).

    `observe_batch` returns the raw sums as 0-d tensors; `MambaVLMTrainer` gathers them like its
    other metrics (`_global_means`: per-process mean, then the mean over processes) and
    `annotate_logs` turns the global means into `train_vision_gap` = shuffled - true and
    `train_vision_gap_rel` = gap / shuffled (the share of the blind loss the image removes).
    `train_image_spread` = mean |image - other image|: exactly 0 when every image is the same.
    """

    name = "TrainVisionProbe"
    KEYS = ("train_vision_loss_true", "train_vision_loss_shuffled", "train_image_spread")

    def __init__(self, every: int = 50):
        super().__init__(action="warn")
        self.every = every
        self._probed_step: int | None = None
        self._previous: torch.Tensor | None = None
        self.probes = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self._probed_step, self._previous = None, None

    def _due(self, step: int) -> bool:
        if self.every <= 0 or step == self._probed_step:
            return False  # one probe per optimizer step, however many micro-batches it accumulates
        return self._probed_step is None or step % self.every == 0

    @torch.no_grad()
    def observe_batch(self, args, state, control, inputs, model) -> dict[str, torch.Tensor] | None:
        key = _image_key(inputs)
        images, labels = inputs.get(key), inputs.get("labels")
        if images is None or labels is None:
            return None
        rows = labels.shape[0]
        previous = self._previous
        if rows < 2:
            self._previous = _probe_images(inputs, key)  # references, not copies: the next batch is new
        if not self._due(state.global_step):
            return None
        self._probed_step = state.global_step
        shifted = _shift_images(inputs, key, previous)
        if shifted is None:
            shifted = {key: images.float().mean().to(images.dtype).expand_as(images)}
        was_training = model.training
        model.eval()
        try:
            true_loss = model(**inputs).loss.detach().float()
            shuffled_loss = model(**{**inputs, **shifted}).loss.detach().float()
        finally:
            model.train(was_training)
        self.probes += 1
        spread = _spread(images, shifted[key])
        return dict(zip(self.KEYS, (true_loss, shuffled_loss, spread)))

    def annotate_logs(self, args, state, logs) -> None:
        true_loss, shuffled_loss = logs.get(self.KEYS[0]), logs.get(self.KEYS[1])
        if true_loss is None or shuffled_loss is None:
            return
        gap = shuffled_loss - true_loss
        logs["train_vision_gap"] = gap
        logs["train_vision_gap_rel"] = gap / shuffled_loss if shuffled_loss > 0 else 0.0


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
                key = _image_key(batch)
                if batch.get(key) is None or batch.get("labels") is None:
                    continue
                shifted = _shift_images(batch, key, previous)
                previous = _probe_images(batch, key)
                if shifted is None:
                    continue
                with context():
                    true_losses.append(float(model(**batch).loss))
                    shuffled_losses.append(float(model(**{**batch, **shifted}).loss))
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


__all__ = ["TrainVisionProbe", "VisionProbe"]

"""One training-health verdict from the loss level, its trend and the train-time vision gap.

Fixed loss bands are a prior, not a test (docs/architecture.md, "Fixed loss bands mislead"):
what separates learning from leaking from being stuck is whether the loss depends on the image
(`TrainVisionProbe`, health.py) and whether it still moves. At every training log
`TrainingHealth` writes a `health` code into the log (CSV and console) and, the first time a
problem verdict appears, trips with what to do; `guard_action` decides warn or stop.

| code | when | |
|---|---|---|
| `nan` | a NaN/Inf loss, gradient or weight (the CollapseGuard stops the run) | fail |
| `collapse` | an established gap fell under `collapse_gap_fraction` of it, or visual_std collapsed | fail |
| `healthy` | a clear gap (however low the loss; a plateau then means converged) | pass |
| `blind` | every image of the probed batch is the same (constant / black images) | fail |
| `leak` | the probed loss is below `suspicious_loss` with AND without the true image | fail |
| `not_learning` | a plateau of the smoothed loss with no gap on a probe inside the window | fail |
| `learning` / `pending` | no gap yet but the loss still falls / not enough logs or probes yet | warn |

The plateau test, with the numbers it states: the smoothed loss (mean of the last `h` logs)
improved by less than `plateau_min_improvement` (relative) against the smoothed loss
`window` steps earlier, where `window` = `plateau_window_fraction` x max_steps (at least 4 logs)
and the earlier point lies after the warm-up.
"""

from __future__ import annotations

import math

from .guards import Guard

SINGLE_PROBE_PEAK = 5  # x min_gap: one probe this far above the threshold establishes a gap on its own
PROBLEMS = ("nan", "collapse", "blind", "leak", "not_learning")
NOT_LEARNING_EXIT_CODE = 4  # `hf-vlm train` exit status when the not-learning verdict stopped the run

_WHAT_TO_DO = {
    "collapse": "The visual features collapsed, so the LLM cannot see the image any more. What to do: do not "
    "initialise the next stage from this checkpoint; restart the bridge with from_scratch=True, lower "
    "bridge_learning_rate (e.g. 1e-5), train on the caption loss (not a feature-norm proxy), and watch "
    "visual_std in the log.",
    "blind": "The images of a training batch are all identical, so nothing about the picture can be learned. "
    "What to do: check the image column and image_root / path_map (every row pointing at one file?), the "
    "CT window / DICOM rescale (all-black or all-white slices?), and the image processor's normalisation.",
    "leak": "The caption is reachable without the image. What to do: check, in this order, (1) the labels "
    "(print one batch: only the answer + EOS supervised, each label the NEXT token, never shifted by hand), "
    "(2) captions duplicated in the prompt, (3) eval rows in the training set, (4) a task that is text-only "
    "(every caption the same, or predictable from the prompt).",
    "not_learning": "The model is not learning to see. What to do: give the bridge something it can steer - LoRA "
    "(stage=finetune, use_lora=true) or unfreeze_llm_layers=N on the last layers; raise "
    "bridge_learning_rate (or lower it if the loss jumped first); try bridge_type=qformer or more "
    "max_visual_tokens; start a collapsed bridge again with from_scratch=true. The frozen-LM case "
    "looks like this: loss flat in the start band, train_vision_gap ~0, generated text = the LM's "
    "pre-training text whatever the image.",
    "nan": "see the CollapseGuard message: the last good checkpoint is kept.",
}


def plateau(
    losses: list[tuple[int, float]],
    window_steps: int,
    logging_steps: int,
    after_step: int = 0,
    min_improvement: float = 0.02,
) -> dict | None:
    """Relative improvement of the smoothed loss over the last `window_steps`; None while too short.

    Returns {"plateau", "improvement", "before", "now", "window", "smooth_steps", "start"} ("start": the
    first step the comparison reads).
    """
    w = max(4, math.ceil(window_steps / max(logging_steps, 1)))
    h = max(2, w // 2)
    if len(losses) < w + h or losses[-(w + h)][0] < after_step:
        return None
    before = sum(v for _, v in losses[-(w + h) : -w]) / h
    now = sum(v for _, v in losses[-h:]) / h
    improvement = (before - now) / before if before > 0 else 0.0
    return {
        "plateau": improvement < min_improvement,
        "improvement": improvement,
        "before": before,
        "now": now,
        "window": losses[-1][0] - losses[-(w + 1)][0],
        "smooth_steps": losses[-1][0] - losses[-(h + 1)][0],
        "start": losses[-(w + h)][0],
    }


class TrainingHealth(Guard):
    """The verdict callback; reads `train_vision_gap` (TrainVisionProbe) and the CollapseGuard's state."""

    name = "TrainingHealth"

    def __init__(
        self,
        action: str = "stop",
        collapse_guard=None,
        *,
        min_gap: float = 0.02,
        min_gap_relative: float = 0.02,
        low_loss: float = 0.1,
        low_patience: int = 2,
        window_fraction: float = 0.2,
        min_improvement: float = 0.02,
        collapse_fraction: float = 0.25,
        band=(3.0, 8.0, 0.5, 1.0),
    ):
        super().__init__(action)
        self.collapse_guard = collapse_guard
        self.min_gap, self.min_gap_relative = min_gap, min_gap_relative
        self.low_loss, self.low_patience = low_loss, low_patience
        self.window_fraction, self.min_improvement = window_fraction, min_improvement
        self.collapse_fraction, self.band = collapse_fraction, tuple(band)
        self.losses: list[tuple[int, float]] = []
        self.probes: list[dict] = []  # step, gap, rel, true, shuffled, spread
        self.visual_std: list[float] = []
        self.eval_gap: float | None = None
        self.nonfinite_step: int | None = None
        self.verdicts: list[tuple[int, str]] = []  # (step, code) at each training log
        self.tripped: dict[str, str] = {}  # code -> message, the first time it appeared
        self.stopped_by: str | None = None
        self._window, self._logging, self._warmup = 0, 1, 0
        self._pending: tuple[str, str] | None = None

    # --- inputs ----------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, **kwargs):
        self._window = max(1, round(self.window_fraction * (state.max_steps or args.max_steps or 0)))
        steps = args.logging_steps if args.logging_steps >= 1 else args.logging_steps * state.max_steps  # a ratio
        self._logging = max(1, math.ceil(steps))
        self._warmup = args.get_warmup_steps(state.max_steps) if state.max_steps > 0 else 0

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if metrics and metrics.get("eval_vision_gap") is not None:
            self.eval_gap = float(metrics["eval_vision_gap"])

    def _clear(self, gap: float, rel: float) -> bool:
        return gap >= self.min_gap and rel >= self.min_gap_relative

    def _nonfinite(self) -> int | None:
        guard_step = getattr(self.collapse_guard, "nonfinite_step", None)
        return guard_step if guard_step is not None else self.nonfinite_step

    def _std_collapsed(self) -> bool:
        return getattr(self.collapse_guard, "collapsed_logs", 0) == -1  # the CollapseGuard tripped on visual_std

    def trend(self) -> dict | None:
        return plateau(self.losses, self._window, self._logging, self._warmup, self.min_improvement)

    def _established_peak(self) -> dict | None:
        """The gap a collapse is measured against: the second-highest clear probe, or the highest when
        it alone is >= `SINGLE_PROBE_PEAK` x min_gap. One probe is one batch: on the 3-D demo its
        gap scattered by +-0.03-0.05 around zero, and a lone 0.08 followed by two ~0 probes is noise,
        not a model that saw and then stopped seeing (that stopped runs as "collapse")."""
        clear = sorted((p for p in self.probes if self._clear(p["gap"], p["rel"])), key=lambda p: p["gap"])
        if not clear:
            return None
        if clear[-1]["gap"] >= SINGLE_PROBE_PEAK * self.min_gap:
            return clear[-1]
        return clear[-2] if len(clear) >= 2 else None

    # --- the verdict -----------------------------------------------------------------------------
    def decide(self) -> tuple[str, str]:
        """(code, one line with the numbers) from what was seen so far."""
        if self._nonfinite() is not None:
            return "nan", f"NaN/Inf at step {self._nonfinite()}: training stopped"
        trend, last = self.trend(), (self.probes[-1] if self.probes else None)
        trend_text = (
            ""
            if trend is None
            else (
                f"; smoothed loss {trend['before']:.3g} -> {trend['now']:.3g} ({-trend['improvement']:+.1%}) over "
                f"{trend['window']} steps"
            )
        )
        if trend is not None and trend["plateau"]:
            trend_text += f" (plateau: improvement < {self.min_improvement:.0%})"
        if last is None:
            return "pending", "no vision probe yet" + trend_text
        gap_text = f"train_vision_gap {last['gap']:.3g} (rel {last['rel']:.1%}) at step {last['step']}"
        peak, recent = self._established_peak(), self.probes[-2:]
        if self._std_collapsed() or (
            peak is not None
            and len(recent) == 2
            and all(p["step"] > peak["step"] for p in recent)
            and all(
                p["gap"] < self.collapse_fraction * peak["gap"] and not self._clear(p["gap"], p["rel"]) for p in recent
            )
        ):
            std = f"; visual_std {self.visual_std[0]:.3g} -> {self.visual_std[-1]:.3g}" if self.visual_std else ""
            return "collapse", f"{gap_text}, down from {peak['gap']:.3g} at step {peak['step']}{std}"
        if self._clear(last["gap"], last["rel"]):
            state = "converged" if trend is not None and trend["plateau"] else "learning from the image"
            return "healthy", f"{gap_text}: {state}" + trend_text
        if last["spread"] <= 1e-8:
            return "blind", f"{gap_text}: every image of the probed batch is identical (spread {last['spread']:.3g})"
        low = self.probes[-self.low_patience :]
        if len(low) == self.low_patience and all(
            p["true"] < self.low_loss and p["shuffled"] < self.low_loss for p in low
        ):
            return "leak", (
                f"{gap_text}: loss {last['true']:.3g} with the true images and {last['shuffled']:.3g} "
                f"with other rows' images (< {self.low_loss:g} on {self.low_patience} probes)"
            )
        if trend is not None and trend["plateau"] and last["step"] >= trend["start"]:  # a probe inside the window
            return "not_learning", gap_text + trend_text
        return "learning", f"{gap_text}: no gap yet" + trend_text

    def annotate_logs(self, args, state, logs) -> None:
        loss = logs.get("loss")
        if loss is None:
            return
        step = state.global_step
        if math.isfinite(float(loss)):
            self.losses.append((step, float(loss)))
        else:
            self.nonfinite_step = self.nonfinite_step or step
        if logs.get("visual_std") is not None:
            self.visual_std.append(float(logs["visual_std"]))
        if logs.get("train_vision_gap") is not None:
            self.probes.append(
                {
                    "step": step,
                    "gap": logs["train_vision_gap"],
                    "rel": logs["train_vision_gap_rel"],
                    "true": logs["train_vision_loss_true"],
                    "shuffled": logs["train_vision_loss_shuffled"],
                    "spread": logs.get("train_image_spread", 1.0),
                }
            )
        code, text = self.decide()
        self.verdicts.append((step, code))
        logs["health"] = code
        if code in PROBLEMS and code not in self.tripped:
            self._pending = (code, text)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self._pending is None:
            return
        code, text = self._pending
        self._pending = None
        self.tripped[code] = text
        if code == "nan":
            return  # the CollapseGuard already stopped the run and said what to do
        stop = self.action == "stop"
        if stop and self.stopped_by is None:
            self.stopped_by = code
        self.trip(f"step {state.global_step}: {code} - {text}. {_WHAT_TO_DO[code]}", control)

    # --- end of run --------------------------------------------------------------------------------
    @property
    def verdict(self) -> str:
        return self.decide()[0]

    def table(self) -> list[tuple[str, str, str]]:
        """(check, figure, pass/warn/fail) rows for the console and the model card."""
        code, text = self.decide()
        rows = []
        bad = self._nonfinite()
        rows.append(
            (
                "loss finite",
                "all finite" if bad is None else f"NaN/Inf at step {bad}",
                "pass" if bad is None else "fail",
            )
        )
        last = self.probes[-1] if self.probes else None
        if last is None:
            rows.append(("train vision gap", "not measured (vision_probe_steps=0?)", "warn"))
        else:
            peak = max(p["gap"] for p in self.probes)
            status = "pass" if self._clear(last["gap"], last["rel"]) else ("fail" if code in PROBLEMS else "warn")
            rows.append(
                (
                    "train vision gap",
                    f"{last['gap']:.3g} (rel {last['rel']:.1%}) at step {last['step']}, "
                    f"peak {peak:.3g}, {len(self.probes)} probes",
                    status,
                )
            )
            rows.append(
                (
                    "images differ within a batch",
                    f"mean |image - other| {last['spread']:.3g}",
                    "pass" if last["spread"] > 1e-8 else "fail",
                )
            )
        trend = self.trend()
        if trend is None:
            rows.append(("loss trend", f"too few logs for a {self._window}-step window", "warn"))
        else:
            status = "pass" if not trend["plateau"] or code == "healthy" else "warn"
            rows.append(
                (
                    "loss trend",
                    f"smoothed {trend['before']:.3g} -> {trend['now']:.3g} "
                    f"({-trend['improvement']:+.1%}) over {trend['window']} steps",
                    status,
                )
            )
        if self.losses:
            start_low, start_high, target_low, target_high = self.band
            rows.append(
                (
                    "loss level (context)",
                    f"last {self.losses[-1][1]:.3g}; bands: start {start_low:g}-"
                    f"{start_high:g}, target {target_low:g}-{target_high:g}",
                    "fail" if code == "leak" else "pass",
                )
            )
        if self.visual_std:
            rows.append(
                (
                    "visual features",
                    f"visual_std {self.visual_std[0]:.3g} -> {self.visual_std[-1]:.3g}",
                    "fail" if self._std_collapsed() else "pass",
                )
            )
        if self.eval_gap is not None:
            figure = f"{self.eval_gap:.3g}"
            last = self.probes[-1] if self.probes else None
            if self.eval_gap < self.min_gap and last is not None and self._clear(last["gap"], last["rel"]):
                # the 3-D demo: train gap 0.20 at the end, held-out 0.008, reports identical to the blind ones
                figure += (
                    f" against train_vision_gap {last['gap']:.3g}: the image helps on training rows only - the "
                    "model memorises them instead of reading the image (more data, fewer steps, or a bridge and "
                    "visual budget the findings survive)"
                )
            rows.append(("eval vision gap", figure, "pass" if self.eval_gap >= self.min_gap else "warn"))
        rows.append(
            ("verdict", f"{code}: {text}", "pass" if code == "healthy" else ("fail" if code in PROBLEMS else "warn"))
        )
        return rows


def format_health_table(rows: list[tuple[str, str, str]], markdown: bool = False) -> str:
    if markdown:
        return "\n".join(
            ["| check | figure | status |", "|---|---|---|"]
            + [f"| {c} | {f.replace('|', '/')} | {s} |" for c, f, s in rows]
        )
    width = max(len(c) for c, _, _ in rows)
    return "\n".join(f"{s.upper():4}  {c:<{width}}  {f}" for c, f, s in rows)


__all__ = ["NOT_LEARNING_EXIT_CODE", "PROBLEMS", "TrainingHealth", "format_health_table", "plateau"]

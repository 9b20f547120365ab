"""The callbacks `MambaVLMTrainer` installs by default, built from the training arguments.

The guards live in `guards.py` (freeze, masks, collapse/NaN), `health.py` (train-time and
eval vision probes) and `verdict.py` (the health verdict); the on-disk outputs in `outputs.py`
(CSV log, loss plot). This module only assembles them, so a plain `transformers.Trainer` user can take the same set:
`Trainer(..., callbacks=default_callbacks(args))` (the batch-level hooks then stay idle).
"""

from __future__ import annotations

from .guards import CollapseGuard, FreezeGuard, Guard, GuardError, GuardWarning, MaskGuard
from .health import TrainVisionProbe, VisionProbe
from .outputs import CsvLogCallback, LossPlotCallback, plot_loss_curve
from .verdict import TrainingHealth


def default_callbacks(args) -> list:
    """Guards, CSV log and loss plot configured from `MambaVLMTrainingArguments`."""
    collapse = CollapseGuard(
        args.guard_action,
        std_threshold=args.collapse_std_threshold,
        relative_threshold=args.collapse_relative_threshold,
        patience=args.collapse_patience,
    )
    callbacks = [  # order matters: annotate_logs runs in this order (nan loss, then the gap, then the verdict)
        FreezeGuard(args.guard_action, check_steps=args.freeze_check_steps),
        MaskGuard(args.guard_action, min_first_step_loss=args.min_first_step_loss),
        collapse,
        TrainVisionProbe(args.vision_probe_steps),
        TrainingHealth(
            args.guard_action,
            collapse,
            min_gap=args.vision_gap_min,
            min_gap_relative=args.vision_gap_min_relative,
            low_loss=args.suspicious_loss,
            low_patience=args.suspicious_loss_patience,
            window_fraction=args.plateau_window_fraction,
            min_improvement=args.plateau_min_improvement,
            collapse_fraction=args.collapse_gap_fraction,
            band=args.healthy_loss_band,
        ),
    ]
    if args.vision_probe:
        callbacks.append(VisionProbe(args.vision_probe_min_gap, args.vision_probe_batches))
    csv_log = CsvLogCallback(args.csv_log_name)
    callbacks.append(csv_log)
    if args.plot_loss:
        callbacks.append(LossPlotCallback(csv_log, args.healthy_loss_band, args.suspicious_loss))
    return callbacks


__all__ = [
    "CollapseGuard",
    "CsvLogCallback",
    "FreezeGuard",
    "Guard",
    "GuardError",
    "GuardWarning",
    "LossPlotCallback",
    "MaskGuard",
    "TrainVisionProbe",
    "TrainingHealth",
    "VisionProbe",
    "default_callbacks",
    "plot_loss_curve",
]

"""The callbacks `MambaVLMTrainer` installs by default, built from the training arguments.

The guards live in `guards.py` (freeze, masks, collapse/NaN) and `health.py` (loss band,
vision probe); the on-disk outputs in `outputs.py` (CSV log, loss plot). This module only
assembles them, so a plain `transformers.Trainer` user can take the same set:
`Trainer(..., callbacks=default_callbacks(args))` (the batch-level hooks then stay idle).
"""

from __future__ import annotations

from .guards import CollapseGuard, FreezeGuard, Guard, GuardError, GuardWarning, MaskGuard
from .health import LossHealthCallback, VisionProbe
from .outputs import CsvLogCallback, LossPlotCallback, plot_loss_curve


def default_callbacks(args) -> list:
    """Guards, CSV log and loss plot configured from `MambaVLMTrainingArguments`."""
    callbacks = [
        FreezeGuard(args.guard_action, check_steps=args.freeze_check_steps),
        MaskGuard(args.guard_action, min_first_step_loss=args.min_first_step_loss),
        CollapseGuard(
            args.guard_action,
            std_threshold=args.collapse_std_threshold,
            relative_threshold=args.collapse_relative_threshold,
            patience=args.collapse_patience,
        ),
        LossHealthCallback(args.healthy_loss_band, args.suspicious_loss, args.suspicious_loss_patience),
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
    "LossHealthCallback",
    "LossPlotCallback",
    "MaskGuard",
    "VisionProbe",
    "default_callbacks",
    "plot_loss_curve",
]

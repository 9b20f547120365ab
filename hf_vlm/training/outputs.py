"""What training leaves on disk besides checkpoints: a per-step CSV log and a loss-curve PNG.

Users diagnosed their failures from a per-step CSV log (`stage2_train_log.csv` in their scripts)
and a plotted curve; both are written by default. The CSV has one row per step (training and
evaluation logs of the same step are merged) and is rewritten whole on each log, so a new metric
appearing mid-run (eval_loss, eval_vision_gap) simply becomes a new column. The plot's top panel
is the loss with the seeds' loss bands as context (not a verdict: templated captions legitimately
go far below them); the bottom panel is the vision gap (train and eval), the evidence the
`health` verdict is built on (verdict.py).
"""

from __future__ import annotations

import csv
import logging
import math
import os

from transformers import TrainerCallback

logger = logging.getLogger(__name__)

DEFAULT_CSV_LOG = "train_log.csv"
LEADING_COLUMNS = (
    "step",
    "epoch",
    "loss",
    "caption_loss",
    "learning_rate",
    "grad_norm",
    "visual_std",
    "visual_norm",
    "supervised_fraction",
    "health",
    "train_vision_gap",
    "train_vision_gap_rel",
    "eval_loss",
    "eval_vision_gap",
)


class CsvLogCallback(TrainerCallback):
    """Write `output_dir/<csv_log_name>`: step, epoch, loss, lr, grad_norm, visual_std, … per step."""

    def __init__(self, file_name: str = DEFAULT_CSV_LOG):
        self.file_name = file_name
        self.rows: dict[int, dict] = {}
        self.path: str | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.path = os.path.join(args.output_dir, self.file_name)
        if self.path and os.path.exists(self.path) and state.global_step > 0:  # resumed: keep the earlier rows
            with open(self.path, encoding="utf-8", newline="") as handle:
                for row in csv.DictReader(handle):
                    if row.get("step") and int(row["step"]) <= state.global_step:
                        self.rows[int(row["step"])] = row

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        self.path = self.path or os.path.join(args.output_dir, self.file_name)
        row = self.rows.setdefault(state.global_step, {"step": state.global_step})
        row.update({k: v for k, v in logs.items() if isinstance(v, (int, float, str))})
        self._write()

    def _write(self) -> None:
        keys = {k for row in self.rows.values() for k in row}
        columns = [c for c in LEADING_COLUMNS if c in keys] + sorted(keys - set(LEADING_COLUMNS))
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            for step in sorted(self.rows):
                writer.writerow(self.rows[step])
        os.replace(tmp, self.path)  # a reader never sees a half-written file


def _floats(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    steps, values = [], []
    for row in rows:
        try:
            value = float(row.get(key) or "nan")
        except ValueError:
            continue
        if math.isfinite(value):
            steps.append(float(row["step"]))
            values.append(value)
    return steps, values


def plot_loss_curve(
    csv_path: str,
    png_path: str | None = None,
    band: tuple[float, float, float, float] = (3.0, 8.0, 0.5, 1.0),
    suspicious: float = 0.1,
    title: str | None = None,
) -> str:
    """Plot the loss (bands as context) and the vision gap from a CsvLogCallback CSV; returns the PNG path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    png_path = png_path or os.path.splitext(csv_path)[0] + ".png"
    with open(csv_path, encoding="utf-8", newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if r.get("step")]
    start_low, start_high, target_low, target_high = band
    fig, (ax, gap_ax) = plt.subplots(
        2, 1, figsize=(9, 6.5), dpi=100, sharex=True, gridspec_kw={"height_ratios": (2, 1)}
    )
    ax.axhspan(start_low, start_high, color="tab:orange", alpha=0.12, label=f"start band {start_low:g}-{start_high:g}")
    ax.axhspan(target_low, target_high, color="tab:green", alpha=0.2, label=f"target {target_low:g}-{target_high:g}")
    ax.axhspan(suspicious / 100, suspicious, color="tab:red", alpha=0.12, label=f"< {suspicious:g}: leak if no gap")
    ax.axhline(suspicious, color="tab:red", linewidth=0.8, linestyle="--")
    steps, losses = _floats(rows, "loss")
    if steps:
        marker = "." if len(steps) < 50 else None
        ax.plot(steps, losses, color="tab:blue", linewidth=1.5, marker=marker, label="train loss")
    eval_steps, eval_losses = _floats(rows, "eval_loss")
    if eval_steps:
        ax.plot(eval_steps, eval_losses, color="tab:purple", marker="o", linestyle="--", label="eval loss")
    values = losses + eval_losses
    ax.set_yscale("log")
    low = min(values + [target_low, suspicious]) * 0.5
    high = max(values + [start_high]) * 1.5
    ax.set_ylim(max(low, suspicious / 100), high)
    ax.set_ylabel("caption loss (log scale)")
    ax.set_title(title or os.path.basename(csv_path))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)  # never over the curve
    gap_ax.axhline(0.0, color="black", linewidth=0.8)
    for key, color, label in (
        ("train_vision_gap", "tab:cyan", "train vision gap"),
        ("eval_vision_gap", "tab:purple", "eval vision gap"),
    ):
        gap_steps, gaps = _floats(rows, key)
        if gap_steps:
            gap_ax.plot(gap_steps, gaps, color=color, marker="o", markersize=3, label=label)
    gap_ax.set_xlabel("step")
    gap_ax.set_ylabel("loss(other image)\n- loss(true image)")
    gap_ax.grid(True, alpha=0.3)
    if gap_ax.get_legend_handles_labels()[0]:
        gap_ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    else:
        gap_ax.text(0.5, 0.5, "no vision probe (vision_probe_steps=0)", transform=gap_ax.transAxes, ha="center")
    fig.tight_layout()
    os.makedirs(os.path.dirname(png_path) or ".", exist_ok=True)
    fig.savefig(png_path)
    plt.close(fig)
    return png_path


class LossPlotCallback(TrainerCallback):
    """At the end of training, plot the CSV log next to it (`<csv name>.png`)."""

    def __init__(self, csv_callback: CsvLogCallback, band=(3.0, 8.0, 0.5, 1.0), suspicious: float = 0.1):
        self.csv_callback, self.band, self.suspicious = csv_callback, tuple(band), suspicious
        self.png_path: str | None = None

    def plot(self) -> str | None:
        path = self.csv_callback.path
        if not path or not os.path.exists(path):
            return None
        try:
            self.png_path = plot_loss_curve(path, band=self.band, suspicious=self.suspicious)
        except ImportError:
            logger.warning("matplotlib is not installed: no loss plot (pip install matplotlib)")
            return None
        logger.info("Loss curve written to %s", self.png_path)
        return self.png_path

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.plot()


__all__ = ["CsvLogCallback", "LossPlotCallback", "plot_loss_curve"]

"""One run per output_dir, and a resume that continues *this* run from a complete checkpoint.

Why: re-running into an existing output_dir silently overwrote the first run's final model, and
`resume_from_checkpoint: last` resumed the *old* run's checkpoint-30, printed "finished at step
30" for a `max_steps: 12` run and left the old weights in place. So:

* `check_output_dir`: a non-empty output_dir is refused unless `overwrite_output_dir` (the old
  run's checkpoints are then removed, so "last" can never mean them) or a resume was asked for.
  The synthetic assets folder (`<output_dir>/assets` by default) does not count: it is reused.
* `resolve_resume`: "last" is the newest *complete* checkpoint (`checkpoint_integrity`); the
  incomplete or rejected ones skipped are logged with the reason; an explicit path must be complete.
* `resume_settings` is recorded in every checkpoint (hf_vlm_checkpoint.json, `run_settings`) and
  `check_resume_compatible` refuses a checkpoint whose recorded settings differ in what decides
  what the weights mean (model, data, freeze policy), naming each difference, or whose step is
  already past `max_steps`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil

from .checkpoint_integrity import checkpoint_dirs, checkpoint_problems, newest_complete

logger = logging.getLogger(__name__)

RESUME_TRUE = ("true", "last", "auto", "yes")
RESUME_FALSE = ("", "false", "no", "none")
# what decides what the weights of a checkpoint mean: resuming with another value mixes two runs
RESUME_CRITICAL = {
    "model": (
        "tiny_preset",
        "bridge_type",
        "max_visual_tokens",
        "vision_feature_layer",
        "vision_model_name_or_path",
        "language_model_name_or_path",
        "init_from",
        "from_scratch",
        "llm_8bit",
        "llm_4bit",
        # studies (docs/architecture.md, section 4): how slices are pooled and where they sit in z
        "bridge_pooling",
        "slice_position_embedding",
        "study_depth_tokens",
    ),
    "data": (
        "train_file",
        "max_length",
        "max_slices",
        # studies: which pixels one row becomes (the processor's StudyPreprocessing)
        "studies",
        "study_windows",
        "study_num_slices",
        "study_slice_sampling",
        "study_slice_stride",
        "study_extent",
        "study_target_spacing",
        "study_crop",
        "study_image_size",
    ),
    "training": (
        "stage",
        "use_lora",
        "lora_r",
        "lora_alpha",
        "lora_target_modules",
        "unfreeze_vision_tower",
        "unfreeze_llm_layers",
        "seed",
    ),
}


def resume_requested(training_args) -> bool:
    value = training_args.resume_from_checkpoint
    return value is not None and str(value).lower() not in RESUME_FALSE


def resume_settings(model_args, data_args, training_args) -> dict:
    """The RESUME_CRITICAL values of this run (paths made absolute, lists as lists)."""
    groups = {"model": model_args, "data": data_args, "training": training_args}
    settings = {}
    for group, names in RESUME_CRITICAL.items():
        for name in names:
            value = getattr(groups[group], name, None)
            if isinstance(value, str) and os.path.exists(value):
                value = os.path.abspath(value)
            settings[name] = list(value) if isinstance(value, (list, tuple)) else value
    return settings


def check_output_dir(training_args, synthetic_dir: str | None = None) -> None:
    """Refuse to write a second run into a non-empty output_dir (see the module docstring)."""
    output_dir = training_args.output_dir
    if not output_dir or not os.path.isdir(output_dir) or resume_requested(training_args):
        return
    assets = os.path.abspath(synthetic_dir or os.path.join(output_dir, "assets"))
    entries = sorted(e for e in os.listdir(output_dir) if os.path.abspath(os.path.join(output_dir, e)) != assets)
    if not entries:
        return
    if getattr(training_args, "overwrite_output_dir", False):
        old = checkpoint_dirs(output_dir)
        for _step, path in old:
            shutil.rmtree(path, ignore_errors=True)
        logger.warning(
            "overwrite_output_dir: writing over the previous run in %s (%d old checkpoint(s) removed)",
            output_dir,
            len(old),
        )
        return
    shown = ", ".join(entries[:6]) + (f" (+{len(entries) - 6} more)" if len(entries) > 6 else "")
    raise ValueError(
        f"output_dir {output_dir} already holds a run ({shown}). A new run would overwrite its final model and "
        "mix its checkpoints with this one. Choose another output_dir, pass --overwrite_output_dir true to "
        "replace it, or --resume_from_checkpoint last to continue it."
    )


def resolve_resume(training_args) -> str | None:
    """`resume_from_checkpoint` -> a complete checkpoint path, or None to start fresh."""
    value = training_args.resume_from_checkpoint
    if not resume_requested(training_args):
        return None
    if str(value).lower() in RESUME_TRUE:
        path, skipped = newest_complete(training_args.output_dir)
        for bad, problems in skipped:
            logger.warning("Not resuming from %s: %s", bad, "; ".join(problems))
        if path is None:
            logger.warning(
                "resume_from_checkpoint=%s but %s has no complete checkpoint-N: starting fresh",
                value,
                training_args.output_dir,
            )
        else:
            logger.info("Resuming from %s (the newest complete checkpoint)", path)
        return path
    if not os.path.isdir(value):
        raise FileNotFoundError(f"resume_from_checkpoint={value!r} is not a directory")
    problems = checkpoint_problems(value)
    if problems:
        raise ValueError(
            f"resume_from_checkpoint={value!r} is not a complete checkpoint: {'; '.join(problems)}. "
            "Pass --resume_from_checkpoint last to take the newest complete one."
        )
    return value


def check_resume_compatible(path: str, settings: dict, max_steps: int) -> None:
    """Refuse a checkpoint of another run: different recorded settings, or a step past max_steps."""
    from ..checkpoints import read_checkpoint_info

    recorded = read_checkpoint_info(path).get("run_settings")
    problems = []
    if recorded is not None:
        for name, value in settings.items():
            if name in recorded and recorded[name] != value:
                problems.append(f"{name}: {recorded[name]!r} in the checkpoint, {value!r} now")
    state_file = os.path.join(path, "trainer_state.json")
    if max_steps and max_steps > 0 and os.path.isfile(state_file):
        with open(state_file, encoding="utf-8") as handle:
            step = int(json.load(handle).get("global_step", 0))
        if step > max_steps:
            problems.append(
                f"the checkpoint is at step {step} but this run has max_steps={max_steps}: it belongs to a longer run"
            )
    if problems:
        raise ValueError(
            f"Cannot resume from {path}: it was written by a run with other settings. "
            + "; ".join(problems)
            + ". Use another output_dir, or the settings of that run."
        )


__all__ = [
    "RESUME_CRITICAL",
    "check_output_dir",
    "check_resume_compatible",
    "resolve_resume",
    "resume_requested",
    "resume_settings",
]

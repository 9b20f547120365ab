"""`hf-vlm preflight RECIPE.yaml`: build everything, run ONE step, check it, print PASS/FAIL.

A 20-hour run that dies at hour 3 (OOM), or finishes having learned nothing (every label
-100, the LLM that was meant to be frozen drifting, a bridge with LR 0), costs a day. Each of
those shows up in the first step, so this command builds exactly what `hf-vlm train` would
and checks, in minutes:

* masks: every row supervises some answer tokens (and its EOS), no visual or prompt token;
* freeze policy: which components train; after one step frozen weights are bit-identical
  and trainable ones moved (the FreezeGuard, run at step 1);
* the step itself: a finite loss in a plausible range (a first-step loss < 0.1 means the
  masks leak);
* memory: peak RSS and CUDA max-allocated for one step at the recipe's batch and length.

Exit code 1 when any check FAILs. Nothing is saved to the recipe's output_dir.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import tempfile
import time

logger = logging.getLogger("hf_vlm.preflight")

PASS, FAIL, WARN, INFO = "PASS", "FAIL", "WARN", "INFO"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="recipe YAML path, or a name from recipes/")
    parser.add_argument("overrides", nargs=argparse.REMAINDER, help="--key value overrides, as for `hf-vlm train`")


def peak_rss_bytes() -> int | None:
    """Peak resident memory of this process (Linux/macOS: getrusage; Windows: peak working set)."""
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak if sys.platform == "darwin" else peak * 1024)
    except ImportError:  # Windows
        import psutil

        info = psutil.Process().memory_info()
        return int(getattr(info, "peak_wset", info.rss))


def _gb(n: float | None) -> str:
    return "n/a" if n is None else f"{n / 2**30:.2f} GB"


def preflight_overrides(recipe, overrides) -> dict:
    """One step, no saving/eval/push, output in a temp dir; synthetic assets stay where training puts them."""
    from ..training.recipe import load_recipe_dict, overrides_to_dict, resolve_recipe_path

    user = overrides_to_dict(overrides)
    raw = recipe if isinstance(recipe, dict) else load_recipe_dict(resolve_recipe_path(recipe))
    output_dir = user.get("output_dir", raw.get("output_dir")) or "trainer_output"
    forced = {
        "max_steps": 1,
        "gradient_accumulation_steps": 1,
        "warmup_steps": 0,
        "lr_scheduler_type": "constant",
        "save_strategy": "no",
        "eval_strategy": "no",
        "load_best_model_at_end": False,
        "push_to_hub": False,
        "report_to": "none",
        "logging_steps": 1,
        "plot_loss": False,
        "freeze_check_steps": 1,
        "vision_probe": False,
        "resume_from_checkpoint": None,
        "guard_action": "stop",
        "disable_tqdm": True,
        "output_dir": os.path.join(tempfile.mkdtemp(prefix="hf_vlm_preflight_"), "run"),
        "synthetic_dir": user.get("synthetic_dir", raw.get("synthetic_dir")) or os.path.join(output_dir, "assets"),
    }
    return {**user, **forced}


def check_masks(run) -> list[tuple[str, str, str]]:
    """Collate the first batch exactly as training does and inspect its labels by position."""
    from ..data.collator import IGNORE_INDEX

    size = min(run.training_args.per_device_train_batch_size, len(run.train_dataset))
    features = [run.train_dataset[i] for i in range(size)]
    try:
        batch = run.collator(features)
    except ValueError as error:  # PromptTooLongError and friends
        return [("masks", FAIL, str(error))]
    labels, ids, attention = batch["labels"], batch["input_ids"], batch["attention_mask"]
    supervised = labels != IGNORE_INDEX
    image = ids == run.processor.image_token_id
    problems = []
    for row, feature in enumerate(features):
        prompt_length = int(feature["prompt_length"])
        last = int(attention[row].sum()) - 1
        if not bool(supervised[row].any()):
            problems.append(f"row {row}: no supervised token")
        if bool(supervised[row, :prompt_length].any()):
            problems.append(f"row {row}: prompt positions supervised")
        truncated = run.data_args.max_length is not None and len(feature["input_ids"]) > run.data_args.max_length
        if not truncated and int(labels[row, last]) != run.processor.tokenizer.eos_token_id:
            problems.append(f"row {row}: the answer's EOS is not supervised (the model would never stop)")
    visual = int((supervised & image).sum())
    if visual:
        problems.append(f"{visual} visual position(s) supervised")
    fraction = float(supervised.sum()) / max(int(attention.sum()), 1)
    detail = f"supervised fraction {fraction:.2f} of {int(attention.sum())} tokens in {size} rows"
    rows = [("masks", FAIL if problems else PASS, "; ".join(problems) or f"{detail}; visual + prompt = -100, EOS kept")]
    if run.collator.truncated_answers:
        rows.append(
            (
                "truncation",
                WARN,
                f"{run.collator.truncated_answers} of {size} answers cut by max_length={run.data_args.max_length}",
            )
        )
    return rows


def check_freeze(trainer, stage: str) -> tuple[str, str, str]:
    from ..training.freeze import describe_trainable

    table = describe_trainable(trainer.model)
    detail = ", ".join(f"{r['component']} {r['status']}" for r in table)
    status = {r["component"]: r["status"] for r in table}
    if status.get("bridge") != "trainable":
        return ("freeze policy", FAIL, f"the bridge is not fully trainable: {detail}")
    if stage == "align" and status.get("language_model", "frozen") != "frozen":
        return ("freeze policy", WARN, f"stage align with LLM weights training (explicit opt-in): {detail}")
    return ("freeze policy", PASS, detail)


def run_preflight(recipe, overrides=None) -> list[tuple[str, str, str]]:
    """All checks as (name, PASS/FAIL/WARN/INFO, detail) rows."""
    import torch

    from ..ops import active_scan_backend
    from ..training.guards import GuardError
    from ..training.run import build_trainer, prepare_run

    rows = []
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    try:
        run = prepare_run(recipe, preflight_overrides(recipe, overrides))
    except Exception as error:  # noqa: BLE001 - any build failure is the answer
        return [("build", FAIL, f"{type(error).__name__}: {error}")]
    rows.append(
        (
            "build",
            PASS,
            f"{type(run.model).__name__}, {len(run.train_dataset)} training rows, scan backend {active_scan_backend()}",
        )
    )
    rows += check_masks(run)
    if any(r[1] == FAIL for r in rows):
        return rows
    trainer, _ = build_trainer(run)
    rows.append(check_freeze(trainer, run.training_args.stage))
    start = time.time()
    try:
        trainer.train()
    except GuardError as error:
        rows.append(("one step", FAIL, str(error)))
    except Exception as error:  # noqa: BLE001 - OOM, shape errors ... are what preflight is for
        rows.append(("one step", FAIL, f"{type(error).__name__}: {error}"))
    else:
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        loss = losses[0] if losses else float("nan")
        if not math.isfinite(loss):
            rows.append(("one step", FAIL, f"loss {loss}: NaN/Inf at the first step"))
        elif loss < run.training_args.min_first_step_loss:
            rows.append(
                (
                    "one step",
                    FAIL,
                    f"first-step loss {loss:.4f} < {run.training_args.min_first_step_loss}: "
                    "masks probably leak (a fresh bridge starts around 3-8)",
                )
            )
        else:
            rows.append(("one step", PASS, f"loss {loss:.3f} in {time.time() - start:.1f} s"))
        trips = trainer.guard_trips
        stopped = trainer.state.global_step < 1
        rows.append(
            (
                "guards",
                FAIL if stopped and trips else WARN if trips else PASS,
                " | ".join(trips) or "frozen weights unchanged, trainable weights moved, no NaN",
            )
        )
    cuda = None
    if torch.cuda.is_available():
        cuda = f"CUDA max allocated {_gb(torch.cuda.max_memory_allocated())} of {_gb(torch.cuda.get_device_properties(0).total_memory)}"  # noqa: E501
    rows.append(("memory", INFO, f"peak RSS {_gb(peak_rss_bytes())}" + (f", {cuda}" if cuda else "")))
    return rows


def format_table(rows) -> str:
    width = max(len(r[0]) for r in rows)
    lines = [f"{'check':<{width}}  result  detail", f"{'-' * width}  ------  ------"]
    lines += [f"{name:<{width}}  {status:<6}  {detail}" for name, status, detail in rows]
    failed = sum(r[1] == FAIL for r in rows)
    lines.append(f"\npreflight: {'FAIL' if failed else 'PASS'} ({failed} check(s) failed)")
    return "\n".join(lines)


def run(args) -> int:
    import transformers

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    transformers.logging.set_verbosity_error()  # the table is the output; load reports would bury it
    try:
        rows = run_preflight(args.recipe, args.overrides)
    except (ValueError, FileNotFoundError) as error:  # bad recipe keys / path
        rows = [("recipe", FAIL, str(error))]
    print(format_table(rows))
    return 1 if any(r[1] == FAIL for r in rows) else 0

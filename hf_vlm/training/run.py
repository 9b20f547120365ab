"""One training stage, top to bottom: recipe -> parts -> trainer -> train -> export -> record -> evaluate ->
card -> push.

Read it like prismatic's `scripts/pretrain.py`: `train_from_recipe` is the whole run, each step a
named function below it. `hf-vlm train` (hf_vlm.commands.train) only parses arguments and prints;
`hf-vlm preflight` builds the same parts with `prepare_run` + `build_trainer` and runs one step;
the demo calls `train_from_recipe` for each of its stages.

The parts come from `hf_vlm.training.builder` (processor, model, datasets, collator), the
checkpoint record / export / push from `hf_vlm.checkpoints`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

logger = logging.getLogger("hf_vlm.train")


@dataclass
class PreparedRun:
    """Everything a recipe builds before the Trainer exists (shared with `hf-vlm preflight`)."""

    model_args: object
    data_args: object
    synth_args: object
    training_args: object
    info: dict
    processor: object
    model: object
    train_dataset: object
    eval_dataset: object
    data_rows: dict
    collator: object
    record_extra: dict = field(default_factory=dict)  # tower hash + run settings, in every record

    def vision_source(self) -> str | None:
        """Where a checkpoint without tower weights re-loads the tower from."""
        from ..checkpoints import read_checkpoint_info

        source = self.model_args.vision_model_name_or_path
        if not source and self.model_args.init_from:
            source = read_checkpoint_info(self.model_args.init_from).get("vision_model_name_or_path")
        return source


def train_from_recipe(recipe, overrides=None, callbacks=None) -> dict:
    """Run one stage. `recipe` is a path, a recipe name or a dict; `overrides` a dict or a list of
    "--key value" strings. Returns {"model", "processor", "output_dir", "metrics", "global_step",
    "world_size", "guard_trips", "best_model_checkpoint", "stopped_early", "model_card",
    "nonfinite_step", "last_good_checkpoint", "saved", "evaluation_error", "health"} ("health": the
    verdict, what stopped the run, every code seen, the probes and the end-of-run table, see
    `verdict.TrainingHealth`).

    The final model is saved BEFORE the final evaluation (an evaluation error cannot lose a
    finished run), and after a NaN/Inf stop nothing is written or pushed as final: the result
    names the last good checkpoint instead.
    """
    run = prepare_run(recipe, overrides)
    trainer, tower_saved = build_trainer(run, callbacks)
    metrics = train(run, trainer)
    args = run.training_args
    result = {
        "model": trainer.model,  # in memory, already exported (plain VLM): the demo generates with it
        "processor": run.processor,
        "output_dir": args.output_dir,
        "metrics": metrics,
        "global_step": trainer.state.global_step,
        "world_size": args.world_size,
        "guard_trips": trainer.guard_trips,
        "best_model_checkpoint": trainer.state.best_model_checkpoint,
        "stopped_early": trainer.state.global_step < trainer.state.max_steps,
        "model_card": None,
        "nonfinite_step": trainer.nonfinite_step,
        "last_good_checkpoint": trainer.last_good_checkpoint(),
        "saved": False,
        "evaluation_error": None,
    }
    result["health"] = health_summary(trainer)
    if trainer.nonfinite_step is not None:
        logger.error(
            "NaN/Inf at step %d: nothing is saved as the final model in %s; last good checkpoint: %s",
            trainer.nonfinite_step,
            args.output_dir,
            result["last_good_checkpoint"] or "none",
        )
        return result
    exported = export(run, trainer)
    if trainer.is_world_process_zero():
        record(run, trainer, tower_saved, exported)
    result["saved"] = True
    evaluation, result["evaluation_error"] = final_evaluation(run, trainer)
    metrics.update(evaluation)
    result["health"] = health_summary(trainer)  # with the final eval_vision_gap
    if trainer.is_world_process_zero():
        result["model_card"] = write_card(run, trainer, metrics, result["health"])
        if args.push_to_hub:
            push(run)
    print(
        f"hf-vlm train: rank {args.process_index} of {args.world_size} finished at step {trainer.state.global_step}",
        flush=True,
    )
    return result


# --- 1. parts -------------------------------------------------------------------------------------
def _no_accelerator() -> bool:
    import torch

    mps = getattr(torch.backends, "mps", None)
    xpu = getattr(torch, "xpu", None)
    return not (torch.cuda.is_available() or (mps and mps.is_available()) or (xpu and xpu.is_available()))


def parse_run_arguments(recipe, overrides=None):
    """Recipe + overrides -> (model, data, synthetic, training) args and info.

    Without any GPU, `use_cpu` defaults to True: only then does a multi-process launch
    (accelerate_configs/cpu_2proc.yaml) join a gloo process group instead of running N
    independent copies.
    """
    from .recipe import load_recipe_dict, overrides_to_dict, parse_recipe, resolve_recipe_path

    extra = overrides_to_dict(overrides)
    raw = recipe if isinstance(recipe, dict) else load_recipe_dict(resolve_recipe_path(recipe))
    if "use_cpu" not in extra and "use_cpu" not in raw and _no_accelerator():
        extra["use_cpu"] = True
    return parse_recipe(recipe, extra)


def prepare_run(recipe, overrides=None) -> PreparedRun:
    """Arguments, then processor, model, datasets (optionally from cached vision features), collator."""
    from transformers import set_seed

    from ..data.validation import validate_dataset_images
    from .builder import (
        apply_study_settings,
        build_collator,
        build_datasets,
        build_model,
        build_processor,
        prepare_synthetic_assets,
    )
    from .resume import check_output_dir

    model_args, data_args, synth_args, training_args, info = parse_run_arguments(recipe, overrides)
    check_output_dir(training_args, synth_args.synthetic_dir if synth_args.synthetic_data else None)
    set_seed(training_args.seed)
    prepare_synthetic_assets(model_args, data_args, synth_args, training_args)
    processor = apply_study_settings(
        build_processor(model_args), data_args, model_args.processor_name_or_path or model_args.init_from
    )
    set_seed(training_args.seed)  # the same fresh bridge whether or not assets were just generated
    model = build_model(model_args, processor)
    train_dataset, eval_dataset, rows = build_datasets(data_args, processor)
    # every image training and evaluation will read, checked before step 0 (row_id + file named)
    validate_dataset_images(
        train_dataset, data_args.train_file, mode=data_args.validate_images, progress=training_args.process_index == 0
    )
    if eval_dataset is not None:
        validate_dataset_images(
            eval_dataset, data_args.eval_file, mode=data_args.validate_images, progress=training_args.process_index == 0
        )
    if data_args.vision_feature_cache:
        train_dataset, eval_dataset = use_feature_cache(
            data_args, training_args, model, processor, train_dataset, eval_dataset
        )
    return PreparedRun(
        model_args,
        data_args,
        synth_args,
        training_args,
        info,
        processor,
        model,
        train_dataset,
        eval_dataset,
        rows,
        build_collator(data_args, processor),
    )


def use_feature_cache(data_args, training_args, model, processor, train_dataset, eval_dataset):
    """Encode every image once with the frozen tower (main process first) and train from the features."""
    from ..data.feature_cache import VisionFeatureCache

    if training_args.unfreeze_vision_tower:
        raise ValueError("vision_feature_cache needs a frozen vision tower, but unfreeze_vision_tower is true")
    model.vision_tower.requires_grad_(False)
    cache = VisionFeatureCache(data_args.vision_feature_cache, model, processor, max_slices=data_args.max_slices)
    with training_args.main_process_first(desc="vision feature cache"):
        for dataset in (train_dataset, eval_dataset):
            if dataset is not None:
                cache.precompute(dataset)
    transform = cache.transform()
    return train_dataset.with_transform(transform), (
        eval_dataset.with_transform(transform) if eval_dataset is not None else None
    )


# --- 2. trainer -----------------------------------------------------------------------------------
def build_trainer(run: PreparedRun, callbacks=None):
    """`MambaVLMTrainer` (it applies the freeze policy) + the checkpoint-info callback."""
    from ..checkpoints import CheckpointInfoCallback
    from ..tower_identity import TOWER_HASH_KEY, tower_weights_hash
    from .resume import resume_settings
    from .trainer import MambaVLMTrainer

    args = run.training_args
    source = run.vision_source()
    if not args.save_frozen_vision_weights and not source:
        logger.info("save_frozen_vision_weights=false but the tower has no source to re-load it from: saving it")
        args.save_frozen_vision_weights = True
    tower_saved = bool(args.save_frozen_vision_weights or args.unfreeze_vision_tower)
    # first in the list: the record is on disk before any later callback (or a crash) can intervene
    extra = {"run_settings": resume_settings(run.model_args, run.data_args, args)}
    if not tower_saved and source:
        extra[TOWER_HASH_KEY] = tower_weights_hash(run.model.vision_tower)  # verified when re-attached
    run.record_extra = extra
    info = CheckpointInfoCallback(tower_saved, source, **extra)
    trainer = MambaVLMTrainer(
        model=run.model,
        args=args,
        train_dataset=run.train_dataset,
        eval_dataset=run.eval_dataset,
        data_collator=run.collator,
        processing_class=run.processor,
        callbacks=[info, *report_eval_callbacks(run), *(callbacks or [])],
    )
    return trainer, tower_saved


def report_eval_callbacks(run: PreparedRun) -> list:
    """Generation metrics (findings-F1, CIDEr-D, BLEU, repetition) and sample reports at every evaluation."""
    from ..data.dataset import with_image_transform
    from .report_eval import ReportEvalCallback, select_eval_rows

    data_args, args = run.data_args, run.training_args
    if run.eval_dataset is None or data_args.eval_samples <= 0 or args.eval_strategy == "no":
        return []
    # the eval CSV is already loaded with its paths resolved: only swap the transform to decoded rows
    rows = with_image_transform(
        run.eval_dataset, max_slices=data_args.max_slices, study_settings=run.processor.study_settings
    )
    return [ReportEvalCallback(select_eval_rows(rows, data_args.eval_samples, seed=args.seed), run.processor)]


# --- 3. train -------------------------------------------------------------------------------------
def resume_target(training_args) -> str | None:
    """`resume_from_checkpoint`: a path, or true/last/auto = the newest COMPLETE checkpoint-N in
    output_dir (an interrupted save or a rejected checkpoint is skipped, see `resume.resolve_resume`)."""
    from .resume import resolve_resume

    return resolve_resume(training_args)


def train(run: PreparedRun, trainer) -> dict:
    """Train (resuming if asked, from a checkpoint of this same run). Returns the training metrics."""
    from .resume import check_resume_compatible, resume_settings

    args = run.training_args
    logger.info(
        "rank %d of %d: %s stage, %d training rows",
        args.process_index,
        args.world_size,
        args.stage,
        len(run.train_dataset),
    )
    target = resume_target(args)
    if target is not None:
        check_resume_compatible(target, resume_settings(run.model_args, run.data_args, args), args.max_steps)
    return dict(trainer.train(resume_from_checkpoint=target).metrics)


def final_evaluation(run: PreparedRun, trainer) -> tuple[dict, str | None]:
    """Evaluate the saved model once; an error is reported, never fatal to the saved run."""
    if run.eval_dataset is None:
        return {}, None
    try:
        return dict(trainer.evaluate()), None
    except Exception as error:  # noqa: BLE001 - the final model is already on disk
        message = f"{type(error).__name__}: {error}"
        logger.error(
            "Final evaluation failed (the trained model is saved in %s): %s", run.training_args.output_dir, message
        )
        return {}, message


# --- 4. export ------------------------------------------------------------------------------------
def export(run: PreparedRun, trainer) -> dict:
    """Keep the LoRA adapter on its own, fold it into the LLM (8-bit de-quantised) and save the final model."""
    from peft import PeftModel

    from ..checkpoints import export_plain_model

    output_dir = run.training_args.output_dir
    llm = trainer.model.language_model
    if isinstance(llm, PeftModel) and trainer.is_world_process_zero():
        llm.save_pretrained(os.path.join(output_dir, "llm_adapter"))  # small, re-usable with peft
    exported = export_plain_model(trainer.model)  # LoRA merged, 8-bit de-quantised: a plain VLM checkpoint
    if any(exported.values()):
        logger.info("Final model exported as a plain checkpoint: %s", exported)
    trainer.save_model(output_dir, _internal_call=True)  # our card and push below, not the Trainer's
    return exported


# --- 5. record, card, push (main process) ---------------------------------------------------------
def record(run: PreparedRun, trainer, tower_saved: bool, exported: dict) -> None:
    """Processor, checkpoint record and trainer state next to the final weights."""
    from ..checkpoints import write_checkpoint_info

    output_dir = run.training_args.output_dir
    run.processor.save_pretrained(output_dir)
    write_checkpoint_info(
        output_dir,
        tower_saved=tower_saved,
        vision_model_name_or_path=run.vision_source(),
        **run.record_extra,
        lora_merged=exported["lora_merged"],
        trained_llm_quantization=exported.get("trained_llm_quantization"),
    )
    trainer.save_state()


def health_summary(trainer) -> dict | None:
    """The TrainingHealth verdict, the code that stopped the run (if any) and the end-of-run table."""
    from .verdict import TrainingHealth

    health = next((cb for cb in trainer.callback_handler.callbacks if isinstance(cb, TrainingHealth)), None)
    if health is None:
        return None
    return {
        "verdict": health.verdict,
        "stopped_by": health.stopped_by,
        "tripped": sorted(health.tripped),
        "seen": sorted({code for _, code in health.verdicts}),
        "probes": list(health.probes),
        "table": health.table(),
    }


def write_card(run: PreparedRun, trainer, metrics: dict, health: dict | None = None) -> str:
    """The stage history (carried over from init_from) and the model card (README.md)."""
    from .freeze import describe_trainable
    from .model_card import load_history, stage_record, write_history, write_model_card

    args = run.training_args
    previous = [] if run.model_args.from_scratch else load_history(run.model_args.init_from)
    stage = stage_record(
        run.model_args,
        run.data_args,
        args,
        run.info,
        run.data_rows,
        metrics,
        trainer.state.global_step,
        describe_trainable(trainer.model),
    )
    write_history(args.output_dir, previous + [stage])
    return write_model_card(
        args.output_dir,
        previous + [stage],
        run.info["recipe"],
        run.info["overrides"],
        guard_trips=trainer.guard_trips,
        health=(health or {}).get("table"),
    )


def push(run: PreparedRun) -> str:
    from ..checkpoints import push_output_dir

    return push_output_dir(run.training_args.output_dir, run.training_args)


__all__ = ["PreparedRun", "build_trainer", "parse_run_arguments", "prepare_run", "train_from_recipe"]

"""One training stage, top to bottom: recipe -> parts -> trainer -> train -> export -> record -> card -> push.

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
from dataclasses import dataclass

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
    "world_size", "guard_trips", "best_model_checkpoint", "stopped_early", "model_card"}."""
    run = prepare_run(recipe, overrides)
    trainer, tower_saved = build_trainer(run, callbacks)
    metrics = train(run, trainer)
    exported = export(run, trainer)
    card = None
    if trainer.is_world_process_zero():
        record(run, trainer, tower_saved, exported)
        card = write_card(run, trainer, metrics)
        if run.training_args.push_to_hub:
            push(run)
    args = run.training_args
    print(f"hf-vlm train: rank {args.process_index} of {args.world_size} finished at step "
          f"{trainer.state.global_step}", flush=True)
    return {
        "model": trainer.model,  # in memory, already exported (plain VLM): the demo generates with it
        "processor": run.processor,
        "output_dir": args.output_dir,
        "metrics": metrics,
        "global_step": trainer.state.global_step,
        "world_size": args.world_size,
        "guard_trips": trainer.guard_trips,
        "best_model_checkpoint": trainer.state.best_model_checkpoint,
        "stopped_early": trainer.state.global_step < trainer.state.max_steps,
        "model_card": card,
    }


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

    from .builder import build_collator, build_datasets, build_model, build_processor, prepare_synthetic_assets

    model_args, data_args, synth_args, training_args, info = parse_run_arguments(recipe, overrides)
    set_seed(training_args.seed)
    prepare_synthetic_assets(model_args, data_args, synth_args, training_args)
    processor = build_processor(model_args)
    set_seed(training_args.seed)  # the same fresh bridge whether or not assets were just generated
    model = build_model(model_args, processor)
    train_dataset, eval_dataset, rows = build_datasets(data_args, processor)
    if data_args.vision_feature_cache:
        train_dataset, eval_dataset = use_feature_cache(data_args, training_args, model, processor,
                                                        train_dataset, eval_dataset)
    return PreparedRun(model_args, data_args, synth_args, training_args, info, processor, model,
                       train_dataset, eval_dataset, rows, build_collator(data_args, processor))


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
    from .trainer import MambaVLMTrainer

    args = run.training_args
    source = run.vision_source()
    if not args.save_frozen_vision_weights and not source:
        logger.info("save_frozen_vision_weights=false but the tower has no source to re-load it from: saving it")
        args.save_frozen_vision_weights = True
    tower_saved = bool(args.save_frozen_vision_weights or args.unfreeze_vision_tower)
    # first in the list: the record is on disk before any later callback (or a crash) can intervene
    info = CheckpointInfoCallback(tower_saved, source)
    trainer = MambaVLMTrainer(
        model=run.model, args=args, train_dataset=run.train_dataset, eval_dataset=run.eval_dataset,
        data_collator=run.collator, processing_class=run.processor,
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
    rows = with_image_transform(run.eval_dataset, max_slices=data_args.max_slices)
    return [ReportEvalCallback(select_eval_rows(rows, data_args.eval_samples, seed=args.seed), run.processor)]


# --- 3. train -------------------------------------------------------------------------------------
def resume_target(training_args) -> str | None:
    """`resume_from_checkpoint`: a path, or true/last/auto = the newest checkpoint-N in output_dir."""
    from transformers.trainer_utils import get_last_checkpoint

    value = training_args.resume_from_checkpoint
    if value is None or str(value).lower() in ("", "false", "no", "none"):
        return None
    if str(value).lower() in ("true", "last", "auto", "yes"):
        last = get_last_checkpoint(training_args.output_dir) if os.path.isdir(training_args.output_dir) else None
        if last is None:
            logger.warning("resume_from_checkpoint=%s but %s has no checkpoint-N: starting fresh", value,
                           training_args.output_dir)
        return last
    if not os.path.isdir(value):
        raise FileNotFoundError(f"resume_from_checkpoint={value!r} is not a directory")
    return value


def train(run: PreparedRun, trainer) -> dict:
    """Train (resuming if asked), then evaluate once unless a NaN stopped the run. Returns metrics."""
    args = run.training_args
    logger.info("rank %d of %d: %s stage, %d training rows", args.process_index, args.world_size, args.stage,
                len(run.train_dataset))
    metrics = dict(trainer.train(resume_from_checkpoint=resume_target(args)).metrics)
    if run.eval_dataset is not None and trainer.nonfinite_step is None:
        metrics.update(trainer.evaluate())
    return metrics


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
    write_checkpoint_info(output_dir, tower_saved=tower_saved, vision_model_name_or_path=run.vision_source(),
                          lora_merged=exported["lora_merged"],
                          trained_llm_quantization=exported.get("trained_llm_quantization"))
    trainer.save_state()


def write_card(run: PreparedRun, trainer, metrics: dict) -> str:
    """The stage history (carried over from init_from) and the model card (README.md)."""
    from .freeze import describe_trainable
    from .model_card import load_history, stage_record, write_history, write_model_card

    args = run.training_args
    previous = [] if run.model_args.from_scratch else load_history(run.model_args.init_from)
    stage = stage_record(run.model_args, run.data_args, args, run.info, run.data_rows, metrics,
                         trainer.state.global_step, describe_trainable(trainer.model))
    write_history(args.output_dir, previous + [stage])
    return write_model_card(args.output_dir, previous + [stage], run.info["recipe"], run.info["overrides"],
                            guard_trips=trainer.guard_trips)


def push(run: PreparedRun) -> str:
    from ..checkpoints import push_output_dir

    return push_output_dir(run.training_args.output_dir, run.training_args)


__all__ = ["PreparedRun", "build_trainer", "parse_run_arguments", "prepare_run", "train_from_recipe"]

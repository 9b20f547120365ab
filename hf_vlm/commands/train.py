"""`hf-vlm train RECIPE.yaml [--key value ...]`: one training stage from a recipe.

Launch it through accelerate to pick the hardware (the recipe stays the same):

    accelerate launch --config_file accelerate_configs/single_gpu_bf16.yaml -m hf_vlm.cli train recipes/stage1_align.yaml
    accelerate launch --config_file accelerate_configs/cpu_2proc.yaml -m hf_vlm.cli train recipes/tiny_demo.yaml --max_steps 3

`train_from_recipe` is the same thing in-process (the demo and the tests call it). It parses
the recipe, builds processor/model/data (`hf_vlm.training.builder`), trains with
`MambaVLMTrainer` (periodic checkpoints, best checkpoint when `load_best_model_at_end`, resume
with `resume_from_checkpoint`), saves the final model + processor, writes a model card and,
if asked, pushes to the Hub.
"""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass

logger = logging.getLogger("hf_vlm.train")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="recipe YAML path, or a name from recipes/ (e.g. tiny_demo)")
    parser.add_argument(
        "overrides", nargs=argparse.REMAINDER,
        help="--key value pairs that override recipe keys (e.g. --max_steps 3 --learning_rate 1e-5)",
    )


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
        from ..training.builder import read_checkpoint_info

        source = self.model_args.vision_model_name_or_path
        if not source and self.model_args.init_from:
            source = read_checkpoint_info(self.model_args.init_from).get("vision_model_name_or_path")
        return source


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
    from ..training.recipe import load_recipe_dict, overrides_to_dict, parse_recipe, resolve_recipe_path

    extra = overrides_to_dict(overrides)
    raw = recipe if isinstance(recipe, dict) else load_recipe_dict(resolve_recipe_path(recipe))
    if "use_cpu" not in extra and "use_cpu" not in raw and _no_accelerator():
        extra["use_cpu"] = True
    return parse_recipe(recipe, extra)


def prepare_run(recipe, overrides=None) -> PreparedRun:
    from transformers import set_seed

    from ..training.builder import (
        build_collator, build_datasets, build_model, build_processor, prepare_synthetic_assets,
    )

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


def build_trainer(run: PreparedRun, callbacks=None):
    """`MambaVLMTrainer` (it applies the freeze policy) + the checkpoint-info callback."""
    from ..training import MambaVLMTrainer
    from ..training.builder import CheckpointInfoCallback

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
    from ..training.report_eval import ReportEvalCallback, select_eval_rows

    data_args, args = run.data_args, run.training_args
    if run.eval_dataset is None or data_args.eval_samples <= 0 or args.eval_strategy == "no":
        return []
    # the eval CSV is already loaded with its paths resolved: only swap the transform to decoded rows
    rows = with_image_transform(run.eval_dataset, max_slices=data_args.max_slices)
    return [ReportEvalCallback(select_eval_rows(rows, data_args.eval_samples, seed=args.seed), run.processor)]


def _resume_target(training_args) -> str | None:
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


def _save_adapter(trainer, output_dir: str) -> None:
    """Keep the LoRA adapter on its own too (small, re-usable with peft) before it is merged."""
    from peft import PeftModel

    llm = trainer.model.language_model
    if isinstance(llm, PeftModel) and trainer.is_world_process_zero():
        llm.save_pretrained(os.path.join(output_dir, "llm_adapter"))


def train_from_recipe(recipe, overrides=None, callbacks=None) -> dict:
    """Run one stage. Returns {"model", "processor", "output_dir", "metrics", "global_step", "world_size",
    "guard_trips", "best_model_checkpoint", "stopped_early", "model_card"}; `recipe` is a path, a
    recipe name or a dict; `overrides` a dict or a list of "--key value" strings."""
    from ..training.builder import export_plain_model, write_checkpoint_info
    from ..training.freeze import describe_trainable
    from ..training.model_card import load_history, push_output_dir, stage_record, write_history, write_model_card

    run = prepare_run(recipe, overrides)
    args = run.training_args
    trainer, tower_saved = build_trainer(run, callbacks)
    rank, world = args.process_index, args.world_size
    logger.info("rank %d of %d: %s stage, %d training rows", rank, world, args.stage, len(run.train_dataset))
    result = trainer.train(resume_from_checkpoint=_resume_target(args))
    metrics = dict(result.metrics)
    if run.eval_dataset is not None and trainer.nonfinite_step is None:
        metrics.update(trainer.evaluate())
    _save_adapter(trainer, args.output_dir)
    exported = export_plain_model(trainer.model)  # LoRA merged, 8-bit de-quantised: a plain VLM checkpoint
    if any(exported.values()):
        logger.info("Final model exported as a plain checkpoint: %s", exported)
    trainer.save_model(args.output_dir, _internal_call=True)  # our card and push below, not the Trainer's
    card = None
    if trainer.is_world_process_zero():
        run.processor.save_pretrained(args.output_dir)
        write_checkpoint_info(args.output_dir, tower_saved=tower_saved, vision_model_name_or_path=run.vision_source(),
                              lora_merged=exported["lora_merged"],
                              trained_llm_quantization=exported.get("trained_llm_quantization"))
        trainer.save_state()
        previous = [] if run.model_args.from_scratch else load_history(run.model_args.init_from)
        record = stage_record(run.model_args, run.data_args, args, run.info, run.data_rows, metrics,
                              trainer.state.global_step, describe_trainable(trainer.model))
        write_history(args.output_dir, previous + [record])
        card = write_model_card(args.output_dir, previous + [record], run.info["recipe"], run.info["overrides"],
                                guard_trips=trainer.guard_trips)
        if args.push_to_hub:
            push_output_dir(args.output_dir, args)
    print(f"hf-vlm train: rank {rank} of {world} finished at step {trainer.state.global_step}", flush=True)
    return {
        "model": trainer.model,  # in memory, already exported (plain VLM): the demo generates with it
        "processor": run.processor,
        "output_dir": args.output_dir,
        "metrics": metrics,
        "global_step": trainer.state.global_step,
        "world_size": world,
        "guard_trips": trainer.guard_trips,
        "best_model_checkpoint": trainer.state.best_model_checkpoint,
        "stopped_early": trainer.state.global_step < trainer.state.max_steps,
        "model_card": card,
    }


def run(args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        result = train_from_recipe(args.recipe, args.overrides)
    except (ValueError, FileNotFoundError) as error:
        logger.error("%s", error)
        return 2
    metrics = result["metrics"]
    shown = ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items()) if isinstance(v, float))
    print(f"Saved to {result['output_dir']} ({shown})")
    if result["stopped_early"] and result["guard_trips"]:
        print("Training stopped early because a guard tripped:\n" + "\n".join(result["guard_trips"]))
        return 1
    return 0

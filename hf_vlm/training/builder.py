"""Build what a recipe asks for: processor, model, datasets, collator; save/load checkpoints.

The model comes from exactly one source, checked in this order (the first that applies wins,
and the choice is logged, so nobody trains on a checkpoint they meant to discard):

1. `init_from` (a previous stage's output) unless `from_scratch`;
2. pretrained components (`vision_model_name_or_path` + `language_model_name_or_path`) joined
   by a fresh bridge (`from_components`), the LLM optionally in 8-bit;
3. `tiny_preset`: tiny random parts from `hf_vlm.presets` (tests);
4. `init_from` with `from_scratch`: that checkpoint with its bridge re-initialised.

Checkpoints (record, save, load, tower re-attach, export, push) live in `hf_vlm.checkpoints`.
"""

from __future__ import annotations

import dataclasses
import logging
import os

from ..checkpoints import load_vlm_checkpoint

logger = logging.getLogger(__name__)


# --- synthetic assets (the embedded default) ---------------------------------------------------
def prepare_synthetic_assets(model_args, data_args, synth_args, training_args) -> None:
    """Generate (or reuse) the synthetic data and tiny parts, and point the arguments at them.

    Runs on the main process first; the others then find the finished assets and reuse them,
    so a 2-process launch never writes the same files twice.
    """
    from ..demo_assets import DemoAssets, build_demo_assets, load_assets_record, save_assets_record

    if not synth_args.synthetic_data:
        return
    if model_args.tiny_preset is None:
        raise ValueError("synthetic_data: true needs tiny_preset ('tiny' or 'micro') to size the parts")
    out_dir = synth_args.synthetic_dir or os.path.join(training_args.output_dir, "assets")
    settings = {
        "preset": model_args.tiny_preset,
        "n_train": synth_args.synthetic_train_rows,
        "n_eval": synth_args.synthetic_eval_rows,
        "lm_steps": synth_args.synthetic_lm_steps,
        "seed": training_args.seed,
        **({"studies": True} if synth_args.synthetic_studies else {}),  # 2-D asset markers stay valid
        **({"lm_family": model_args.tiny_lm_family} if model_args.tiny_lm_family != "mamba" else {}),
        **(_tower_pretraining(synth_args, data_args, model_args) if synth_args.synthetic_tower_steps else {}),
    }
    with training_args.main_process_first(desc="synthetic assets"):
        stored = load_assets_record(out_dir)
        if stored is not None and stored[0] == settings:
            assets = stored[1]
            logger.info("Reusing synthetic assets in %s", out_dir)
        else:
            built = build_demo_assets(out_dir, **settings)
            assets = DemoAssets(**{k: os.path.abspath(v) for k, v in built.__dict__.items()})
            save_assets_record(out_dir, settings, assets)
    data_args.train_file = data_args.train_file or assets.train_csv
    if data_args.eval_file is None and synth_args.synthetic_eval_rows > 0:
        data_args.eval_file = assets.eval_csv
    if model_args.init_from is None or model_args.from_scratch:
        model_args.vision_model_name_or_path = model_args.vision_model_name_or_path or assets.vision_path
        model_args.language_model_name_or_path = model_args.language_model_name_or_path or assets.llm_path
        model_args.processor_name_or_path = model_args.processor_name_or_path or assets.processor_path


def _tower_pretraining(synth_args, data_args, model_args) -> dict:
    """`build_demo_assets` settings of the tower's Stage 0: every lung slice, preprocessed in-plane as
    this recipe does (windows, spacing, crop, size), trained at the hidden layer the bridge will read
    (`vision_feature_layer`). The slice sampling is left out on purpose: the demo's middle-slice
    baseline samples differently and must share the same tower (same assets)."""
    settings = data_args.study_preprocessing()
    if settings is None:
        raise ValueError("synthetic_tower_steps needs studies: true (the tower trains on study slices)")
    in_plane = dataclasses.replace(settings, slice_sampling="all", extent="lung")
    return {
        "tower_steps": synth_args.synthetic_tower_steps,
        "tower_settings": in_plane.to_dict(),
        "tower_feature_layer": model_args.vision_feature_layer,
    }


# --- processor ----------------------------------------------------------------------------------
def _has_processor(path: str | None) -> bool:
    return bool(path) and os.path.isfile(os.path.join(path, "processor_config.json"))


def build_processor(model_args):
    """Saved processor (processor_name_or_path, else init_from), or tokenizer + image processor
    of the components. The recipe's `max_visual_tokens` is applied unless the weights come
    from init_from (whose config fixes it)."""
    from transformers import AutoImageProcessor, AutoTokenizer

    from ..processing_mamba_vlm import MambaVLMProcessor

    use_init = model_args.init_from and not model_args.from_scratch
    source = model_args.processor_name_or_path or (
        model_args.init_from if _has_processor(model_args.init_from) else None
    )
    if source:
        processor = MambaVLMProcessor.from_pretrained(source)
    elif model_args.language_model_name_or_path and model_args.vision_model_name_or_path:
        tokenizer = AutoTokenizer.from_pretrained(model_args.language_model_name_or_path)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token  # GPT-NeoX: pad = eos; masks go by position
        image_processor = AutoImageProcessor.from_pretrained(model_args.vision_model_name_or_path)
        processor = MambaVLMProcessor(image_processor, tokenizer, max_visual_tokens=model_args.max_visual_tokens)
    else:
        raise ValueError(
            "No processor: set processor_name_or_path, or init_from a saved checkpoint, or both "
            "vision_model_name_or_path and language_model_name_or_path (tokenizer + image processor)"
        )
    if not use_init:
        processor.max_visual_tokens = model_args.max_visual_tokens
    return processor


def apply_study_settings(processor, data_args, source: str | None = None):
    """Record the recipe's study settings in the processor (saved with every checkpoint), so that
    generate, serve, eval and the feature cache load studies exactly as training did.

    A processor that already carries settings (from `init_from`) must agree with the recipe:
    a difference is an error naming both values, never a silent switch.
    """
    wanted = data_args.study_preprocessing()
    have = processor.study_settings
    if have is not None and wanted is not None and have != wanted:
        mine, theirs = wanted.to_dict(), have.to_dict()
        diff = ", ".join(f"{k}: recipe {mine[k]!r} vs {theirs[k]!r}" for k in mine if mine[k] != theirs.get(k))
        raise ValueError(
            f"the study settings of {source or 'the saved processor'} differ from the recipe's ({diff}); "
            "a model must keep the preprocessing it was trained with: set the recipe's study_* keys "
            "to the checkpoint's values"
        )
    if have is not None and wanted is None and not data_args.studies:
        raise ValueError(
            f"{source or 'the saved processor'} was trained on studies ({have.num_slices} slices, "
            f"{have.slice_sampling}); set studies: true with its study_* settings in the recipe"
        )
    if wanted is not None:
        processor.study_settings = wanted
    return processor


# --- model --------------------------------------------------------------------------------------
def _bridge_kwargs(model_args, processor) -> dict:
    return {
        "bridge_type": model_args.bridge_type,
        "max_visual_tokens": model_args.max_visual_tokens,
        "vision_feature_layer": model_args.vision_feature_layer,
        "image_token_id": processor.image_token_id,
        "qformer_init_from": model_args.qformer_init_from,
        "bridge_pooling": model_args.bridge_pooling,
        "slice_position_embedding": model_args.slice_position_embedding,
        "study_depth_tokens": model_args.study_depth_tokens,
    }


def _quantization_config(model_args):
    if not (model_args.llm_8bit or model_args.llm_4bit):
        return None
    from ..loading import bnb_quantization_config

    return bnb_quantization_config(load_in_4bit=bool(model_args.llm_4bit))


def build_model(model_args, processor):
    """The VLM from the first applicable source (see the module docstring)."""
    from ..modeling_mamba_vlm import MambaVLMForConditionalGeneration

    quant = _quantization_config(model_args)
    components = model_args.vision_model_name_or_path and model_args.language_model_name_or_path
    if model_args.init_from and not model_args.from_scratch:
        logger.info("Model: init_from %s", model_args.init_from)
        model = load_vlm_checkpoint(
            model_args.init_from,
            vision_model_name_or_path=model_args.vision_model_name_or_path,
            quantization_config=quant,
        )
        if model.config.max_visual_tokens != model_args.max_visual_tokens:
            raise ValueError(
                f"init_from {model_args.init_from} was trained with max_visual_tokens="
                f"{model.config.max_visual_tokens} but the recipe asks for {model_args.max_visual_tokens}: "
                "set them equal, or use from_scratch: true to start a new bridge"
            )
        return model
    if model_args.init_from:
        logger.info("from_scratch: the bridge weights of init_from=%s are NOT used", model_args.init_from)
    if components:
        logger.info(
            "Model: vision %s + LLM %s + fresh %s bridge",
            model_args.vision_model_name_or_path,
            model_args.language_model_name_or_path,
            model_args.bridge_type,
        )
        return MambaVLMForConditionalGeneration.from_components(
            model_args.vision_model_name_or_path,
            model_args.language_model_name_or_path,
            llm_quantization_config=quant,
            **_bridge_kwargs(model_args, processor),
        )
    if model_args.tiny_preset:
        from ..configuration_mamba_vlm import MambaVLMConfig
        from ..presets import tiny_text_config, tiny_vision_config

        pad = processor.tokenizer.pad_token_id
        config = MambaVLMConfig(
            vision_config=tiny_vision_config(model_args.tiny_preset),
            text_config=tiny_text_config(
                len(processor.tokenizer), model_args.tiny_preset, pad_token_id=pad, family=model_args.tiny_lm_family
            ),
            **_bridge_kwargs(model_args, processor),
        )
        logger.info("Model: random %s preset", model_args.tiny_preset)
        return MambaVLMForConditionalGeneration(config)
    if model_args.init_from:
        model = load_vlm_checkpoint(model_args.init_from, vision_model_name_or_path=None, quantization_config=quant)
        model.bridge.apply(model._init_weights)
        logger.info("Model: %s with a re-initialised bridge (from_scratch)", model_args.init_from)
        return model
    raise ValueError(
        "No model source: set init_from, or vision_model_name_or_path + language_model_name_or_path, "
        "or tiny_preset (see docs/recipes.md)"
    )


# --- data -----------------------------------------------------------------------------------------
def build_datasets(data_args, processor):
    """(train, eval or None, {file: rows}) lazily encoded `datasets.Dataset`s."""
    from ..data.encoding import load_training_dataset

    if not data_args.train_file:
        raise ValueError("train_file is not set (a cleaned caption CSV, see `hf-vlm clean`)")
    kwargs = dict(image_root=data_args.image_root, path_map=data_args.path_map_spec, max_slices=data_args.max_slices)
    train = load_training_dataset(data_args.train_file, processor, **kwargs)
    rows = {data_args.train_file: len(train)}
    evaluation = None
    if data_args.eval_file:
        evaluation = load_training_dataset(data_args.eval_file, processor, **kwargs)
        rows[data_args.eval_file] = len(evaluation)
    return train, evaluation, rows


def build_collator(data_args, processor):
    from ..data.collator import DataCollatorForMambaVLM

    return DataCollatorForMambaVLM(
        pad_token_id=processor.tokenizer.pad_token_id,
        max_length=data_args.max_length,
        image_token_id=processor.image_token_id,
        tokenizer=processor.tokenizer,
    )


__all__ = [
    "apply_study_settings",
    "build_collator",
    "build_datasets",
    "build_model",
    "build_processor",
    "prepare_synthetic_assets",
]

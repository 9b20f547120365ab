"""What `push_to_hub` uploads: a folder that loads on a machine without hf_vlm, with its tower.

Why: with the recipes' `save_frozen_vision_weights: false` the final output_dir holds no tower
weights (they are re-attached from a local folder, which does not exist elsewhere), and the run
never called `register_for_auto_class`, so a pushed checkpoint either loaded a random tower or
did not load at all where hf_vlm is not installed. `stage_for_push` writes a separate folder:

* the model loaded through `from_pretrained` (tower re-attached and verified against its
  recorded sha256) and saved whole, so the tower's weights travel with it;
* config, model and processor registered for the Auto classes (`AutoConfig`,
  `AutoModelForImageTextToText`, `AutoProcessor`): the modeling/processing files and the
  files they import are copied in, and `trust_remote_code=True` loads them;
* the record (`vision_tower_weights: included` + the tower hash), the model card, the stage
  history, the CSV log and plots, the LoRA adapter; never checkpoints, assets or pickles.
"""

from __future__ import annotations

import logging
import os
import shutil

logger = logging.getLogger(__name__)

AUTO_MODEL_CLASS = "AutoModelForImageTextToText"
# written by the staged save itself, or never pushed
_NOT_COPIED = (
    "model.safetensors",
    "model.safetensors.index.json",
    "config.json",
    "generation_config.json",
    "processor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "preprocessor_config.json",
    "chat_template.jinja",
    "training_args.bin",
    "trainer_state.json",
)
_NOT_COPIED_DIRS = ("assets", "runs")


def _register_for_auto_classes(model, processor):
    """Register config, model and processor for the Auto classes; returns an undo function."""
    classes = (type(model.config), type(model), type(processor))
    before = [getattr(cls, "_auto_class", None) for cls in classes]
    type(model.config).register_for_auto_class()
    type(model).register_for_auto_class(AUTO_MODEL_CLASS)
    type(processor).register_for_auto_class("AutoProcessor")

    def undo():
        for cls, value in zip(classes, before):
            cls._auto_class = value

    return undo


def stage_for_push(output_dir: str, staging_dir: str) -> str:
    """Write the self-contained copy of `output_dir` that is uploaded (see the module docstring)."""
    from .checkpoints import read_checkpoint_info, write_checkpoint_info
    from .modeling_mamba_vlm import MambaVLMForConditionalGeneration
    from .processing_mamba_vlm import MambaVLMProcessor
    from .tower_identity import TOWER_HASH_KEY, tower_weights_hash

    info = read_checkpoint_info(output_dir)
    model = MambaVLMForConditionalGeneration.from_pretrained(output_dir)  # external tower re-attached + verified
    processor = MambaVLMProcessor.from_pretrained(output_dir)
    os.makedirs(staging_dir, exist_ok=True)
    undo = _register_for_auto_classes(model, processor)
    try:
        model.save_pretrained(staging_dir)  # the whole model, tower included
        processor.save_pretrained(staging_dir)
    finally:
        undo()
    extra = {k: v for k, v in info.items() if k not in ("vision_tower_weights", "vision_model_name_or_path")}
    extra[TOWER_HASH_KEY] = tower_weights_hash(model.vision_tower)
    write_checkpoint_info(
        staging_dir, tower_saved=True, vision_model_name_or_path=info.get("vision_model_name_or_path"), **extra
    )
    for name in os.listdir(output_dir):
        source = os.path.join(output_dir, name)
        if name in _NOT_COPIED or name.endswith((".pt", ".pth", ".bin")) or name.startswith("checkpoint-"):
            continue
        if name.endswith((".safetensors", ".json")) and os.path.exists(os.path.join(staging_dir, name)):
            continue
        if os.path.isdir(source):
            if name not in _NOT_COPIED_DIRS:
                shutil.copytree(source, os.path.join(staging_dir, name), dirs_exist_ok=True)
        else:
            shutil.copy2(source, os.path.join(staging_dir, name))
    logger.info("Staged %s for the Hub in %s (tower included, Auto classes registered)", output_dir, staging_dir)
    return staging_dir


__all__ = ["AUTO_MODEL_CLASS", "stage_for_push"]

"""Checkpoints: optionally without the frozen vision tower, and exported as a plain VLM.

* `save_frozen_vision_weights: false` leaves the frozen tower (1.2 GB for CLIP-L) out of every
  checkpoint; `hf_vlm_checkpoint.json` records where it comes from and the model's own
  `from_pretrained` re-attaches it (`hf_vlm.loading.reattach_vision_tower`), so such a
  checkpoint still loads in one call, through the Auto classes too.
* `export_plain_model` folds LoRA adapters into the LLM (and de-quantises 8-bit layers) before
  the final save: peft's wrapped parameter names (`language_model.base_model.model...`) would
  otherwise make the final checkpoint unloadable by `from_pretrained`, by generation and by the
  next stage's `init_from`. Periodic `checkpoint-N` keep the training form, for resuming.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from transformers import TrainerCallback

from ..loading import CHECKPOINT_INFO, VISION_PREFIX, read_checkpoint_info, weight_names  # noqa: F401 - re-exported

logger = logging.getLogger(__name__)

_PEFT_PREFIX = "language_model.base_model.model."


def _source_for_record(name_or_path: str | None) -> str | None:
    """Absolute path for a local directory (the run may start elsewhere), else the hub id as is."""
    if name_or_path and os.path.isdir(name_or_path):
        return str(Path(name_or_path).resolve())
    return name_or_path


def save_vlm_checkpoint(model, output_dir: str, *, save_frozen_vision_weights: bool = True,
                        vision_model_name_or_path: str | None = None, state_dict: dict | None = None,
                        **save_kwargs) -> None:
    """`save_pretrained`, optionally without a frozen vision tower (recorded in hf_vlm_checkpoint.json)."""
    os.makedirs(output_dir, exist_ok=True)
    tower_frozen = not any(p.requires_grad for p in model.vision_tower.parameters())
    drop = not save_frozen_vision_weights and tower_frozen
    if drop and not vision_model_name_or_path:
        logger.warning("save_frozen_vision_weights=false but no vision_model_name_or_path to reload the tower "
                       "from: saving the tower weights anyway")
        drop = False
    if state_dict is None:
        state_dict = model.state_dict()
    if drop:
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith(VISION_PREFIX)}
    model.save_pretrained(output_dir, state_dict=state_dict, **save_kwargs)
    write_checkpoint_info(output_dir, tower_saved=not drop, vision_model_name_or_path=vision_model_name_or_path)


def write_checkpoint_info(path: str, *, tower_saved: bool, vision_model_name_or_path: str | None,
                          **extra) -> None:
    """Record whether `path` holds the tower weights and where to re-load them from (+ `extra`)."""
    info = {"vision_tower_weights": "included" if tower_saved else "external",
            "vision_model_name_or_path": _source_for_record(vision_model_name_or_path), **extra}
    with open(os.path.join(path, CHECKPOINT_INFO), "w", encoding="utf-8") as handle:
        json.dump(info, handle, indent=2)


class CheckpointInfoCallback(TrainerCallback):
    """Writes hf_vlm_checkpoint.json into every `checkpoint-N` the Trainer saves (main process)."""

    def __init__(self, tower_saved: bool, vision_model_name_or_path: str | None):
        self.tower_saved, self.source = tower_saved, vision_model_name_or_path

    def on_save(self, args, state, control, **kwargs):
        path = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if state.is_world_process_zero and os.path.isdir(path):
            write_checkpoint_info(path, tower_saved=self.tower_saved, vision_model_name_or_path=self.source)


def load_vlm_checkpoint(path: str, *, vision_model_name_or_path: str | None = None, quantization_config=None,
                        **kwargs):
    """Load a saved VLM; re-attach the vision tower when the checkpoint left it out.

    The tower source is `vision_model_name_or_path` if given, else the one recorded at save time.
    """
    from ..loading import disable_cpu_4bit_packing
    from ..modeling_mamba_vlm import MambaVLMForConditionalGeneration

    if any(name.startswith(_PEFT_PREFIX) for name in weight_names(path)):
        raise ValueError(
            f"{path} holds the LLM in peft's training form (LoRA adapters not merged): it is meant for "
            "resume_from_checkpoint. Load the run's final output_dir instead (LoRA merged there)."
        )
    # from_pretrained re-attaches a tower that the checkpoint left out (see hf_vlm.loading)
    model = MambaVLMForConditionalGeneration.from_pretrained(path, vision_model_name_or_path=vision_model_name_or_path,
                                                             **kwargs)
    if quantization_config is not None:
        # quantise only the LLM (as `from_components` does): the VLM itself stays a plain model,
        # so the tower and bridge keep full precision and the Trainer sees LLM-level quantisation only
        from transformers import MambaForCausalLM

        llm = model.language_model
        model.language_model = MambaForCausalLM.from_pretrained(
            None, config=llm.config, state_dict=llm.state_dict(), quantization_config=quantization_config
        )
        del llm
        disable_cpu_4bit_packing(model.language_model)  # keep 4-bit layers on the path that has a backward
    return model


def export_plain_model(model) -> dict:
    """Merge LoRA into the LLM and turn 8-bit/4-bit layers back into full-precision `nn.Linear`.

    Returns what was done. The LLM config loses its `quantization_config` (left in text_config,
    it makes `from_pretrained` quantise the whole VLM, tower included); the report's
    `trained_llm_quantization` ("8bit"/"4bit") is recorded in hf_vlm_checkpoint.json instead.
    """
    import torch
    from peft import PeftModel
    from torch import nn

    report = {"lora_merged": False, "dequantized_layers": 0}
    if isinstance(model.language_model, PeftModel):
        model.language_model = model.language_model.merge_and_unload()
        report["lora_merged"] = True
    try:
        import bitsandbytes as bnb
        from peft.utils.integrations import dequantize_bnb_weight
    except ImportError:
        return report
    quantized = (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit)
    for name, module in list(model.language_model.named_modules()):
        if not isinstance(module, quantized):
            continue
        weight = dequantize_bnb_weight(module.weight, state=getattr(module, "state", None)).float()
        plain = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
        with torch.no_grad():
            plain.weight.copy_(weight)
            if module.bias is not None:
                plain.bias.copy_(module.bias.float())
        plain.requires_grad_(False)
        parent = model.language_model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model.language_model
        setattr(parent, name.rsplit(".", 1)[-1], plain)
        report["dequantized_layers"] += 1
    if report["dequantized_layers"]:
        for attr in ("is_quantized", "is_loaded_in_8bit", "is_loaded_in_4bit"):
            if hasattr(model.language_model, attr):
                setattr(model.language_model, attr, False)
        model.language_model.hf_quantizer = None
        # a quantization_config left in text_config makes from_pretrained quantise the whole VLM
        # (vision tower included) on load; the fact is recorded in hf_vlm_checkpoint.json instead
        for config in (model.language_model.config, model.config.text_config):
            quant = getattr(config, "quantization_config", None)
            if quant is not None:
                quant = quant.to_dict() if hasattr(quant, "to_dict") else dict(quant)
                report["trained_llm_quantization"] = "4bit" if quant.get("load_in_4bit") else "8bit"
                delattr(config, "quantization_config")
    return report


__all__ = [
    "CHECKPOINT_INFO",
    "CheckpointInfoCallback",
    "export_plain_model",
    "load_vlm_checkpoint",
    "read_checkpoint_info",
    "save_vlm_checkpoint",
    "write_checkpoint_info",
]

"""Checkpoints, in one place: the record, save, load, tower re-attach, export and push.

* `hf_vlm_checkpoint.json` (`CHECKPOINT_INFO`) records whether the frozen vision tower's weights
  are in the checkpoint and where to re-load them from. `save_frozen_vision_weights: false` leaves
  the frozen tower (1.2 GB for CLIP-L) out of every checkpoint (`without_frozen_tower`), and the
  model's own `from_pretrained` re-attaches it (`reattach_vision_tower`), so such a checkpoint
  still loads in one call, through the Auto classes too: no load path ends with a random tower.
* `export_plain_model` folds LoRA adapters into the LLM (and de-quantises 8-bit layers) before the
  final save: peft's wrapped parameter names (`language_model.base_model.model...`) would
  otherwise make the final checkpoint unloadable by `from_pretrained`, by generation and by the
  next stage's `init_from`. Periodic `checkpoint-N` keep the training form, for resuming.
* `push_output_dir` uploads a self-contained copy: the tower included, model + processor
  registered for the Auto classes with remote code (`hf_vlm.publishing`).
* An external tower is verified by a content hash recorded at save time (`hf_vlm.tower_identity`).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from transformers import TrainerCallback

from .tower_identity import TOWER_HASH_KEY, check_tower_hash, tower_weights_hash

logger = logging.getLogger(__name__)

CHECKPOINT_INFO = "hf_vlm_checkpoint.json"
VISION_PREFIX = "vision_tower."
_PEFT_PREFIX = "language_model.base_model.model."
_IGNORE_ON_PUSH = ["checkpoint-*", "checkpoint-*/**", "assets/**", "runs/**", "*.pt"]


def tower_is_frozen(model) -> bool:
    return not any(p.requires_grad for p in model.vision_tower.parameters())


def without_frozen_tower(state_dict: dict) -> dict:
    """The state dict minus the vision tower's tensors (re-loaded from its recorded source)."""
    return {k: v for k, v in state_dict.items() if not k.startswith(VISION_PREFIX)}


# --- the record -----------------------------------------------------------------------------------
def weight_names(path: str) -> list[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as handle:
            return list(json.load(handle)["weight_map"])
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(single):
        from safetensors import safe_open

        with safe_open(single, "pt") as handle:
            return list(handle.keys())
    return []


def read_checkpoint_info(path: str) -> dict:
    """The recorded info, or (no record) whether the weights hold any `vision_tower.*` tensor."""
    file = os.path.join(path, CHECKPOINT_INFO)
    if os.path.isfile(file):
        with open(file, encoding="utf-8") as handle:
            return json.load(handle)
    names = weight_names(path)
    tower = not names or any(n.startswith(VISION_PREFIX) for n in names)
    return {"vision_tower_weights": "included" if tower else "external", "vision_model_name_or_path": None}


def _source_for_record(name_or_path: str | None) -> str | None:
    """Absolute path for a local directory (the run may start elsewhere), else the hub id as is."""
    if name_or_path and os.path.isdir(name_or_path):
        return str(Path(name_or_path).resolve())
    return name_or_path


def write_checkpoint_info(path: str, *, tower_saved: bool, vision_model_name_or_path: str | None, **extra) -> None:
    """Record whether `path` holds the tower weights and where to re-load them from (+ `extra`)."""
    info = {
        "vision_tower_weights": "included" if tower_saved else "external",
        "vision_model_name_or_path": _source_for_record(vision_model_name_or_path),
        **extra,
    }
    with open(os.path.join(path, CHECKPOINT_INFO), "w", encoding="utf-8") as handle:
        json.dump(info, handle, indent=2)


class CheckpointInfoCallback(TrainerCallback):
    """Writes hf_vlm_checkpoint.json into every `checkpoint-N` the Trainer saves (main process).

    `MambaVLMTrainer` calls `write_checkpoint_record` before it marks the checkpoint complete,
    so the record is part of what the completion marker vouches for; `on_save` covers a plain
    `Trainer`. `extra` (the tower hash, the run settings a resume is checked against) goes in too.
    """

    def __init__(self, tower_saved: bool, vision_model_name_or_path: str | None, **extra):
        self.tower_saved, self.source, self.extra = tower_saved, vision_model_name_or_path, extra

    def write_checkpoint_record(self, path: str, args=None, state=None) -> None:
        write_checkpoint_info(path, tower_saved=self.tower_saved, vision_model_name_or_path=self.source, **self.extra)

    def on_save(self, args, state, control, **kwargs):
        path = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        written = os.path.isfile(os.path.join(path, CHECKPOINT_INFO))
        if state.is_world_process_zero and os.path.isdir(path) and not written:
            self.write_checkpoint_record(path)


# --- save / load ----------------------------------------------------------------------------------
def save_vlm_checkpoint(
    model,
    output_dir: str,
    *,
    save_frozen_vision_weights: bool = True,
    vision_model_name_or_path: str | None = None,
    state_dict: dict | None = None,
    **save_kwargs,
) -> None:
    """`save_pretrained`, optionally without a frozen vision tower (recorded in hf_vlm_checkpoint.json)."""
    os.makedirs(output_dir, exist_ok=True)
    drop = not save_frozen_vision_weights and tower_is_frozen(model)
    if drop and not vision_model_name_or_path:
        logger.warning(
            "save_frozen_vision_weights=false but no vision_model_name_or_path to reload the tower "
            "from: saving the tower weights anyway"
        )
        drop = False
    if state_dict is None:
        state_dict = model.state_dict()
    extra = {}
    if drop:
        state_dict = without_frozen_tower(state_dict)
        extra[TOWER_HASH_KEY] = tower_weights_hash(model.vision_tower)  # the re-attached tower is verified
    model.save_pretrained(output_dir, state_dict=state_dict, **save_kwargs)
    write_checkpoint_info(
        output_dir, tower_saved=not drop, vision_model_name_or_path=vision_model_name_or_path, **extra
    )


def load_vlm_checkpoint(path: str, *, vision_model_name_or_path: str | None = None, quantization_config=None, **kwargs):
    """Load a saved VLM; re-attach the vision tower when the checkpoint left it out.

    The tower source is `vision_model_name_or_path` if given, else the one recorded at save time.
    """
    from .modeling_mamba_vlm import MambaVLMForConditionalGeneration

    if any(name.startswith(_PEFT_PREFIX) for name in weight_names(path)):
        raise ValueError(
            f"{path} holds the LLM in peft's training form (LoRA adapters not merged): it is meant for "
            "resume_from_checkpoint. Load the run's final output_dir instead (LoRA merged there)."
        )
    # from_pretrained re-attaches a tower that the checkpoint left out (`reattach_vision_tower`)
    model = MambaVLMForConditionalGeneration.from_pretrained(
        path, vision_model_name_or_path=vision_model_name_or_path, **kwargs
    )
    if quantization_config is not None:
        quantize_language_model(model, quantization_config)
    return model


def quantize_language_model(model, quantization_config, device_map=None):
    """Replace the VLM's LLM by a bitsandbytes copy quantised from its current (full-precision) weights.

    Only the LLM (as `from_components` does): the VLM itself stays a plain model, so the tower and
    bridge keep full precision and the Trainer sees LLM-level quantisation only. Used by `init_from`
    with `llm_8bit` and by inference on a checkpoint whose export de-quantised the LLM.
    """
    from .loading import disable_cpu_4bit_packing

    llm = model.language_model
    kwargs = {"device_map": device_map} if device_map is not None else {}
    model.language_model = type(llm).from_pretrained(
        None, config=llm.config, state_dict=llm.state_dict(), quantization_config=quantization_config, **kwargs
    )
    del llm
    disable_cpu_4bit_packing(model.language_model)  # keep 4-bit layers on the path that has a backward
    return model


def reattach_vision_tower(model, checkpoint: str, vision_model_name_or_path: str | None = None) -> bool:
    """Load the frozen vision tower of a checkpoint that was saved without it.

    `hf_vlm_checkpoint.json` (written by the trainer) records `vision_tower_weights: external` and
    where the tower comes from. Without this, `from_pretrained` would leave a randomly initialised
    tower in place and the model would describe noise: a silent failure. Returns True if re-attached.
    """
    if not os.path.isdir(checkpoint):
        return False  # hub checkpoints: pushed with their tower (`push_output_dir`)
    info = read_checkpoint_info(checkpoint)
    if info.get("vision_tower_weights") != "external":
        return False
    source = vision_model_name_or_path or info.get("vision_model_name_or_path")
    if not source:
        raise ValueError(
            f"{checkpoint} was saved without its vision tower and records no source: "
            "pass vision_model_name_or_path=... to from_pretrained"
        )
    from .loading import load_vision_tower

    tower = load_vision_tower(source)  # in its stored precision: hashed before any cast
    recorded = info.get(TOWER_HASH_KEY)
    check_tower_hash(tower, recorded, source, checkpoint)
    if not recorded:
        logger.warning(
            "%s records no %s (saved by an older hf_vlm): the tower at %s is not verified",
            checkpoint,
            TOWER_HASH_KEY,
            source,
        )
    tower.to(next(model.bridge.parameters()).dtype)
    missing, unexpected = model.vision_tower.load_state_dict(tower.state_dict(), strict=False)
    if unexpected or [k for k in missing if "pooler" not in k]:
        model.vision_tower = tower  # different head layout: take the loaded module as is
    model.vision_tower.requires_grad_(False)
    logger.info("Vision tower re-attached from %s (the checkpoint stores only bridge + LLM)", source)
    return True


# --- export and push ------------------------------------------------------------------------------
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


def push_output_dir(output_dir: str, training_args) -> str:
    """Upload a self-contained copy of the final model (tower included, Auto classes registered with
    remote code, see `hf_vlm.publishing`), processor, card and logs; never the intermediate checkpoints."""
    import tempfile

    from huggingface_hub import HfApi

    from .publishing import stage_for_push

    repo_id = training_args.hub_model_id or os.path.basename(os.path.normpath(output_dir))
    api = HfApi(token=training_args.hub_token)
    repo_id = api.create_repo(repo_id, private=bool(training_args.hub_private_repo), exist_ok=True).repo_id
    with tempfile.TemporaryDirectory(prefix="hf_vlm_push_") as staging:
        stage_for_push(output_dir, staging)
        api.upload_folder(
            repo_id=repo_id,
            folder_path=staging,
            commit_message="hf_vlm: final model and card",
            ignore_patterns=_IGNORE_ON_PUSH,
        )
    logger.info("Pushed %s to https://huggingface.co/%s", output_dir, repo_id)
    return repo_id


__all__ = [
    "CHECKPOINT_INFO",
    "VISION_PREFIX",
    "CheckpointInfoCallback",
    "export_plain_model",
    "load_vlm_checkpoint",
    "push_output_dir",
    "quantize_language_model",
    "read_checkpoint_info",
    "reattach_vision_tower",
    "save_vlm_checkpoint",
    "tower_is_frozen",
    "weight_names",
    "without_frozen_tower",
    "write_checkpoint_info",
]

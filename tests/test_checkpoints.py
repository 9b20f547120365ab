"""hf_vlm/checkpoints.py: the record, saving without the frozen tower, re-attaching it, init_from."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch


def test_checkpoint_without_the_frozen_tower_round_trips(micro_config, tmp_path, micro_processor):
    from transformers import ViTModel

    from hf_vlm import MambaVLMForConditionalGeneration
    from hf_vlm.checkpoints import load_vlm_checkpoint, read_checkpoint_info, save_vlm_checkpoint
    from hf_vlm.presets import tiny_vision_config

    torch.manual_seed(0)
    tower_dir = tmp_path / "tower"
    ViTModel(tiny_vision_config("micro"), add_pooling_layer=False).save_pretrained(tower_dir)
    tower = ViTModel.from_pretrained(tower_dir)
    model = MambaVLMForConditionalGeneration(micro_config(), vision_tower=tower).eval()
    model.vision_tower.requires_grad_(False)
    out = tmp_path / "ckpt"
    save_vlm_checkpoint(model, str(out), save_frozen_vision_weights=False, vision_model_name_or_path=str(tower_dir))

    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as handle:
        keys = list(handle.keys())
    assert keys and not any(k.startswith("vision_tower.") for k in keys)
    info = read_checkpoint_info(str(out))
    assert info["vision_tower_weights"] == "external" and Path(info["vision_model_name_or_path"]) == tower_dir.resolve()

    loaded = load_vlm_checkpoint(str(out)).eval()
    original = dict(model.state_dict())
    for name, value in loaded.state_dict().items():
        if name in original and ".pooler." not in name:  # ViT's pooler is not in the tower checkpoint (unused)
            assert torch.equal(value, original[name]), name
    pixel = torch.randn(1, 3, 32, 32)
    assert torch.equal(loaded.get_image_features(pixel), model.get_image_features(pixel))
    # every load path re-attaches it, the Auto classes included (never a random tower in silence)
    from transformers import AutoModelForImageTextToText

    auto = AutoModelForImageTextToText.from_pretrained(out).eval()
    assert torch.equal(auto.get_image_features(pixel), model.get_image_features(pixel))

    (out / "hf_vlm_checkpoint.json").unlink()  # no record: detected from the weights, source must be given
    assert read_checkpoint_info(str(out))["vision_tower_weights"] == "external"
    with pytest.raises(ValueError, match="without its vision tower"):
        load_vlm_checkpoint(str(out))
    again = load_vlm_checkpoint(str(out), vision_model_name_or_path=str(tower_dir))
    assert torch.equal(again.get_image_features(pixel), model.get_image_features(pixel))


def test_checkpoint_keeps_a_trainable_tower(tmp_path, micro_model):
    from hf_vlm.checkpoints import read_checkpoint_info, save_vlm_checkpoint

    save_vlm_checkpoint(
        micro_model,
        str(tmp_path),
        save_frozen_vision_weights=False,
        vision_model_name_or_path="openai/clip-vit-large-patch14",
    )
    assert json.loads((tmp_path / "hf_vlm_checkpoint.json").read_text())["vision_tower_weights"] == "included"
    assert read_checkpoint_info(str(tmp_path))["vision_tower_weights"] == "included"


def test_build_model_from_init_from_and_from_scratch(tmp_path, micro_model, micro_processor):
    """init_from loads the previous stage; from_scratch keeps its LLM but starts a fresh bridge."""
    from hf_vlm.checkpoints import save_vlm_checkpoint
    from hf_vlm.training.arguments import ModelArguments
    from hf_vlm.training.builder import build_model

    save_vlm_checkpoint(micro_model, str(tmp_path))
    k = micro_model.config.max_visual_tokens
    loaded = build_model(ModelArguments(init_from=str(tmp_path), max_visual_tokens=k), micro_processor)
    assert torch.equal(loaded.bridge.linear_1.weight, micro_model.bridge.linear_1.weight)

    torch.manual_seed(123)
    fresh = build_model(
        ModelArguments(init_from=str(tmp_path), max_visual_tokens=k, from_scratch=True), micro_processor
    )
    assert not torch.equal(fresh.bridge.linear_1.weight, micro_model.bridge.linear_1.weight)
    llm = micro_model.language_model.get_input_embeddings().weight
    assert torch.equal(fresh.language_model.get_input_embeddings().weight, llm)

    with pytest.raises(ValueError, match="max_visual_tokens"):
        build_model(ModelArguments(init_from=str(tmp_path), max_visual_tokens=k + 1), micro_processor)
    with pytest.raises(ValueError, match="No model source"):
        build_model(ModelArguments(), micro_processor)

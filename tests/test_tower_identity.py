"""An external vision tower is verified by a content hash, not trusted by path (issue 13, case 5).

Before: a checkpoint saved without its frozen tower re-loaded whatever sat at the recorded folder;
regenerated assets there (or an edited record pointing elsewhere) silently changed every report.
"""

from __future__ import annotations

import json

import pytest
import torch


def _saved_without_tower(micro_config, tmp_path):
    from transformers import ViTModel

    from hf_vlm import MambaVLMForConditionalGeneration
    from hf_vlm.checkpoints import save_vlm_checkpoint
    from hf_vlm.presets import tiny_vision_config

    torch.manual_seed(0)
    tower_dir = tmp_path / "tower"
    ViTModel(tiny_vision_config("micro"), add_pooling_layer=False).save_pretrained(tower_dir)
    model = MambaVLMForConditionalGeneration(micro_config(), vision_tower=ViTModel.from_pretrained(tower_dir)).eval()
    model.vision_tower.requires_grad_(False)
    out = tmp_path / "ckpt"
    save_vlm_checkpoint(model, str(out), save_frozen_vision_weights=False, vision_model_name_or_path=str(tower_dir))
    return model, out, tower_dir


def test_a_changed_tower_folder_is_refused_naming_both_hashes(micro_config, tmp_path):
    from transformers import ViTModel

    from hf_vlm.checkpoints import load_vlm_checkpoint, read_checkpoint_info
    from hf_vlm.presets import tiny_vision_config
    from hf_vlm.tower_identity import TOWER_HASH_KEY, TowerMismatchError, tower_weights_hash

    model, out, tower_dir = _saved_without_tower(micro_config, tmp_path)
    recorded = read_checkpoint_info(str(out))[TOWER_HASH_KEY]
    assert recorded == tower_weights_hash(model.vision_tower)
    pixel = torch.randn(1, 3, 32, 32)
    assert torch.equal(load_vlm_checkpoint(str(out)).eval().get_image_features(pixel), model.get_image_features(pixel))

    torch.manual_seed(1)  # the assets are regenerated: same architecture, other weights, same folder
    ViTModel(tiny_vision_config("micro"), add_pooling_layer=False).save_pretrained(tower_dir)
    with pytest.raises(TowerMismatchError) as error:
        load_vlm_checkpoint(str(out))
    assert recorded in str(error.value) and str(tower_dir) in str(error.value)
    found = tower_weights_hash(ViTModel.from_pretrained(tower_dir))
    assert found != recorded and found in str(error.value)

    # the record edited to point at another tower folder: refused as well
    torch.manual_seed(0)
    restored = tmp_path / "restored"
    ViTModel(tiny_vision_config("micro"), add_pooling_layer=False).save_pretrained(restored)
    info = json.loads((out / "hf_vlm_checkpoint.json").read_text(encoding="utf-8"))
    info["vision_model_name_or_path"] = str(restored)  # the original weights, re-created: accepted
    (out / "hf_vlm_checkpoint.json").write_text(json.dumps(info), encoding="utf-8")
    assert torch.equal(load_vlm_checkpoint(str(out)).eval().get_image_features(pixel), model.get_image_features(pixel))
    info["vision_model_name_or_path"] = str(tower_dir)
    (out / "hf_vlm_checkpoint.json").write_text(json.dumps(info), encoding="utf-8")
    with pytest.raises(TowerMismatchError):
        load_vlm_checkpoint(str(out))


def test_hash_ignores_the_load_dtype_and_file_layout(micro_config, tmp_path):
    from hf_vlm.tower_identity import tower_weights_hash

    model, _out, _tower = _saved_without_tower(micro_config, tmp_path)
    reference = tower_weights_hash(model.vision_tower)
    state = {k: v.clone() for k, v in model.vision_tower.state_dict().items()}
    again = type(model.vision_tower)(model.vision_tower.config).to(torch.bfloat16).float()  # another pooler init
    again.load_state_dict(state)
    assert tower_weights_hash(again) == reference
    with torch.no_grad():
        next(again.parameters()).add_(1e-3)
    assert tower_weights_hash(again) != reference

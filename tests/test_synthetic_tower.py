"""hf_vlm.synthetic_tower: the demo tower's lesion-marking Stage 0, and what it is built on."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from transformers import ViTModel

from hf_vlm.data.studies import load_study, preprocess_volume
from hf_vlm.presets import tiny_vision_config
from hf_vlm.synthetic_tower import lesion_slices, patch_auc, patch_targets, pretrain_lesion_tower
from hf_vlm.synthetic_volumes import draw_study

NORMALISE = {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}  # as the demo's image processor
SETTINGS = {"windows": ["lung"], "slice_sampling": "all", "extent": "lung", "crop": "body", "image_size": 64}


def test_preprocess_volume_equals_loading_the_same_volume_from_a_nifti(tmp_path):
    volume, affine, _ = draw_study(np.random.default_rng([5, 0]))
    path = tmp_path / "case.nii.gz"
    nib.save(nib.Nifti1Image(volume, affine), str(path))
    from_file, in_memory = load_study(str(path), SETTINGS), preprocess_volume(volume, affine, SETTINGS)
    assert in_memory.slice_indices == from_file.slice_indices and in_memory.extent == from_file.extent
    assert torch.equal(in_memory.pixels, from_file.pixels)


def test_without_nodule_only_the_lesion_differs():
    volume, _, facts = draw_study(np.random.default_rng([5, 1]))
    clean, _, clean_facts = draw_study(np.random.default_rng([5, 1]), with_nodule=False)
    assert clean_facts == facts  # same rng stream: same anatomy, facts and noise
    changed = np.argwhere(volume != clean)
    assert len(changed) > 0
    x, y = facts.nodule_xy
    radius_px = facts.size_mm / 2 / 1.5 + 1
    assert np.abs(changed[:, 0] - x).max() <= radius_px and np.abs(changed[:, 1] - y).max() <= radius_px
    assert abs(np.median(changed[:, 2]) - facts.nodule_slice) <= 1


def test_lesion_masks_lie_on_the_nodule_slices_and_patch_targets_follow_vit_order():
    pixels, masks = lesion_slices(SETTINGS, num_studies=3, seed=11, image_size=64)
    assert pixels.shape[0] == masks.shape[0] and pixels.shape[-2:] == masks.shape[-2:] == (64, 64)
    per_slice = masks.flatten(1).any(1)
    assert 3 <= int(per_slice.sum()) <= len(per_slice) // 3  # each nodule spans a few slices, not the study
    targets = patch_targets(masks, 8)  # 64 px / 8 px patches
    assert targets.shape == (len(masks), 64) and float(targets.max()) <= 1.0
    first = int(per_slice.nonzero()[0])
    row, col = divmod(int(targets[first].argmax()), 8)  # row-major patch grid, as ViTEmbeddings flattens it
    assert masks[first, row * 8 : row * 8 + 8, col * 8 : col * 8 + 8].any()


def test_pretraining_teaches_the_tower_to_mark_lesion_patches():
    torch.manual_seed(0)
    tower = ViTModel(tiny_vision_config("tiny"), add_pooling_layer=False)
    before = {k: v.clone() for k, v in tower.state_dict().items()}
    untrained = pretrain_lesion_tower(tower, SETTINGS, **NORMALISE, steps=0, num_studies=24)["held_out_patch_auc"]
    stats = pretrain_lesion_tower(tower, SETTINGS, **NORMALISE, steps=200, num_studies=60)
    assert any(not torch.equal(before[k], v) for k, v in tower.state_dict().items())
    assert not tower.training
    # held-out slices: 300 steps on 200 studies (the demo's default) reached 0.98
    assert untrained < 0.7 < 0.85 < stats["held_out_patch_auc"]


def test_patch_auc():
    targets = torch.tensor([0.0, 0.0, 0.5, 1.0, 0.1])  # 0.1: neither lesion nor clean, left out
    assert patch_auc(torch.tensor([0.1, 0.2, 0.8, 0.9, 5.0]), targets) == 1.0
    assert patch_auc(torch.tensor([0.9, 0.8, 0.1, 0.2, 0.0]), targets) == 0.0
    assert patch_auc(torch.tensor([0.1, 0.9, 0.5, 0.2, 0.0]), targets) == 0.5


@pytest.mark.slow
def test_recipe_key_builds_a_pretrained_tower_that_the_middle_slice_baseline_shares(tmp_path):
    """`synthetic_tower_steps` through the recipe: the assets record holds the tower's settings
    (every lung slice, in-plane preprocessing of the recipe), and the demo's middle-slice run
    (other slice sampling) reuses the same assets instead of rebuilding them."""
    from hf_vlm.training.run import train_from_recipe

    common = {
        "tiny_preset": "micro",
        "max_visual_tokens": 4,
        "study_depth_tokens": 1,
        "synthetic_train_rows": 4,
        "synthetic_eval_rows": 0,
        "synthetic_lm_steps": 2,
        "synthetic_tower_steps": 3,
        "synthetic_dir": str(tmp_path / "assets"),
        "vision_feature_cache": None,
        "max_steps": 1,
        "per_device_train_batch_size": 2,
        "save_strategy": "no",
        "plot_loss": False,
    }
    train_from_recipe("tiny_demo_3d", {**common, "output_dir": str(tmp_path / "run")})
    record = json.loads((tmp_path / "assets" / "assets.json").read_text())
    assert record["settings"]["tower_steps"] == 3
    assert record["settings"]["tower_feature_layer"] == -1  # the layer tiny_demo_3d's bridge reads
    tower = record["settings"]["tower_settings"]
    assert tower["slice_sampling"] == "all" and tower["extent"] == "lung" and tower["image_size"] == 64
    stamp = (tmp_path / "assets" / "vision_tower" / "model.safetensors").stat().st_mtime_ns
    overrides = {"study_slice_sampling": "middle", "study_extent": "full", "output_dir": str(tmp_path / "middle")}
    train_from_recipe("tiny_demo_3d", {**common, **overrides})
    assert (tmp_path / "assets" / "vision_tower" / "model.safetensors").stat().st_mtime_ns == stamp


def test_tower_steps_need_synthetic_studies():
    from hf_vlm.training.recipe import SyntheticDataArguments

    with pytest.raises(ValueError, match="synthetic_tower_steps needs synthetic_studies"):
        SyntheticDataArguments(synthetic_data=True, synthetic_tower_steps=10)

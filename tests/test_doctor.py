"""`hf-vlm doctor`: the environment table and the memory estimate."""

from __future__ import annotations

from argparse import Namespace
from pathlib import Path

import pytest

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def _estimate(recipe, **overrides):
    from hf_vlm.commands.doctor import estimate_memory
    from hf_vlm.training.run import parse_run_arguments

    model_args, data_args, _, training_args, _ = parse_run_arguments(recipe, overrides)
    return estimate_memory(model_args, data_args, training_args, scan_backend=overrides.pop("_backend", None))


def test_doctor_prints_environment_and_memory_tables(capsys, monkeypatch):
    from hf_vlm.commands import doctor

    monkeypatch.setattr(doctor, "check_int8", lambda device: "works (stubbed in this test)")
    assert doctor.run(Namespace(recipe="stage1_align", overrides=[])) == 0
    out = capsys.readouterr().out
    for needle in (
        "torch",
        "bf16",
        "mamba-ssm",
        "scan backend",
        "bitsandbytes",
        "accelerate config",
        "memory estimate",
        "weights",
        "activations",
        "estimated total",
        "memory ~=",
    ):
        assert needle in out, needle


def test_memory_estimate_is_sane_for_the_2_8b_recipes():
    """MambaConfig(hidden 2560, 64 layers) + CLIP-L built on the meta device: no weights, no download."""
    align = _estimate("stage1_align", bf16=False)
    assert 2.6e9 < align["llm_params"] < 2.9e9
    assert 5e6 < align["trainable_params"] < 2e7  # the MLP bridge only
    params = align["trainable_params"] + align["frozen_params"]
    assert align["terms"]["weights"] == pytest.approx(params * 4, rel=0.01)  # fp32 as loaded
    assert align["terms"]["optimizer"] == pytest.approx(align["trainable_params"] * 8)
    assert 15 * 2**30 < align["total"] < 40 * 2**30

    low = _estimate("low_vram", bf16=False)
    assert low["terms"]["weights"] < 0.7 * align["terms"]["weights"]  # in_proj in 8-bit
    assert low["total"] < 0.5 * align["total"] and low["lora_params"] > 0
    bf16 = _estimate("stage1_align", bf16=True)
    assert bf16["terms"]["activations"] == pytest.approx(align["terms"]["activations"] / 2, rel=0.05)
    checkpointed = _estimate("stage1_align", bf16=False, activation_checkpointing=True)
    assert checkpointed["terms"]["activations"] < 0.2 * align["terms"]["activations"]


def test_memory_estimate_grows_with_the_reference_scan():
    from hf_vlm.commands.doctor import estimate_memory
    from hf_vlm.training.run import parse_run_arguments

    model_args, data_args, _, training_args, _ = parse_run_arguments("stage1_align", {"bf16": False})
    ref = estimate_memory(model_args, data_args, training_args, scan_backend="transformers_reference")
    fast = estimate_memory(model_args, data_args, training_args, scan_backend="hf_vlm_chunked")
    # docs/architecture.md: the reference loop keeps ~1.3 GB per layer per 1k tokens at 2.8B (B=1)
    per_layer_per_1k = (ref["terms"]["activations"] - fast["terms"]["activations"]) / 64 / 2 / (608 / 1000)
    assert 1.0 * 2**30 < per_layer_per_1k < 1.6 * 2**30


def test_memory_estimate_for_a_hybrid_backbone_recipe(tmp_path):
    """The Falcon-H1 recipe with its LM config read from a local path (sizes per family, hf_vlm.backbones)."""
    import torch
    from transformers import AutoModelForCausalLM

    from hf_vlm.backbones import example_config

    config = example_config("falcon_h1", vocab_size=32000, num_layers=4)
    config.save_pretrained(tmp_path)
    full = _estimate(
        str(RECIPES / "families" / "stage1_align_falcon_h1.yaml"), bf16=False, language_model_name_or_path=str(tmp_path)
    )
    with torch.device("meta"):
        expected = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    assert full["family"] == "falcon_h1" and full["llm_params"] == expected
    assert full["terms"]["activations"] > 0 and full["trainable_params"] < full["frozen_params"]
    int8 = _estimate(
        str(RECIPES / "families" / "stage1_align_falcon_h1.yaml"),
        bf16=False,
        language_model_name_or_path=str(tmp_path),
        llm_8bit=True,
    )
    assert int8["terms"]["weights"] < full["terms"]["weights"]
    longer = _estimate(
        str(RECIPES / "families" / "stage1_align_falcon_h1.yaml"),
        bf16=False,
        language_model_name_or_path=str(tmp_path),
        max_length=1216,
    )
    assert longer["terms"]["activations"] == pytest.approx(2 * full["terms"]["activations"], rel=0.1)


def test_a_study_recipe_counts_s_slices_through_the_tower(capsys, monkeypatch):
    """Studies: the tower sees S slices x P patches per row (the LM sequence does not grow with S),
    so without the feature cache the estimate grows with S; with it the batch holds S x P x Dv
    features per study. The printout names S and the visual-token budget."""
    from hf_vlm.commands import doctor

    base = {"bf16": False, "vision_feature_cache": None}
    few, many = _estimate("stage1_align_study", study_num_slices=8, **base), _estimate("stage1_align_study", **base)
    assert few["slices"] == 8 and many["slices"] == 32 and few["length"] == many["length"] == 768
    assert many["terms"]["vision"] == pytest.approx(4 * few["terms"]["vision"])  # linear in S
    assert many["total"] - few["total"] > 0.5 * 2**30  # CLIP-L over 24 more slices of 257 patches, B = 2
    cached = _estimate("stage1_align_study", bf16=False)
    assert cached["vision_source"] == "cached features" and cached["terms"]["vision"] == 2 * 32 * 257 * 1024 * 4
    assert cached["terms"]["vision"] < many["terms"]["vision"]
    trained = _estimate("stage1_align_study", unfreeze_vision_tower=True, **base)
    assert trained["terms"]["vision"] > 10 * many["terms"]["vision"]  # every tower layer kept for backward

    monkeypatch.setattr(doctor, "check_int8", lambda device: "works (stubbed in this test)")
    assert doctor.run(Namespace(recipe="stage1_align_study", overrides=[])) == 0
    out = capsys.readouterr().out
    assert "S = 32 slices (uniform over the lung extent) x 257 patches" in out, out
    assert "256 visual tokens per study" in out and "vision" in out and "bridge" in out

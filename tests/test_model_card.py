"""The output directory's model card: data, stages, recipe, metrics, version and usage."""

from __future__ import annotations

from pathlib import Path


def test_model_card_lists_data_stages_recipe_metrics_and_version(tmp_path):
    import yaml

    from hf_vlm import __version__
    from hf_vlm.training.model_card import load_history, write_history, write_model_card

    stage = {
        "stage": "align",
        "recipe": "recipes/stage1_align.yaml",
        "global_step": 100,
        "world_size": 2,
        "vision_model": "openai/clip-vit-large-patch14",
        "language_model": "state-spaces/mamba-2.8b-hf",
        "max_visual_tokens": 96,
        "data": {"data/train_clean.csv": 254, "data/val_clean.csv": 30},
        "metrics": {"train_loss": 2.5, "eval_loss": 2.25},
        "init_from": None,
    }
    second = {
        **stage,
        "stage": "finetune",
        "recipe": "recipes/stage2_finetune.yaml",
        "init_from": "outputs/s1",
        "metrics": {"train_loss": 0.9, "eval_loss": 1.1},
    }
    write_history(str(tmp_path), [stage])
    assert load_history(str(tmp_path)) == [stage]
    card = Path(
        write_model_card(
            str(tmp_path),
            [stage, second],
            {"stage": "finetune", "max_steps": 10},
            {"max_steps": 5},
            guard_trips=["[hf_vlm VisionProbe] blind"],
        )
    ).read_text("utf-8")
    header = yaml.safe_load(card.split("---")[1])
    assert header["library_name"] == "hf_vlm" and "state-spaces/mamba-2.8b-hf" in header["base_model"]
    for needle in (
        "data/train_clean.csv` | 254",
        "| 1 | align",
        "| 2 | finetune",
        "eval_loss | 1.1",
        f"hf_vlm {__version__}",
        "max_steps: 5",
        "VisionProbe",
        "AutoModelForImageTextToText.from_pretrained",
    ):
        assert needle in card, needle

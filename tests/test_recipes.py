"""Recipes parse into the argument dataclasses; overrides are typed; unknown keys and bad values are clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from hf_vlm.training.recipe import overrides_to_dict, parse_recipe, resolve_recipe_path

REPO = Path(__file__).resolve().parent.parent
RECIPES = sorted((REPO / "recipes").glob("*.yaml"))
ACCELERATE_CONFIGS = sorted((REPO / "accelerate_configs").glob("*.yaml"))


def test_the_documented_recipes_and_configs_exist():
    names = {p.stem for p in RECIPES}
    assert {"stage1_align", "stage2_finetune", "low_vram", "from_scratch", "tiny_demo"} <= names
    assert {"tiny_demo_3d", "stage1_align_study", "stage2_finetune_study"} <= names
    configs = {p.stem for p in ACCELERATE_CONFIGS}
    assert {"cpu", "cpu_2proc", "single_gpu_bf16", "multi_gpu_ddp", "fsdp", "deepspeed_zero2"} <= configs


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_every_recipe_parses_into_the_dataclasses(path):
    text = path.read_text(encoding="utf-8")
    for group in ("# Model arguments", "# Data arguments", "# Training arguments"):
        assert group in text, f"{path.name} lacks the '{group}' section comment"
    model_args, data_args, synth_args, training_args, info = parse_recipe(path)
    assert training_args.stage in ("align", "finetune")
    assert training_args.report_to == [] or training_args.report_to == ["none"] or training_args.report_to == "none"
    assert not training_args.push_to_hub and not training_args.fp16
    assert info["recipe_path"] == str(path)
    if path.stem in ("tiny_demo", "tiny_demo_3d"):
        assert model_args.tiny_preset == "tiny" and synth_args.synthetic_data
        if path.stem == "tiny_demo_3d":  # studies: the settings become the processor's
            assert data_args.studies and synth_args.synthetic_studies and model_args.slice_position_embedding
            assert data_args.study_preprocessing().slice_sampling == "all"
    else:
        assert model_args.language_model_name_or_path == "state-spaces/mamba-2.8b-hf"
        assert model_args.vision_model_name_or_path == "openai/clip-vit-large-patch14"
        assert data_args.max_length == model_args.max_visual_tokens + (256 if path.stem == "low_vram" else 512)
    if path.stem.endswith("_study"):  # the 2-D recipe on studies: 32 lung slices -> 16 z bins x 4x4 tokens
        settings = data_args.study_preprocessing()
        assert settings.slice_sampling == "uniform" and settings.num_slices == 32 and settings.extent == "lung"
        assert {w.name for w in settings.windows} == {"lung", "mediastinum"} and settings.image_size == 224
        assert model_args.max_visual_tokens == 256 and model_args.study_depth_tokens == 16
        assert model_args.slice_position_embedding and data_args.vision_feature_cache
    if path.stem == "low_vram":
        assert model_args.llm_8bit and model_args.max_visual_tokens == 64
        assert training_args.gradient_accumulation_steps > 1 and training_args.activation_checkpointing


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=lambda p: p.stem)
def test_accelerate_configs_load(path):
    from accelerate.commands.config.config_args import ClusterConfig

    config = ClusterConfig.from_yaml_file(str(path))
    assert config.num_processes >= 1
    if path.stem == "cpu_2proc":
        assert config.num_processes == 2 and config.use_cpu


@pytest.mark.parametrize(
    "overrides",
    [
        ["--max_steps", "7", "--learning_rate", "2e-5", "--use_lora", "--lora_target_modules", "in_proj", "embeddings"],
        ["max_steps=7", "learning_rate=2e-5", "use_lora=true", "lora_target_modules=in_proj"],
        {"max_steps": 7, "learning_rate": "2e-5", "use_lora": True},
    ],
    ids=["flags", "key=value", "dict"],
)
def test_overrides_win_over_the_recipe_and_are_typed(overrides):
    _, _, _, args, info = parse_recipe("stage2_finetune", overrides)
    assert args.max_steps == 7 and args.learning_rate == pytest.approx(2e-5) and args.use_lora
    assert isinstance(args.learning_rate, float) and "in_proj" in args.lora_target_modules
    assert info["overrides"]["max_steps"] == 7


def test_yaml_number_strings_are_coerced(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "tiny_preset: micro\nlearning_rate: 2e-5\nbridge_learning_rate: 1e-4\nmax_steps: '3'\n", encoding="utf-8"
    )
    _, _, _, args, _ = parse_recipe(recipe)  # PyYAML reads 2e-5 (no dot) as a string
    assert args.learning_rate == pytest.approx(2e-5) and args.bridge_learning_rate == pytest.approx(1e-4)
    assert args.max_steps == 3


@pytest.mark.parametrize("where", ["recipe", "override"])
def test_unknown_key_is_a_clear_error(tmp_path, where):
    recipe = tmp_path / "typo.yaml"
    recipe.write_text("tiny_preset: micro\n" + ("lerning_rate: 0.1\n" if where == "recipe" else ""), encoding="utf-8")
    overrides = ["--lerning_rate", "0.1"] if where == "override" else None
    with pytest.raises(ValueError) as error:
        parse_recipe(recipe, overrides)
    message = str(error.value)
    assert "'lerning_rate'" in message and "did you mean 'learning_rate'" in message
    assert "Model arguments:" in message and "max_visual_tokens" in message and "Training arguments:" in message


def test_invalid_value_is_refused():
    with pytest.raises(ValueError, match="stage must be one of"):
        parse_recipe("tiny_demo", {"stage": "pretrain"})


def test_recipe_lookup_by_name_and_missing_recipe():
    assert resolve_recipe_path("tiny_demo").name == "tiny_demo.yaml"
    with pytest.raises(FileNotFoundError, match="Available: .*stage1_align"):
        resolve_recipe_path("no_such_recipe")


def test_train_command_takes_the_recipe_and_free_overrides():
    from hf_vlm.cli import build_parser

    args = build_parser(only="train").parse_args(["train", "recipes/tiny_demo.yaml", "--max_steps", "3", "--use_lora"])
    assert args.recipe == "recipes/tiny_demo.yaml" and args.overrides == ["--max_steps", "3", "--use_lora"]
    assert overrides_to_dict(args.overrides) == {"max_steps": 3, "use_lora": True}


# --- model card -------------------------------------------------------------------------------------


# --- checkpoints without the frozen vision tower -------------------------------------------------------

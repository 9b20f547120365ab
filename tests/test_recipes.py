"""Recipes parse into the argument dataclasses; overrides, errors, doctor, memory estimate, card, checkpoints."""

from __future__ import annotations

import json
from argparse import Namespace
from pathlib import Path

import pytest
import torch

from hf_vlm.training.recipe import overrides_to_dict, parse_recipe, resolve_recipe_path

REPO = Path(__file__).resolve().parent.parent
RECIPES = sorted((REPO / "recipes").glob("*.yaml"))
ACCELERATE_CONFIGS = sorted((REPO / "accelerate_configs").glob("*.yaml"))


def test_the_documented_recipes_and_configs_exist():
    names = {p.stem for p in RECIPES}
    assert {"stage1_align", "stage2_finetune", "low_vram", "from_scratch", "tiny_demo"} <= names
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
    if path.stem == "tiny_demo":
        assert model_args.tiny_preset == "tiny" and synth_args.synthetic_data
    else:
        assert model_args.language_model_name_or_path == "state-spaces/mamba-2.8b-hf"
        assert model_args.vision_model_name_or_path == "openai/clip-vit-large-patch14"
        assert data_args.max_length == model_args.max_visual_tokens + (256 if path.stem == "low_vram" else 512)
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
    recipe.write_text("tiny_preset: micro\nlearning_rate: 2e-5\nbridge_learning_rate: 1e-4\nmax_steps: '3'\n",
                      encoding="utf-8")
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


# --- doctor and the memory estimate ---------------------------------------------------------------
def test_doctor_prints_environment_and_memory_tables(capsys, monkeypatch):
    from hf_vlm.commands import doctor

    monkeypatch.setattr(doctor, "check_int8", lambda device: "works (stubbed in this test)")
    assert doctor.run(Namespace(recipe="stage1_align", overrides=[])) == 0
    out = capsys.readouterr().out
    for needle in ("torch", "bf16", "mamba-ssm", "scan backend", "bitsandbytes", "accelerate config",
                   "memory estimate", "weights", "activations", "estimated total", "memory ~="):
        assert needle in out, needle


def _estimate(recipe, **overrides):
    from hf_vlm.commands.doctor import estimate_memory
    from hf_vlm.training.run import parse_run_arguments

    model_args, data_args, _, training_args, _ = parse_run_arguments(recipe, overrides)
    return estimate_memory(model_args, data_args, training_args, scan_backend=overrides.pop("_backend", None))


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
    # DESIGN.md: the reference loop keeps ~1.3 GB per layer per 1k tokens at 2.8B (B=1)
    per_layer_per_1k = (ref["terms"]["activations"] - fast["terms"]["activations"]) / 64 / 2 / (608 / 1000)
    assert 1.0 * 2**30 < per_layer_per_1k < 1.6 * 2**30


# --- model card -------------------------------------------------------------------------------------
def test_model_card_lists_data_stages_recipe_metrics_and_version(tmp_path):
    import yaml

    from hf_vlm import __version__
    from hf_vlm.training.model_card import load_history, write_history, write_model_card

    stage = {"stage": "align", "recipe": "recipes/stage1_align.yaml", "global_step": 100, "world_size": 2,
             "vision_model": "openai/clip-vit-large-patch14", "language_model": "state-spaces/mamba-2.8b-hf",
             "max_visual_tokens": 96, "data": {"data/train_clean.csv": 254, "data/val_clean.csv": 30},
             "metrics": {"train_loss": 2.5, "eval_loss": 2.25}, "init_from": None}
    second = {**stage, "stage": "finetune", "recipe": "recipes/stage2_finetune.yaml", "init_from": "outputs/s1",
              "metrics": {"train_loss": 0.9, "eval_loss": 1.1}}
    write_history(str(tmp_path), [stage])
    assert load_history(str(tmp_path)) == [stage]
    card = Path(write_model_card(str(tmp_path), [stage, second], {"stage": "finetune", "max_steps": 10},
                                 {"max_steps": 5}, guard_trips=["[hf_vlm VisionProbe] blind"])).read_text("utf-8")
    header = yaml.safe_load(card.split("---")[1])
    assert header["library_name"] == "hf_vlm" and "state-spaces/mamba-2.8b-hf" in header["base_model"]
    for needle in ("data/train_clean.csv` | 254", "| 1 | align", "| 2 | finetune", "eval_loss | 1.1",
                   f"hf_vlm {__version__}", "max_steps: 5", "VisionProbe", "AutoModelForImageTextToText.from_pretrained"):
        assert needle in card, needle


# --- checkpoints without the frozen vision tower -------------------------------------------------------
def test_checkpoint_without_the_frozen_tower_round_trips(tmp_path, micro_processor):
    from transformers import ViTModel

    from conftest import build_micro_config
    from hf_vlm import MambaVLMForConditionalGeneration
    from hf_vlm.presets import tiny_vision_config
    from hf_vlm.checkpoints import load_vlm_checkpoint, read_checkpoint_info, save_vlm_checkpoint

    torch.manual_seed(0)
    tower_dir = tmp_path / "tower"
    ViTModel(tiny_vision_config("micro"), add_pooling_layer=False).save_pretrained(tower_dir)
    tower = ViTModel.from_pretrained(tower_dir)
    model = MambaVLMForConditionalGeneration(build_micro_config(micro_processor), vision_tower=tower).eval()
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

    save_vlm_checkpoint(micro_model, str(tmp_path), save_frozen_vision_weights=False,
                        vision_model_name_or_path="openai/clip-vit-large-patch14")
    assert json.loads((tmp_path / "hf_vlm_checkpoint.json").read_text())["vision_tower_weights"] == "included"
    assert read_checkpoint_info(str(tmp_path))["vision_tower_weights"] == "included"


def test_build_model_from_init_from_and_from_scratch(tmp_path, micro_model, micro_processor):
    """init_from loads the previous stage; from_scratch keeps its LLM but starts a fresh bridge."""
    from hf_vlm.training.arguments import ModelArguments
    from hf_vlm.checkpoints import save_vlm_checkpoint
    from hf_vlm.training.builder import build_model

    save_vlm_checkpoint(micro_model, str(tmp_path))
    k = micro_model.config.max_visual_tokens
    loaded = build_model(ModelArguments(init_from=str(tmp_path), max_visual_tokens=k), micro_processor)
    assert torch.equal(loaded.bridge.linear_1.weight, micro_model.bridge.linear_1.weight)

    torch.manual_seed(123)
    fresh = build_model(ModelArguments(init_from=str(tmp_path), max_visual_tokens=k, from_scratch=True), micro_processor)
    assert not torch.equal(fresh.bridge.linear_1.weight, micro_model.bridge.linear_1.weight)
    llm = micro_model.language_model.get_input_embeddings().weight
    assert torch.equal(fresh.language_model.get_input_embeddings().weight, llm)

    with pytest.raises(ValueError, match="max_visual_tokens"):
        build_model(ModelArguments(init_from=str(tmp_path), max_visual_tokens=k + 1), micro_processor)
    with pytest.raises(ValueError, match="No model source"):
        build_model(ModelArguments(), micro_processor)

"""MambaVLMTrainer: freeze policy per stage (TRL-style parameter diffs), optimizer groups,
argument validation, CSV log and loss plot."""

from __future__ import annotations

import csv
import os

import pytest
import torch

from hf_vlm import MambaVLMForConditionalGeneration
from hf_vlm.training import (
    apply_freeze_policy,
    describe_trainable,
    plot_loss_curve,
)

HIGH_LR = dict(bridge_learning_rate=1e-2, lora_learning_rate=1e-2, llm_learning_rate=1e-2)


@pytest.mark.parametrize(
    "overrides, trainable_parts",
    [
        (dict(stage="align"), {"bridge"}),
        (dict(stage="finetune", use_lora=True), {"bridge", "lora"}),
        (dict(stage="finetune", unfreeze_llm_layers=1), {"bridge", "llm_last_layer"}),
    ],
    ids=["align", "finetune-lora", "unfreeze-last-layer"],
)
def test_trainable_params_move_and_frozen_ones_stay_bit_identical(micro_trainer, tmp_path, overrides, trainable_parts):
    trainer = micro_trainer(tmp_path, **HIGH_LR, **overrides)
    model = trainer.model
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}

    def part(name):
        if name.startswith("bridge."):
            return "bridge"
        if "lora_" in name:
            return "lora"
        if ".layers.1." in name or "norm_f" in name:
            return "llm_last_layer"
        return "other"

    assert {part(n) for n in trainable} == trainable_parts
    trainer.train()
    assert trainer.state.global_step == 2 and not trainer.guard_trips
    for name, param in model.named_parameters():
        if name in trainable:
            assert not torch.equal(param, before[name]), f"trainable {name} did not move"
        else:
            assert torch.equal(param, before[name]), f"frozen {name} changed"


def test_describe_trainable_rows(micro_config, make_args, tmp_path):
    model = MambaVLMForConditionalGeneration(micro_config())
    apply_freeze_policy(model, make_args(tmp_path, stage="finetune", use_lora=True))
    rows = {r["component"]: r for r in describe_trainable(model)}
    assert rows["vision_tower"]["status"] == "frozen" and rows["language_model"]["status"] == "frozen"
    assert rows["bridge"]["status"] == "trainable" and rows["lora"]["status"] == "trainable"
    assert rows["lora"]["trainable"] > 0


def test_optimizer_groups_have_module_lrs_and_no_decay_on_biases_norms(micro_trainer, tmp_path):
    lrs = dict(
        bridge_learning_rate=1e-3,
        qformer_learning_rate=1e-5,
        lora_learning_rate=2e-5,
        llm_learning_rate=3e-5,
        vision_learning_rate=4e-6,
    )
    trainer = micro_trainer(
        tmp_path,
        config_overrides={"bridge_type": "qformer"},
        stage="finetune",
        use_lora=True,
        unfreeze_llm_layers=1,
        unfreeze_vision_tower=True,
        weight_decay=0.1,
        **lrs,
    )
    optimizer = trainer.create_optimizer()
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    expected_lr = {"bridge": 1e-3, "qformer": 1e-5, "lora": 2e-5, "language_model": 3e-5, "vision_tower": 4e-6}
    seen = []
    for group in optimizer.param_groups:
        component = group["name"].removesuffix("_no_decay")
        assert group["lr"] == expected_lr[component], group["name"]
        decay = not group["name"].endswith("_no_decay")
        assert group["weight_decay"] == (0.1 if decay else 0.0)
        for p in group["params"]:
            name = names[id(p)]
            seen.append(name)
            if decay:
                assert p.ndim >= 2 and not name.endswith((".A_log", "query_tokens")), name
            if name.endswith(".bias") or "norm" in name or name.endswith(".D"):
                assert not decay, f"{name} must not be weight-decayed"
    trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert sorted(seen) == sorted(trainable)  # every trainable tensor exactly once, no frozen one
    assert {g["name"].removesuffix("_no_decay") for g in optimizer.param_groups} == set(expected_lr)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(fp16=True), r"state-spaces/mamba#6"),
        (dict(stage="pretrain"), r"stage must be one of \('align', 'finetune'\)"),
        (
            dict(stage="finetune", use_lora=True, lora_target_modules=["conv1d"]),
            r"'conv1d' is not a safe target for any supported language model \(depthwise Conv1d",
        ),
        (dict(stage="finetune", use_lora=True, lora_target_modules=["lm_head_typo"]), r"known: \('in_proj'"),
        (dict(use_lora=True), r"use_lora needs stage='finetune'"),
        (dict(guard_action="ignore"), r"guard_action must be one of \('warn', 'stop'\)"),
        (dict(remove_unused_columns=True), r"with_transform"),
        (dict(healthy_loss_band=[8.0, 3.0, 0.5, 1.0]), r"low <= high"),
    ],
)
def test_arguments_refuse_known_bad_settings(make_args, tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        make_args(tmp_path, **overrides)


@pytest.mark.parametrize("target, message", [("out_proj", "PEFT refuses it"), ("x_proj", "bypassed on GPU")])
def test_lora_targets_are_checked_against_the_llm_family(micro_model, make_args, tmp_path, target, message):
    """out_proj / x_proj are safe for Jamba, so arguments accept them; a Mamba LM refuses them with the reason."""
    args = make_args(tmp_path, stage="finetune", use_lora=True, lora_target_modules=["in_proj", target])
    with pytest.raises(ValueError, match=rf"{target!r} is refused for mamba \(.*{message}"):
        apply_freeze_policy(micro_model, args)


def test_unfreezing_the_last_layers_trains_each_familys_final_norm(make_args, tmp_path):
    from hf_vlm.training.freeze import intended_trainable

    args = make_args(tmp_path, stage="finetune", unfreeze_llm_layers=1)
    for name in ("backbone.norm_f", "model.final_layernorm", "model.norm"):  # Mamba, Falcon-H1 / Bamba, Granite
        assert intended_trainable(f"language_model.{name}.weight", args, 4), name
    assert intended_trainable("language_model.model.layers.3.mamba.in_proj.weight", args, 4)
    assert not intended_trainable("language_model.model.layers.2.mamba.in_proj.weight", args, 4)
    assert not intended_trainable("language_model.model.layers.0.input_layernorm.weight", args, 4)


def test_argument_defaults(make_args, tmp_path):
    args = make_args(tmp_path)
    assert args.remove_unused_columns is False and args.report_to in ("none", [], ["none"])
    assert args.bf16 is False  # CPU: no bf16 autocast by default
    assert args.lora_target_modules == ["in_proj"] and args.csv_log_name == "train_log.csv"


def test_gradient_checkpointing_with_frozen_llm_still_trains_the_bridge(micro_trainer, tmp_path):
    trainer = micro_trainer(
        tmp_path, activation_checkpointing=True, max_steps=1, bridge_learning_rate=1e-2, freeze_check_steps=0
    )
    assert getattr(trainer.model, "_require_grads_hook", None) is not None
    before = trainer.model.bridge.linear_1.weight.detach().clone()
    trainer.train()
    assert trainer.model.language_model.backbone.gradient_checkpointing
    assert not torch.equal(before, trainer.model.bridge.linear_1.weight)


def test_csv_log_and_loss_plot(micro_trainer, tmp_path):
    trainer = micro_trainer(
        tmp_path,
        eval_data=True,
        max_steps=3,
        eval_strategy="steps",
        eval_steps=3,
        vision_probe=True,
        plot_loss=True,
        bridge_learning_rate=1e-3,
    )
    with pytest.warns(UserWarning):  # an untrained bridge: the vision probe says the model is blind
        trainer.train()
    with open(tmp_path / "train_log.csv", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["step"]) for r in rows] == [1, 2, 3]
    for row in rows:
        assert 0 < float(row["supervised_fraction"]) < 1 and float(row["visual_std"]) > 0
        assert float(row["loss"]) > 1 and row["health"] in ("learning", "pending")  # 3 steps: no verdict yet
    assert rows[0]["train_vision_gap"] != "" and float(rows[0]["train_image_spread"]) > 0  # probed on the 1st batch
    assert float(rows[-1]["eval_loss"]) > 0 and rows[-1]["eval_vision_gap"] != ""

    for png in (
        tmp_path / "train_log.png",
        plot_loss_curve(str(tmp_path / "train_log.csv"), str(tmp_path / "again.png")),
    ):
        data = open(png, "rb").read()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    from PIL import Image

    pixels = list(Image.open(tmp_path / "again.png").convert("RGB").getdata())
    band_green = sum(1 for r, g, b in pixels if abs(r - 213) < 6 and abs(g - 236) < 6 and abs(b - 213) < 6)
    assert band_green > 2_000, "the target band (0.5-1.0) should be drawn"


def test_checkpoint_can_leave_out_frozen_vision_weights(micro_trainer, tmp_path):
    from safetensors import safe_open

    trainer = micro_trainer(tmp_path, max_steps=1, save_frozen_vision_weights=False, freeze_check_steps=0)
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    with safe_open(os.path.join(tmp_path, "final", "model.safetensors"), "pt") as handle:
        keys = list(handle.keys())
    assert keys and not any(k.startswith("vision_tower.") for k in keys)
    assert any(k.startswith("bridge.") for k in keys)


def test_qformer_body_lr_defaults_to_the_capped_bridge_lr_unless_blip2_weights_were_loaded(
    micro_trainer, tmp_path, caplog
):
    trainer = micro_trainer(tmp_path, config_overrides={"bridge_type": "qformer"}, bridge_learning_rate=3e-3)
    with caplog.at_level("INFO", logger="hf_vlm.training.trainer"):
        groups = {g["name"]: g["lr"] for g in trainer.build_parameter_groups(trainer.model)}
    assert groups["qformer"] == 1e-4 and groups["bridge"] == 3e-3  # a fresh post-LN body: 3e-3 left it blind
    assert "Q-Former body LR 0.0001 (fresh Q-Former: bridge_learning_rate capped at 0.0001" in caplog.text
    slow = micro_trainer(tmp_path / "d", config_overrides={"bridge_type": "qformer"}, bridge_learning_rate=5e-5)
    assert {g["name"]: g["lr"] for g in slow.build_parameter_groups(slow.model)}["qformer"] == 5e-5
    pretrained = micro_trainer(tmp_path / "b", config_overrides={"bridge_type": "qformer"}, bridge_learning_rate=3e-3)
    pretrained.model.config.qformer_init_from = "some/blip2"  # as after load_blip2_weights
    assert {g["name"]: g["lr"] for g in pretrained.build_parameter_groups(pretrained.model)}["qformer"] == 1e-5
    explicit = micro_trainer(tmp_path / "c", config_overrides={"bridge_type": "qformer"}, qformer_learning_rate=2e-4)
    assert {g["name"]: g["lr"] for g in explicit.build_parameter_groups(explicit.model)}["qformer"] == 2e-4
    caplog.clear()
    mlp = micro_trainer(tmp_path / "e", bridge_learning_rate=3e-3)
    with caplog.at_level("INFO", logger="hf_vlm.training.trainer"):
        assert "qformer" not in {g["name"] for g in mlp.build_parameter_groups(mlp.model)}
    assert "Q-Former" not in caplog.text  # an MLP run is not told about a Q-Former LR

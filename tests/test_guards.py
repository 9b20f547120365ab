"""Each failure from the users' notes, reproduced on a micro model and caught by its guard.

(a) Stage 1 visual features collapsing to zero, (b) a collator that supervises prompt /
visual tokens, (c) an LLM meant to be frozen that is not, (d) NaN after a few steps,
(e) a model blind to the image; plus the first-step low-loss warning. The training-health
verdict (train-time vision gap + trend) has its scenario matrix in tests/test_verdict.py.
"""

from __future__ import annotations

import os
import types

import pytest
import torch

from hf_vlm import MambaVLMForConditionalGeneration
from hf_vlm.data.collator import IGNORE_INDEX, DataCollatorForMambaVLM
from hf_vlm.training import apply_freeze_policy
from hf_vlm.training.callbacks import GuardError, GuardWarning, VisionProbe


@pytest.fixture
def make_trainer(micro_trainer):
    def build(out, **overrides):
        overrides.setdefault("bridge_learning_rate", 1e-2)  # guards need the bridge to move in 2 steps
        return micro_trainer(out, **overrides)

    return build


def scale_bridge_output(model, factor_for_call):
    """Multiply the bridge output by `factor_for_call(n)` on the n-th training forward."""
    calls = {"n": 0}

    def hook(module, inputs, output):
        if not module.training:
            return output
        calls["n"] += 1
        return output * factor_for_call(calls["n"])

    model.bridge.register_forward_hook(hook)
    return calls


# (a) ------------------------------------------------------------------------------------------
def test_collapse_guard_stops_when_visual_features_die(make_trainer, micro_config, tmp_path):
    torch.manual_seed(0)
    model = MambaVLMForConditionalGeneration(micro_config())
    scale_bridge_output(model, lambda n: 0.2**n)  # the proxy-loss failure: features driven to 0
    trainer = make_trainer(tmp_path, model=model, max_steps=8, collapse_patience=2)
    trainer.train()
    assert trainer.state.global_step < 8, "training should have been stopped"
    assert any("collapsing to zero" in t and "from_scratch" in t for t in trainer.guard_trips)


# (b) ------------------------------------------------------------------------------------------
class SupervisesEverything(DataCollatorForMambaVLM):
    def __call__(self, features):
        batch = super().__call__(features)
        batch["labels"] = batch["input_ids"].clone()  # the classic bug
        return batch


class SupervisesPromptText(DataCollatorForMambaVLM):
    def __call__(self, features):
        batch = super().__call__(features)
        text = (batch["attention_mask"] == 1) & (batch["input_ids"] != self.image_token_id)
        batch["labels"] = torch.where(text, batch["input_ids"], IGNORE_INDEX)
        return batch


class SupervisesNothing(DataCollatorForMambaVLM):
    def __call__(self, features):
        batch = super().__call__(features)
        batch["labels"].fill_(IGNORE_INDEX)
        return batch


@pytest.mark.parametrize(
    "collator_cls, message",
    [
        (SupervisesEverything, r"labels supervise [1-9]\d* visual and [1-9]\d* prompt position"),
        (SupervisesPromptText, r"labels supervise 0 visual and [1-9]\d* prompt position"),
        (SupervisesNothing, r"no supervised token"),
    ],
)
def test_mask_guard_raises_on_wrong_masks(make_trainer, micro_processor, tmp_path, collator_cls, message):
    collator = collator_cls(micro_processor.tokenizer.pad_token_id, image_token_id=micro_processor.image_token_id)
    trainer = make_trainer(tmp_path, collator=collator)
    with pytest.raises(GuardError, match=message):
        trainer.train()


def test_low_first_step_loss_is_flagged(make_trainer, tmp_path):
    # Stage 1's proxy "loss" (mean squared visual token) is ~1e-4 from the first step
    def proxy(outputs, labels, num_items_in_batch=None):
        return outputs.image_hidden_states.pow(2).mean()

    trainer = make_trainer(
        tmp_path,
        max_steps=3,
        freeze_check_steps=0,
        vision_probe_steps=0,
        trainer_kwargs={"compute_loss_func": proxy},
    )
    with pytest.warns(GuardWarning, match=r"the masks are probably wrong \(visual \+ prompt must be -100\)"):
        trainer.train()
    assert [h["health"] for h in trainer.state.log_history if "health" in h] == ["pending"] * 3  # no probe: no verdict


# (c) ------------------------------------------------------------------------------------------
def test_freeze_guard_names_unfrozen_llm_params_in_align(make_trainer, micro_config, make_args, tmp_path):
    torch.manual_seed(0)
    model = MambaVLMForConditionalGeneration(micro_config())
    apply_freeze_policy(model, make_args(tmp_path))  # stage="align"
    model.language_model.requires_grad_(True)  # the seed bug: "LLM meant to be frozen was not"
    trainer = make_trainer(tmp_path, model=model)
    n_llm = len(list(model.language_model.parameters()))
    with pytest.raises(GuardError, match=rf"{n_llm} parameter tensor\(s\) require grad: language_model\.backbone\."):
        trainer.train()
    assert trainer.state.global_step == 0


def test_freeze_guard_warn_mode_keeps_training(make_trainer, micro_config, make_args, tmp_path):
    torch.manual_seed(0)
    model = MambaVLMForConditionalGeneration(micro_config())
    apply_freeze_policy(model, make_args(tmp_path))
    model.language_model.backbone.norm_f.requires_grad_(True)
    trainer = make_trainer(tmp_path, model=model, guard_action="warn", max_steps=1)
    with pytest.warns(GuardWarning, match=r"language_model\.backbone\.norm_f\.weight"):
        trainer.train()
    assert trainer.state.global_step == 1


def test_freeze_guard_catches_frozen_weights_that_change(make_trainer, tmp_path):
    from transformers import TrainerCallback

    class EditsFrozenWeight(TrainerCallback):
        def on_optimizer_step(self, args, state, control, model=None, **kwargs):
            with torch.no_grad():
                model.vision_tower.embeddings.patch_embeddings.projection.weight.add_(1e-3)

    trainer = make_trainer(tmp_path, trainer_kwargs={"callbacks": [EditsFrozenWeight()]})
    with pytest.raises(GuardError, match=r"frozen parameter tensor\(s\) changed: vision_tower\.embeddings"):
        trainer.train()


@pytest.mark.parametrize("lora_lr, stuck", [(1e-2, []), (0.0, ["lora_A", "lora_B"])])
def test_freeze_guard_judges_a_lora_pair_as_a_unit(make_trainer, tmp_path, caplog, lora_lr, stuck):
    """Issue 17: LoRA's B starts at zero, so with the LR warming up from 0 at step 1, A has had only
    zero gradients at step 2: the guard warned "lora_A ... did not move" on every LoRA run. The pair
    moved (B did); a pair where neither moved is still named."""
    import logging

    trainer = make_trainer(
        tmp_path,
        stage="finetune",
        use_lora=True,
        lora_r=2,
        lora_alpha=4,
        lora_learning_rate=lora_lr,
        warmup_steps=1,
        max_steps=2,
        guard_action="warn",
    )
    with caplog.at_level(logging.WARNING, logger="hf_vlm.training.guards"):
        trainer.train()
    warned = [r.getMessage() for r in caplog.records if "did not move" in r.getMessage()]
    params = dict(trainer.model.named_parameters())
    assert any("lora_B" in n and bool(p.abs().sum()) for n, p in params.items()) == (lora_lr > 0)  # B moved
    if not stuck:
        assert warned == []
    else:
        assert len(warned) == 1 and all(part in warned[0] for part in stuck)


# (d) ------------------------------------------------------------------------------------------
def test_nan_loss_stops_and_keeps_last_good_checkpoint(make_trainer, micro_config, tmp_path):
    torch.manual_seed(0)
    model = MambaVLMForConditionalGeneration(micro_config())
    scale_bridge_output(model, lambda n: float("nan") if n >= 3 else 1.0)  # NaN from step 3 on
    trainer = make_trainer(
        tmp_path,
        model=model,
        max_steps=6,
        save_strategy="steps",
        save_steps=1,
        save_only_model=True,
    )
    trainer.train()
    assert trainer.state.global_step == 3
    assert trainer.nonfinite_step == 3
    assert sorted(d for d in os.listdir(tmp_path) if d.startswith("checkpoint-")) == ["checkpoint-1", "checkpoint-2"]
    assert any("loss is nan at step 3" in t and "last good checkpoint" in t for t in trainer.guard_trips)
    assert all(torch.isfinite(p).all() for p in model.parameters()), "the NaN step's update must be skipped"


# (e) ------------------------------------------------------------------------------------------
def test_vision_probe_warns_for_an_image_blind_model(make_trainer, micro_config, tmp_path):
    torch.manual_seed(0)
    model = MambaVLMForConditionalGeneration(micro_config())
    model.bridge.register_forward_hook(lambda module, inputs, output: output * 0)  # no visual signal at all
    trainer = make_trainer(tmp_path, model=model, eval_data=True, vision_probe=True)
    with pytest.warns(GuardWarning, match="the model is blind to the image"):
        metrics = trainer.evaluate()
    assert abs(metrics["eval_vision_gap"]) < 1e-6
    assert metrics["eval_vision_loss_true"] > 0


def test_vision_probe_sees_a_model_that_uses_the_image():
    class LooksAtImage(torch.nn.Module):
        def forward(self, pixel_values, labels, reference, **kwargs):  # loss 0 only for the true images
            return types.SimpleNamespace(loss=(pixel_values - reference).abs().mean())

    images = torch.randn(4, 3, 8, 8)
    batches = [{"pixel_values": images, "labels": torch.zeros(4, 3), "reference": images}]
    result = VisionProbe(min_gap=0.01).probe(LooksAtImage(), batches)
    assert result["vision_loss_true"] == 0 and result["vision_gap"] > 0.5

"""No bad weights on disk, and "last" means the newest COMPLETE checkpoint (issue 13, cases 1 and 3).

Reproduced on the micro trainer: a learning rate that blows the weights up to inf in one update,
a NaN loss that the Trainer's NaN filter logged as 0.0, a kill during a checkpoint save (config
only / 0-byte optimizer.pt), and `generate` on a checkpoint holding inf.
"""

from __future__ import annotations

import csv
import json
import os

import pytest
import torch

from hf_vlm import MambaVLMForConditionalGeneration


def _finite_on_disk(path) -> bool:
    from safetensors.torch import load_file

    return all(
        bool(torch.isfinite(t).all())
        for t in load_file(os.path.join(path, "model.safetensors")).values()
        if t.is_floating_point()
    )


def _checkpoints(out) -> list[str]:
    return sorted((d for d in os.listdir(out) if d.startswith("checkpoint-")), key=lambda d: int(d.split("-")[1]))


def test_exploding_update_never_reaches_disk(micro_trainer, tmp_path):
    """lr 1e39: the update of step 1 makes every bridge weight inf; before, checkpoint-1 held them."""
    from hf_vlm.training.run import resume_target

    trainer = micro_trainer(tmp_path, max_steps=4, save_strategy="steps", save_steps=1, bridge_learning_rate=1e39)
    trainer.train()
    assert trainer.nonfinite_step == 1 and trainer.state.global_step == 1
    for name in _checkpoints(tmp_path):
        assert _finite_on_disk(tmp_path / name), f"{name} holds NaN/Inf weights"
    assert trainer.last_good_checkpoint() is None
    assert any("weights are NaN/Inf after the update of step 1" in t for t in trainer.guard_trips)
    trainer.save_model(str(tmp_path / "final"))  # the final save refuses too
    assert not (tmp_path / "final" / "model.safetensors").exists()
    args = trainer.args
    args.resume_from_checkpoint = "last"
    assert resume_target(args) is None  # nothing good to resume from


def test_nan_loss_is_logged_as_nan_and_its_checkpoint_is_not_last(micro_trainer, micro_config, tmp_path):
    """The checkpoint whose weights produced the NaN loss is rejected; the one before stays "last"."""
    from hf_vlm.training.run import resume_target

    torch.manual_seed(0)
    model = MambaVLMForConditionalGeneration(micro_config())
    calls = {"n": 0}

    def nan_from_step_3(module, inputs, output):
        if module.training:
            calls["n"] += 1
            return output * (float("nan") if calls["n"] >= 3 else 1.0)
        return output

    model.bridge.register_forward_hook(nan_from_step_3)
    trainer = micro_trainer(
        tmp_path, model=model, max_steps=6, save_strategy="steps", save_steps=1, bridge_learning_rate=1e-2
    )
    trainer.train()
    assert trainer.nonfinite_step == 3
    with open(tmp_path / "train_log.csv", encoding="utf-8", newline="") as handle:
        rows = {int(r["step"]): r for r in csv.DictReader(handle)}
    assert rows[3]["loss"] == "nan", rows[3]  # the Trainer's NaN filter used to log 0.0
    assert float(rows[2]["loss"]) > 0.1
    assert trainer.last_good_checkpoint() == str(tmp_path / "checkpoint-1")
    rejected = json.loads((tmp_path / "checkpoint-2" / "hf_vlm_rejected.json").read_text(encoding="utf-8"))
    assert "NaN/Inf loss or gradient at step 3" in rejected["rejected"]
    trainer.args.resume_from_checkpoint = "last"
    assert resume_target(trainer.args) == str(tmp_path / "checkpoint-1")


class KilledDuringSave(Exception):
    pass


def test_resume_skips_a_half_written_checkpoint(micro_trainer, tmp_path, monkeypatch):
    """A kill while checkpoint-3's optimizer is written: "last" must be checkpoint-2, and rotation
    (save_total_limit=1) must not have deleted it before checkpoint-3 was complete."""
    from transformers import Trainer

    from hf_vlm.training.run import resume_target

    original = Trainer._save_optimizer_and_scheduler

    def dies_at_step_3(self, output_dir):
        if self.state.global_step == 3:
            open(os.path.join(output_dir, "optimizer.pt"), "wb").close()  # 0 bytes, as after kill -9
            raise KilledDuringSave("kill -9 during the save of checkpoint-3")
        return original(self, output_dir)

    monkeypatch.setattr(Trainer, "_save_optimizer_and_scheduler", dies_at_step_3)
    trainer = micro_trainer(
        tmp_path, max_steps=5, save_strategy="steps", save_steps=1, save_total_limit=1, bridge_learning_rate=1e-2
    )
    with pytest.raises(KilledDuringSave):
        trainer.train()
    assert (tmp_path / "checkpoint-2").is_dir() and (tmp_path / "checkpoint-3").is_dir()
    (tmp_path / "checkpoint-4").mkdir()  # another interrupted save: a config only
    (tmp_path / "checkpoint-4" / "config.json").write_text("{}", encoding="utf-8")
    args = trainer.args
    args.resume_from_checkpoint = "last"
    assert resume_target(args) == str(tmp_path / "checkpoint-2")
    args.resume_from_checkpoint = str(tmp_path / "checkpoint-3")
    with pytest.raises(ValueError, match=r"not a complete checkpoint.*optimizer.pt is empty"):
        resume_target(args)

    monkeypatch.setattr(Trainer, "_save_optimizer_and_scheduler", original)
    resumed = micro_trainer(
        tmp_path,
        max_steps=5,
        save_strategy="steps",
        save_steps=1,
        save_total_limit=1,
        bridge_learning_rate=1e-2,
        resume_from_checkpoint="last",
    )
    resumed.train(resume_from_checkpoint=resume_target(resumed.args))
    assert resumed.state.global_step == 5
    assert resumed.last_good_checkpoint() == str(tmp_path / "checkpoint-5")


def test_generate_refuses_a_checkpoint_with_nonfinite_weights(tiny_checkpoint, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    from hf_vlm.cli import main

    checkpoint, _assets = tiny_checkpoint(tmp_path)
    weights = load_file(str(checkpoint / "model.safetensors"))
    name = next(k for k in weights if k.startswith("bridge.") and weights[k].is_floating_point())
    weights[name] = torch.full_like(weights[name], float("inf"))
    save_file(weights, str(checkpoint / "model.safetensors"), metadata={"format": "pt"})
    image = sorted((tmp_path / "assets" / "data" / "images" / "eval").glob("*.png"))[0]
    code = main(
        [
            "generate",
            "--checkpoint",
            str(checkpoint),
            "--images",
            str(image),
            "--output",
            str(tmp_path / "reports.csv"),
            "--no_progress",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "NaN/Inf weights" in err and name in err
    assert not (tmp_path / "reports.csv").exists()

"""Run under `accelerate launch --config_file accelerate_configs/fsdp_cpu_2proc.yaml` by tests/test_fsdp.py.

Two tiny FSDP2 trainings in the same two CPU processes: (A) a clean run whose optimizer groups,
guard trips, train-time vision probe (rank-local losses and the logged gap), final logits and
inputs are written to `result_<rank>.json` / `logits.pt`; (B) the same
run with a NaN injected into rank 1's bridge output from step 3 on (only one rank sees it).
"""

from __future__ import annotations

import json
import os
import sys

import torch
from transformers import TrainerCallback


class RecordGroups(TrainerCallback):
    """The optimizer's groups as built from the FSDP2-wrapped model: name, lr, parameter names."""

    def __init__(self):
        self.groups = None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        names = {id(p): n for n, p in model.named_parameters()}
        self.groups = [
            {"name": g.get("name"), "lr": g["lr"], "params": [names.get(id(p), "?") for p in g["params"]]}
            for g in optimizer.param_groups
        ]
        self.trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)


class RecordProbe(TrainerCallback):
    """Rank-local probe losses (wrapping `TrainVisionProbe.observe_batch`) and the logged, gathered gap."""

    def __init__(self):
        from hf_vlm.training.health import TrainVisionProbe

        self.local, self.logged = [], []  # in step order: one probe per step, logged every step
        original = TrainVisionProbe.observe_batch

        def observe(probe, args, state, control, inputs, model):
            out = original(probe, args, state, control, inputs, model)
            if out is not None:
                self.local.append([float(out[k]) for k in probe.KEYS[:2]])
            return out

        TrainVisionProbe.observe_batch = observe
        self._restore = lambda: setattr(TrainVisionProbe, "observe_batch", original)

    def on_train_end(self, args, state, control, **kwargs):
        self._restore()  # run B is not recorded

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "train_vision_gap" in logs:
            self.logged.append(logs["train_vision_gap"])


class NanOnRank1(TrainerCallback):
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if args.process_index != 1:
            return
        calls = {"n": 0}

        def hook(module, inputs, output):
            if not module.training:
                return output
            calls["n"] += 1
            return output * (float("nan") if calls["n"] >= 3 else 1.0)

        model.bridge.register_forward_hook(hook)


def main(root: str, assets: str) -> None:
    from PIL import Image

    from hf_vlm.training.run import train_from_recipe

    common = {
        "tiny_preset": "micro",
        "max_visual_tokens": 4,
        "synthetic_train_rows": 32,
        "synthetic_eval_rows": 0,
        "synthetic_lm_steps": 5,
        "synthetic_dir": assets,
        "per_device_train_batch_size": 2,
        "logging_steps": 1,
        "warmup_steps": 0,
        "plot_loss": False,
        "seed": 0,
        "use_cpu": True,
        "stage": "finetune",
        "unfreeze_llm_layers": 1,
        "bridge_learning_rate": 2e-3,
        "llm_learning_rate": 5e-4,
        "learning_rate": 1e-4,
        "save_strategy": "steps",
        "save_steps": 1,
        "freeze_check_steps": 2,
        "vision_probe_steps": 1,
    }
    record, probe = RecordGroups(), RecordProbe()
    a = train_from_recipe(
        "tiny_demo", {**common, "max_steps": 3, "output_dir": os.path.join(root, "a")}, callbacks=[record, probe]
    )
    model, processor = a["model"], a["processor"]
    image = sorted(
        os.path.join(assets, "data", "images", "train", f)
        for f in os.listdir(os.path.join(assets, "data", "images", "train"))
    )[0]
    inputs = processor(images=[[Image.open(image).convert("RGB")]], text=[None])
    model.eval()
    with torch.no_grad():
        logits = model(**inputs).logits  # every rank: FSDP2 all-gathers the shards
    rank = int(os.environ.get("RANK", "0"))
    from accelerate.state import AcceleratorState

    sharding = f"{AcceleratorState().distributed_type}, fsdp_version {AcceleratorState().fsdp_plugin.fsdp_version}"
    b = train_from_recipe(
        "tiny_demo", {**common, "max_steps": 6, "output_dir": os.path.join(root, "b")}, callbacks=[NanOnRank1()]
    )
    finite = all(
        bool(torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all())
        for p in b["model"].parameters()
        if p.is_floating_point()
    )
    result = {
        "sharding": sharding,
        "groups": record.groups,
        "trainable": record.trainable,
        "a_trips": a["guard_trips"],
        "a_step": a["global_step"],
        "a_saved": a["saved"],
        "world_size": a["world_size"],
        "b_step": b["global_step"],
        "b_nonfinite_step": b["nonfinite_step"],
        "b_last_good": b["last_good_checkpoint"],
        "b_saved": b["saved"],
        "b_finite": finite,
        "b_trips": b["guard_trips"],
        "probe_local": probe.local,
        "probe_logged": probe.logged,
    }
    with open(os.path.join(root, f"result_{rank}.json"), "w", encoding="utf-8") as handle:
        json.dump(result, handle, indent=2)
    if rank == 0:
        torch.save({"inputs": dict(inputs), "logits": logits}, os.path.join(root, "logits.pt"))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

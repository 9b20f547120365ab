"""FSDP2 on the CI path (issue 13, case 10): 2 CPU processes over gloo, and the shipped configs.

Before: accelerate_configs/fsdp.yaml was FSDP v1, which accelerate refuses on CPU, and even an
FSDP2 config trained as plain DDP there (accelerate 1.15 promotes to FSDP only on accelerators),
so the sharded path was never exercised by CI. `hf_vlm.training.distributed` promotes the CPU
group to FSDP2; the run below checks what sharding could break: per-module learning-rate groups
(built from the wrapped model's parameter names), the FreezeGuard (each rank sees shards), the
NaN skip (a NaN on ONE rank must stop both at the same step, or the next collective deadlocks),
and a final save that is complete and reloads with identical logits.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "accelerate_configs"


def test_fsdp_configs_are_fsdp2_and_the_cpu_one_matches_the_gpu_one():
    from accelerate.commands.config.config_args import load_config_from_file

    gpu, cpu = (
        yaml.safe_load((CONFIGS / name).read_text(encoding="utf-8")) for name in ("fsdp.yaml", "fsdp_cpu_2proc.yaml")
    )
    assert gpu["fsdp_config"] == cpu["fsdp_config"]  # CI tests what users run
    assert gpu["fsdp_config"]["fsdp_version"] == 2 and gpu["fsdp_config"]["fsdp_cpu_ram_efficient_loading"] is False
    assert gpu["fsdp_config"]["fsdp_state_dict_type"] == "FULL_STATE_DICT"  # final weights load with from_pretrained
    from hf_vlm import MambaVLMForConditionalGeneration

    wrapped = gpu["fsdp_config"]["fsdp_transformer_layer_cls_to_wrap"]
    assert wrapped in MambaVLMForConditionalGeneration._no_split_modules
    for name in ("fsdp.yaml", "fsdp_cpu_2proc.yaml", "deepspeed_zero2.yaml"):
        config = load_config_from_file(str(CONFIGS / name))  # accelerate itself parses them
        assert config.num_processes == 2


def test_deepspeed_config_is_consistent_with_the_recipes():
    """DeepSpeed is not run in CI (not a dependency; its CPU path is not what users run): what can be
    checked here is that the config parses and its 'auto' keys are the ones the Trainer fills from
    the recipe (gradient_accumulation_steps, gradient_clipping = max_grad_norm)."""
    from accelerate.commands.config.config_args import load_config_from_file

    raw = yaml.safe_load((CONFIGS / "deepspeed_zero2.yaml").read_text(encoding="utf-8"))
    ds = raw["deepspeed_config"]
    assert raw["distributed_type"] == "DEEPSPEED" and ds["zero_stage"] == 2
    assert ds["gradient_accumulation_steps"] == "auto" and ds["gradient_clipping"] == "auto"
    assert raw["mixed_precision"] == "bf16"  # Mamba is fragile in fp16: never fp16
    assert load_config_from_file(str(CONFIGS / "deepspeed_zero2.yaml")).deepspeed_config["zero_stage"] == 2


@pytest.mark.slow
def test_two_process_fsdp2_training_on_cpu(tmp_path):
    from hf_vlm.checkpoints import load_vlm_checkpoint
    from hf_vlm.training.checkpoint_integrity import checkpoint_problems
    from hf_vlm.training.freeze import component_of

    root, assets = tmp_path / "runs", tmp_path / "assets"
    root.mkdir()
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(CONFIGS / "fsdp_cpu_2proc.yaml"),
        "--main_process_port",
        "29533",
        str(REPO / "tests" / "fsdp_worker.py"),
        str(root),
        str(assets),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "USE_LIBUV": "0", "PYTHONPATH": str(REPO)}
    done = subprocess.run(command, cwd=str(REPO), env=env, capture_output=True, text=True, timeout=900)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-5000:]
    results = [json.loads((root / f"result_{rank}.json").read_text(encoding="utf-8")) for rank in (0, 1)]
    assert all(r["sharding"] == "DistributedType.FSDP, fsdp_version 2" for r in results), results[0]["sharding"]
    assert "DDP constructor" not in log  # not silently DDP

    for result in results:
        # (1) per-module LR groups built from the wrapped model: every trainable tensor in the group of its module
        assert result["world_size"] == 2 and result["a_step"] == 3 and result["a_saved"]
        lrs = {"bridge": 2e-3, "language_model": 5e-4}
        grouped = []
        for group in result["groups"]:
            component = group["name"].replace("_no_decay", "")
            assert group["lr"] == pytest.approx(lrs[component]), group
            assert all(component_of(name) == component for name in group["params"]), group
            grouped += group["params"]
        assert sorted(grouped) == result["trainable"] and any(n.startswith("bridge.") for n in grouped)
        # (2) the FreezeGuard checked at step 2 on shards, on both ranks, without a false trip
        assert not result["a_trips"], result["a_trips"]
        # (3) NaN on rank 1 only: both ranks stop at step 3, nothing final, checkpoint-1 is the last good one
        assert result["b_nonfinite_step"] == 3 and result["b_step"] == 3 and not result["b_saved"]
        assert result["b_finite"] and result["b_last_good"] == str(root / "b" / "checkpoint-1")
    # (5) the train-time vision probe is global: every rank logs the same gap, the mean over ranks of
    # the rank-local (shuffled - true) losses, and the ranks' own gaps differ (so rank-local would show)
    logged = [r["probe_logged"] for r in results]
    assert logged[0] and logged[0] == logged[1], logged
    local_gaps = [[shuffled - true for true, shuffled in r["probe_local"]] for r in results]
    assert len(logged[0]) == len(local_gaps[0]) == len(local_gaps[1]) == 3, (logged, local_gaps)
    for gap, rank0, rank1 in zip(logged[0], *local_gaps):
        assert gap == pytest.approx((rank0 + rank1) / 2, abs=1e-6), (logged, local_gaps)
    assert any(abs(rank0 - rank1) > 1e-6 for rank0, rank1 in zip(*local_gaps)), local_gaps
    assert not (root / "b" / "model.safetensors").exists()
    rejected = json.loads((root / "b" / "checkpoint-2" / "hf_vlm_rejected.json").read_text(encoding="utf-8"))
    assert "NaN/Inf loss or gradient at step 3" in rejected["rejected"]
    assert checkpoint_problems(str(root / "b" / "checkpoint-1")) == []

    # (4) the final weights are complete (gathered on rank 0) and reload with identical logits
    saved = torch.load(root / "logits.pt")
    model = load_vlm_checkpoint(str(root / "a")).eval()
    with torch.no_grad():
        reloaded = model(**saved["inputs"]).logits
    assert torch.allclose(reloaded, saved["logits"], atol=1e-6, rtol=0), (reloaded - saved["logits"]).abs().max()
    from safetensors import safe_open

    with safe_open(str(root / "a" / "model.safetensors"), "pt") as handle:
        stored = set(handle.keys())
    expected = {k for k in model.state_dict() if not k.startswith("vision_tower.")}
    assert expected - stored == set()  # nothing missing; the frozen tower is re-attached (hash-verified)

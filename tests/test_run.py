"""End to end on the CPU: 2-process DDP over gloo, kill-and-resume, preflight PASS/FAIL.

All runs use `recipes/tiny_demo.yaml` shrunk to the micro preset (32 synthetic rows, a few
steps); the synthetic assets are generated once per module and reused through `synthetic_dir`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    """Overrides that shrink tiny_demo to seconds; the assets are shared by every test here."""
    assets = tmp_path_factory.mktemp("assets")
    return {
        "tiny_preset": "micro",
        "max_visual_tokens": 4,
        "synthetic_train_rows": 32,
        "synthetic_eval_rows": 0,
        "synthetic_lm_steps": 5,
        "synthetic_dir": str(assets),
        "per_device_train_batch_size": 4,
        "logging_steps": 1,
        "warmup_steps": 1,
        "plot_loss": False,
        "seed": 0,
    }


def _flags(overrides: dict) -> list[str]:
    return [part for key, value in overrides.items() for part in (f"--{key}", str(value))]


def test_two_process_ddp_over_gloo(tmp_path, micro):
    out = tmp_path / "ddp"
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(REPO / "accelerate_configs" / "cpu_2proc.yaml"),
        "--main_process_port",
        "29531",
        "-m",
        "hf_vlm.cli",
        "train",
        str(REPO / "recipes" / "tiny_demo.yaml"),
        *_flags(
            {
                **micro,
                "max_steps": 3,
                "per_device_train_batch_size": 2,
                "save_steps": 3,
                "output_dir": out,
                "use_cpu": "true",
            }
        ),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "USE_LIBUV": "0"}
    done = subprocess.run(command, cwd=str(REPO), env=env, capture_output=True, text=True, timeout=400)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:]
    assert "rank 0 of 2 finished at step 3" in log and "rank 1 of 2 finished at step 3" in log, log[-4000:]
    history = json.loads((out / "hf_vlm_training.json").read_text(encoding="utf-8"))
    assert history["stages"][-1]["world_size"] == 2
    state = json.loads((out / "trainer_state.json").read_text(encoding="utf-8"))
    assert state["global_step"] == 3 and (out / "model.safetensors").exists() and (out / "README.md").exists()


class SimulatedKill(Exception):
    pass


class KillAfterCheckpoint(TrainerCallback):
    """Dies right after checkpoint-`step` is on disk, as a crashed or killed job would."""

    def __init__(self, step: int):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise SimulatedKill(f"killed after checkpoint-{self.step}")


def _weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def test_kill_and_resume_gives_the_uninterrupted_weights(tmp_path, micro):
    """Bit-identical (torch.equal): same seed, data order restored from the checkpoint's RNG state."""
    from hf_vlm.training.run import train_from_recipe

    run = {**micro, "max_steps": 6, "save_steps": 2}
    straight = train_from_recipe("tiny_demo", {**run, "output_dir": str(tmp_path / "straight")})
    interrupted = tmp_path / "interrupted"
    with pytest.raises(SimulatedKill):
        train_from_recipe("tiny_demo", {**run, "output_dir": str(interrupted)}, callbacks=[KillAfterCheckpoint(4)])
    assert (interrupted / "checkpoint-4").is_dir() and not (interrupted / "checkpoint-6").exists()
    info = json.loads((interrupted / "checkpoint-4" / "hf_vlm_checkpoint.json").read_text(encoding="utf-8"))
    assert info["vision_tower_weights"] == "external"  # the frozen tower is not copied into checkpoints
    resumed = train_from_recipe("tiny_demo", {**run, "output_dir": str(interrupted), "resume_from_checkpoint": "last"})
    assert straight["global_step"] == resumed["global_step"] == 6
    a, b = _weights(tmp_path / "straight"), _weights(interrupted)
    assert sorted(a) == sorted(b) and not any(k.startswith("vision_tower.") for k in a)
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_preflight_passes_on_tiny_demo_and_fails_on_broken_recipes(micro, capsys):
    from hf_vlm.cli import main
    from hf_vlm.commands.preflight import FAIL, PASS, run_preflight

    rows = {name: (status, detail) for name, status, detail in run_preflight("tiny_demo", micro)}
    assert all(status != FAIL for status, _ in rows.values()), rows
    for check in ("build", "masks", "freeze policy", "one step", "guards"):
        assert rows[check][0] == PASS, (check, rows[check])
    assert "peak RSS" in rows["memory"][1]

    # stage align whose bridge cannot learn (LR 0): the FreezeGuard sees no trainable weight move
    frozen_bridge = {**micro, "stage": "align", "unfreeze_llm_layers": 0, "bridge_learning_rate": 0.0}
    assert main(["preflight", "tiny_demo", *_flags(frozen_bridge)]) == 1
    out = capsys.readouterr().out
    assert "FreezeGuard" in out and "no trainable parameter moved" in out and "preflight: FAIL" in out

    # a token budget that cannot hold the visual + prompt tokens: nothing could be supervised
    rows = {name: (status, detail) for name, status, detail in run_preflight("tiny_demo", {**micro, "max_length": 6})}
    assert rows["masks"][0] == FAIL and "max_length=6" in rows["masks"][1]


def test_two_stages_chain_through_init_from_with_lora_on_an_8bit_llm(tmp_path, micro):
    """Stage 1 (align) -> Stage 2 (LoRA on the 8-bit LLM, init_from Stage 1): the final output is a
    plain checkpoint (LoRA merged, LLM de-quantised) that loads in one call, and its card lists both stages."""
    from hf_vlm.checkpoints import load_vlm_checkpoint
    from hf_vlm.training.run import train_from_recipe

    stage1 = tmp_path / "stage1"
    train_from_recipe(
        "tiny_demo",
        {
            **micro,
            "stage": "align",
            "unfreeze_llm_layers": 0,
            "max_steps": 2,
            "save_strategy": "no",
            "output_dir": str(stage1),
        },
    )
    stage2 = tmp_path / "stage2"
    result = train_from_recipe(
        "tiny_demo",
        {
            **micro,
            "stage": "finetune",
            "unfreeze_llm_layers": 0,
            "use_lora": True,
            "llm_8bit": True,
            "init_from": str(stage1),
            "max_steps": 2,
            "save_strategy": "no",
            "output_dir": str(stage2),
        },
    )
    assert result["global_step"] == 2 and (stage2 / "llm_adapter" / "adapter_config.json").exists()
    info = json.loads((stage2 / "hf_vlm_checkpoint.json").read_text(encoding="utf-8"))
    assert info["lora_merged"] and info["trained_llm_quantization"] == "8bit"
    from hf_vlm.inference import read_training_settings

    assert read_training_settings(str(stage2))["llm_8bit"]  # generate/serve default to the training setting
    model = load_vlm_checkpoint(str(stage2))  # plain names, fp32, tower re-attached
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert not any("lora_" in name for name, _ in model.named_parameters())
    history = json.loads((stage2 / "hf_vlm_training.json").read_text(encoding="utf-8"))["stages"]
    assert [s["stage"] for s in history] == ["align", "finetune"] and history[1]["init_from"] == str(stage1)
    card = (stage2 / "README.md").read_text(encoding="utf-8")
    assert "| 1 | align" in card and "| 2 | finetune" in card and "(8-bit)" in card


def test_recipe_trains_the_bridge_from_the_vision_feature_cache(tmp_path, micro):
    """`vision_feature_cache: DIR` encodes each image once; a second run reuses the stored features."""
    from hf_vlm.training.run import train_from_recipe

    overrides = {
        **micro,
        "stage": "align",
        "unfreeze_llm_layers": 0,
        "max_steps": 2,
        "save_strategy": "no",
        "vision_feature_cache": str(tmp_path / "cache"),
    }
    first = train_from_recipe("tiny_demo", {**overrides, "output_dir": str(tmp_path / "run1")})
    entries = [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]
    assert len(entries) == 1 and (entries[0] / "index.json").exists()
    cached = json.loads((entries[0] / "index.json").read_text(encoding="utf-8"))
    assert len(cached) == micro["synthetic_train_rows"]
    second = train_from_recipe("tiny_demo", {**overrides, "output_dir": str(tmp_path / "run2")})
    assert [p for p in (tmp_path / "cache").iterdir() if p.is_dir()] == entries  # same fingerprint reused
    assert first["global_step"] == second["global_step"] == 2
    assert abs(first["metrics"]["train_loss"] - second["metrics"]["train_loss"]) < 1e-6


def test_recipe_evaluation_generates_reports_and_picks_the_best_by_findings_f1(tmp_path, micro):
    from hf_vlm.training.run import train_from_recipe

    result = train_from_recipe(
        "tiny_demo",
        {
            **micro,
            "synthetic_dir": str(tmp_path / "assets"),
            "synthetic_eval_rows": 6,
            "eval_samples": 4,
            "max_steps": 4,
            "eval_strategy": "steps",
            "eval_steps": 2,
            "save_strategy": "steps",
            "save_steps": 2,
            "load_best_model_at_end": True,
            "metric_for_best_model": "eval_findings_f1_cider",
            "greater_is_better": True,
            "output_dir": str(tmp_path / "run"),
        },
    )
    for key in ("eval_findings_f1", "eval_cider_d", "eval_bleu_4", "eval_repetition", "eval_findings_f1_cider"):
        assert key in result["metrics"], sorted(result["metrics"])
    assert result["best_model_checkpoint"] is not None
    assert list((tmp_path / "run").glob("samples_step_*.jsonl"))  # sample reports next to the truth


# --- issue 13: runs and checkpoints you can trust ------------------------------------------------
def _eval_csv_with_a_missing_image(micro, tmp_path, bad_row: int = 5) -> Path:
    """8 rows of the shared synthetic train CSV (absolute paths), row `bad_row`'s image missing."""
    import csv

    source = Path(micro["synthetic_dir"]) / "data" / "train.csv"
    with open(source, encoding="utf-8-sig", newline="") as handle:
        rows = list(csv.DictReader(handle))[:8]
    for row in rows:
        row["image_path"] = str((source.parent / row["image_path"]).resolve())
    rows[bad_row]["image_path"] = str(tmp_path / "gone" / "slice_059.png")
    path = tmp_path / "eval.csv"
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_nan_run_saves_nothing_as_final_and_exits_3(tmp_path, micro, capsys):
    """Case 1: lr 1e39 used to keep an all-inf checkpoint, print `Saved to`, and exit 1."""
    from hf_vlm.cli import main

    out = tmp_path / "nan"
    code = main(
        [
            "train",
            "tiny_demo",
            *_flags(
                {
                    **micro,
                    "max_steps": 4,
                    "save_steps": 1,
                    "learning_rate": 1e39,
                    "bridge_learning_rate": 1e39,
                    "llm_learning_rate": 1e39,
                    "warmup_steps": 0,
                    "output_dir": out,
                }
            ),
        ]
    )
    printed = capsys.readouterr().out
    assert code == 3, printed
    assert "NaN/Inf at step 1" in printed and "Nothing was saved as the final model" in printed
    assert "No good checkpoint was written" in printed and "Saved to" not in printed
    for name in ("model.safetensors", "config.json", "README.md", "processor_config.json"):
        assert not (out / name).exists(), name
    assert (out / "train_log.csv").exists()  # the diagnosis stays


def test_bad_eval_image_is_named_before_step_0_and_preflight_fails(tmp_path, micro):
    """Case 2: a missing eval image used to surface only in the final evaluation, after training."""
    from hf_vlm.commands.preflight import FAIL, run_preflight
    from hf_vlm.training.run import train_from_recipe

    eval_csv = _eval_csv_with_a_missing_image(micro, tmp_path)
    run = {**micro, "max_steps": 2, "save_strategy": "no", "eval_file": str(eval_csv), "eval_samples": 0}
    with pytest.raises(
        ValueError, match=rf"(?s){eval_csv}: 1 unreadable image\(s\).*row_id 5: .*slice_059.png: file not found"
    ):
        train_from_recipe("tiny_demo", {**run, "output_dir": str(tmp_path / "checked")})
    assert not (tmp_path / "checked" / "train_log.csv").exists()  # stopped before step 0
    rows = {name: (status, detail) for name, status, detail in run_preflight("tiny_demo", run)}
    assert rows["build"][0] == FAIL and "row_id 5" in rows["build"][1] and "slice_059.png" in rows["build"][1]


def test_final_evaluation_error_does_not_lose_the_trained_model(tmp_path, micro):
    """Case 2: the final save now comes first; the evaluation error is reported, not fatal."""
    from hf_vlm.checkpoints import load_vlm_checkpoint
    from hf_vlm.training.run import train_from_recipe

    eval_csv = _eval_csv_with_a_missing_image(micro, tmp_path)
    out = tmp_path / "run"
    result = train_from_recipe(
        "tiny_demo",
        {
            **micro,
            "max_steps": 2,
            "save_strategy": "no",
            "eval_file": str(eval_csv),
            "eval_samples": 0,
            "validate_images": "off",
            "output_dir": str(out),
        },
    )
    assert result["saved"] and "slice_059.png" in result["evaluation_error"]
    assert (out / "model.safetensors").exists() and (out / "README.md").exists()
    load_vlm_checkpoint(str(out))  # the finished run is usable


def test_a_second_run_into_the_same_output_dir_is_refused(tmp_path, micro):
    """Case 4: a second run used to overwrite the first; `resume last` resumed the old run's checkpoint."""
    from hf_vlm.training.run import train_from_recipe

    out = str(tmp_path / "run")
    first = train_from_recipe("tiny_demo", {**micro, "max_steps": 4, "save_steps": 2, "output_dir": out})
    assert first["global_step"] == 4
    with pytest.raises(ValueError, match="already holds a run"):
        train_from_recipe("tiny_demo", {**micro, "max_steps": 2, "output_dir": out})
    with pytest.raises(ValueError, match=r"checkpoint-4: .*at step 4 but this run has max_steps=2"):
        train_from_recipe("tiny_demo", {**micro, "max_steps": 2, "output_dir": out, "resume_from_checkpoint": "last"})
    with pytest.raises(ValueError, match=r"max_visual_tokens: 4 in the checkpoint, 8 now"):
        train_from_recipe(
            "tiny_demo",
            {**micro, "max_steps": 6, "max_visual_tokens": 8, "output_dir": out, "resume_from_checkpoint": "last"},
        )
    again = train_from_recipe("tiny_demo", {**micro, "max_steps": 2, "output_dir": out, "overwrite_output_dir": True})
    assert again["global_step"] == 2 and not (Path(out) / "checkpoint-4").exists()


def test_synthetic_assets_are_reused_from_another_working_directory(tmp_path, micro, monkeypatch):
    """Issue 17: assets.json stored cwd-relative paths, so `--synthetic_dir` given from another folder
    failed ("Repo id must be in the form 'repo_name' ...: 'outputs/demo/assets/processor'"). Paths are
    now recorded relative to assets.json and resolved against it."""
    from hf_vlm.cli import main

    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    flags = _flags({**micro, "synthetic_dir": "outputs/demo/assets", "max_steps": 1, "save_strategy": "no"})
    monkeypatch.chdir(first)
    assert main(["train", "tiny_demo", *flags, "--output_dir", "outputs/run1"]) == 0
    record = json.loads((first / "outputs/demo/assets/assets.json").read_text(encoding="utf-8"))
    assert all(not os.path.isabs(p) and not p.startswith("outputs") for p in record["assets"].values()), record
    built = (first / "outputs/demo/assets/mamba_lm/model.safetensors").stat().st_mtime_ns
    monkeypatch.chdir(second)
    for synthetic_dir in (str(first / "outputs/demo/assets"), "../first/outputs/demo/assets"):
        flags = _flags({**micro, "synthetic_dir": synthetic_dir, "max_steps": 1, "save_strategy": "no"})
        out = second / f"run{len(list(second.iterdir()))}"
        assert main(["train", "tiny_demo", *flags, "--output_dir", str(out)]) == 0
        info = json.loads((out / "hf_vlm_checkpoint.json").read_text(encoding="utf-8"))
        assert info["run_settings"]["language_model_name_or_path"] == str(first / "outputs/demo/assets/mamba_lm")
    assert (first / "outputs/demo/assets/mamba_lm/model.safetensors").stat().st_mtime_ns == built  # reused


@pytest.mark.parametrize("family", ["mamba2", "falcon_h1"])
def test_tiny_demo_runs_on_another_lm_family_via_a_recipe_key(tmp_path, micro, family):
    """Issue 12: `tiny_lm_family` builds the demo's Stage-0 LM in any family of hf_vlm.backbones;
    `hf-vlm train` and `hf-vlm generate` then run on it end to end through the CLI."""
    from transformers import AutoModelForImageTextToText

    from hf_vlm.cli import main

    out = tmp_path / family
    flags = _flags(
        {
            **micro,
            "synthetic_dir": str(tmp_path / "assets"),
            "tiny_lm_family": family,
            "max_steps": 2,
            "save_strategy": "no",
        }
    )
    assert main(["train", "tiny_demo", *flags, "--output_dir", str(out)]) == 0
    model = AutoModelForImageTextToText.from_pretrained(out)
    assert model.language_model.config.model_type == family
    record = json.loads((tmp_path / "assets" / "assets.json").read_text(encoding="utf-8"))
    assert record["settings"]["lm_family"] == family
    csv_out = tmp_path / "reports.csv"
    images = tmp_path / "assets" / "data"
    assert (
        main(
            [
                "generate",
                "--checkpoint",
                str(out),
                "--images",
                str(next(images.rglob("*.png")).parent),
                "--output",
                str(csv_out),
                "--max_new_tokens",
                "4",
            ]
        )
        == 0
    )
    assert csv_out.read_text(encoding="utf-8-sig").count("\n") >= 2

"""The training-health verdict: the scenario matrix (issue 11) and the probe's mechanics.

Each scenario is a real run through `train_from_recipe` (what `hf-vlm train` calls; the stuck
run goes through `hf_vlm.cli.main`) on micro models and a 4-class templated caption set
("{左,右}肺{上,下}叶见一结节，边界清楚。", the quadrant of a bright square on the image), and
must get exactly its own verdict: no false alarm, no miss, no other problem code at any log.
"""

from __future__ import annotations

import csv
import os
import types

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from hf_vlm.data.collator import IGNORE_INDEX, DataCollatorForMambaVLM
from hf_vlm.synthetic import DEFAULT_PROMPT
from hf_vlm.training.health import TrainVisionProbe
from hf_vlm.training.verdict import NOT_LEARNING_EXIT_CODE, PROBLEMS, TrainingHealth, plateau

SIDES, LOBES = ("左", "右"), ("上叶", "下叶")


def _image(side: int, lobe: int, rng, mode: str) -> Image.Image:
    pixels = np.zeros((32, 32)) if mode == "black" else rng.normal(60, 8, (32, 32))
    if mode == "quadrant":
        pixels[lobe * 16 : (lobe + 1) * 16, side * 16 : (side + 1) * 16] += 150
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "L").convert("RGB")


@pytest.fixture(autouse=True)
def one_thread():
    """Micro models gain nothing from a second thread, and on a shared 2-core runner its spin-waits
    made these runs ~5x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def scenario_data(tmp_path_factory, micro_processor):
    """{mode: train CSV} (64 rows) and the saved micro processor."""
    root = tmp_path_factory.mktemp("verdict")
    micro_processor.save_pretrained(root / "processor")
    files = {}
    for mode in ("quadrant", "black"):
        rng = np.random.default_rng(0)
        (root / mode).mkdir()
        with open(root / f"{mode}.csv", "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["image_path", "prompt", "caption"])
            for i in range(64):
                side, lobe = int(rng.integers(2)), int(rng.integers(2))
                path = root / mode / f"{i}.png"
                _image(side, lobe, rng, mode).save(path)
                writer.writerow([str(path), DEFAULT_PROMPT, f"{SIDES[side]}肺{LOBES[lobe]}见一结节，边界清楚。"])
        files[mode] = str(root / f"{mode}.csv")
    return files, str(root / "processor")


def _recipe(scenario_data, out, mode="quadrant", **overrides) -> dict:
    files, processor = scenario_data
    recipe = dict(
        tiny_preset="micro",
        max_visual_tokens=4,
        processor_name_or_path=processor,
        train_file=files[mode],
        output_dir=str(out),
        max_steps=60,
        per_device_train_batch_size=8,
        logging_steps=2,
        vision_probe_steps=5,
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
        report_to="none",
        stage="finetune",
        unfreeze_llm_layers=-1,
        learning_rate=1e-2,
        bridge_learning_rate=1e-2,
        llm_learning_rate=1e-2,
        guard_action="warn",
        plot_loss=False,
        seed=0,
    )
    recipe.update(overrides)
    return recipe


class ScaleBridge:
    """A callback that multiplies the bridge output by `factor(n)`, n = training forwards so far."""

    def __new__(cls, factor, training_only: bool):
        from transformers import TrainerCallback

        class _Hook(TrainerCallback):
            def on_train_begin(self, args, state, control, model=None, **kwargs):
                calls = {"n": 0}

                def hook(module, inputs, output):
                    if module.training:
                        calls["n"] += 1
                    elif training_only:
                        return output
                    return output * factor(max(calls["n"], 1))

                model.bridge.register_forward_hook(hook)

        return _Hook()


class EchoLabels(DataCollatorForMambaVLM):
    """The label leak MaskGuard cannot see by position: labels shifted by hand once more, so each
    supervised label is the token the model is reading (the answer is in its input)."""

    def __call__(self, features):
        batch = super().__call__(features)
        labels = batch["labels"]
        echo = torch.full_like(labels, IGNORE_INDEX)
        echo[:, 1:] = torch.where(labels[:, 1:] != IGNORE_INDEX, batch["input_ids"][:, :-1], IGNORE_INDEX)
        batch["labels"] = echo
        return batch


def _run(recipe, callbacks=None):
    from hf_vlm.training.run import train_from_recipe

    return train_from_recipe(recipe, callbacks=callbacks)


def _log(out) -> list[dict]:
    with open(os.path.join(out, "train_log.csv"), encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _assert_own_verdict(name, result, expected):
    health = result["health"]
    print(f"{name}: verdict {health['verdict']}, tripped {health['tripped']}, step {result['global_step']}")
    assert health["verdict"] == expected, health["table"]
    own = {expected} if expected in PROBLEMS else set()
    assert set(health["tripped"]) == own, health["tripped"]
    assert set(health["seen"]) & set(PROBLEMS) == own, health["seen"]  # at no log another problem code


def test_a_templated_captions_to_a_very_low_loss_are_healthy(scenario_data, tmp_path):
    result = _run(_recipe(scenario_data, tmp_path))
    _assert_own_verdict("a healthy", result, "healthy")
    assert float(_log(tmp_path)[-1]["loss"]) < 0.05, "the templated captions should be learned to a very low loss"
    assert result["health"]["probes"][-1]["rel"] > 0.5  # most of the blind loss is removed by the image
    assert not any("leak" in t or "suspicious" in t for t in result["guard_trips"])
    card = (tmp_path / "README.md").read_text(encoding="utf-8")
    assert "## Training health" in card and "| verdict | healthy:" in card


def test_b_frozen_lm_bridge_only_no_eval_file_is_not_learning(scenario_data, tmp_path, capsys):
    """Through the CLI with guard_action stop: detected within the first third, exit 4, weights kept."""
    from hf_vlm.cli import main

    recipe = _recipe(
        scenario_data,
        tmp_path / "out",
        stage="align",
        unfreeze_llm_layers=0,
        guard_action="stop",
        save_strategy="steps",
        save_steps=10,
    )
    path = tmp_path / "stuck.yaml"
    path.write_text(yaml.safe_dump(recipe, allow_unicode=True), encoding="utf-8")
    assert main(["train", str(path)]) == NOT_LEARNING_EXIT_CODE
    printed = capsys.readouterr().out
    assert "Training health (verdict: not_learning)" in printed and "not learning to see" in printed
    state = yaml.safe_load((tmp_path / "out" / "trainer_state.json").read_text(encoding="utf-8"))
    assert state["global_step"] <= 60 // 3, "the stuck run must be detected within the first third"
    assert os.path.isfile(tmp_path / "out" / "model.safetensors") and os.path.isdir(tmp_path / "out" / "checkpoint-10")
    rows = _log(tmp_path / "out")
    assert {r["health"] for r in rows} <= {"pending", "learning", "not_learning"}


def test_c_labels_leaking_the_answer_are_a_leak(scenario_data, tmp_path, monkeypatch):
    from hf_vlm.training import builder

    monkeypatch.setattr(
        builder,
        "build_collator",
        lambda data_args, processor: EchoLabels(
            processor.tokenizer.pad_token_id, image_token_id=processor.image_token_id, tokenizer=processor.tokenizer
        ),
    )
    result = _run(_recipe(scenario_data, tmp_path))
    _assert_own_verdict("c leak", result, "leak")


def test_d_black_images_are_blind(scenario_data, tmp_path):
    result = _run(_recipe(scenario_data, tmp_path, mode="black"))
    _assert_own_verdict("d blind", result, "blind")


def test_e_visual_features_collapsing_mid_run_are_a_collapse(scenario_data, tmp_path):
    collapse = ScaleBridge(lambda n: 1.0 if n <= 30 else 0.3 ** (n - 30), training_only=False)
    result = _run(_recipe(scenario_data, tmp_path, max_steps=50), callbacks=[collapse])
    _assert_own_verdict("e collapse", result, "collapse")
    probes = result["health"]["probes"]
    assert max(p["gap"] for p in probes if p["step"] <= 30) > 0.1 > probes[-1]["gap"]


def test_f_nan_stops(scenario_data, tmp_path):
    nan = ScaleBridge(lambda n: float("nan") if n >= 10 else 1.0, training_only=True)
    result = _run(_recipe(scenario_data, tmp_path, max_steps=30), callbacks=[nan])
    _assert_own_verdict("f nan", result, "nan")
    assert result["nonfinite_step"] == 10 and result["global_step"] == 10


# --- the mechanics, fast ---------------------------------------------------------------------------
class LooksAtImage(torch.nn.Module):
    """Loss 0 with the true images, > 0 with any other: a model that reads the picture."""

    def forward(self, labels, reference, pixel_values=None, vision_features=None, **kwargs):
        images = pixel_values if pixel_values is not None else vision_features
        return types.SimpleNamespace(loss=(images - reference).abs().mean())


def _state(step):
    return types.SimpleNamespace(global_step=step)


@pytest.mark.parametrize("key", ["pixel_values", "vision_features"])
def test_probe_batch_size_one_uses_the_previous_batch_and_cached_features(key):
    probe, model = TrainVisionProbe(every=2), LooksAtImage()
    first, second = torch.zeros(1, 3, 4, 4), torch.ones(1, 3, 4, 4)
    out = probe.observe_batch(
        None, _state(0), None, {key: first, "labels": torch.zeros(1, 3), "reference": first}, model
    )  # no previous batch: the constant (mean) image
    assert float(out["train_vision_loss_true"]) == 0 and float(out["train_image_spread"]) == 0
    assert (
        probe.observe_batch(
            None, _state(1), None, {key: second, "labels": torch.zeros(1, 3), "reference": second}, model
        )
        is None
    )  # not due
    out = probe.observe_batch(
        None, _state(2), None, {key: first, "labels": torch.zeros(1, 3), "reference": first}, model
    )
    assert float(out["train_vision_loss_shuffled"]) == 1.0 and float(out["train_image_spread"]) == 1.0
    logs = {k: float(v) for k, v in out.items()}
    probe.annotate_logs(None, None, logs)
    assert logs["train_vision_gap"] == 1.0 and logs["train_vision_gap_rel"] == 1.0


def test_probe_runs_once_per_optimizer_step_with_gradient_accumulation(micro_trainer, tmp_path):
    trainer = micro_trainer(
        tmp_path,
        max_steps=2,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        vision_probe_steps=1,
        freeze_check_steps=0,
    )
    probe = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, TrainVisionProbe))
    trainer.train()
    assert probe.probes == 2  # 4 micro-batches, 2 optimizer steps
    logged = [h for h in trainer.state.log_history if "train_vision_gap" in h]
    assert len(logged) == 2 and all(h["train_image_spread"] > 0 for h in logged)
    assert all(
        abs(h["train_vision_gap"] - (h["train_vision_loss_shuffled"] - h["train_vision_loss_true"])) < 1e-9
        for h in logged
    )


def test_plateau_states_the_window_and_the_improvement():
    flat = [(s, 4.9 + 0.01 * (s % 3)) for s in range(10, 210, 10)]
    result = plateau(flat, window_steps=60, logging_steps=10)
    assert result["plateau"] and abs(result["improvement"]) < 0.02 and result["window"] == 60
    falling = [(s, 5.0 * 0.97 ** (s / 10)) for s in range(10, 210, 10)]
    assert not plateau(falling, window_steps=60, logging_steps=10)["plateau"]
    assert plateau(flat[:8], window_steps=60, logging_steps=10) is None  # 6 + 3 logs needed
    assert plateau(flat, window_steps=60, logging_steps=10, after_step=150) is None  # still warming up


def test_healthy_gap_is_never_a_leak_however_low_the_loss_and_a_vanishing_gap_is_a_collapse():
    health = TrainingHealth("warn")
    health.losses = [(s, 0.01) for s in range(1, 40)]
    probe = {"gap": 0.3, "rel": 0.95, "true": 0.01, "shuffled": 0.31, "spread": 0.5}
    health.probes = [{**probe, "step": s} for s in (10, 20, 30)]
    assert health.decide()[0] == "healthy"
    blind_loss = {"gap": 0.001, "rel": 0.09, "shuffled": 0.011}
    health.probes += [{**probe, **blind_loss, "step": s} for s in (40, 50)]
    assert health.decide()[0] == "collapse"
    health.probes = health.probes[-2:]  # never a gap, loss ~0.01 with and without the image
    assert health.decide()[0] == "leak"


def test_one_noisy_probe_is_not_a_gap_that_collapsed():
    """The 3-D demo's probes scatter by +-0.03-0.05 around zero when the model is blind: a lone 0.08
    followed by two ~0 probes stopped runs as "collapse". Two clear probes, or one >= 5x min_gap, are."""
    health = TrainingHealth("warn")
    health.losses = [(s, 0.8) for s in range(1, 60)]

    def probes(*gaps):
        return [
            {"gap": g, "rel": g / 0.8, "true": 0.8 - g, "shuffled": 0.8, "spread": 0.5, "step": 10 * (i + 1)}
            for i, g in enumerate(gaps)
        ]

    health.probes = probes(-0.05, 0.081, 0.0075, -0.0008)
    assert health.decide()[0] == "learning"
    health.probes = probes(0.03, 0.081, 0.005, -0.0008)  # two clear probes: the gap was there
    assert health.decide()[0] == "collapse"
    health.probes = probes(0.245, -0.0006, -0.0014)  # one probe far above the threshold (10x min_gap)
    code, line = health.decide()
    assert code == "collapse" and "down from 0.245" in line


def test_a_train_gap_without_a_held_out_gap_is_named_memorising_in_the_table():
    """The 3-D demo after the probe fix: train_vision_gap 0.20 at the end, eval_vision_gap 0.008,
    held-out reports identical to the blind baseline's."""
    health = TrainingHealth("warn")
    health.losses = [(s, 0.8 - 0.001 * s) for s in range(1, 60)]
    probe = {"gap": 0.2, "rel": 0.25, "true": 0.6, "shuffled": 0.8, "spread": 0.5}
    health.probes = [{**probe, "step": s} for s in (20, 40)]
    health.eval_gap = 0.008
    row = next(r for r in health.table() if r[0] == "eval vision gap")
    assert row[2] == "warn" and "memorises" in row[1] and "0.2" in row[1]
    health.eval_gap = 0.5  # the gap holds out of sample: no such text
    row = next(r for r in health.table() if r[0] == "eval vision gap")
    assert row == ("eval vision gap", "0.5", "pass")

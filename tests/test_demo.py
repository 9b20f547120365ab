"""End to end: the README's demo trains on synthetic CT data and reads the image."""

from __future__ import annotations

import json

import pytest

from hf_vlm.cli import main
from hf_vlm.synthetic import chance_accuracy


@pytest.mark.slow
def test_demo_reports_match_the_image_far_better_than_chance(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the README runs it from the repo root with a relative output_dir
    assert main(["demo"]) == 0
    tmp_path = tmp_path / "outputs" / "demo"
    scores = json.loads((tmp_path / "demo_scores.json").read_text(encoding="utf-8"))
    model, blind, chance = scores["model"], scores["blind_shuffled_images"], chance_accuracy()
    assert model["side"] >= 0.85 and model["lobe"] >= 0.75 and model["size_within_2mm"] >= 0.6, model
    for fact in ("side", "lobe"):
        assert model[fact] >= chance[fact] + 0.2, (fact, model, chance)
        assert model[fact] >= blind[fact] + 0.2, (fact, model, blind)  # the image matters
    assert scores["health"]["verdict"] == "healthy" and scores["health"]["train_vision_gap"] > 0.02, scores["health"]
    printed = capsys.readouterr().out
    assert "prediction | ground truth" in printed and "肺" in printed
    final = tmp_path / "final"
    assert (final / "config.json").exists() and (final / "processor_config.json").exists()
    assert (final / "train_log.csv").exists() and (final / "README.md").exists()  # CSV log, model card
    png = (final / "train_log.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000  # loss curve with the healthy band

"""One run per output_dir; a resume continues the same run (issue 13, case 4), fast unit level.

The end-to-end version (a second `train_from_recipe` into the first run's folder) is in
tests/test_run.py.
"""

from __future__ import annotations

import json

import pytest


def test_a_non_empty_output_dir_is_refused_unless_asked(make_args, tmp_path):
    from hf_vlm.training.resume import check_output_dir

    out = tmp_path / "run"
    check_output_dir(make_args(out))  # does not exist yet
    (out / "assets").mkdir(parents=True)
    check_output_dir(make_args(out))  # only the reusable synthetic assets
    (out / "model.safetensors").write_bytes(b"old run")
    (out / "checkpoint-30").mkdir()
    with pytest.raises(
        ValueError, match=r"already holds a run \(checkpoint-30, model.safetensors\).*overwrite_output_dir"
    ):
        check_output_dir(make_args(out))
    check_output_dir(make_args(out, resume_from_checkpoint="last"))  # continuing it is fine
    check_output_dir(make_args(out, overwrite_output_dir=True))
    assert not (out / "checkpoint-30").exists()  # the old run's checkpoints can no longer be "last"


def _checkpoint(path, step: int, settings: dict):
    path.mkdir(parents=True)
    (path / "trainer_state.json").write_text(json.dumps({"global_step": step}), encoding="utf-8")
    (path / "hf_vlm_checkpoint.json").write_text(json.dumps({"run_settings": settings}), encoding="utf-8")
    return str(path)


def test_resume_refuses_a_checkpoint_of_another_run(tmp_path):
    from hf_vlm.training.resume import check_resume_compatible

    settings = {"max_visual_tokens": 4, "stage": "finetune", "train_file": "/data/train.csv"}
    same = _checkpoint(tmp_path / "a" / "checkpoint-10", 10, settings)
    check_resume_compatible(same, settings, max_steps=12)
    other = _checkpoint(tmp_path / "b" / "checkpoint-10", 10, {**settings, "max_visual_tokens": 16, "stage": "align"})
    with pytest.raises(ValueError, match=r"max_visual_tokens: 16 in the checkpoint, 4 now; stage: 'align'"):
        check_resume_compatible(other, settings, max_steps=12)
    longer = _checkpoint(tmp_path / "c" / "checkpoint-30", 30, settings)
    with pytest.raises(ValueError, match=r"at step 30 but this run has max_steps=12"):
        check_resume_compatible(longer, settings, max_steps=12)


def test_resume_refuses_a_checkpoint_whose_study_settings_differ(make_args, tmp_path):
    """A study run resumed with other slices or another z-embedding would train weights that
    meant one preprocessing on another: the recorded study keys are compared like the rest."""
    from hf_vlm.training.arguments import DataArguments, ModelArguments
    from hf_vlm.training.resume import check_resume_compatible, resume_settings

    args = make_args(tmp_path / "run")
    model = ModelArguments(tiny_preset="micro", slice_position_embedding=True, study_depth_tokens=4)
    recorded = resume_settings(model, DataArguments(studies=True, study_num_slices=32), args)
    checkpoint = _checkpoint(tmp_path / "run" / "checkpoint-2", 2, recorded)
    check_resume_compatible(checkpoint, recorded, max_steps=4)
    fewer = resume_settings(model, DataArguments(studies=True, study_num_slices=16), args)
    with pytest.raises(ValueError, match=r"study_num_slices: 32 in the checkpoint, 16 now"):
        check_resume_compatible(checkpoint, fewer, max_steps=4)
    three = DataArguments(studies=True, study_windows=["lung", "mediastinum", "mediastinum"])
    windows = resume_settings(model, three, args)
    with pytest.raises(ValueError, match=r"study_windows: \['lung'\] in the checkpoint"):
        check_resume_compatible(checkpoint, windows, max_steps=4)
    no_z = ModelArguments(tiny_preset="micro", slice_position_embedding=False, study_depth_tokens=4)
    with pytest.raises(ValueError, match=r"slice_position_embedding: True in the checkpoint, False now"):
        check_resume_compatible(checkpoint, resume_settings(no_z, DataArguments(studies=True), args), max_steps=4)

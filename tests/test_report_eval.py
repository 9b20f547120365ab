"""ReportEvalCallback: report metrics during training, best checkpoint by findings-F1."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from hf_vlm.training.report_eval import ReportEvalCallback, make_compute_metrics, select_eval_rows

GOOD = ["右肺上叶见一直径约12mm结节，边界清楚。", "左肺下叶见结节，直径约6mm。"]
LOOP = "左肺上叶左肺上叶左肺上叶左肺上叶左肺上叶左肺上叶左肺上叶"


@pytest.fixture
def eval_rows(ct_images):
    return [
        {"images": [ct_images[0]], "prompt": None, "caption": GOOD[0]},
        {"images": [ct_images[1]], "prompt": "请描述。", "caption": GOOD[1]},
    ]


class _State:
    def __init__(self, step=3):
        self.global_step, self.is_world_process_zero = step, True
        self.log_history = [{"eval_loss": 1.0, "step": step}]


class _Args:
    def __init__(self, output_dir):
        self.output_dir = output_dir


def test_metrics_are_added_in_place_and_samples_written(micro_model, micro_processor, eval_rows, tmp_path, caplog):
    callback = ReportEvalCallback(
        eval_rows, micro_processor, num_samples_to_log=1, generate_kwargs={"max_new_tokens": 6}
    )
    metrics, state = {"eval_loss": 1.0}, _State(step=3)
    micro_model.train()
    with caplog.at_level(logging.INFO, logger="hf_vlm.training.report_eval"):
        callback.on_evaluate(_Args(str(tmp_path)), state, None, metrics=metrics, model=micro_model)
    assert micro_model.training  # restored after generating
    for key in (
        "eval_findings_f1",
        "eval_cider_d",
        "eval_bleu_4",
        "eval_rouge_l",
        "eval_repetition",
        "eval_findings_f1_cider",
    ):
        assert isinstance(metrics[key], float), key
    assert metrics["eval_findings_f1_cider"] == pytest.approx(
        metrics["eval_findings_f1"] + 1e-3 * metrics["eval_cider_d"]
    )
    assert state.log_history[-1]["eval_findings_f1"] == metrics["eval_findings_f1"]  # visible in the log history
    lines = (tmp_path / "samples_step_3.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["reference"] for line in lines] == GOOD and GOOD[0] in lines[0]  # ensure_ascii=False
    assert f"reference: {GOOD[0]}" in caplog.text and GOOD[1] not in caplog.text  # num_samples_to_log=1


def test_loops_raise_a_warning(micro_processor, eval_rows, tmp_path, caplog, monkeypatch):
    callback = ReportEvalCallback(eval_rows, micro_processor)
    monkeypatch.setattr(callback, "generate", lambda model: [LOOP, GOOD[1]])
    metrics = {}
    with caplog.at_level(logging.WARNING, logger="hf_vlm.training.report_eval"):
        callback.on_evaluate(_Args(str(tmp_path)), _State(), None, metrics=metrics, model=object())
    assert metrics["eval_repetition_flagged"] == 1.0
    assert "1 of 2 generated reports look like loops" in caplog.text and "repetition_penalty" in caplog.text


def test_unknown_best_metric_names_the_choices(micro_processor, eval_rows):
    callback = ReportEvalCallback(eval_rows, micro_processor, metric_for_best="meteor")
    with pytest.raises(KeyError, match="findings_f1"):
        callback.score(GOOD)


def test_trainer_keeps_the_checkpoint_with_the_best_findings_f1(
    micro_model, micro_processor, ct_images, eval_rows, tmp_path
):
    """Two evaluations: the first states the findings right, the second (trained longer) wrong."""
    from transformers import Trainer, TrainingArguments

    from hf_vlm.data.collator import DataCollatorForMambaVLM

    examples = [micro_processor.encode_example([img], None, GOOD[i % 2]) for i, img in enumerate(ct_images)]
    scripted = iter([GOOD, ["右肺中叶未见结节。", "右肺上叶见结节。"]])

    class Scripted(ReportEvalCallback):
        def generate(self, model):
            super().generate(model)  # real generation inside the Trainer
            return next(scripted)

    callback = Scripted(eval_rows, micro_processor, generate_kwargs={"max_new_tokens": 4})
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=4,
        per_device_train_batch_size=2,
        per_device_eval_batch_size=2,
        learning_rate=1e-2,
        eval_strategy="steps",
        eval_steps=2,
        save_strategy="steps",
        save_steps=2,
        load_best_model_at_end=True,
        metric_for_best_model="eval_findings_f1",
        logging_steps=1,
        report_to="none",
        remove_unused_columns=False,
        use_cpu=True,
        dataloader_num_workers=0,
        seed=0,
    )
    collator = DataCollatorForMambaVLM(
        pad_token_id=micro_processor.tokenizer.pad_token_id, image_token_id=micro_processor.image_token_id
    )
    trainer = Trainer(
        model=micro_model,
        args=args,
        train_dataset=examples,
        eval_dataset=examples,
        data_collator=collator,
        callbacks=[callback],
    )
    trainer.train()
    evals = [h for h in trainer.state.log_history if "eval_findings_f1" in h]
    assert [h["step"] for h in evals] == [2, 4] and evals[0]["eval_findings_f1"] > evals[1]["eval_findings_f1"]
    assert trainer.state.best_model_checkpoint.endswith("checkpoint-2")
    assert trainer.state.best_metric == pytest.approx(evals[0]["eval_findings_f1"])
    assert (tmp_path / "samples_step_2.jsonl").exists() and (tmp_path / "samples_step_4.jsonl").exists()
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "checkpoint-2" / "model.safetensors"))
    name = next(k for k in saved if k.startswith("bridge."))
    assert torch.equal(trainer.model.state_dict()[name], saved[name])  # the best weights were loaded back
    assert not torch.equal(load_file(str(tmp_path / "checkpoint-4" / "model.safetensors"))[name], saved[name])


def test_select_eval_rows_is_a_fixed_subset():
    data = [{"images": [i], "prompt": "", "caption": f"c{i}"} for i in range(10)]
    first, again = select_eval_rows(data, 3, seed=1), select_eval_rows(data, 3, seed=1)
    assert first == again and len(first) == 3 and all(r["prompt"] is None for r in first)


def test_make_compute_metrics_decodes_generated_ids(tokenizer):
    import numpy as np
    from transformers import EvalPrediction

    ids = tokenizer(GOOD[0], add_special_tokens=False)["input_ids"]
    labels = np.array([[-100, -100] + ids])
    predictions = np.array([ids + [-100, -100]])
    scores = make_compute_metrics(tokenizer)(EvalPrediction(predictions=predictions, label_ids=labels))
    assert scores["findings_f1"] == pytest.approx(1.0) and scores["bleu_4"] == pytest.approx(1.0)

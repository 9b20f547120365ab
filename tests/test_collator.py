"""Label masking: only the answer and its EOS are supervised, decided by position."""

from __future__ import annotations

import pytest

from hf_vlm.data.collator import IGNORE_INDEX, DataCollatorForMambaVLM, PromptTooLongError


def _collate(processor, examples, **kwargs):
    collator = DataCollatorForMambaVLM(
        pad_token_id=processor.tokenizer.pad_token_id, image_token_id=processor.image_token_id, **kwargs
    )
    return collator, collator(examples)


def _supervised(batch, row):
    labels = batch["labels"][row]
    return labels[labels != IGNORE_INDEX].tolist()


CASES = [
    # (name, n_images per row, answers, max_length)
    ("single", [1], ["右肺下叶见一直径约12mm结节。"], None),
    ("batch_padding", [1, 1], ["左肺上叶见结节。", "右肺中叶可见一约5mm结节影，边缘光整。余肺野清晰。"], None),
    ("multiple_images", [2, 1], ["双肺见多发结节。", "左肺下叶见结节。"], None),
]


@pytest.mark.parametrize("name,n_images,answers,max_length", CASES, ids=[c[0] for c in CASES])
def test_only_answer_and_eos_are_supervised(micro_processor, ct_images, name, n_images, answers, max_length):
    tok = micro_processor.tokenizer
    examples = [micro_processor.encode_example(ct_images[:n], None, a) for n, a in zip(n_images, answers)]
    _, batch = _collate(micro_processor, examples, max_length=max_length)
    assert batch["pixel_values"].shape[0] == sum(n_images)
    for row, (example, answer) in enumerate(zip(examples, answers)):
        expected = tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert _supervised(batch, row) == expected  # answer + EOS, nothing else
        # pad == eos: the EOS is supervised although it has the pad id
        assert tok.eos_token_id == tok.pad_token_id and _supervised(batch, row)[-1] == tok.pad_token_id
        labels, ids = batch["labels"][row], batch["input_ids"][row]
        # every visual token and every prompt token is masked
        assert (labels[ids == micro_processor.image_token_id] == IGNORE_INDEX).all()
        assert (labels[: example["prompt_length"]] == IGNORE_INDEX).all()
        assert int((ids == micro_processor.image_token_id).sum()) == n_images[row] * micro_processor.max_visual_tokens
        # padding (right side) is masked and not attended
        real = len(example["input_ids"])
        assert batch["attention_mask"][row, :real].all() and not batch["attention_mask"][row, real:].any()
        assert (labels[real:] == IGNORE_INDEX).all()


def test_answer_truncation_keeps_prompt_and_counts(micro_processor, ct_images):
    long_answer = "右肺下叶见一直径约12mm结节，边界清楚。" * 6
    example = micro_processor.encode_example(ct_images[:1], None, long_answer)
    budget = example["prompt_length"] + 5
    collator, batch = _collate(micro_processor, [example], max_length=budget)
    assert batch["input_ids"].shape[1] == budget
    assert (
        batch["input_ids"][0, : example["prompt_length"]].tolist() == example["input_ids"][: example["prompt_length"]]
    )
    assert _supervised(batch, 0) == example["input_ids"][example["prompt_length"] : budget]
    assert collator.truncated_answers == 1


def test_prompt_too_long_is_a_clear_error(micro_processor, ct_images):
    example = micro_processor.encode_example(ct_images[:2], None, "左肺上叶见结节。")
    with pytest.raises(PromptTooLongError, match=r"visual \+ prompt tokens \(\d+\) do not fit in max_length=8"):
        _collate(micro_processor, [example], max_length=8)


@pytest.mark.parametrize("answer", ["", "   ", None])
def test_empty_answer_is_rejected(micro_processor, ct_images, answer):
    with pytest.raises(ValueError, match="Empty answer"):
        micro_processor.encode_example(ct_images[:1], None, answer)


def test_collator_rejects_rows_without_answer_tokens(micro_processor, ct_images):
    example = micro_processor.encode_example(ct_images[:1], None, "左肺上叶见结节。")
    example["input_ids"] = example["input_ids"][: example["prompt_length"]]
    with pytest.raises(ValueError, match="no answer tokens"):
        _collate(micro_processor, [example])


def test_first_batch_logs_supervised_span(micro_processor, ct_images, caplog):
    example = micro_processor.encode_example(ct_images[:1], None, "左肺上叶见结节。")
    with caplog.at_level("INFO", logger="hf_vlm.data.collator"):
        _collate(micro_processor, [example], tokenizer=micro_processor.tokenizer)
    message = caplog.text
    assert f"prompt tokens {example['prompt_length']}" in message and "左肺上叶见结节。" in message

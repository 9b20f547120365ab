"""MambaVLMProcessor: prompt template, `<image>` expansion, BatchFeature outputs, decoding."""

from __future__ import annotations

import pytest
import torch


def test_image_marker_count_must_match_images(micro_processor, ct_images):
    with pytest.raises(ValueError, match="1 <image> marker"):
        micro_processor.encode_example(ct_images[:2], "<image>请描述。", "左肺上叶见结节。")


def test_prompt_and_answer_boundary_is_exact(micro_processor, ct_images):
    """Prompt and answer are tokenised separately: the prompt ids are a prefix of the row."""
    example = micro_processor.encode_example(ct_images[:1], "描述", "左肺上叶见结节。")
    prompt_ids = micro_processor.tokenize_prompt("描述", 1)
    assert example["input_ids"][: example["prompt_length"]] == prompt_ids
    assert torch.is_tensor(example["pixel_values"]) and example["pixel_values"].shape[0] == 1


def test_batch_is_a_left_padded_batch_feature(micro_processor, ct_images):
    from transformers import BatchFeature

    batch = micro_processor(images=[[ct_images[0]], [ct_images[1]]], text=["短", "一个长得多的提示词"])
    assert isinstance(batch, BatchFeature)
    moved = batch.to("cpu")  # the transformers convention: .to(device) on the whole batch
    assert set(moved) == {"input_ids", "attention_mask", "pixel_values"}
    mask = batch["attention_mask"]
    assert mask[0, 0] == 0 and mask[:, -1].tolist() == [1, 1]  # left padding: new tokens follow every prompt
    per_row = (batch["input_ids"] == micro_processor.image_token_id).sum(-1).tolist()
    assert per_row == [micro_processor.max_visual_tokens] * 2


def test_decode_passes_skip_special_tokens_through(micro_processor):
    tokenizer = micro_processor.tokenizer
    ids = tokenizer("左肺上叶见结节。", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert micro_processor.decode(ids) == "左肺上叶见结节。"  # EOS dropped by default
    assert micro_processor.decode(ids, skip_special_tokens=False).endswith(tokenizer.eos_token)
    assert micro_processor.batch_decode([ids], skip_special_tokens=False)[0].endswith(tokenizer.eos_token)

"""`bridge_pooling: attention` (hf_vlm.bridges.GatedAttentionPooling) on images and studies.

What it must do: start as avg pooling (so switching it on changes nothing until it trains), keep
the fixed token budget and the save -> load guarantee, and learn to report the one telling patch
of a box, which avg pooling divides by the box size (the 3-D demo's one-slice nodule).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image

from hf_vlm import MambaVLMForConditionalGeneration, MambaVLMProcessor
from hf_vlm.bridges import GatedAttentionPooling, pool_tokens
from hf_vlm.modeling_study import pool_study_tokens

BUDGET = 16


@pytest.fixture(scope="module")
def study_processor(micro_processor):
    processor = copy.deepcopy(micro_processor)
    processor.max_visual_tokens = BUDGET
    processor.study_settings = {"num_slices": 8}
    return processor


def _slices(n: int, seed: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)) for _ in range(n)]


def _model(micro_config, pooling: str, seed: int = 0):
    torch.manual_seed(seed)
    config = micro_config(
        max_visual_tokens=BUDGET, slice_position_embedding=True, study_depth_tokens=4, bridge_pooling=pooling
    )
    return MambaVLMForConditionalGeneration(config).eval()


def test_untrained_attention_pooling_is_avg_pooling(micro_config, study_processor):
    attention, avg = _model(micro_config, "attention"), _model(micro_config, "avg")
    assert not attention.bridge.attention_pool.score.weight.any()  # _init_weights keeps the scorer at zero
    missing = avg.load_state_dict(attention.state_dict(), strict=False)
    assert sorted(missing.unexpected_keys) == sorted(
        f"bridge.attention_pool.{k}" for k in attention.bridge.attention_pool.state_dict()
    )
    batch = study_processor(images=[_slices(s, s) for s in (1, 7, 32)], text=[None] * 3)
    with torch.no_grad():
        torch.testing.assert_close(
            attention(**batch).image_hidden_states, avg(**batch).image_hidden_states, rtol=1e-5, atol=1e-6
        )
    features = torch.randn(3, 64, 8)  # the 2-D path too
    pooler = GatedAttentionPooling(8)
    torch.testing.assert_close(pooler(features, lambda x: pool_tokens(x, 16, "avg")), pool_tokens(features, 16, "avg"))


def test_attention_study_model_fixed_budget_and_save_load_identical_logits(micro_config, study_processor, tmp_path):
    model = _model(micro_config, "attention")
    with torch.no_grad():  # a trained-looking scorer, so the weights are far from uniform
        model.bridge.attention_pool.score.weight.normal_(0, 3.0)
    studies = [_slices(s, 20 + s) for s in (1, 7, 32)]
    batch = study_processor(images=studies, text=[None, "请描述。", None])
    with torch.no_grad():
        out = model(**batch)
        assert out.image_hidden_states.shape == (3, BUDGET, model.config.text_config.hidden_size)
        for i, slices in enumerate(studies):  # each study alone gives the tokens it gets in the batch
            alone = model(**study_processor(images=[slices], text=[None])).image_hidden_states
            torch.testing.assert_close(alone[0], out.image_hidden_states[i], rtol=1e-5, atol=1e-6)
    model.save_pretrained(tmp_path)
    study_processor.save_pretrained(tmp_path)
    loaded = MambaVLMForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert loaded.config.bridge_pooling == "attention"
    processor = MambaVLMProcessor.from_pretrained(tmp_path)
    with torch.no_grad():
        again = loaded(**processor(images=studies, text=[None, "请描述。", None]))
    assert torch.equal(out.logits, again.logits)


def test_weights_never_underflow_to_nan():
    pooler = GatedAttentionPooling(4)
    with torch.no_grad():
        pooler.score.weight.fill_(1e4)  # scores thousands apart: exp would underflow to 0 / 0
    features = torch.randn(2, 6, 16, 4) * 10
    pooled = pooler(features, lambda x: pool_study_tokens(x, 16, 4, "avg"))
    assert torch.isfinite(pooled).all()


def _needle_batch(generator, n: int = 64, boxes: int = 4, members: int = 32, dim: int = 8):
    """n rows of `boxes` boxes of `members` noise patches; one patch of one box is a needle whose
    channel 1 carries the label (+-1). The answer: which box, and the sign."""
    x = torch.randn(n, boxes * members, dim, generator=generator) * 0.5
    box = torch.randint(boxes, (n,), generator=generator)
    sign = torch.randint(2, (n,), generator=generator)
    where = box * members + torch.randint(members, (n,), generator=generator)
    x[torch.arange(n), where, 0] = 4.0  # what makes it a needle
    x[torch.arange(n), where, 1] = 4.0 * (2 * sign - 1).float()
    return x, box * 2 + sign


def _train_readout(pooling: str, steps: int = 300) -> float:
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    pooler = GatedAttentionPooling(8) if pooling == "attention" else None
    head = torch.nn.Linear(4 * 8, 8)
    params = list(head.parameters()) + (list(pooler.parameters()) if pooler else [])
    optimizer = torch.optim.Adam(params, lr=1e-2)

    def pooled(x):
        if pooler is None:
            return pool_tokens(x, 4, "avg")
        return pooler(x, lambda t: pool_tokens(t, 4, "avg"))

    for _ in range(steps):
        x, y = _needle_batch(generator)
        loss = torch.nn.functional.cross_entropy(head(pooled(x).flatten(1)), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    x, y = _needle_batch(torch.Generator().manual_seed(99), n=512)
    with torch.no_grad():
        return float((head(pooled(x).flatten(1)).argmax(1) == y).float().mean())


def test_attention_learns_to_find_the_needle_that_avg_pooling_dilutes():
    attention, avg = _train_readout("attention"), _train_readout("avg")
    assert attention > 0.9, attention
    assert attention > avg + 0.2, (attention, avg)

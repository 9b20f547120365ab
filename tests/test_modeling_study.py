"""The study encoder (hf_vlm/modeling_study.py): S slices -> a fixed budget for the whole study.

Micro parts: a ViT of 32 px / 8 px patches (P = 16 patch tokens) and a budget of 16 tokens.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from PIL import Image

from hf_vlm import MambaVLMForConditionalGeneration, MambaVLMProcessor
from hf_vlm.data.collator import IGNORE_INDEX, DataCollatorForMambaVLM
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


def _model(micro_config, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    kwargs = dict(max_visual_tokens=BUDGET, slice_position_embedding=True, study_depth_tokens=4)
    kwargs.update(overrides)
    return MambaVLMForConditionalGeneration(micro_config(**kwargs)).eval()


@pytest.mark.parametrize("bridge", ["mlp", "qformer"])
def test_fixed_budget_whatever_the_slice_count(micro_config, study_processor, bridge):
    model = _model(micro_config, bridge_type=bridge)
    studies = [_slices(s, s) for s in (1, 7, 32)]
    batch = study_processor(images=studies, text=[None] * 3)
    assert batch["slice_counts"].tolist() == [1, 7, 32] and batch["pixel_values"].shape[0] == 40
    # one <image> per study: exactly BUDGET placeholders per row, whatever S is
    assert ((batch["input_ids"] == study_processor.image_token_id).sum(-1) == BUDGET).all()
    with torch.no_grad():
        out = model(**batch)
    assert out.image_hidden_states.shape == (3, BUDGET, model.config.text_config.hidden_size)
    with torch.no_grad():  # each study alone gives the same tokens as inside the batch
        for i, slices in enumerate(studies):
            alone = model(**study_processor(images=[slices], text=[None])).image_hidden_states
            torch.testing.assert_close(alone[0], out.image_hidden_states[i], rtol=1e-5, atol=1e-6)


def test_the_slices_and_their_positions_matter(micro_config, study_processor):
    model = _model(micro_config)
    batch = study_processor(images=[_slices(7, 0)], text=[None])
    with torch.no_grad():
        base = model(**batch).image_hidden_states
        reversed_z = model(**{**batch, "slice_z": batch["slice_z"].flip(0)}).image_hidden_states
        other_slice = batch["pixel_values"].clone()
        other_slice[6] = 0
        changed = model(**{**batch, "pixel_values": other_slice}).image_hidden_states
    assert not torch.allclose(base, reversed_z) and not torch.allclose(base, changed)


def test_pooling_is_3d_and_z_major():
    # slice k holds the value k everywhere: 8 slices pooled to 4 z bins give bins of 2 slices
    features = torch.arange(8.0)[None, :, None, None].expand(1, 8, 16, 2)
    pooled = pool_study_tokens(features, 16, 4)
    assert pooled.shape == (1, 16, 2)
    assert pooled[0, :, 0].reshape(4, 4).mean(1).tolist() == [0.5, 2.5, 4.5, 6.5]
    assert pool_study_tokens(features[:, :1], 16, 4).shape == (1, 16, 2)  # S=1 still fills the budget
    assert pool_study_tokens(torch.randn(2, 5, 12, 3), 6, 2).shape == (2, 6, 3)  # non-square: 1-D fallback
    # the separable computation equals torch's 3-D adaptive pooling over (z, h, w)
    for s, (mode, pool3d) in [
        (5, ("avg", torch.nn.functional.adaptive_avg_pool3d)),
        (7, ("max", torch.nn.functional.adaptive_max_pool3d)),
    ]:
        x = torch.randn(2, s, 16, 3)
        reference = pool3d(x.permute(0, 3, 1, 2).reshape(2, 3, s, 4, 4), (4, 2, 2)).flatten(2).transpose(1, 2)
        torch.testing.assert_close(pool_study_tokens(x, 16, 4, mode), reference)


def test_study_depth_tokens_must_divide_the_budget(micro_config):
    with pytest.raises(ValueError, match="study_depth_tokens must be a positive divisor of max_visual_tokens=16"):
        micro_config(max_visual_tokens=BUDGET, study_depth_tokens=3)


def test_collator_keeps_mask_guarantees_for_studies(study_processor):
    rows = []
    for i, s in enumerate((1, 7, 32)):
        example = study_processor.encode_example(_slices(s, i), None, "右肺上叶见结节。")
        example["row_id"] = i
        rows.append(example)
    collator = DataCollatorForMambaVLM(
        pad_token_id=study_processor.tokenizer.pad_token_id, image_token_id=study_processor.image_token_id
    )
    batch = collator(rows)
    assert batch["slice_counts"].tolist() == [1, 7, 32] and batch["slice_z"].shape == (40,)
    assert batch["pixel_values"].shape[0] == 40
    image = batch["input_ids"] == study_processor.image_token_id
    assert (image.sum(-1) == BUDGET).all()
    assert (batch["labels"][image] == IGNORE_INDEX).all()  # visual tokens never supervised
    for i, row in enumerate(rows):  # the answer and its EOS are supervised, nothing else
        n, p = len(row["input_ids"]), row["prompt_length"]
        assert (batch["labels"][i, :p] == IGNORE_INDEX).all() and (batch["labels"][i, n:] == IGNORE_INDEX).all()
        assert batch["labels"][i, p:n].tolist() == row["input_ids"][p:]


def test_study_model_save_load_identical_logits(micro_config, study_processor, tmp_path):
    model = _model(micro_config, bridge_type="qformer")
    batch = study_processor(images=[_slices(5, 1), _slices(2, 2)], text=[None, "请描述。"])
    model.save_pretrained(tmp_path)
    study_processor.save_pretrained(tmp_path)
    loaded = MambaVLMForConditionalGeneration.from_pretrained(tmp_path).eval()
    processor = MambaVLMProcessor.from_pretrained(tmp_path)
    assert processor.study_settings == study_processor.study_settings
    assert json.loads((tmp_path / "processor_config.json").read_text())["study_preprocessing"]["num_slices"] == 8
    with torch.no_grad():
        assert torch.equal(
            model(**batch).logits,
            loaded(**processor(images=[_slices(5, 1), _slices(2, 2)], text=[None, "请描述。"])).logits,
        )


def test_batched_generation_equals_one_by_one_for_studies(micro_config, study_processor):
    model = _model(micro_config, seed=3)
    with torch.no_grad():  # a loud bridge, so the reports depend on the study
        for param in model.bridge.parameters():
            param.normal_(0, 2.0)
    studies, prompts = [_slices(s, 10 + s) for s in (1, 9, 4)], [None, "请描述。", None]
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=study_processor.tokenizer.pad_token_id)
    with torch.no_grad():
        batch = study_processor(images=studies, text=prompts)
        batched = model.generate(**batch, **kwargs)[:, batch["input_ids"].shape[1] :]
        for i in range(3):
            one = study_processor(images=[studies[i]], text=[prompts[i]])
            alone = model.generate(**one, **kwargs)[0, one["input_ids"].shape[1] :]
            assert batched[i, : len(alone)].tolist() == alone.tolist()


def test_two_d_checkpoint_loads_and_gives_the_same_logits(micro_config, micro_processor, ct_images, tmp_path):
    """A checkpoint from before studies (no study keys in config.json) takes the 2-D path unchanged,
    and one slice given as a study through a study processor gives the same logits too."""
    torch.manual_seed(0)
    model = MambaVLMForConditionalGeneration(micro_config()).eval()
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    for key in ("slice_position_embedding", "study_depth_tokens"):
        config.pop(key)
    (tmp_path / "config.json").write_text(json.dumps(config))
    old = MambaVLMForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert not hasattr(old.bridge, "slice_position")
    batch = micro_processor(images=[[ct_images[0]], [ct_images[1]]], text=[None, None])
    with torch.no_grad():
        reference = model(**batch).logits
        # the pre-study computation, spelled out: tower -> bridge -> scatter
        features = model.bridge(model.get_vision_features(batch["pixel_values"]))
        assert torch.equal(old(**batch).image_hidden_states, features)
        assert torch.equal(old(**batch).logits, reference)
        study_processor = copy.deepcopy(micro_processor)
        study_processor.study_settings = {"num_slices": 8}
        as_studies = study_processor(images=[[ct_images[0]], [ct_images[1]]], text=[None, None])
        assert as_studies["slice_counts"].tolist() == [1, 1]
        assert torch.equal(old(**as_studies).logits, reference)


def test_train_probe_gives_each_row_the_next_whole_study_whatever_its_slice_count(micro_config, study_processor):
    """The train-time vision probe on studies of S = 3, 5 and 8: its 'shuffled' loss is the loss of
    the batch built with row i holding study i+1 (slices, count and z together). It used to roll
    the flat slice tensor by N // rows, splicing two studies into one (or, when N % rows != 0,
    falling back to a constant image): on the 3-D demo (`all` sampling, S = 22-42) that reported a
    train gap of 0.1-0.25 for a model whose loss did not depend on the study (measured 8e-5)."""
    from types import SimpleNamespace

    from hf_vlm.training.health import TrainVisionProbe, _shift_images

    model = _model(micro_config)
    studies = [_slices(s, 10 + s) for s in (3, 5, 8)]
    captions = ["右肺上叶见结节。", "左肺下叶见一约8mm结节。", "右肺中叶见结节，建议随访。"]
    collate = DataCollatorForMambaVLM(pad_token_id=study_processor.tokenizer.pad_token_id)

    def batch(order):
        return collate([study_processor.encode_example(studies[j], None, c) for j, c in zip(order, captions)])

    own, rolled = batch([0, 1, 2]), batch([1, 2, 0])
    shifted = _shift_images(own, "pixel_values", None)
    assert shifted["slice_counts"].tolist() == [5, 8, 3]
    assert torch.equal(shifted["pixel_values"], rolled["pixel_values"])
    assert torch.equal(shifted["slice_z"], rolled["slice_z"])

    keys = ("input_ids", "attention_mask", "labels", "pixel_values", "slice_counts", "slice_z")
    inputs = {k: own[k] for k in keys}
    probed = TrainVisionProbe(every=1).observe_batch(None, SimpleNamespace(global_step=0), None, inputs, model)
    with torch.no_grad():
        expected_true = model(**inputs).loss
        expected_shuffled = model(**{k: rolled[k] for k in keys}).loss
    torch.testing.assert_close(probed["train_vision_loss_true"], expected_true)
    torch.testing.assert_close(probed["train_vision_loss_shuffled"], expected_shuffled)
    assert float(expected_shuffled - expected_true) != 0.0  # the studies differ, so the check can fail


def test_probe_with_one_study_per_batch_uses_the_previous_study_of_another_slice_count(micro_config, study_processor):
    from hf_vlm.training.health import _probe_images, _shift_images

    collate = DataCollatorForMambaVLM(pad_token_id=study_processor.tokenizer.pad_token_id)
    first = collate([study_processor.encode_example(_slices(4, 1), None, "右肺上叶见结节。")])
    second = collate([study_processor.encode_example(_slices(6, 2), None, "左肺下叶见结节。")])
    assert _shift_images(first, "pixel_values", None) is None  # nothing to compare with yet
    shifted = _shift_images(second, "pixel_values", _probe_images(first, "pixel_values"))
    assert shifted["slice_counts"].tolist() == [4] and shifted["pixel_values"].shape[0] == 4
    assert torch.equal(shifted["slice_z"], first["slice_z"])


def test_untrained_attention_pooling_study_model_is_the_avg_model(micro_config, study_processor):
    attention, avg = _model(micro_config, bridge_pooling="attention"), _model(micro_config, bridge_pooling="avg")
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


def test_attention_study_model_fixed_budget_and_save_load_identical_logits(micro_config, study_processor, tmp_path):
    model = _model(micro_config, bridge_pooling="attention")
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

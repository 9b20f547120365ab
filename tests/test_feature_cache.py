"""Vision feature cache: equal features and loss, invalidation by fingerprint, refusals."""

from __future__ import annotations

import copy
import os
import pickle

import pytest
import torch

from hf_vlm.data.collator import DataCollatorForMambaVLM
from hf_vlm.data.dataset import load_caption_dataset
from hf_vlm.data.encoding import EncodeCaptionRows
from hf_vlm.data.feature_cache import EncodeCaptionRowsCached, FeatureCacheMiss, VisionFeatureCache
from hf_vlm.synthetic import make_synthetic_dataset


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    """Eight synthetic CT rows (PNG + cleaned-CSV columns), loaded as the trainer loads them."""
    csv_path = make_synthetic_dataset(str(tmp_path_factory.mktemp("fc_data")), 8, seed=0, image_size=32)
    return load_caption_dataset(csv_path)


@pytest.fixture
def frozen_model(micro_model):
    micro_model.vision_tower.requires_grad_(False)
    return micro_model


def _collate(processor, items):
    collator = DataCollatorForMambaVLM(pad_token_id=processor.tokenizer.pad_token_id, log_first_example=False)
    return collator(items)


def test_cached_features_equal_tower_output(tmp_path, rows, frozen_model, micro_processor):
    cache = VisionFeatureCache(tmp_path, frozen_model, micro_processor, shard_rows=3)
    assert cache.precompute(rows, batch_size=3, progress=False) == {"cached": 0, "encoded": 8}
    shards = sorted(p.name for p in cache.path.glob("shard-*.safetensors"))
    assert len(shards) == 3  # 3 + 3 + 2 rows
    pixel_rows = rows.with_transform(EncodeCaptionRows(micro_processor))
    cached_rows = rows.with_transform(cache.transform())
    with torch.no_grad():
        for i in range(len(rows)):
            expected = frozen_model.get_vision_features(torch.as_tensor(pixel_rows[i]["pixel_values"]))
            got = cached_rows[i]["vision_features"]
            assert got.shape == expected.shape and got.dtype == expected.dtype
            torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)  # batched vs one-by-one BLAS
    # a second run encodes nothing and writes no shard
    assert cache.precompute(rows, batch_size=3, progress=False) == {"cached": 8, "encoded": 0}
    assert sorted(p.name for p in cache.path.glob("shard-*.safetensors")) == shards


def test_loss_from_cached_features_equals_loss_from_pixels(tmp_path, rows, frozen_model, micro_processor):
    cache = VisionFeatureCache(tmp_path, frozen_model, micro_processor)
    cache.precompute(rows, progress=False)
    transform = pickle.loads(pickle.dumps(cache.transform()))  # DataLoader workers under spawn
    assert isinstance(transform, EncodeCaptionRowsCached)
    pixel_items = [rows.with_transform(EncodeCaptionRows(micro_processor))[i] for i in range(4)]
    cached_items = [rows.with_transform(transform)[i] for i in range(4)]
    for p, c in zip(pixel_items, cached_items):
        assert (p["input_ids"], p["prompt_length"], p["row_id"]) == (c["input_ids"], c["prompt_length"], c["row_id"])
    pixel_batch, cached_batch = _collate(micro_processor, pixel_items), _collate(micro_processor, cached_items)
    assert "pixel_values" not in cached_batch and cached_batch["vision_features"].shape[0] == 4
    with torch.no_grad():
        losses = [frozen_model(**batch).loss for batch in (pixel_batch, cached_batch)]
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-6, atol=1e-6)


def _change_weight(model, processor):
    with torch.no_grad():
        next(model.vision_tower.parameters()).view(-1)[0] += 1e-3  # one element of one tensor
    return model, processor


def _change_processor_size(model, processor):
    processor = copy.deepcopy(processor)
    processor.image_processor.size = {"height": 16, "width": 16}
    return model, processor


def _change_feature_layer(model, processor):
    model.config.vision_feature_layer = -1
    return model, processor


@pytest.mark.parametrize(
    "change,field",
    [
        (_change_weight, "encoder_weights"),
        (_change_processor_size, "image_processor"),
        (_change_feature_layer, "vision_feature_layer"),
    ],
    ids=["one-encoder-weight", "image-processor-size", "feature-layer"],
)
def test_changed_encoder_or_preprocessing_is_a_miss(tmp_path, rows, frozen_model, micro_processor, change, field):
    old = VisionFeatureCache(tmp_path, frozen_model, micro_processor)
    old.precompute(rows.select(range(2)), progress=False)
    model, processor = change(frozen_model, micro_processor)
    new = VisionFeatureCache(tmp_path, model, processor)
    assert new.fingerprint != old.fingerprint and new.path != old.path
    assert new.stale == [(old.path, [field])]  # reported, with what changed
    with pytest.raises(FeatureCacheMiss, match="precompute"):
        rows.with_transform(new.transform())[0]


def test_other_decode_settings_change_the_fingerprint(tmp_path, frozen_model, micro_processor):
    base = VisionFeatureCache(tmp_path, frozen_model, micro_processor)
    for kwargs in ({"max_slices": 4}, {"window_center": 40, "window_width": 400}):
        assert VisionFeatureCache(tmp_path, frozen_model, micro_processor, **kwargs).fingerprint != base.fingerprint


def test_replaced_image_file_is_a_miss(tmp_path, rows, frozen_model, micro_processor):
    subset = rows.select(range(2))
    cache = VisionFeatureCache(tmp_path, frozen_model, micro_processor)
    cache.precompute(subset, progress=False)
    path = subset[0]["image_files"]
    stat = os.stat(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # as if rewritten
    with pytest.raises(FeatureCacheMiss, match="changed"):
        subset.with_transform(cache.transform())[0]
    assert cache.precompute(subset, progress=False) == {"cached": 1, "encoded": 1}
    assert "vision_features" in subset.with_transform(cache.transform())[0]


def test_trainable_tower_is_refused(tmp_path, micro_model, micro_processor):
    with pytest.raises(ValueError, match="needs a frozen vision tower"):
        VisionFeatureCache(tmp_path, micro_model, micro_processor)


def test_image_augmentation_turns_the_cache_off(tmp_path, rows, micro_model, micro_processor):
    cache = VisionFeatureCache(tmp_path / "c", micro_model, micro_processor, image_augmentation=True)
    assert not cache.enabled and not (tmp_path / "c").exists()
    assert cache.precompute(rows, progress=False) == {"cached": 0, "encoded": 0}
    transform = cache.transform()
    assert isinstance(transform, EncodeCaptionRows)
    assert "pixel_values" in rows.with_transform(transform)[0]


def test_a_reinitialised_pooler_keeps_the_cache(tmp_path, rows, frozen_model, micro_processor):
    """The pooler never touches the hidden states the cache stores; a tower saved without one gets a
    random pooler at every load, which re-encoded the cache at every stage. A layer weight still counts."""
    old = VisionFeatureCache(tmp_path, frozen_model, micro_processor)
    pooler = [p for n, p in frozen_model.vision_tower.named_parameters() if n.startswith("pooler.")]
    assert pooler, "the micro ViT has a pooler"
    with torch.no_grad():
        for param in pooler:
            param.normal_()
    assert VisionFeatureCache(tmp_path, frozen_model, micro_processor).fingerprint == old.fingerprint
    layer = next(p for n, p in frozen_model.vision_tower.named_parameters() if n.startswith("layers."))
    with torch.no_grad():
        layer.view(-1)[0] += 1e-3
    assert VisionFeatureCache(tmp_path, frozen_model, micro_processor).fingerprint != old.fingerprint

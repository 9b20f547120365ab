"""MambaVLMConfig: sub-configs, bridge settings and the validation that names allowed values."""

from __future__ import annotations

import pytest

from hf_vlm import MambaVLMConfig


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"bridge_type": "linear"}, r"bridge_type must be one of \('mlp', 'qformer'\)"),
        ({"bridge_pooling": "median"}, r"bridge_pooling must be one of \('avg', 'max', 'attention'\)"),
        ({"max_visual_tokens": 0}, "max_visual_tokens must be a positive integer"),
        ({"vision_feature_select_strategy": "cls"}, r"vision_feature_select_strategy must be one of"),
    ],
)
def test_config_validation_names_allowed_values(overrides, message):
    with pytest.raises(ValueError, match=message):
        MambaVLMConfig(**overrides)


def test_config_round_trips_with_its_sub_configs(tmp_path, micro_config):
    config = micro_config(bridge_type="qformer", max_visual_tokens=4)
    config.save_pretrained(tmp_path)
    loaded = MambaVLMConfig.from_pretrained(tmp_path)
    assert loaded.text_config.model_type == "mamba" and loaded.vision_config.model_type == "vit"
    assert loaded.max_visual_tokens == 4 and loaded.bridge_type == "qformer"
    # the Q-Former cross-attends to the vision features: its key/value width is the tower's
    assert loaded.qformer_config.encoder_hidden_size == loaded.vision_config.hidden_size
    assert loaded.tie_word_embeddings == loaded.text_config.tie_word_embeddings


def test_default_qformer_is_sized_from_the_tower_and_blip2_sized_only_for_blip2_weights(tmp_path, micro_config):
    fresh = micro_config(bridge_type="qformer")
    vision, q = fresh.vision_config, fresh.qformer_config
    assert (q.hidden_size, q.num_attention_heads, q.intermediate_size) == (
        vision.hidden_size,
        vision.num_attention_heads,
        vision.intermediate_size,
    )
    assert q.cross_attention_frequency == 1 and q.num_hidden_layers == 2  # every layer looks at the image
    assert fresh.qformer_locality_bias == 4.0
    fresh.save_pretrained(tmp_path)
    loaded = MambaVLMConfig.from_pretrained(tmp_path)  # the resolved sizes are what is saved
    assert loaded.qformer_config.hidden_size == vision.hidden_size and loaded.qformer_locality_bias == 4.0
    blip2 = micro_config(bridge_type="qformer", qformer_init_from="some/blip2")
    q = blip2.qformer_config
    assert (q.hidden_size, q.num_attention_heads, q.intermediate_size, q.num_hidden_layers) == (768, 12, 3072, 12)
    assert q.encoder_hidden_size == vision.hidden_size and blip2.qformer_locality_bias == 0.0

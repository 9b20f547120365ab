"""`QFormerBridge.load_blip2_weights` against a BLIP-2-shaped checkpoint written here.

The checkpoint uses BLIP-2's key names (`query_tokens`, `qformer.*`, next to `vision_model.*` and
`language_model.*` that must be ignored) with shapes that differ from the bridge where BLIP-2's
do: 32 queries (resampled to the budget), a cross-attention sized for a wider tower (skipped and
reported), one layer fewer (left at init and reported as missing), one key the bridge lacks.
"""

from __future__ import annotations

import torch
from safetensors.torch import save_file
from transformers import Blip2QFormerConfig, Blip2QFormerModel, MambaForCausalLM, ViTModel

from hf_vlm import MambaVLMForConditionalGeneration

QFORMER = dict(
    hidden_size=32, num_attention_heads=2, intermediate_size=64, num_hidden_layers=2, cross_attention_frequency=1
)


def _write_blip2_checkpoint(folder, vision_width: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    config = Blip2QFormerConfig(**{**QFORMER, "num_hidden_layers": 1}, encoder_hidden_size=vision_width + 16)
    tensors = {f"qformer.{k}": v.clone() for k, v in Blip2QFormerModel(config).state_dict().items()}
    tensors["query_tokens"] = torch.randn(1, 32, QFORMER["hidden_size"])
    tensors["qformer.encoder.layer.0.extra.weight"] = torch.zeros(3)  # a key this bridge has no home for
    tensors["vision_model.embeddings.patch_embedding.weight"] = torch.zeros(2, 2)  # not the Q-Former's
    tensors["language_model.lm_head.weight"] = torch.zeros(2, 2)
    folder.mkdir()
    save_file(tensors, str(folder / "model.safetensors"))
    return tensors


def test_load_blip2_weights_adapts_shapes_and_reports_what_it_skipped(tmp_path, micro_config, caplog):
    base = micro_config(bridge_type="qformer")
    blip2 = _write_blip2_checkpoint(tmp_path / "blip2", base.vision_config.hidden_size)
    with caplog.at_level("INFO", logger="hf_vlm.bridges"):
        model = MambaVLMForConditionalGeneration.from_components(
            ViTModel(base.vision_config, add_pooling_layer=False),
            MambaForCausalLM(base.text_config),
            bridge_type="qformer",
            max_visual_tokens=4,
            image_token_id=base.image_token_id,
            qformer_config=QFORMER,
            qformer_init_from=str(tmp_path / "blip2"),
        )
    bridge = model.bridge
    assert model.config.qformer_locality_bias == 0.0  # BLIP-2's queries were trained without it
    report = bridge.load_blip2_weights(str(tmp_path / "blip2"))  # the same load again, to read its report
    own = bridge.state_dict()
    # same shape: copied exactly
    for key in (
        "qformer.layernorm.weight",
        "qformer.encoder.layer.0.attention.attention.query.weight",
        "qformer.encoder.layer.0.crossattention.attention.query.weight",
    ):
        assert key in report["loaded"] and torch.equal(own[key], blip2[key]), key
    # 32 BLIP-2 queries resampled to the 4-token budget, ends kept in order
    assert "query_tokens" in report["loaded"] and own["query_tokens"].shape == (1, 4, 32)
    expected = torch.nn.functional.interpolate(blip2["query_tokens"].transpose(1, 2), size=4, mode="linear")
    assert torch.allclose(own["query_tokens"], expected.transpose(1, 2))
    # cross-attention keys/values read a 48-wide tower there, 32 here: skipped, named with both shapes
    skipped = "\n".join(report["skipped"])
    assert "qformer.encoder.layer.0.crossattention.attention.key.weight (shape (32, 48) vs (32, 32))" in skipped
    assert "qformer.encoder.layer.0.extra.weight (unexpected)" in skipped
    assert not any(k.startswith(("vision_model.", "language_model.")) for k in report["loaded"] + report["skipped"])
    # the checkpoint has one layer: layer 1 (and the skipped cross-attention) stay at init and are listed
    assert "qformer.encoder.layer.1.attention.attention.query.weight" in report["missing"]
    assert "qformer.encoder.layer.0.crossattention.attention.key.weight" in report["missing"]
    assert not any(k.startswith(("language_projection", "vision_layernorm")) for k in report["missing"])
    assert "Q-Former init from" in caplog.text and "skipped qformer.encoder.layer.0.crossattention" in caplog.text
    # and the model runs with the adapted bridge
    out = bridge(torch.randn(2, 16, base.vision_config.hidden_size))
    assert out.shape == (2, 4, base.text_config.hidden_size) and torch.isfinite(out).all()

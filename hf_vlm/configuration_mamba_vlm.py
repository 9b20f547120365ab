"""Configuration of a vision encoder + vision bridge + Mamba language model.

The composite follows transformers' LLaVA config: one `PreTrainedConfig` with `sub_configs`
for the vision tower and the language model (`MambaConfig`), plus the bridge settings that
decide how many visual tokens reach the Mamba sequence (`max_visual_tokens`). Keeping the
budget in the config means training, generation and the processor all read the same
number: a checkpoint trained with 96 visual tokens cannot silently be used with 64.
"""

from __future__ import annotations

from typing import Literal

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

BRIDGE_TYPES = ("mlp", "qformer")
FRESH_QFORMER_LOCALITY_BIAS = 4.0  # see QFormerBridge: a fresh Q-Former's queries start near their grid cell
FRESH_QFORMER_LAYERS = 2  # a fresh Q-Former: 2 layers, each cross-attending (docs/architecture.md, "Q-Former")
POOLING_TYPES = ("avg", "max", "attention")
FEATURE_SELECT_STRATEGIES = ("default", "full")


@strict
class MambaVLMConfig(PreTrainedConfig):
    r"""
    Args:
        vision_config (`dict` or `PreTrainedConfig`):
            Any transformers vision model config (CLIP/SigLIP vision, ViT, DINOv2 ...).
        text_config (`dict` or `MambaConfig`):
            The Mamba language model config.
        qformer_config (`dict` or `Blip2QFormerConfig`, *optional*):
            Q-Former settings, used when `bridge_type="qformer"`.
        bridge_type (`str`, defaults to `"mlp"`):
            `"mlp"`: LLaVA-style 2-layer MLP on patch features, pooled down to `max_visual_tokens`.
            `"qformer"`: BLIP-2 Q-Former with `max_visual_tokens` learned queries.
        max_visual_tokens (`int`, defaults to 64):
            Visual token budget per image: the number of `<image>` positions in the sequence.
        vision_feature_layer (`int`, defaults to -2):
            Hidden layer of the vision tower whose output feeds the bridge.
        vision_feature_select_strategy (`str`, defaults to `"default"`):
            `"default"` drops the prefix tokens (CLS, registers) and keeps patch tokens;
            `"full"` keeps every token.
        bridge_pooling (`str`, defaults to `"avg"`):
            How the MLP bridge reduces the patch grid (and a study's slices) to `max_visual_tokens`:
            `"avg"`, `"max"` or `"attention"` (a learned weighted mean per pooling box, see
            `hf_vlm.bridges.GatedAttentionPooling`).
        bridge_hidden_act (`str`, defaults to `"gelu"`):
            Activation between the two MLP layers.
        qformer_init_from (`str`, *optional*):
            Path or hub id of a BLIP-2 checkpoint whose Q-Former weights initialise the bridge. It also
            decides the default `qformer_config`: BLIP-2's own size when set, otherwise a Q-Former
            sized from the vision tower (see `default_qformer_settings`).
        qformer_locality_bias (`float`, *optional*):
            Additive cross-attention bias of each Q-Former query on the patches of "its" grid cell
            (see `QFormerBridge`). Default: 4.0 for a fresh Q-Former, 0.0 (BLIP-2 unchanged) with
            `qformer_init_from`.
        image_token_id (`int`, defaults to 50277):
            Token id of the `<image>` placeholder. It may lie outside the LLM vocabulary: its
            embedding is never looked up, visual embeddings are scattered at its positions.
        slice_position_embedding (`bool`, defaults to `False`):
            Add a learned embedding of each slice's relative z to its patch features (studies of
            several slices, see `hf_vlm.modeling_study`). False keeps the 2-D model unchanged.
        study_depth_tokens (`int`, defaults to 1):
            MLP bridge: z bins of the 3-D pooling; the budget is split into this many bins of
            `max_visual_tokens / study_depth_tokens` in-plane tokens. 1 = the 2-D pooling.
    """

    model_type = "mamba_vlm"
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(config_class=AutoConfig, model_type="clip_vision_model"),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="mamba"),
        "qformer_config": SubConfigSpec(config_class=AutoConfig, model_type="blip_2_qformer", optional=True),
    }

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    qformer_config: dict | PreTrainedConfig | None = None
    bridge_type: str = "mlp"
    max_visual_tokens: int = 64
    vision_feature_layer: int = -2
    vision_feature_select_strategy: Literal["default", "full"] = "default"
    bridge_pooling: str = "avg"
    bridge_hidden_act: str = "gelu"
    qformer_init_from: str | None = None
    qformer_locality_bias: float | None = None
    image_token_id: int = 50277
    tie_word_embeddings: bool = True
    slice_position_embedding: bool = False
    study_depth_tokens: int = 1

    def __post_init__(self, **kwargs):
        self._check_bridge_settings()
        super().__post_init__(**kwargs)
        if self.bridge_type == "qformer" and self.qformer_config is None:
            self.qformer_config = AutoConfig.for_model("blip_2_qformer", **default_qformer_settings(self))
        if self.qformer_locality_bias is None:
            self.qformer_locality_bias = 0.0 if self.qformer_init_from else FRESH_QFORMER_LOCALITY_BIAS
        if self.qformer_config is not None:
            # the Q-Former cross-attends to vision features: its key/value width is the vision width
            self.qformer_config.encoder_hidden_size = self.vision_config.hidden_size
        self.tie_word_embeddings = getattr(self.text_config, "tie_word_embeddings", True)

    def _check_bridge_settings(self):
        """Reject settings that would otherwise fail later, deep inside a run (plain `ValueError`)."""
        if self.bridge_type not in BRIDGE_TYPES:
            raise ValueError(f"bridge_type must be one of {BRIDGE_TYPES}, got {self.bridge_type!r}")
        if self.bridge_pooling not in POOLING_TYPES:
            raise ValueError(f"bridge_pooling must be one of {POOLING_TYPES}, got {self.bridge_pooling!r}")
        if self.vision_feature_select_strategy not in FEATURE_SELECT_STRATEGIES:
            raise ValueError(
                f"vision_feature_select_strategy must be one of {FEATURE_SELECT_STRATEGIES}, "
                f"got {self.vision_feature_select_strategy!r}"
            )
        if not isinstance(self.max_visual_tokens, int) or self.max_visual_tokens < 1:
            raise ValueError(f"max_visual_tokens must be a positive integer, got {self.max_visual_tokens!r}")
        depth = self.study_depth_tokens
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1 or self.max_visual_tokens % depth:
            raise ValueError(
                f"study_depth_tokens must be a positive divisor of max_visual_tokens="
                f"{self.max_visual_tokens}, got {depth!r}"
            )
        if self.image_token_id < 0:
            raise ValueError(f"image_token_id must be >= 0, got {self.image_token_id}")


def default_qformer_settings(config) -> dict:
    """`Blip2QFormerConfig` kwargs for a Q-Former bridge whose config was not given.

    With `qformer_init_from` the BLIP-2 size (768 wide, 12 heads, 12 layers, cross-attention every
    2nd layer), so that every pretrained tensor has a home. A *fresh* Q-Former is sized from the
    tower it reads: its width, heads and MLP width (a 64-wide tiny ViT gets a 64-wide Q-Former,
    CLIP-L a 1024-wide one), `FRESH_QFORMER_LAYERS` layers and cross-attention in every layer.
    BLIP-2's 768/3072 on a 64-wide tower gave 12x the bridge's parameters, and with cross-attention
    every 2nd layer a 2-layer Q-Former looked at the image once (docs/architecture.md, "Q-Former").
    """
    if config.qformer_init_from:
        return {}
    vision = config.vision_config
    hidden = vision.hidden_size
    heads = getattr(vision, "num_attention_heads", None) or max(1, hidden // 64)
    if hidden % heads:
        heads = 1
    return {
        "hidden_size": hidden,
        "num_attention_heads": heads,
        "intermediate_size": getattr(vision, "intermediate_size", None) or 4 * hidden,
        "num_hidden_layers": FRESH_QFORMER_LAYERS,
        "cross_attention_frequency": 1,
    }


__all__ = ["MambaVLMConfig", "BRIDGE_TYPES", "default_qformer_settings"]

"""Tiny model presets for the CPU demo and the tests.

They use the same classes as real checkpoints (a ViT vision tower, `MambaForCausalLM`), only
smaller, and are saved and re-loaded through `from_pretrained` like a real model would be.
"""

from __future__ import annotations

from transformers import MambaConfig, ViTConfig

TINY_PRESETS = {
    # name: (vision kwargs, text kwargs, max_visual_tokens)
    "tiny": (
        dict(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
            image_size=64,
            patch_size=8,
        ),
        dict(hidden_size=128, num_hidden_layers=2, state_size=16, expand=2),
        16,
    ),
    "micro": (
        dict(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            image_size=32,
            patch_size=8,
        ),
        dict(hidden_size=32, num_hidden_layers=2, state_size=8, expand=2),
        4,
    ),
}


def tiny_vision_config(preset: str = "tiny") -> ViTConfig:
    return ViTConfig(**TINY_PRESETS[preset][0])


def tiny_text_config(vocab_size: int, preset: str = "tiny", pad_token_id: int = 0, family: str = "mamba"):
    """The preset's LM config: Mamba, or any family of hf_vlm.backbones at the preset's width/depth/state."""
    if family != "mamba":
        from .backbones import example_config, get_family

        text = TINY_PRESETS[preset][1]
        get_family(family)  # an unknown family: the error lists the supported ones
        return example_config(
            family,
            vocab_size=vocab_size,
            hidden_size=text["hidden_size"],
            num_layers=max(text["num_hidden_layers"], 2),
            state_size=text["state_size"],
            pad_token_id=pad_token_id,
            bos_token_id=pad_token_id,
            eos_token_id=pad_token_id,
        )
    return MambaConfig(
        vocab_size=vocab_size,
        pad_token_id=pad_token_id,
        bos_token_id=pad_token_id,
        eos_token_id=pad_token_id,
        **TINY_PRESETS[preset][1],
    )


def tiny_max_visual_tokens(preset: str = "tiny") -> int:
    return TINY_PRESETS[preset][2]

"""Loading pretrained vision towers and Mamba LLMs from local paths or hub ids.

Full CLIP/SigLIP checkpoints (e.g. `openai/clip-vit-large-patch14`) hold a text tower too:
only their vision half is loaded. The Mamba LLM can be loaded in 8-bit; the modules whose
weights Mamba reads directly in raw matmuls (`dt_proj`, `x_proj`, `out_proj`, `lm_head`) are
kept out of quantisation, because bitsandbytes 0.50 otherwise fails at the first forward
with "expected scalar type Float but found Char".
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, MambaForCausalLM

logger = logging.getLogger(__name__)

# model_type of a two-tower checkpoint -> class that loads only its vision half
_VISION_HALF = {
    "clip": "CLIPVisionModel",
    "siglip": "SiglipVisionModel",
    "siglip2": "Siglip2VisionModel",
    "blip-2": "Blip2VisionModel",
}

# weights read directly by MambaMixer (raw matmul / fused kernels): keep them in full precision
MAMBA_INT8_SKIP_MODULES = ["dt_proj", "x_proj", "out_proj", "conv1d", "lm_head"]


def load_vision_tower(name_or_path: str, dtype: torch.dtype | None = None) -> nn.Module:
    """Load only the vision half of a vision (or vision-text) checkpoint."""
    import transformers

    config = AutoConfig.from_pretrained(name_or_path)
    class_name = _VISION_HALF.get(config.model_type)
    model_cls = getattr(transformers, class_name) if class_name else AutoModel
    model = model_cls.from_pretrained(name_or_path, dtype=dtype)
    logger.info("Vision tower %s loaded from %s", type(model).__name__, name_or_path)
    return model


def int8_quantization_config(load_in_4bit: bool = False, compute_dtype: torch.dtype = torch.float32):
    """bitsandbytes config for the Mamba LLM that skips the directly-read modules."""
    from transformers import BitsAndBytesConfig

    if load_in_4bit:
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_compute_dtype=compute_dtype,
            llm_int8_skip_modules=MAMBA_INT8_SKIP_MODULES,
        )
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=MAMBA_INT8_SKIP_MODULES)


def load_language_model(
    name_or_path: str, quantization_config=None, dtype: torch.dtype | None = None
) -> MambaForCausalLM:
    """Load a `MambaForCausalLM` (optionally quantised with bitsandbytes)."""
    kwargs = {"dtype": dtype} if dtype is not None else {}
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    model = MambaForCausalLM.from_pretrained(name_or_path, **kwargs)
    logger.info(
        "Language model loaded from %s (%.1fM parameters%s)",
        name_or_path,
        sum(p.numel() for p in model.parameters()) / 1e6,
        ", quantised" if quantization_config is not None else "",
    )
    return model

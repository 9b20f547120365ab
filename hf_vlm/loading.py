"""Loading pretrained vision towers and Mamba LLMs from local paths or hub ids (checkpoints of a
trained VLM: `hf_vlm.checkpoints`).

Full CLIP/SigLIP checkpoints (e.g. `openai/clip-vit-large-patch14`) hold a text tower too:
only their vision half is loaded. The Mamba LLM can be loaded in 8-bit or 4-bit with
bitsandbytes; `MAMBA_INT8_SKIP_MODULES` names the modules that must stay in full precision
and why (each reason is reproduced in tests/test_quantization.py; see docs/quantization.md).
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from transformers import AutoConfig, AutoModel

logger = logging.getLogger(__name__)

# model_type of a two-tower checkpoint -> class that loads only its vision half
_VISION_HALF = {
    "clip": "CLIPVisionModel",
    "siglip": "SiglipVisionModel",
    "siglip2": "Siglip2VisionModel",
    "blip-2": "Blip2VisionModel",
}

# Modules of `MambaForCausalLM` kept in full precision under bitsandbytes (8-bit and 4-bit).
# The smallest list that is correct on every path transformers' MambaMixer can take:
#   dt_proj   `MambaMixer.forward` computes `self.dt_proj.weight @ time_step`, a raw matmul, on
#             every path (CPU, GPU, generation): an int8 weight fails at the first forward with
#             "expected scalar type Float but found Char".
#   x_proj,   passed as raw `.weight` tensors to the fused `mamba_inner_fn` (the mamba-ssm CUDA
#   out_proj  training path: `model.train()`, no cache). Quantised, the kernel would receive int8
#             data. On the pure-PyTorch path they are called as modules and would work, but a
#             checkpoint must train wherever it is loaded.
#   lm_head   tied to the input embeddings. An explicit skip list *replaces* transformers' default
#             one (which keeps the output head), so without this entry bitsandbytes quantises the
#             shared tensor and the forward fails ("'Parameter' object has no attribute 'CB'").
# Not listed: `conv1d` (bitsandbytes only replaces `nn.Linear`; naming it changes nothing) and
# `in_proj` (always called as a module). `in_proj` is the largest matrix (4*d^2 of ~6.2*d^2 mixer
# weights per layer), so 8-bit still shrinks mamba-2.8b from ~5.5 GB (bf16) to ~3.9 GB.
MAMBA_INT8_SKIP_MODULES = ["dt_proj", "x_proj", "out_proj", "lm_head"]


def load_vision_tower(name_or_path: str, dtype: torch.dtype | None = None) -> nn.Module:
    """Load only the vision half of a vision (or vision-text) checkpoint."""
    import transformers

    config = AutoConfig.from_pretrained(name_or_path)
    class_name = _VISION_HALF.get(config.model_type)
    model_cls = getattr(transformers, class_name) if class_name else AutoModel
    model = model_cls.from_pretrained(name_or_path, dtype=dtype)
    logger.info("Vision tower %s loaded from %s", type(model).__name__, name_or_path)
    return model


def bnb_quantization_config(load_in_4bit: bool = False, compute_dtype: torch.dtype = torch.float32):
    """bitsandbytes config for the Mamba LLM that skips the directly-read modules.

    8-bit: LLM.int8 (vector-wise int8 with fp16 outlier columns). 4-bit: NF4, computing in
    `compute_dtype` (use `torch.bfloat16` on a GPU that supports it).
    """
    from transformers import BitsAndBytesConfig

    if load_in_4bit:
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=compute_dtype,
            llm_int8_skip_modules=list(MAMBA_INT8_SKIP_MODULES),
        )
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=list(MAMBA_INT8_SKIP_MODULES))


def disable_cpu_4bit_packing(model: nn.Module) -> int:
    """Keep bitsandbytes' 4-bit layers on the path that has a backward, on CPU.

    bitsandbytes 0.50 repacks a `Linear4bit` weight for its AVX512-BF16 CPU kernel the first
    time the layer runs in eval mode without grad, permanently. That kernel (`gemv_4bit`) has
    no autograd formula, so every later *training* step backpropagates a wrong gradient
    through the layer, silently (measured: cosine -0.09 against the fp32 bridge gradient
    after one evaluation pass). It also needs out_features % 32 == 0 and in_features >= 64.
    Turning it off costs CPU inference speed only. Returns the number of layers changed.
    """
    changed = 0
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            changed += 1
    return changed


def load_language_model(name_or_path: str, quantization_config=None, dtype: torch.dtype | None = None) -> nn.Module:
    """The LLM of any supported state-space family (`hf_vlm.backbones`: Mamba, Mamba-2, the hybrids),
    optionally quantised with bitsandbytes (see `bnb_quantization_config`).

    A quantised LLM is meant to stay frozen: its int8/4-bit weights cannot be trained, while
    the gradient still flows *through* it into the bridge (tested). The family's skip list is
    checked against the config's (a warning names what is missing).
    """
    from .backbones import load_language_model as load_family_model

    return load_family_model(name_or_path, quantization=quantization_config, dtype=dtype)

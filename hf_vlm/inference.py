"""Inference, in one place: load a checkpoint with the settings it was trained with, generate reports.

`load_for_inference` is shared by `hf-vlm generate` and `serve`; `generate_batch` (one
batch) and `generate_reports` (batching loop) are the one generation entry point of the package. Why a settings check: a checkpoint whose
bridge was trained to emit 96 visual tokens, or whose LLM was trained in 8-bit, gives
quietly worse reports when run otherwise. So inference reads those settings from the
checkpoint by default, and a flag that contradicts them is an error naming both values
instead of a silent difference.

Two generation facts handled here:
- beam search works with Mamba's recurrent cache (transformers reorders it with
  `reorder_cache`), but `generate` expands `pixel_values` image by image, which pairs the
  wrong images with the beams when a study has several images; the model's
  `_expand_inputs_for_generation` repeats the images study by study instead.
- an 8-bit checkpoint records its bitsandbytes config in `text_config`, and transformers
  applies that skip list to the *whole* model, quantising the vision tower and the bridge
  too (their fp32 weights then fail with "'Parameter' object has no attribute 'CB'"). The
  loader re-states the config with both kept in full precision.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

logger = logging.getLogger(__name__)

FULL_PRECISION_MODULES = ["vision_tower", "bridge"]


class SettingsMismatchError(ValueError):
    """An inference setting contradicts what the checkpoint was trained with."""


class NonFiniteWeightsError(ValueError):
    """The checkpoint holds NaN/Inf weights: every report would be empty or garbage."""


def check_finite_weights(model, checkpoint: str) -> None:
    """Refuse a model with NaN/Inf in any floating-point parameter (names the first few)."""
    bad = [name for name, p in model.named_parameters() if p.is_floating_point() and not bool(torch.isfinite(p).all())]
    if bad:
        shown = ", ".join(bad[:5]) + (f" (+{len(bad) - 5} more)" if len(bad) > 5 else "")
        raise NonFiniteWeightsError(
            f"{checkpoint} has NaN/Inf weights in {len(bad)} tensor(s): {shown}. It was saved after training "
            "diverged; use the last good checkpoint of that run (hf-vlm train prints it) instead."
        )


def _uses_8bit(config) -> bool:
    for holder in (config, getattr(config, "text_config", None)):
        qc = getattr(holder, "quantization_config", None) if holder is not None else None
        if qc is not None:
            qc = qc if isinstance(qc, dict) else qc.to_dict()
            if qc.get("load_in_8bit") or qc.get("_load_in_8bit"):
                return True
    return False


def read_training_settings(checkpoint: str, config=None, processor=None) -> dict[str, Any]:
    """Settings recorded in a checkpoint that inference must reproduce.

    `max_visual_tokens` comes from config.json and must agree with processor_config.json;
    `llm_8bit` is true when the LLM's config carries a bitsandbytes 8-bit config, or when the
    trainer recorded an 8-bit LLM in hf_vlm_checkpoint.json (its export de-quantises the weights).
    """
    from .checkpoints import read_checkpoint_info
    from .configuration_mamba_vlm import MambaVLMConfig
    from .processing_mamba_vlm import MambaVLMProcessor

    config = config if config is not None else MambaVLMConfig.from_pretrained(checkpoint)
    processor = processor if processor is not None else MambaVLMProcessor.from_pretrained(checkpoint)
    if processor.max_visual_tokens != config.max_visual_tokens:
        raise SettingsMismatchError(
            f"{checkpoint} is inconsistent: config.json has max_visual_tokens={config.max_visual_tokens} but "
            f"processor_config.json has {processor.max_visual_tokens}; save model and processor from the same run"
        )
    trained_8bit = read_checkpoint_info(checkpoint).get("trained_llm_quantization") == "8bit"
    return {"max_visual_tokens": int(config.max_visual_tokens), "llm_8bit": _uses_8bit(config) or trained_8bit}


def check_settings(trained: dict[str, Any], requested: dict[str, Any], checkpoint: str = "the checkpoint") -> dict:
    """Merge requested settings (None = use the checkpoint's) and fail on any contradiction."""
    problems = []
    for name, value in requested.items():
        if value is None or name not in trained:
            continue
        if value != trained[name]:
            problems.append(f"--{name} {value} differs from the training setting of {checkpoint}: {name}={trained[name]}")
    if problems:
        raise SettingsMismatchError(
            "; ".join(problems) + ". A model must run with the settings it was trained with "
            "(omit the flag to use the checkpoint's value)."
        )
    return dict(trained)


def pick_device(device: str = "auto") -> torch.device:
    """`auto`: CUDA when available, else Apple MPS, else CPU."""
    if device != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto`: bf16 on a bf16-capable GPU, fp32 otherwise (Mamba is fragile in fp16)."""
    if dtype != "auto":
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def load_for_inference(
    checkpoint: str,
    *,
    max_visual_tokens: int | None = None,
    llm_8bit: bool | None = None,
    device: str = "auto",
    dtype: str = "auto",
):
    """Return `(model, processor, settings)` for a saved model + processor directory."""
    from transformers import BitsAndBytesConfig

    from .configuration_mamba_vlm import MambaVLMConfig
    from .loading import MAMBA_INT8_SKIP_MODULES
    from .modeling_mamba_vlm import MambaVLMForConditionalGeneration
    from .processing_mamba_vlm import MambaVLMProcessor

    config = MambaVLMConfig.from_pretrained(checkpoint)
    processor = MambaVLMProcessor.from_pretrained(checkpoint)
    trained = read_training_settings(checkpoint, config, processor)
    settings = check_settings(trained, {"max_visual_tokens": max_visual_tokens, "llm_8bit": llm_8bit}, checkpoint)
    target = pick_device(device)
    kwargs: dict[str, Any] = {"config": config}
    if settings["llm_8bit"]:
        quant = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=MAMBA_INT8_SKIP_MODULES + FULL_PRECISION_MODULES)
        config.quantization_config = None
        config.text_config.quantization_config = quant.to_dict()
        kwargs["device_map"] = {"": target.index if target.type == "cuda" and target.index is not None else str(target)}
    else:
        kwargs["dtype"] = pick_dtype(dtype, target)
    model = MambaVLMForConditionalGeneration.from_pretrained(checkpoint, **kwargs)
    check_finite_weights(model, checkpoint)
    if not settings["llm_8bit"]:
        model.to(target)
    model.eval()
    logger.info("Loaded %s on %s (max_visual_tokens=%d, llm_8bit=%s)", checkpoint, target,
                settings["max_visual_tokens"], settings["llm_8bit"])
    return model, processor, settings


def build_generate_kwargs(
    *,
    max_new_tokens: int | None = None,
    do_sample: bool = False,
    temperature: float | None = None,
    top_p: float | None = None,
    num_beams: int | None = None,
    repetition_penalty: float | None = None,
    no_repeat_ngram_size: int | None = None,
) -> dict[str, Any]:
    """Keyword arguments for `model.generate`, leaving unset values to the generation config."""
    if not do_sample and (temperature is not None or top_p is not None):
        raise ValueError("--temperature / --top_p only apply with --do_sample")
    kwargs: dict[str, Any] = {"do_sample": do_sample}
    for name, value in (("max_new_tokens", max_new_tokens), ("temperature", temperature), ("top_p", top_p),
                        ("num_beams", num_beams), ("repetition_penalty", repetition_penalty),
                        ("no_repeat_ngram_size", no_repeat_ngram_size)):
        if value is not None:
            kwargs[name] = value
    return kwargs


@torch.no_grad()
def generate_batch(model, processor, images: Sequence[Sequence], prompts: Sequence[str | None],
                   streamer=None, **generate_kwargs) -> list[str]:
    """One report per study (`images[i]` = the images of study i), greedy by default.

    Left padding comes from the processor, so batched greedy output equals one-by-one output.
    """
    generate_kwargs.setdefault("max_new_tokens", 256)
    generate_kwargs.setdefault("pad_token_id", processor.tokenizer.pad_token_id)
    generate_kwargs.setdefault("eos_token_id", processor.tokenizer.eos_token_id)
    generate_kwargs.setdefault("use_cache", True)
    if processor.image_token_id < model.config.text_config.vocab_size:
        # a sampled <image> id would be fed back without pixel values and abort the whole batch
        generate_kwargs.setdefault("suppress_tokens", [processor.image_token_id])
    expand = max(int(generate_kwargs.get("num_beams") or 1), int(generate_kwargs.get("num_return_sequences") or 1))
    inputs = processor(images=[list(group) for group in images], text=list(prompts))
    inputs = inputs.to(model.device)  # the model casts pixels to the tower dtype
    try:
        output = model.generate(**inputs, streamer=streamer, **generate_kwargs)
    except ValueError as exc:
        if "beam search" in str(exc) and "cache" in str(exc):
            raise ValueError(
                f"num_beams={expand} is not possible here: this transformers version cannot reorder the Mamba "
                "recurrent cache during beam search. Use --num_beams 1 (greedy or sampling) or upgrade transformers."
            ) from exc
        raise
    reports = processor.batch_decode(output[:, inputs["input_ids"].shape[1]:])
    return [r.strip() for r in reports]


@torch.no_grad()
def generate_reports(model, processor, images: Sequence[Sequence], prompts: Sequence[str | None] | None = None,
                     batch_size: int = 8, progress: bool = False, **generate_kwargs) -> list[str]:
    """One report per entry of `images` (the images of one study each), in batches of `batch_size`.

    The demo, the report-eval callback and `hf-vlm eval` use this; `hf-vlm generate` calls
    `generate_batch` itself to write each batch as it is produced.
    """
    from tqdm.auto import tqdm

    prompts = list(prompts) if prompts is not None else [None] * len(images)
    was_training = model.training
    model.eval()
    reports: list[str] = []
    try:
        for start in tqdm(range(0, len(images), batch_size), desc="generate", disable=not progress):
            stop = start + batch_size
            reports.extend(generate_batch(model, processor, images[start:stop], prompts[start:stop], **generate_kwargs))
    finally:
        model.train(was_training)
    return reports


__all__ = [
    "NonFiniteWeightsError", "SettingsMismatchError", "build_generate_kwargs", "check_finite_weights",
    "check_settings", "generate_batch", "generate_reports",
    "load_for_inference",
    "pick_device", "pick_dtype", "read_training_settings",
]

"""Inference, in one place: load a checkpoint with the settings it was trained with, generate reports.

`load_for_inference` is shared by `hf-vlm generate` and `serve`; `generate_batch` (one
batch) and `generate_reports` (batching loop) are the one generation entry point of the package.
Why a settings check: a checkpoint whose
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
- the final checkpoint of `hf-vlm train` with `llm_8bit` / `llm_4bit` is *de-quantised* on export
  (`checkpoints.export_plain_model`, the fact recorded as `trained_llm_quantization`): its weights
  are plain fp32. A bitsandbytes config in the model config makes transformers treat the weights
  as already quantised (`pre_quantized`): it swaps in `Linear8bitLt` layers and loads the fp32
  tensors into them unconverted, and the first forward fails with the same "no attribute 'CB'".
  Such a checkpoint is loaded in full precision and its LLM is then quantised from those weights
  (`checkpoints.quantize_language_model`, as training did). Weights that really are stored
  quantised (int8 + `SCB`, NF4 + `absmax`) keep the pre-quantised path.
- a checkpoint trained with a quantised LLM may be run in full precision (`--no-llm_8bit`, e.g. on a
  bigger GPU): allowed with a logged note (`settings["notes"]`), since the fp32 weights are the
  de-quantised training weights; the reverse (quantising a full-precision model) stays an error.
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


QUANTIZATION_SETTINGS = {"llm_8bit": "8bit", "llm_4bit": "4bit"}  # inference flag -> recorded kind


def stored_quantization(config) -> str | None:
    """ "8bit" / "4bit" when the model config carries a bitsandbytes config (weights saved quantised), else None."""
    for holder in (config, getattr(config, "text_config", None)):
        qc = getattr(holder, "quantization_config", None) if holder is not None else None
        if qc is not None:
            qc = qc if isinstance(qc, dict) else qc.to_dict()
            if qc.get("load_in_8bit") or qc.get("_load_in_8bit"):
                return "8bit"
            if qc.get("load_in_4bit") or qc.get("_load_in_4bit"):
                return "4bit"
    return None


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
    kind = stored_quantization(config) or read_checkpoint_info(checkpoint).get("trained_llm_quantization")
    return {
        "max_visual_tokens": int(config.max_visual_tokens),
        **{name: kind == value for name, value in QUANTIZATION_SETTINGS.items()},
    }


def check_settings(trained: dict[str, Any], requested: dict[str, Any], checkpoint: str = "the checkpoint") -> dict:
    """Merge requested settings (None = use the checkpoint's) and fail on any contradiction.

    One contradiction is allowed: running a checkpoint trained with a quantised LLM in full precision
    (`--no-llm_8bit`); the returned settings then carry a `notes` list saying so.
    """
    problems, notes, merged = [], [], dict(trained)
    for name, value in requested.items():
        if value is None or name not in trained or value == trained[name]:
            continue
        if name in QUANTIZATION_SETTINGS and value is False and trained[name]:
            merged[name] = False
            label = QUANTIZATION_SETTINGS[name].replace("bit", "-bit")
            notes.append(
                f"{checkpoint} was trained with an {label} LLM ({name}=True); running it in full precision "
                f"as asked (--no-{name}): reports may differ slightly from the {label} model's"
            )
            continue
        problems.append(f"--{name} {value} differs from the training setting of {checkpoint}: {name}={trained[name]}")
    if problems:
        raise SettingsMismatchError(
            "; ".join(problems) + ". A model must run with the settings it was trained with "
            "(omit the flag to use the checkpoint's value)."
        )
    merged["notes"] = notes
    return merged


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


def _quantization_config(kind: str, config):
    """The LLM family's bitsandbytes config for `kind` ("8bit"/"4bit"), tower and bridge kept in full precision."""
    from .backbones import get_family

    bits = {"8bit": 8, "4bit": 4}[kind]
    quant = get_family(config.text_config).quantization_config(bits, torch.float32)
    quant.llm_int8_skip_modules = list(dict.fromkeys([*(quant.llm_int8_skip_modules or []), *FULL_PRECISION_MODULES]))
    return quant


def _device_map(target: torch.device) -> dict:
    return {"": target.index if target.type == "cuda" and target.index is not None else str(target)}


def load_for_inference(
    checkpoint: str,
    *,
    max_visual_tokens: int | None = None,
    llm_8bit: bool | None = None,
    llm_4bit: bool | None = None,
    device: str = "auto",
    dtype: str = "auto",
):
    """Return `(model, processor, settings)` for a saved model + processor directory.

    `settings` holds the training settings used (`max_visual_tokens`, `llm_8bit`, `llm_4bit`) and
    `notes`: what differs from training on request (a quantised-trained LLM run in full precision).
    """
    from .checkpoints import export_plain_model, quantize_language_model
    from .configuration_mamba_vlm import MambaVLMConfig
    from .loading import disable_cpu_4bit_packing
    from .modeling_mamba_vlm import MambaVLMForConditionalGeneration
    from .processing_mamba_vlm import MambaVLMProcessor

    config = MambaVLMConfig.from_pretrained(checkpoint)
    processor = MambaVLMProcessor.from_pretrained(checkpoint)
    trained = read_training_settings(checkpoint, config, processor)
    settings = check_settings(
        trained, {"max_visual_tokens": max_visual_tokens, "llm_8bit": llm_8bit, "llm_4bit": llm_4bit}, checkpoint
    )
    for note in settings["notes"]:
        logger.warning("%s", note)
    target = pick_device(device)
    kind = next((value for name, value in QUANTIZATION_SETTINGS.items() if settings[name]), None)
    stored = stored_quantization(config)  # weights saved quantised (training form), not de-quantised
    kwargs: dict[str, Any] = {"config": config}
    if stored:
        # re-state the config so that the tower and the bridge stay in full precision
        config.quantization_config = None
        config.text_config.quantization_config = _quantization_config(stored, config).to_dict()
        kwargs["device_map"] = _device_map(target)
    elif kind:
        kwargs["dtype"] = torch.float32  # quantised from these weights below; the rest stays fp32
    else:
        kwargs["dtype"] = pick_dtype(dtype, target)
    model = MambaVLMForConditionalGeneration.from_pretrained(checkpoint, **kwargs)
    check_finite_weights(model, checkpoint)
    if stored and not kind:
        export_plain_model(model)  # int8 / NF4 weights -> fp32 nn.Linear (asked for full precision)
        for attr in ("is_quantized", "is_loaded_in_8bit", "is_loaded_in_4bit"):  # the VLM-level flags too
            if hasattr(model, attr):
                setattr(model, attr, False)
        model.hf_quantizer = model.quantization_method = None
        model.config.quantization_config = None
        model.to(pick_dtype(dtype, target))
    elif kind and not stored:
        quantize_language_model(model, _quantization_config(kind, config), device_map=_device_map(target))
    if kind:
        disable_cpu_4bit_packing(model.language_model)  # bitsandbytes' CPU repack needs out_features % 32 == 0
    if not (stored and kind):
        model.to(target)  # a pre-quantised load is placed by its device_map (transformers refuses .to)
    model.eval()
    logger.info(
        "Loaded %s on %s (max_visual_tokens=%d, llm_8bit=%s, llm_4bit=%s)",
        checkpoint,
        target,
        settings["max_visual_tokens"],
        settings["llm_8bit"],
        settings["llm_4bit"],
    )
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
    for name, value in (
        ("max_new_tokens", max_new_tokens),
        ("temperature", temperature),
        ("top_p", top_p),
        ("num_beams", num_beams),
        ("repetition_penalty", repetition_penalty),
        ("no_repeat_ngram_size", no_repeat_ngram_size),
    ):
        if value is not None:
            kwargs[name] = value
    return kwargs


@torch.no_grad()
def generate_batch(
    model, processor, images: Sequence[Sequence], prompts: Sequence[str | None], streamer=None, **generate_kwargs
) -> list[str]:
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
    reports = processor.batch_decode(output[:, inputs["input_ids"].shape[1] :])
    return [r.strip() for r in reports]


@torch.no_grad()
def generate_reports(
    model,
    processor,
    images: Sequence[Sequence],
    prompts: Sequence[str | None] | None = None,
    batch_size: int = 8,
    progress: bool = False,
    **generate_kwargs,
) -> list[str]:
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
    "NonFiniteWeightsError",
    "SettingsMismatchError",
    "build_generate_kwargs",
    "check_finite_weights",
    "check_settings",
    "generate_batch",
    "generate_reports",
    "load_for_inference",
    "pick_device",
    "pick_dtype",
    "read_training_settings",
    "stored_quantization",
]

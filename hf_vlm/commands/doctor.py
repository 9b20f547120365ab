"""`hf-vlm doctor [RECIPE.yaml]`: what this machine can do, and whether a recipe fits in it.

The seeds' users lost days to a CPU-only torch on an RTX 5090, to a mamba-ssm build that
silently was not used, and to OOM at batch 8. This prints, without training anything:
torch / CUDA / bf16 support, the Mamba scan backend (mamba-ssm kernels or the fallback),
bitsandbytes and whether an 8-bit Mamba really runs forward + backward here, the accelerate
default config, and, for a recipe, a memory estimate (formula in `MEMORY_FORMULA`).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import math
import os
import platform
import sys

logger = logging.getLogger("hf_vlm.doctor")

MEMORY_FORMULA = """\
memory ~= weights + gradients + optimizer + activations + logits   (per process)
  weights      = frozen params x bytes(dtype as loaded: fp32 = 4; LLM Linear layers quantised by
                 llm_8bit = 1, llm_4bit = 0.5) + trainable params x 4 (fp32 master weights)
  gradients    = trainable params x 4
  optimizer    = trainable params x 8 (AdamW: two fp32 moments; *_8bit optimizers: 2)
  activations  = layers x B x L x (3 d + c E + dt_rank + 2 N) x a          (a = 2 with bf16, else 4;
                 c = 5 with mamba-ssm kernels, 9 on the PyTorch path)   + scan state per layer:
                 reference loop 4 x B x E x L x N x 4, hf_vlm chunked ceil(L/64) x B x E x N x 4, mamba-ssm 0.
                 With activation checkpointing: layers x B x L x d x a + one layer as above.
  logits       = 2 x B x L x vocab x 4   (fp32 logits and their gradient)
  vision       = the tower's output for B x S images of P patches: B x S x P x Dv x a, read from the
                 vision feature cache when it is on (frozen tower); without the cache a frozen tower adds
                 one layer at a time, B x S x P x (4 Dv + Dff + heads x P) x a (no graph is kept), and a
                 trained tower keeps that for each of its layers
  bridge       = B x T x (Dv + 2 d) x a, plus for the Q-Former 2 x B x S x P x Dv x a (keys, values)
  B = per_device_train_batch_size, L = max_length (visual + text tokens), d = hidden size,
  E = d_inner = expand x d, N = state size; S = slices per study (studies: study_num_slices with
  uniform sampling; all / stride assume a lung extent of ~250 slices) or images per row (2-D:
  max_slices), P = patches per slice (+ CLS), Dv / Dff = the tower's width / MLP width,
  T = max_visual_tokens per study or image (the LM sequence does not grow with S).
  Add ~0.5-1 GB for the CUDA context and allocator slack."""

# Offline fallbacks for the hub ids the recipes name (so the estimate needs no download).
KNOWN_TEXT = {
    "state-spaces/mamba-2.8b-hf": dict(hidden_size=2560, num_hidden_layers=64),
    "state-spaces/mamba-1.4b-hf": dict(hidden_size=2048, num_hidden_layers=48),
    "state-spaces/mamba-790m-hf": dict(hidden_size=1536, num_hidden_layers=48),
    "state-spaces/mamba-370m-hf": dict(hidden_size=1024, num_hidden_layers=48),
    "state-spaces/mamba-130m-hf": dict(hidden_size=768, num_hidden_layers=24),
}
KNOWN_VISION = {
    "openai/clip-vit-large-patch14": dict(
        hidden_size=1024,
        num_hidden_layers=24,
        num_attention_heads=16,
        intermediate_size=4096,
        image_size=224,
        patch_size=14,
    ),
    "openai/clip-vit-large-patch14-336": dict(
        hidden_size=1024,
        num_hidden_layers=24,
        num_attention_heads=16,
        intermediate_size=4096,
        image_size=336,
        patch_size=14,
    ),
    "openai/clip-vit-base-patch16": dict(
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=3072,
        image_size=224,
        patch_size=16,
    ),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", nargs="?", help="optional recipe YAML (or name) to estimate memory for")
    parser.add_argument("overrides", nargs=argparse.REMAINDER, help="--key value overrides, as for `hf-vlm train`")


# --- environment --------------------------------------------------------------------------------
def _version(module: str) -> str | None:
    try:
        return getattr(importlib.import_module(module), "__version__", "installed")
    except Exception:  # noqa: BLE001 - a broken extension build counts as "not usable"
        return None


def check_int8(device: str) -> str:
    """Load a tiny Mamba in 8-bit (the real loading path) and run forward + backward-to-inputs."""
    import tempfile

    import torch
    from transformers import MambaConfig, MambaForCausalLM

    from ..loading import bnb_quantization_config

    with tempfile.TemporaryDirectory() as tmp:
        MambaForCausalLM(MambaConfig(vocab_size=64, hidden_size=64, num_hidden_layers=1, state_size=4)).save_pretrained(
            tmp
        )
        model = MambaForCausalLM.from_pretrained(tmp, quantization_config=bnb_quantization_config(), device_map=device)
    int8 = any(p.dtype == torch.int8 for p in model.parameters())
    embeds = model.get_input_embeddings()(torch.tensor([[1, 2, 3]], device=device)).detach().requires_grad_(True)
    model(inputs_embeds=embeds, labels=torch.tensor([[1, 2, 3]], device=device)).loss.backward()
    if not int8:
        return "runs, but no weight was quantised (8-bit saves nothing here)"
    return "works (forward + backward through the frozen 8-bit LLM)"


def environment_rows(test_int8: bool = True) -> list[tuple[str, str]]:
    import torch

    from ..ops import mamba_kernels_available, scan_ladder_report

    rows = [
        ("python", f"{sys.version.split()[0]} on {platform.system()} {platform.machine()}"),
        ("torch", f"{torch.__version__} (CUDA build {torch.version.cuda or 'none: CPU-only wheel'})"),
    ]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            rows.append((f"cuda:{i}", f"{p.name}, {p.total_memory / 2**30:.1f} GB, compute {p.major}.{p.minor}"))
        rows.append(
            (
                "bf16",
                "supported: use bf16 (never fp16 with Mamba)"
                if torch.cuda.is_bf16_supported()
                else "NOT supported on this GPU: train in fp32",
            )
        )
    else:
        rows.append(
            (
                "cuda",
                "not available: training runs on the CPU (a CPU-only torch on a GPU machine? "
                "reinstall torch from the CUDA index)",
            )
        )
        rows.append(("bf16", "CPU: fp32 training (bf16 autocast on CPU is slow and not used)"))
    kernels = mamba_kernels_available()
    rows.append(
        (
            "mamba-ssm",
            f"mamba_ssm {_version('mamba_ssm') or 'not installed'}, causal_conv1d "
            f"{_version('causal_conv1d') or 'not installed'}: kernels "
            f"{'ACTIVE' if kernels else 'not active'}",
        )
    )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ladder = scan_ladder_report(device)
    used = next(rung for rung, status in ladder if status == "used")
    rows.append(
        (
            "scan backend",
            f"{used}: what the Mamba layers of hf_vlm models run on {device} "
            f"(HF_VLM_SCAN_BACKEND forces a rung, HF_VLM_FAST_SCAN=0 turns routing off)",
        )
    )
    rows += [(f"  {rung}", status) for rung, status in ladder if status != "used"]
    bnb = _version("bitsandbytes")
    status = "not installed: llm_8bit unavailable"
    if bnb and test_int8:
        device = "cuda:0" if torch.cuda.is_available() else "cpu"
        try:
            status = f"8-bit on {device}: {check_int8(device)}"
        except Exception as error:  # noqa: BLE001 - the failure is the finding
            status = f"8-bit on {device} FAILS: {type(error).__name__}: {str(error)[:160]}"
    rows.append(("bitsandbytes", f"{bnb or '-'}; {status}" if bnb else status))
    for name in ("transformers", "accelerate", "peft", "datasets"):
        rows.append((name, _version(name) or "not installed"))
    rows.append(("accelerate config", _accelerate_config()))
    return rows


def _accelerate_config() -> str:
    try:
        from accelerate.commands.config import default_config_file
        from accelerate.commands.config.config_args import load_config_from_file
    except ImportError:
        return "accelerate not importable"
    if not os.path.isfile(default_config_file):
        return (
            f"no default ({default_config_file}); pass --config_file accelerate_configs/<name>.yaml "
            "to accelerate launch"
        )
    config = load_config_from_file(default_config_file)
    return (
        f"{default_config_file}: {config.distributed_type}, {config.num_processes} process(es), "
        f"mixed_precision={config.mixed_precision}"
    )


# --- memory estimate ----------------------------------------------------------------------------
def _load_config(name: str, known: dict, kind: str):
    from transformers import AutoConfig, CLIPVisionConfig, MambaConfig

    try:
        config = AutoConfig.from_pretrained(name, local_files_only=True)
        if kind == "vision" and getattr(config, "vision_config", None) is not None:
            return config.vision_config  # a two-tower CLIP/SigLIP checkpoint: only its vision half is used
        return config
    except Exception:  # noqa: BLE001 - not cached: fall back to the table
        if name in known:
            return (CLIPVisionConfig if kind == "vision" else MambaConfig)(**known[name])
        raise ValueError(f"Cannot read the {kind} config of {name!r} offline; pass a local path") from None


def resolve_configs(model_args, vocab_size: int | None = None):
    """(vision config, text config) for a recipe, without loading any weights."""
    from ..configuration_mamba_vlm import MambaVLMConfig
    from ..presets import tiny_text_config, tiny_vision_config

    if model_args.init_from and os.path.isfile(os.path.join(model_args.init_from, "config.json")):
        config = MambaVLMConfig.from_pretrained(model_args.init_from)
        return config.vision_config, config.text_config
    if model_args.vision_model_name_or_path and model_args.language_model_name_or_path:
        return (
            _load_config(model_args.vision_model_name_or_path, KNOWN_VISION, "vision"),
            _load_config(model_args.language_model_name_or_path, KNOWN_TEXT, "text"),
        )
    if model_args.tiny_preset:
        return tiny_vision_config(model_args.tiny_preset), tiny_text_config(
            vocab_size or 600, model_args.tiny_preset, family=model_args.tiny_lm_family
        )
    raise ValueError("The recipe names no model (init_from, components or tiny_preset)")


def _quantized_names(language_model, skip) -> set[str]:
    from torch import nn

    return {
        f"language_model.{name}.weight"
        for name, module in language_model.named_modules()
        if isinstance(module, nn.Linear) and not any(s in name.split(".") for s in skip)
    }


def _lora_params(language_model, args) -> int:
    from torch import nn

    total = 0
    for name, module in language_model.named_modules():
        if name.split(".")[-1] not in args.lora_target_modules:
            continue
        if isinstance(module, nn.Linear):
            total += args.lora_r * (module.in_features + module.out_features)
        elif isinstance(module, nn.Embedding):
            total += args.lora_r * (module.num_embeddings + module.embedding_dim)
    return total


TYPICAL_LUNG_SLICES = 250  # lung extent of a chest CT at ~1.25 mm; for 'all' / 'stride' (the count depends on the data)


def slices_per_row(data_args) -> tuple[int, str]:
    """S, the images one row sends through the tower, and how it was found (for the printout)."""
    if not data_args.studies:
        return data_args.max_slices, "2-D images per row (max_slices)"
    settings = data_args.study_preprocessing()
    if settings.slice_sampling == "uniform":
        return settings.num_slices, f"uniform over the {settings.extent} extent"
    if settings.slice_sampling == "mip":
        return settings.num_slices, f"slab MIPs of the {settings.extent} extent"
    if settings.slice_sampling == "middle":
        return 1, "the middle slice"
    stride = settings.slice_stride if settings.slice_sampling == "stride" else 1
    return math.ceil(TYPICAL_LUNG_SLICES / stride), f"{settings.slice_sampling}: ~{TYPICAL_LUNG_SLICES} slices assumed"


def estimate_memory(model_args, data_args, training_args, scan_backend: str | None = None) -> dict:
    """Bytes per term of `MEMORY_FORMULA` (plus parameter counts) for one training process."""
    import torch

    from ..backbones import SCAN_MAMBA1, get_family
    from ..configuration_mamba_vlm import MambaVLMConfig
    from ..modeling_mamba_vlm import MambaVLMForConditionalGeneration
    from ..ops import mamba_kernels_available
    from ..training.freeze import intended_trainable

    vision, text = resolve_configs(model_args)
    config = MambaVLMConfig(
        vision_config=vision,
        text_config=text,
        bridge_type=model_args.bridge_type,
        max_visual_tokens=model_args.max_visual_tokens,
        vision_feature_layer=model_args.vision_feature_layer,
    )
    with torch.device("meta"):  # shapes only: a 2.8B model costs no memory here
        model = MambaVLMForConditionalGeneration(config)
    family = get_family(text)  # sizes and skip list per LM family (hf_vlm.backbones)
    dims = family.dims(text)
    layers = dims.layers
    quant_bytes = 1.0 if model_args.llm_8bit else 0.5 if model_args.llm_4bit else 4.0
    quantized = _quantized_names(model.language_model, family.int8_skip_modules) if quant_bytes < 4 else set()
    trainable = frozen = 0
    frozen_bytes = 0.0
    for name, param in model.named_parameters():
        if intended_trainable(name, training_args, layers) and name not in quantized:
            trainable += param.numel()
        else:
            frozen += param.numel()
            frozen_bytes += param.numel() * (quant_bytes if name in quantized else 4.0)
    lora = _lora_params(model.language_model, training_args) if training_args.use_lora else 0
    trainable += lora
    optim_bytes = 2 if "8bit" in str(training_args.optim) else 8
    B = training_args.per_device_train_batch_size
    L = data_args.max_length or model_args.max_visual_tokens * data_args.max_slices + 512
    d, E, N = dims.hidden, dims.inner, dims.state
    a = 2 if training_args.bf16 else 4
    if family.scan == SCAN_MAMBA1:
        backend = scan_backend or ("mamba_ssm" if mamba_kernels_available() else "hf_vlm_chunked")
        scan = {
            "transformers_reference": 4 * B * E * L * N * 4,
            "hf_vlm_chunked": math.ceil(L / 64) * B * E * N * 4,
            "mamba_ssm": 0,
        }[backend]
    else:  # Mamba-2 SSD: transformers' chunked path keeps per-chunk states (benchmarks/bench_families.py)
        backend = scan_backend or ("mamba_ssm" if mamba_kernels_available() else "transformers_ssd")
        scan = 0 if backend == "mamba_ssm" else math.ceil(L / (dims.chunk or 256)) * B * E * N * 4
    c = 5 if backend == "mamba_ssm" else 9
    per_layer = B * L * (3 * d + c * E + (dims.dt_rank or dims.heads or 0) + 2 * N) * a
    per_layer += B * L * (4 * d + 2 * (dims.mlp or 0)) * a * dims.attention_layers / max(layers, 1)  # attention + MLP
    if training_args.activation_checkpointing:
        activations = layers * B * L * d * a + per_layer + scan
    else:
        activations = layers * (per_layer + scan)
    S, slices_how = slices_per_row(data_args)
    P = (vision.image_size // vision.patch_size) ** 2 + 1
    Dv, T = vision.hidden_size, model_args.max_visual_tokens
    cached = bool(data_args.vision_feature_cache) and not training_args.unfreeze_vision_tower
    features = B * S * P * Dv * a
    tower_layer = B * S * P * (4 * Dv + vision.intermediate_size + vision.num_attention_heads * P) * a
    if cached:
        tower, vision_vs = features, "cached features"
    elif training_args.unfreeze_vision_tower:
        tower, vision_vs = features + vision.num_hidden_layers * tower_layer, "trained tower"
    else:
        tower, vision_vs = features + tower_layer, "frozen tower, no cache"
    bridge = B * T * (Dv + 2 * d) * a + (2 * features if model_args.bridge_type == "qformer" else 0)
    terms = {
        "weights": frozen_bytes + trainable * 4.0,
        "gradients": trainable * 4.0,
        "optimizer": trainable * float(optim_bytes),
        "activations": float(activations),
        "logits": 2.0 * B * L * text.vocab_size * 4,
        "vision": float(tower),
        "bridge": float(bridge),
    }
    return {
        "terms": terms,
        "total": sum(terms.values()),
        "trainable_params": trainable,
        "frozen_params": frozen,
        "lora_params": lora,
        "llm_params": sum(p.numel() for p in model.language_model.parameters()),
        "family": family.model_type,
        "batch": B,
        "length": L,
        "backend": backend,
        "precision": "bf16" if a == 2 else "fp32",
        "studies": bool(data_args.studies),
        "slices": S,
        "slices_how": slices_how,
        "patches": P,
        "visual_tokens": T,
        "vision_source": vision_vs,
    }


def memory_rows(estimate: dict) -> list[tuple[str, str]]:
    rows = [
        (
            "parameters",
            f"{estimate['trainable_params'] / 1e6:.1f}M trainable (LoRA {estimate['lora_params'] / 1e6:.1f}M),"
            f" {estimate['frozen_params'] / 1e6:.1f}M frozen; LLM ({estimate['family']}) "
            f"{estimate['llm_params'] / 1e9:.2f}B",
        ),
        (
            "shape",
            f"batch {estimate['batch']} x {estimate['length']} tokens, {estimate['precision']}, "
            f"scan {estimate['backend']}",
        ),
        (
            "vision input",
            f"{'study' if estimate['studies'] else 'row'}: S = {estimate['slices']} slices "
            f"({estimate['slices_how']}) x {estimate['patches']} patches through the tower "
            f"({estimate['vision_source']}) -> {estimate['visual_tokens']} visual tokens per "
            f"{'study' if estimate['studies'] else 'image'}",
        ),
    ]
    rows += [(f"  {k}", f"{v / 2**30:.2f} GB") for k, v in estimate["terms"].items()]
    rows.append(("estimated total", f"{estimate['total'] / 2**30:.2f} GB per process (+0.5-1 GB CUDA context)"))
    return rows


def format_rows(title: str, rows) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join([title] + [f"  {k:<{width}}  {v}" for k, v in rows])


def run(args) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    print(format_rows("hf-vlm doctor: environment", environment_rows()))
    if args.recipe:
        from ..training.run import parse_run_arguments

        try:
            model_args, data_args, _, training_args, info = parse_run_arguments(args.recipe, args.overrides)
            estimate = estimate_memory(model_args, data_args, training_args)
        except (ValueError, FileNotFoundError) as error:
            print(f"\nmemory estimate: not available: {error}")
            return 2
        print(
            "\n"
            + format_rows(
                f"memory estimate for {info['recipe_path']} (stage {training_args.stage})", memory_rows(estimate)
            )
        )
        print("\n" + MEMORY_FORMULA)
    return 0

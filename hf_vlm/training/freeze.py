"""Freeze policy per stage, written down once and checked by the FreezeGuard.

Prismatic style: each component (vision tower, bridge, LLM, LoRA) is set trainable or
frozen explicitly, and the result is logged as a table at the start of training. The
decision is a pure function of a parameter *name* and the arguments
(`intended_trainable`), so the FreezeGuard can re-derive it and catch any code that
unfroze the LLM behind the policy's back (a seed user's Stage 2 LLM "meant to be frozen"
was not).

LoRA is applied to `model.language_model` only (peft wraps the Mamba LLM), so the VLM
class stays on top and keeps its `forward`/`generate`.
"""

from __future__ import annotations

import logging
import re

from torch import nn

from ..backbones import FAMILIES, get_family

logger = logging.getLogger(__name__)

COMPONENTS = ("vision_tower", "bridge", "language_model", "lora")
_LAYER_RE = re.compile(r"\blayers\.(\d+)\.")
FINAL_NORM_NAMES = frozenset(family.final_norm.rsplit(".", 1)[-1] for family in FAMILIES.values())


def component_of(name: str) -> str:
    """Component a parameter belongs to; "qformer" is the pretrained body of a Q-Former bridge."""
    if name.startswith("vision_tower."):
        return "vision_tower"
    if name.startswith("bridge."):
        return "qformer" if name.startswith("bridge.qformer.") else "bridge"
    if name.startswith("language_model."):
        return "lora" if "lora_" in name else "language_model"
    return "other"


def num_llm_layers(model: nn.Module) -> int:
    llm = getattr(model, "language_model", model)
    config = getattr(llm, "config", None)
    return int(getattr(config, "num_hidden_layers", 0) or 0)


def intended_trainable(name: str, args, n_layers: int) -> bool:
    """Whether the freeze policy of `args` makes parameter `name` (a VLM parameter name) trainable."""
    component = component_of(name)
    if component in ("bridge", "qformer"):
        return True
    if component == "vision_tower":
        return bool(args.unfreeze_vision_tower)
    if component == "lora":
        return bool(args.use_lora)
    if component == "language_model":
        n = args.unfreeze_llm_layers
        if n == -1:
            return True
        if n > 0:
            parts = name.split(".")
            if len(parts) > 1 and parts[-2] in FINAL_NORM_NAMES and not _LAYER_RE.search(name):
                return True  # the final norm (norm_f / final_layernorm / norm, per family) trains with the last layers
            match = _LAYER_RE.search(name)
            return bool(match) and int(match.group(1)) >= n_layers - n
        return False
    return False


def _wrap_lora(model: nn.Module, args) -> None:
    from peft import LoraConfig, PeftModel, get_peft_model

    if isinstance(model.language_model, PeftModel):
        return  # idempotent: the recipe may have applied the policy before building the trainer
    # the family's safe list, and the reason for a refused target (hf_vlm.backbones)
    targets = get_family(model.language_model).validate_lora_targets(args.lora_target_modules)
    config = LoraConfig(
        r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout, target_modules=targets
    )
    model.language_model = get_peft_model(model.language_model, config)


def apply_freeze_policy(model: nn.Module, args) -> nn.Module:
    """Set `requires_grad` per component for `args.stage`; add LoRA to the LLM when asked.

    align:    bridge trainable; vision tower and LLM frozen.
    finetune: bridge trainable; LLM base weights frozen; LoRA adapters trainable (use_lora).
    Either stage: `unfreeze_llm_layers` (last N layers + final norm, -1 = all) and
    `unfreeze_vision_tower` are explicit opt-ins. Returns the same VLM object.
    """
    if args.use_lora:
        _wrap_lora(model, args)
    n_layers = num_llm_layers(model)
    for name, param in model.named_parameters():
        if param.is_floating_point() or param.is_complex():
            param.requires_grad_(intended_trainable(name, args, n_layers))
    checkpointing = getattr(args, "activation_checkpointing", None) or getattr(args, "gradient_checkpointing", None)
    # With a frozen embedding table the checkpointed blocks would see inputs that do not
    # require grad, and reentrant checkpointing would silently drop every gradient upstream.
    if checkpointing and not _input_embeddings_trainable(model) and getattr(model, "_require_grads_hook", None) is None:
        model.enable_input_require_grads()
    model._hf_vlm_freeze_policy = policy_key(args)
    return model


def policy_key(args) -> tuple:
    """What the freeze policy depends on; the trainer re-applies the policy only when it differs."""
    return (
        args.stage,
        bool(args.use_lora),
        tuple(args.lora_target_modules) if args.use_lora else (),
        args.unfreeze_llm_layers,
        bool(args.unfreeze_vision_tower),
    )


def _input_embeddings_trainable(model: nn.Module) -> bool:
    embeddings = model.get_input_embeddings()
    return any(p.requires_grad for p in embeddings.parameters())


def describe_trainable(model: nn.Module) -> list[dict]:
    """One row per component: trainable and frozen parameter counts and a status word."""
    counts = {c: [0, 0] for c in COMPONENTS}
    seen: set[int] = set()
    for name, param in model.named_parameters():
        if id(param) in seen:
            continue  # tied weights (embeddings / lm_head) count once
        seen.add(id(param))
        component = component_of(name)
        component = "bridge" if component == "qformer" else component
        component = component if component in counts else "language_model"
        counts[component][0 if param.requires_grad else 1] += param.numel()
    rows = []
    for component, (trainable, frozen) in counts.items():
        if trainable + frozen == 0:
            continue
        status = "trainable" if frozen == 0 else "frozen" if trainable == 0 else "partial"
        rows.append({"component": component, "trainable": trainable, "frozen": frozen, "status": status})
    return rows


def _human(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)


def format_trainable_table(rows: list[dict]) -> str:
    """`vision_tower: frozen (86.0M)` style lines plus a total."""
    lines = []
    for row in rows:
        total = row["trainable"] + row["frozen"]
        detail = _human(total)
        if row["status"] == "partial":
            detail = f"{_human(row['trainable'])} trainable of {detail}"
        lines.append(f"  {row['component']:<15} {row['status']:<9} ({detail})")
    trainable = sum(r["trainable"] for r in rows)
    total = sum(r["trainable"] + r["frozen"] for r in rows)
    share = 100 * trainable / max(total, 1)
    lines.append(f"  {'total':<15} {_human(trainable)} trainable of {_human(total)} ({share:.2f}%)")
    return "\n".join(lines)


__all__ = [
    "apply_freeze_policy",
    "component_of",
    "describe_trainable",
    "format_trainable_table",
    "intended_trainable",
    "policy_key",
]

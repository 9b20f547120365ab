"""The output directory's README.md (model card), its stage history, and `push_to_hub`.

A checkpoint that reaches a colleague or the Hub should say what it is without its author:
which data (files and row counts), which stage(s) produced it (the history is carried over
from `init_from`, so a Stage 2 card also lists Stage 1), which recipe and overrides, the
final metrics, and the hf_vlm version. Everything here is plain text generation, so it is
tested offline (the push itself is `hf_vlm.checkpoints.push_output_dir`).
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import os

logger = logging.getLogger(__name__)

HISTORY_FILE = "hf_vlm_training.json"


def load_history(path: str | None) -> list[dict]:
    """Stages recorded in a previous output directory (empty when there is none)."""
    file = os.path.join(path, HISTORY_FILE) if path else None
    if not file or not os.path.isfile(file):
        return []
    with open(file, encoding="utf-8") as handle:
        return list(json.load(handle).get("stages", []))


def write_history(output_dir: str, stages: list[dict]) -> str:
    file = os.path.join(output_dir, HISTORY_FILE)
    with open(file, "w", encoding="utf-8") as handle:
        json.dump({"stages": stages}, handle, indent=2, ensure_ascii=False, default=str)
    return file


def stage_record(
    model_args,
    data_args,
    training_args,
    info: dict,
    data_rows: dict,
    metrics: dict,
    global_step: int,
    trainable: list[dict] | None = None,
) -> dict:
    """One entry of the stage history: enough to re-run it and to judge its result."""
    return {
        "stage": training_args.stage,
        "finished": datetime.datetime.now().isoformat(timespec="seconds"),
        "recipe": info.get("recipe_path"),
        "overrides": info.get("overrides", {}),
        "init_from": None if model_args.from_scratch else model_args.init_from,
        "from_scratch": bool(model_args.from_scratch),
        "vision_model": model_args.vision_model_name_or_path,
        "language_model": model_args.language_model_name_or_path,
        "llm_8bit": bool(model_args.llm_8bit),
        "max_visual_tokens": model_args.max_visual_tokens,
        "max_length": data_args.max_length,
        "data": data_rows,
        "global_step": int(global_step),
        "world_size": int(training_args.world_size),
        "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))},
        "trainable": trainable or [],
    }


def _fmt(value) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def _is_hub_id(name: str | None) -> bool:
    return bool(name) and not os.path.exists(name) and name.count("/") == 1 and ":" not in name


def render_model_card(
    stages: list[dict],
    recipe: dict,
    overrides: dict,
    *,
    version: str,
    model_name: str = "model",
    guard_trips: list[str] | None = None,
    health: list | None = None,
) -> str:
    """Markdown with Hub metadata. `stages[-1]` is the stage that produced this checkpoint."""
    import yaml

    last = stages[-1]
    bases = [m for m in (last.get("vision_model"), last.get("language_model")) if _is_hub_id(m)]
    header = {
        "library_name": "hf_vlm",
        "language": ["zh"],
        "pipeline_tag": "image-to-text",
        "tags": ["hf_vlm", "mamba", "vision-language", "radiology", f"stage-{last['stage']}"],
    }
    if bases:
        header["base_model"] = bases
    lines = [
        "---",
        yaml.safe_dump(header, allow_unicode=True, sort_keys=False).strip(),
        "---",
        "",
        f"# {model_name}",
        "",
        "A vision-language model: vision tower -> trainable bridge -> `MambaForCausalLM`, trained with "
        f"hf_vlm {version} to write Chinese radiology reports from CT images.",
        "",
        "## Components",
        "",
        "| part | source |",
        "|---|---|",
        f"| vision tower | `{last.get('vision_model') or 'from init_from'}` |",
        f"| language model | `{last.get('language_model') or 'from init_from'}`"
        f"{' (8-bit)' if last.get('llm_8bit') else ''} |",
        f"| visual tokens per image | {last.get('max_visual_tokens')} |",
        "",
        "## Training stages",
        "",
        "| # | stage | recipe | steps | processes | init | finished |",
        "|---|---|---|---|---|---|---|",
    ]
    for i, s in enumerate(stages, 1):
        init = "from scratch" if s.get("from_scratch") else (s.get("init_from") or "components")
        lines.append(
            f"| {i} | {s['stage']} | `{s.get('recipe') or '-'}` | {s.get('global_step')} | "
            f"{s.get('world_size', 1)} | {init} | {s.get('finished', '')} |"
        )
    lines += ["", "## Data", "", "| file | rows |", "|---|---|"]
    lines += [f"| `{name}` | {rows} |" for name, rows in last.get("data", {}).items()]
    if last.get("trainable"):
        lines += [
            "",
            "## Trainable parameters (last stage)",
            "",
            "| component | status | trainable | frozen |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {r['component']} | {r['status']} | {r['trainable']:,} | {r['frozen']:,} |" for r in last["trainable"]
        ]
    lines += ["", "## Final metrics", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in sorted(last.get("metrics", {}).items())]
    if health:
        from .verdict import format_health_table

        lines += [
            "",
            "## Training health",
            "",
            "Judged by the image dependence of the loss (train_vision_gap) and "
            "its trend; the loss bands are context only.",
            "",
            format_health_table(health, markdown=True),
        ]
    if guard_trips:
        lines += ["", "## Guard reports", ""] + [f"- {t}" for t in guard_trips]
    effective = {**recipe, **overrides}
    lines += [
        "",
        "## Recipe (with overrides applied)",
        "",
        "```yaml",
        yaml.safe_dump(effective, allow_unicode=True, sort_keys=False).strip(),
        "```",
        "",
        "## Usage",
        "",
        "```python",
        "import hf_vlm  # registers the model with the Auto classes",
        "from transformers import AutoModelForImageTextToText, AutoProcessor",
        "",
        "model = AutoModelForImageTextToText.from_pretrained(path)  # re-attaches a tower left out",
        "processor = AutoProcessor.from_pretrained(path)",
        "```",
        "",
    ]
    return "\n".join(lines)


def write_model_card(
    output_dir: str,
    stages: list[dict],
    recipe: dict,
    overrides: dict,
    *,
    guard_trips: list[str] | None = None,
    health: list | None = None,
) -> str:
    from .. import __version__

    text = render_model_card(
        stages,
        recipe,
        overrides,
        version=__version__,
        model_name=os.path.basename(os.path.normpath(output_dir)),
        guard_trips=guard_trips,
        health=health,
    )
    file = os.path.join(output_dir, "README.md")
    with open(file, "w", encoding="utf-8") as handle:
        handle.write(text)
    return file


__all__ = ["load_history", "render_model_card", "stage_record", "write_history", "write_model_card"]

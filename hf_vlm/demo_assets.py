"""Build the embedded default: synthetic CT data, a local tokenizer and tiny pretrained parts.

Real users start from a pretrained vision tower and a pretrained Mamba LLM. The demo has no
network, so it makes its own: a tiny ViT (random, frozen, like any frozen encoder) and a tiny
Mamba LM briefly pretrained on report text ("Stage 0"), both saved to disk and loaded back
through `from_pretrained`, i.e. the same code path as `state-spaces/mamba-2.8b-hf`.
"""

from __future__ import annotations

import json
import logging
import os
import random
from dataclasses import dataclass

import pandas as pd
import torch
from transformers import AutoModelForCausalLM, ViTImageProcessorPil, ViTModel

from .data.collator import IGNORE_INDEX
from .presets import tiny_max_visual_tokens, tiny_text_config, tiny_vision_config
from .processing_mamba_vlm import MambaVLMProcessor
from .synthetic import DEFAULT_PROMPT, make_synthetic_dataset
from .tokenization import train_report_tokenizer

logger = logging.getLogger(__name__)


ASSETS_RECORD = "assets.json"


@dataclass
class DemoAssets:
    train_csv: str
    eval_csv: str
    vision_path: str
    llm_path: str
    processor_path: str


def save_assets_record(out_dir: str, settings: dict, assets: DemoAssets) -> str:
    """Write `assets.json`: the settings and each path *relative to out_dir*, so the folder is reused
    from any working directory (a cwd-relative path such as `outputs/demo/assets/processor` broke
    `--synthetic_dir` given from elsewhere: it was then read as a hub repo id)."""
    root = os.path.abspath(out_dir)
    paths = {k: os.path.relpath(os.path.abspath(v), root) for k, v in assets.__dict__.items()}
    marker = os.path.join(root, ASSETS_RECORD)
    with open(marker, "w", encoding="utf-8") as handle:
        json.dump({"settings": settings, "assets": paths}, handle, indent=2)
    return marker


def load_assets_record(out_dir: str) -> tuple[dict, DemoAssets] | None:
    """`(settings, assets)` from `out_dir/assets.json` with absolute paths, or None (no record, or a path
    in it is gone: the caller rebuilds). A relative path is read relative to the record's folder; a
    record of an older hf_vlm (paths relative to the cwd it was written from) is accepted where
    those paths still resolve."""
    root = os.path.abspath(out_dir)
    marker = os.path.join(root, ASSETS_RECORD)
    if not os.path.isfile(marker):
        return None
    with open(marker, encoding="utf-8") as handle:
        stored = json.load(handle)
    resolved = {}
    for key, value in stored.get("assets", {}).items():
        candidates = [value] if os.path.isabs(value) else [os.path.join(root, value), os.path.abspath(value)]
        found = next((c for c in candidates if os.path.exists(c)), None)
        if found is None:
            logger.warning("%s: %s=%s does not exist: rebuilding the synthetic assets", marker, key, value)
            return None
        resolved[key] = os.path.normpath(found)
    try:
        return stored.get("settings"), DemoAssets(**resolved)
    except TypeError:  # a field missing or unknown: an incompatible record
        return None


def pretrain_text_lm(model, tokenizer, texts: list[str], steps: int, seed: int = 0) -> float:
    """A few hundred steps of next-token training on report text, so the LLM 'speaks' reports."""
    generator = torch.Generator().manual_seed(seed)
    encoded = [tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for t in texts]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        idx = torch.randint(len(encoded), (32,), generator=generator).tolist()
        width = max(len(encoded[i]) for i in idx)
        ids = torch.full((len(idx), width), tokenizer.pad_token_id)
        labels = torch.full((len(idx), width), IGNORE_INDEX)
        for row, i in enumerate(idx):
            ids[row, : len(encoded[i])] = torch.tensor(encoded[i])
            labels[row, : len(encoded[i])] = torch.tensor(encoded[i])
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    return float(loss.detach())


def build_demo_assets(
    out_dir: str,
    n_train: int = 800,
    n_eval: int = 100,
    preset: str = "tiny",
    lm_steps: int = 150,
    seed: int = 0,
    studies: bool = False,
    lm_family: str = "mamba",
    tower_steps: int = 0,
    tower_settings: dict | None = None,
    tower_feature_layer: int = -2,
) -> DemoAssets:
    """Write data, tokenizer/processor, a tiny ViT and a tiny pretrained Mamba LM under `out_dir`.

    `studies`: the data are synthetic CT volumes (NIfTI, `hf_vlm.synthetic_volumes`) whose reports
    state side, lobe, size and level of a nodule that is rarely on the middle slice. `tower_steps` > 0
    pretrains the tiny ViT to mark nodule patches on slices preprocessed with `tower_settings`, at
    hidden layer `tower_feature_layer` (the VLM's `vision_feature_layer`; `hf_vlm.synthetic_tower`)."""
    torch.manual_seed(seed)
    random.seed(seed)
    data_dir = os.path.join(out_dir, "data")
    vision_cfg = tiny_vision_config(preset)
    if studies:
        from .synthetic_volumes import make_synthetic_studies

        make = make_synthetic_studies
    else:
        make = make_synthetic_dataset
    train_csv = make(data_dir, n_train, seed=seed, image_size=vision_cfg.image_size, split="train")
    eval_csv = make(data_dir, n_eval, seed=seed + 1, image_size=vision_cfg.image_size, split="eval")

    reports = pd.read_csv(train_csv)["caption"].tolist()
    prompt_text = f"{DEFAULT_PROMPT}\n"
    tokenizer = train_report_tokenizer(reports + [prompt_text] * 50, vocab_size=600)
    image_processor = ViTImageProcessorPil(
        size={"height": vision_cfg.image_size, "width": vision_cfg.image_size},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    processor = MambaVLMProcessor(image_processor, tokenizer, max_visual_tokens=tiny_max_visual_tokens(preset))
    processor_path = os.path.join(out_dir, "processor")
    processor.save_pretrained(processor_path)

    vision_path = os.path.join(out_dir, "vision_tower")
    tower = ViTModel(vision_cfg, add_pooling_layer=False)
    if tower_steps:
        from .synthetic_tower import pretrain_lesion_tower

        pretrain_lesion_tower(
            tower,
            tower_settings,
            image_mean=image_processor.image_mean,
            image_std=image_processor.image_std,
            seed=seed,
            steps=tower_steps,
            feature_layer=tower_feature_layer,
        )
    tower.save_pretrained(vision_path)

    llm_path = os.path.join(out_dir, "mamba_lm")
    # any family of hf_vlm.backbones (`tiny_lm_family`); the directory name is kept for old records
    llm = AutoModelForCausalLM.from_config(
        tiny_text_config(len(tokenizer), preset, pad_token_id=tokenizer.pad_token_id, family=lm_family)
    )
    final = pretrain_text_lm(llm, tokenizer, [prompt_text + r for r in reports], steps=lm_steps, seed=seed)
    logger.info("Stage 0 (text-only LM pretraining, %d steps): final loss %.3f", lm_steps, final)
    llm.save_pretrained(llm_path)
    return DemoAssets(train_csv, eval_csv, vision_path, llm_path, processor_path)

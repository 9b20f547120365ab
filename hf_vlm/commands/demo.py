"""`hf-vlm demo`: the embedded default, end to end on CPU in a few minutes.

1. make synthetic CT-like slices with Chinese reports, a local tokenizer, a tiny ViT and a
   tiny Mamba LM pretrained on report text (see `hf_vlm.demo_assets`);
2. join them with a fresh vision bridge; Stage 1 trains the bridge only (vision tower and
   LLM frozen), Stage 2 trains bridge + LLM (a 0.3M-parameter LM is too small to be steered
   by a soft visual prefix alone: bridge-only training stays near chance on the facts);
3. generate reports for held-out images and score the stated side / lobe / size against
   the truth, next to a blind baseline (the same model given shuffled images).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import time

logger = logging.getLogger("hf_vlm.demo")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output_dir", default=os.path.join("outputs", "demo"), help="where data, models and logs go")
    parser.add_argument("--n_train", type=int, default=800, help="synthetic training studies")
    parser.add_argument("--n_eval", type=int, default=100, help="held-out studies to generate reports for")
    parser.add_argument("--lm_steps", type=int, default=150, help="Stage 0 text-only LM pretraining steps")
    parser.add_argument("--align_steps", type=int, default=100, help="Stage 1 steps: bridge only")
    parser.add_argument("--finetune_steps", type=int, default=400, help="Stage 2 steps: bridge + LLM")
    parser.add_argument("--learning_rate", type=float, default=3e-3, help="peak learning rate of both stages")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--show", type=int, default=5, help="generated reports to print next to the truth")


def train_stage(model, train_dataset, collator, args, stage: str, max_steps: int) -> None:
    """Plain `transformers.Trainer`; the vision tower stays frozen, the LLM only in "align"."""
    from transformers import Trainer, TrainingArguments

    model.vision_tower.requires_grad_(False)
    model.language_model.requires_grad_(stage == "finetune")
    training_args = TrainingArguments(
        output_dir=os.path.join(args.output_dir, stage),
        per_device_train_batch_size=args.batch_size,
        max_steps=max_steps,
        learning_rate=args.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=max(max_steps // 20, 1),
        logging_steps=max(max_steps // 10, 1),
        save_strategy="no",
        report_to="none",
        remove_unused_columns=False,
        dataloader_num_workers=0,
        seed=args.seed,
        use_cpu=True,
    )
    Trainer(model=model, args=training_args, train_dataset=train_dataset, data_collator=collator).train()


def evaluate_facts(model, processor, eval_csv: str, shuffle_images: bool = False, seed: int = 0):
    """Generate a report per held-out image; score side/lobe/size against the ground truth."""
    import pandas as pd
    from PIL import Image

    from ..generation import generate_reports
    from ..synthetic import NoduleFacts, score_reports

    frame = pd.read_csv(eval_csv)
    images = [[Image.open(p).convert("RGB")] for p in frame["image_path"]]
    if shuffle_images:
        random.Random(seed).shuffle(images)
    reports = generate_reports(model, processor, images, list(frame["prompt"]), batch_size=25, max_new_tokens=32)
    truths = [NoduleFacts(s, lo, int(mm)) for s, lo, mm in zip(frame["side"], frame["lobe"], frame["size_mm"])]
    return reports, list(frame["caption"]), score_reports(reports, truths)


def run(args) -> int:
    import torch
    from transformers import set_seed

    from .. import MambaVLMForConditionalGeneration, MambaVLMProcessor
    from ..data.collator import DataCollatorForMambaVLM
    from ..data.encoding import load_training_dataset
    from ..demo_assets import build_demo_assets
    from ..ops import install_fast_scan
    from ..synthetic import chance_accuracy

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    start = time.time()
    set_seed(args.seed)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    install_fast_scan()
    assets = build_demo_assets(args.output_dir, args.n_train, args.n_eval, lm_steps=args.lm_steps, seed=args.seed)
    processor = MambaVLMProcessor.from_pretrained(assets.processor_path)
    model = MambaVLMForConditionalGeneration.from_components(
        assets.vision_path,
        assets.llm_path,
        max_visual_tokens=processor.max_visual_tokens,
        image_token_id=processor.image_token_id,
    )
    train_dataset = load_training_dataset(assets.train_csv, processor)
    collator = DataCollatorForMambaVLM(
        pad_token_id=processor.tokenizer.pad_token_id,
        image_token_id=processor.image_token_id,
        tokenizer=processor.tokenizer,
    )
    for stage, steps in (("align", args.align_steps), ("finetune", args.finetune_steps)):
        if steps > 0:
            logger.info("Stage %s: %d steps", stage, steps)
            train_stage(model, train_dataset, collator, args, stage, steps)
    final_dir = os.path.join(args.output_dir, "final")
    model.save_pretrained(final_dir)
    processor.save_pretrained(final_dir)

    reports, references, scores = evaluate_facts(model, processor, assets.eval_csv)
    _, _, blind = evaluate_facts(model, processor, assets.eval_csv, shuffle_images=True, seed=args.seed)
    chance = chance_accuracy()
    print("\nGenerated reports for held-out images (prediction | ground truth):")
    for prediction, reference in list(zip(reports, references))[: args.show]:
        print(f"  {prediction}  |  {reference}")
    print(f"\n{'fact':<18}{'model':>8}{'blind (shuffled)':>18}{'chance':>8}")
    for key in scores:
        print(f"{key:<18}{scores[key]:>8.2f}{blind[key]:>18.2f}{chance[key]:>8.2f}")
    summary = {"model": scores, "blind_shuffled_images": blind, "chance": chance, "seconds": time.time() - start}
    with open(os.path.join(args.output_dir, "demo_scores.json"), "w", encoding="utf-8") as handle:
        json.dump(summary, handle, indent=2, ensure_ascii=False)
    print(f"\nCheckpoint: {final_dir}  ({summary['seconds']:.0f} s in total)")
    return 0

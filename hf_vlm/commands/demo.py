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
    parser.add_argument(
        "--output_dir",
        default=None,
        help="where data, models and logs go (default: outputs/demo_3d with --studies, else outputs/demo)",
    )
    parser.add_argument(
        "--n_train",
        type=int,
        default=None,
        help="synthetic training rows (default: the recipe's synthetic_train_rows: 800 images, 1600 studies)",
    )
    parser.add_argument("--n_eval", type=int, default=100, help="held-out studies to generate reports for")
    parser.add_argument("--lm_steps", type=int, default=150, help="Stage 0 text-only LM pretraining steps")
    parser.add_argument("--align_steps", type=int, default=100, help="Stage 1 steps: bridge only")
    parser.add_argument(
        "--finetune_steps",
        type=int,
        default=None,
        help="Stage 2 steps: bridge + LLM (default: the recipe's max_steps, 800 for images, 1600 for studies)",
    )
    parser.add_argument(
        "--learning_rate",
        type=float,
        default=None,
        help="peak learning rate of both stages for bridge and LLM alike (default: the recipe's, e.g. "
        "tiny_demo_3d's bridge 1e-2 / LLM 3e-3)",
    )
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--show", type=int, default=5, help="generated reports to print next to the truth")
    parser.add_argument(
        "--studies",
        action="store_true",
        help="train on synthetic CT studies (recipes/tiny_demo_3d.yaml) and score side/lobe/size/level",
    )
    parser.add_argument(
        "--tower_steps",
        type=int,
        default=None,
        help="with --studies: Stage 0 steps of the tiny ViT (default: the recipe's synthetic_tower_steps)",
    )
    parser.add_argument(
        "--middle_baseline",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="with --studies: also train the same recipe on the middle slice only (baseline)",
    )


def health_summary(final: dict) -> dict:
    """`{"health": {verdict, last train_vision_gap}}` of Stage 2 for demo_scores.json ({} without one;
    Stage 1 trains a bridge on a frozen LM and is not the run that must see)."""
    health = final.get("health")
    if not health:
        return {}
    gap = health["probes"][-1]["gap"] if health["probes"] else None
    return {"health": {"verdict": health["verdict"], "train_vision_gap": gap}}


def print_health(final: dict) -> None:
    """Print Stage 2's end-of-run health table (the one in the model card)."""
    health = final.get("health")
    if health:
        from ..training.verdict import format_health_table

        print(f"\nTraining health of Stage 2 (verdict: {health['verdict']}):\n{format_health_table(health['table'])}")


def same_learning_rate(lr: float | None) -> dict:
    """Recipe overrides that give bridge and LLM the one `--learning_rate` (none: the recipe's own)."""
    return {} if lr is None else {"learning_rate": lr, "bridge_learning_rate": lr, "llm_learning_rate": lr}


def run_two_stages(args, recipe: str, output_dir: str, extra: dict | None = None) -> dict:
    """Stage 1 (align: bridge only) then Stage 2 (bridge + LLM) with `recipe` into `output_dir`,
    through the guarded `MambaVLMTrainer` — the same path as `hf-vlm train`. The synthetic assets
    live in `<args.output_dir>/assets`, shared with a baseline trained into another `output_dir`;
    `extra` are further recipe overrides of both stages."""
    from ..training.run import train_from_recipe

    common = {
        "output_dir": output_dir,
        **({"synthetic_train_rows": args.n_train} if args.n_train else {}),
        "synthetic_eval_rows": args.n_eval,
        "synthetic_lm_steps": args.lm_steps,
        "synthetic_dir": os.path.join(args.output_dir, "assets"),
        "seed": args.seed,
        "per_device_train_batch_size": args.batch_size,
        **same_learning_rate(args.learning_rate),
        "overwrite_output_dir": True,  # the demo re-runs into the same folders by design
        **(extra or {}),
    }
    align = train_from_recipe(
        recipe,
        {
            **common,
            "stage": "align",
            "unfreeze_llm_layers": 0,
            "max_steps": args.align_steps,
            "save_strategy": "no",
            "output_dir": os.path.join(output_dir, "align"),
        },
    )
    return train_from_recipe(
        recipe,
        {
            **common,
            "init_from": align["output_dir"],
            **({"max_steps": args.finetune_steps} if args.finetune_steps else {}),
            "output_dir": os.path.join(output_dir, "final"),
        },
    )


def run_stages(args) -> dict:
    """The 2-D demo's two stages with `recipes/tiny_demo.yaml`."""
    return run_two_stages(args, "tiny_demo", args.output_dir)


def evaluate_facts(model, processor, eval_csv: str, shuffle_images: bool = False, seed: int = 0):
    """Generate a report per held-out image; score side/lobe/size against the ground truth."""
    import pandas as pd
    from PIL import Image

    from ..inference import generate_reports
    from ..synthetic import NoduleFacts, score_reports

    frame = pd.read_csv(eval_csv)
    images = [[Image.open(p).convert("RGB")] for p in frame["image_path"]]
    if shuffle_images:
        random.Random(seed).shuffle(images)
    reports = generate_reports(model, processor, images, list(frame["prompt"]), batch_size=25, max_new_tokens=32)
    truths = [NoduleFacts(s, lo, int(mm)) for s, lo, mm in zip(frame["side"], frame["lobe"], frame["size_mm"])]
    return reports, list(frame["caption"]), score_reports(reports, truths)


def run(args) -> int:
    from transformers import set_seed

    from ..synthetic import chance_accuracy

    if args.output_dir is None:
        args.output_dir = os.path.join("outputs", "demo_3d" if getattr(args, "studies", False) else "demo")
    if getattr(args, "studies", False):
        from ..demo_studies import run as run_studies

        return run_studies(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    start = time.time()
    set_seed(args.seed)
    final = run_stages(args)
    model, processor, final_dir = final["model"], final["processor"], final["output_dir"]
    eval_csv = os.path.join(args.output_dir, "assets", "data", "eval.csv")
    reports, references, scores = evaluate_facts(model, processor, eval_csv)
    _, _, blind = evaluate_facts(model, processor, eval_csv, shuffle_images=True, seed=args.seed)
    chance = chance_accuracy()
    print("\nGenerated reports for held-out images (prediction | ground truth):")
    for prediction, reference in list(zip(reports, references))[: args.show]:
        print(f"  {prediction}  |  {reference}")
    print(f"\n{'fact':<18}{'model':>8}{'blind (shuffled)':>18}{'chance':>8}")
    for key in scores:
        print(f"{key:<18}{scores[key]:>8.2f}{blind[key]:>18.2f}{chance[key]:>8.2f}")
    summary = {"model": scores, "blind_shuffled_images": blind, "chance": chance, "seconds": time.time() - start}
    summary.update(health_summary(final))
    with open(os.path.join(args.output_dir, "demo_scores.json"), "w", encoding="utf-8") as handle:
        json.dump(summary, handle, indent=2, ensure_ascii=False)
    print_health(final)
    curve = os.path.join(final_dir, "train_log.png")  # written by LossPlotCallback, healthy band drawn
    print(f"\nCheckpoint: {final_dir}\nLoss curve: {curve}  ({summary['seconds']:.0f} s in total)")
    return 0

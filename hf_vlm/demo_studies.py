"""`hf-vlm demo --studies`: the embedded default on synthetic CT studies, with its baselines.

Why: the 2-D demo cannot show what matters for reports, namely that the model reads the whole
study. Here the nodule is rarely on the middle slice (`hf_vlm.synthetic_volumes`), and the
reports state side, lobe, size and level. The same two stages as the 2-D demo run with
`recipes/tiny_demo_3d.yaml` (every lung slice encoded once through the vision feature cache,
64 study tokens), then held-out studies are scored next to three baselines: the same model
given shuffled studies (blind), chance, and the same recipe restricted to the middle slice.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import random
import time

logger = logging.getLogger("hf_vlm.demo")

RECIPE = "tiny_demo_3d"


def run_study_stages(args, output_dir: str, extra: dict | None = None) -> dict:
    """Stage 1 (bridge only) then Stage 2 (bridge + LLM) with `recipes/tiny_demo_3d.yaml`; the
    feature cache under `<args.output_dir>` unless `extra` names another."""
    from .commands.demo import run_two_stages

    tower = {"synthetic_tower_steps": args.tower_steps} if getattr(args, "tower_steps", None) is not None else {}
    cache = {"vision_feature_cache": os.path.join(args.output_dir, "feature_cache")}
    return run_two_stages(args, RECIPE, output_dir, {**cache, **tower, **(extra or {})})


def evaluate_studies(model, processor, eval_csv: str, shuffle: bool = False, seed: int = 0):
    """Reports for the held-out studies (loaded with the processor's saved settings), scored."""
    from .data.studies import load_study
    from .inference import generate_reports
    from .synthetic_volumes import read_study_facts, score_study_reports

    with open(eval_csv, encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    studies = [[load_study(r["image_path"], processor.study_settings)] for r in rows]
    if shuffle:
        random.Random(seed).shuffle(studies)
    reports = generate_reports(model, processor, studies, [r["prompt"] for r in rows], batch_size=25, max_new_tokens=48)
    truths = read_study_facts(eval_csv)
    return (
        reports,
        [r["caption"] for r in rows],
        {
            "all_studies": score_study_reports(reports, truths),
            "off_middle": score_study_reports(reports, truths, off_middle_only=True),
        },
    )


def run(args) -> int:
    from transformers import set_seed

    from .commands.demo import health_summary, print_health
    from .synthetic_volumes import study_chance_accuracy

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    start = time.time()
    set_seed(args.seed)
    final = run_study_stages(args, args.output_dir)
    trained = time.time() - start
    model, processor = final["model"], final["processor"]
    eval_csv = os.path.join(args.output_dir, "assets", "data", "eval.csv")
    reports, references, scores = evaluate_studies(model, processor, eval_csv)
    _, _, blind = evaluate_studies(model, processor, eval_csv, shuffle=True, seed=args.seed)
    columns = {"model": scores, "blind (shuffled)": blind}
    if args.middle_baseline:
        set_seed(args.seed)
        middle = run_study_stages(
            args,
            os.path.join(args.output_dir, "middle_slice"),
            {
                "study_slice_sampling": "middle",
                "study_extent": "full",
                # its own cache root: a sibling of other settings would be reported as stale
                "vision_feature_cache": os.path.join(args.output_dir, "middle_slice", "feature_cache"),
            },
        )
        columns["middle slice"] = evaluate_studies(middle["model"], middle["processor"], eval_csv)[2]
    chance = study_chance_accuracy()
    print("\nGenerated reports for held-out studies (prediction | ground truth):")
    for prediction, reference in list(zip(reports, references))[: args.show]:
        print(f"  {prediction}  |  {reference}")
    for subset in ("all_studies", "off_middle"):
        n = scores[subset]["n"]
        print(f"\n{subset} (n={n}): {'fact':<16}" + "".join(f"{name:>18}" for name in columns) + f"{'chance':>8}")
        for key in ("side", "lobe", "level", "size_within_2mm", "all"):
            values = "".join(f"{col[subset][key]:>18.2f}" for col in columns.values())
            print(f"{'':<{len(subset) + len(str(n)) + 6}}{key:<16}{values}{chance.get(key, float('nan')):>8.2f}")
    summary = {
        **{k: v for k, v in columns.items()},
        "chance": chance,
        "seconds_model_training": trained,
        "seconds": time.time() - start,
        **health_summary(final),
    }
    with open(os.path.join(args.output_dir, "demo_scores.json"), "w", encoding="utf-8") as handle:
        json.dump(summary, handle, indent=2, ensure_ascii=False)
    print_health(final)
    print(
        f"\nCheckpoint: {final['output_dir']}  ({summary['seconds']:.0f} s in total, "
        f"{trained:.0f} s for the study model)"
    )
    return 0

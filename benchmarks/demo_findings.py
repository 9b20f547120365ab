"""Findings-F1 / BLEU / CIDEr of the demo model next to a blind baseline (shuffled images).

    python benchmarks/demo_findings.py --demo_dir outputs/demo            # an existing `hf-vlm demo` run
    python benchmarks/demo_findings.py --demo_dir /tmp/demo --run_demo    # run the demo first

Why the blind baseline: report text metrics reward a fluent template, so a model that ignores
the image still scores well on BLEU/ROUGE. The same model given the *wrong* images (a fixed
permutation of the eval set) shows how much of each score comes from reading the image; the
findings-F1 gap is the number that matters. Prints a table and writes
`<demo_dir>/findings_benchmark.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

ROWS = [
    ("findings_f1", "Findings F1 (micro)"),
    ("findings_f1_tol2", "Findings F1, size ±2 mm"),
    ("findings_precision", "Findings precision"),
    ("findings_recall", "Findings recall"),
    ("bleu_4", "BLEU-4 (char)"),
    ("rouge_l", "ROUGE-L (char)"),
    ("cider_d", "CIDEr-D (char)"),
    ("repetition", "Repetition (seq-rep-4)"),
    ("fact_side", "Side correct"),
    ("fact_lobe", "Side + lobe correct"),
    ("fact_size_within_2mm", "Size within 2 mm"),
]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo_dir", default=os.path.join("outputs", "demo"), help="output_dir of `hf-vlm demo`")
    parser.add_argument(
        "--run_demo", action="store_true", help="run `hf-vlm demo --output_dir DEMO_DIR` first if no checkpoint"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the image permutation of the blind baseline")
    parser.add_argument("--max_new_tokens", type=int, default=48)
    parser.add_argument("--batch_size", type=int, default=25)
    return parser.parse_args(argv)


def score(model, processor, frame, images, args) -> tuple[dict, list[str]]:
    from hf_vlm.inference import generate_batch
    from hf_vlm.metrics import FindingsTable, compute_report_metrics
    from hf_vlm.synthetic import NoduleFacts, score_reports

    reports: list[str] = []
    prompts = list(frame["prompt"])
    for start in range(0, len(images), args.batch_size):
        reports += generate_batch(
            model,
            processor,
            images[start : start + args.batch_size],
            prompts[start : start + args.batch_size],
            max_new_tokens=args.max_new_tokens,
        )
    metrics = compute_report_metrics(reports, list(frame["caption"]))
    # the default table matches sizes exactly; the synthetic task's "size within 2 mm" is looser
    tolerant = compute_report_metrics(
        reports, list(frame["caption"]), findings_table=FindingsTable(size_tolerance_mm=2.0)
    )
    metrics["findings_f1_tol2"] = tolerant["findings_f1"]
    truths = [NoduleFacts(s, lo, int(mm)) for s, lo, mm in zip(frame["side"], frame["lobe"], frame["size_mm"])]
    metrics.update({f"fact_{k}": v for k, v in score_reports(reports, truths).items()})
    return metrics, reports


def main(argv=None) -> int:
    import pandas as pd
    import torch
    from PIL import Image

    args = parse_args(argv)
    final = os.path.join(args.demo_dir, "final")
    eval_csv = os.path.join(args.demo_dir, "assets", "data", "eval.csv")  # hf-vlm demo layout
    if not os.path.isdir(final):
        if not args.run_demo:
            print(
                f"{final}: no demo checkpoint; run `hf-vlm demo --output_dir {args.demo_dir}` or pass --run_demo",
                file=sys.stderr,
            )
            return 2
        from hf_vlm.cli import main as cli_main

        if cli_main(["demo", "--output_dir", args.demo_dir]) != 0:
            return 1
    from hf_vlm.inference import load_for_inference

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    start = time.time()
    model, processor, _ = load_for_inference(final, device="cpu")
    frame = pd.read_csv(eval_csv)
    images = [[Image.open(p).convert("RGB")] for p in frame["image_path"]]
    shuffled = list(images)
    random.Random(args.seed).shuffle(shuffled)
    model_scores, reports = score(model, processor, frame, images, args)
    blind_scores, _ = score(model, processor, frame, shuffled, args)

    print(
        f"Demo checkpoint {final}, {len(frame)} held-out synthetic studies, greedy decoding, "
        f"max_new_tokens={args.max_new_tokens}; text metrics are character-level."
    )
    print(f"\n| {'metric':<24} | {'model':>7} | {'blind (shuffled images)':>23} |")
    print(f"|{'-' * 26}|{'-' * 9}|{'-' * 25}|")
    for key, label in ROWS:
        print(f"| {label:<24} | {model_scores[key]:>7.3f} | {blind_scores[key]:>23.3f} |")
    print("\nExamples (generated | reference):")
    for report, reference in list(zip(reports, frame["caption"]))[:3]:
        print(f"  {report}  |  {reference}")
    summary = {
        "checkpoint": final,
        "n_eval": len(frame),
        "seed": args.seed,
        "seconds": round(time.time() - start, 1),
        "model": {k: model_scores[k] for k, _ in ROWS},
        "blind_shuffled_images": {k: blind_scores[k] for k, _ in ROWS},
    }
    out = os.path.join(args.demo_dir, "findings_benchmark.json")
    with open(out, "w", encoding="utf-8") as handle:
        json.dump(summary, handle, indent=2, ensure_ascii=False)
    print(f"\nwrote {out} ({summary['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark: training-step time and peak memory of a study of S = 1, 8, 32 slices vs one slice (issue 10).

The vision features are cached (frozen tower, `hf_vlm.data.feature_cache`), so a step is the
study encoder (slice-position embedding + bridge, `hf_vlm.modeling_study`) plus the Mamba LM on
a sequence whose length does NOT depend on S (one `<image>` = `--budget` tokens per study).
The question is what the S slices x P patches cost on the way into that fixed budget.

Each (bridge, S) runs in its own process, so its peak memory is its own: `peak MB` is the
process's resident high-water mark (VmHWM) minus its resident size just before the first step
(model, optimizer and batch already built). A step = forward + backward + AdamW step on a
batch of `--batch` studies; the table gives the median wall and process-CPU time after
`--warmup` steps, and CPU time relative to S = 1 of the same bridge (target <= ~1.3x at S = 32).

Defaults resemble a CLIP-L tower (Dv = 1024, P = 256 patches at 224 px) with a small Mamba LM
(d = 256, 4 layers) so the run fits a few CPU minutes; the LM share grows with a real 2.8B LM,
so these ratios are an upper bound for the S-dependent part.

`mlp-attention` is the MLP bridge with `bridge_pooling: attention` (the 3-D demo's): its scorer
runs over all S x P patches with a backward pass, so unlike avg pooling it grows with S.

Usage: python benchmarks/bench_study_step.py [--slices 1 8 32] [--bridges mlp mlp-attention qformer] [--steps 6]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def one(args) -> dict:
    """Run one (bridge, S) configuration in this process; print its numbers as JSON."""
    import torch
    from transformers import MambaConfig, ViTConfig

    from hf_vlm import MambaVLMConfig, MambaVLMForConditionalGeneration

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    side = int(args.patches**0.5)
    vision = ViTConfig(
        hidden_size=args.vision_dim,
        num_hidden_layers=1,
        num_attention_heads=8,
        intermediate_size=64,
        image_size=side * 14,
        patch_size=14,
    )
    text = MambaConfig(vocab_size=600, hidden_size=args.hidden, num_hidden_layers=args.layers, state_size=16)
    bridge, _, pooling = args.bridge.partition("-")
    config = MambaVLMConfig(
        vision_config=vision,
        text_config=text,
        bridge_type=bridge,
        bridge_pooling=pooling or "avg",
        max_visual_tokens=args.budget,
        slice_position_embedding=True,
        study_depth_tokens=args.depth_tokens if bridge == "mlp" else 1,
        qformer_config={"num_hidden_layers": 2, "hidden_size": 256, "num_attention_heads": 4, "intermediate_size": 512}
        if bridge == "qformer"
        else None,
        image_token_id=599,
    )
    model = MambaVLMForConditionalGeneration(config)
    model.vision_tower.requires_grad_(False)  # cached features: the tower is not run
    model.train()
    s, b = args.num_slices, args.batch
    seq = args.budget + args.text_tokens
    input_ids = torch.randint(1, 500, (b, seq))
    input_ids[:, 4 : 4 + args.budget] = 599
    labels = input_ids.clone()
    labels[:, : 4 + args.budget] = -100
    batch = {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "labels": labels,
        "vision_features": torch.randn(b * s, args.patches, args.vision_dim),
        "slice_counts": torch.full((b,), s, dtype=torch.long),
        "slice_z": ((torch.arange(s) + 0.5) / s).repeat(b),
    }
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    before = _rss_kb("VmRSS")
    walls, cpus = [], []
    for step in range(args.warmup + args.steps):
        wall, cpu = time.perf_counter(), time.process_time()
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= args.warmup:
            walls.append(time.perf_counter() - wall)
            cpus.append(time.process_time() - cpu)
    return {
        "bridge": args.bridge,
        "S": s,
        "wall_ms": 1000 * statistics.median(walls),
        "cpu_ms": 1000 * statistics.median(cpus),
        "peak_mb": (_rss_kb("VmHWM") - before) / 1024,
        "rss_mb": _rss_kb("VmHWM") / 1024,
        "features_mb": batch["vision_features"].numel() * 4 / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--slices", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--bridges", nargs="+", default=["mlp", "mlp-attention", "qformer"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--vision_dim", type=int, default=1024)
    parser.add_argument("--patches", type=int, default=256)
    parser.add_argument("--budget", type=int, default=64)
    parser.add_argument("--depth_tokens", type=int, default=4)
    parser.add_argument("--text_tokens", type=int, default=96)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--bridge", default="mlp", help=argparse.SUPPRESS)
    parser.add_argument("--num_slices", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args)))
        return
    passed = [a for a in sys.argv[1:]]
    results = []
    for bridge in args.bridges:
        for s in args.slices:
            out = subprocess.run(
                [sys.executable, __file__, *passed, "--one", "--bridge", bridge, "--num_slices", str(s)],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            results.append(json.loads(out.strip().splitlines()[-1]))
            print(f"  done {bridge} S={s}", file=sys.stderr)
    print(
        f"batch {args.batch} studies, P={args.patches} patches x Dv={args.vision_dim} per slice (cached), "
        f"{args.budget} study tokens + {args.text_tokens} text tokens, Mamba d={args.hidden} x {args.layers}, "
        f"{args.threads} thread(s)"
    )
    print(
        f"{'bridge':<14}{'S':>4}{'features MB':>13}{'wall ms':>10}{'cpu ms':>9}{'cpu vs S=1':>12}"
        f"{'peak MB':>10}{'peak vs S=1':>13}"
    )
    for r in results:
        base = next(x for x in results if x["bridge"] == r["bridge"] and x["S"] == min(args.slices))
        print(
            f"{r['bridge']:<14}{r['S']:>4}{r['features_mb']:>13.1f}{r['wall_ms']:>10.1f}{r['cpu_ms']:>9.1f}"
            f"{r['cpu_ms'] / base['cpu_ms']:>11.2f}x{r['peak_mb']:>10.1f}{r['peak_mb'] / max(base['peak_mb'], 1e-3):>12.2f}x"  # noqa: E501
        )


if __name__ == "__main__":
    main()

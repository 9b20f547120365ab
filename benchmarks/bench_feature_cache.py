"""Benchmark: bridge training per epoch with cached vs uncached vision features (issue 6).

Stage 1 ("align") trains only the bridge: the vision tower and the Mamba LLM are frozen, yet
without the cache every epoch decodes every image, runs the image processor and the whole
tower again. Here the tower dominates, as it does with CLIP-L: a ViT of hidden 384 x 6
layers at 224 px (196 patches) in front of the tiny Mamba LLM (hidden 128 x 2 layers).

Both modes start from the same bridge weights and optimizer state and see the same batches
in the same order, so their first-epoch losses must agree (printed as a sanity check).
Times are the wall time and the process CPU time of one epoch (torch threads = --threads;
CPU time ignores waiting for a core that other jobs hold, wall time does not). The one-off
`precompute` time is reported separately. PASS when the CPU-time ratio >= --target.

Usage: python benchmarks/bench_feature_cache.py [--rows 32] [--batch-size 8] [--epochs 2]
       [--threads 1] [--target 3.0]
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from transformers import ViTConfig, ViTImageProcessorPil  # noqa: E402

from hf_vlm import MambaVLMConfig, MambaVLMForConditionalGeneration, MambaVLMProcessor  # noqa: E402
from hf_vlm.data.collator import DataCollatorForMambaVLM  # noqa: E402
from hf_vlm.data.dataset import load_caption_dataset  # noqa: E402
from hf_vlm.data.encoding import EncodeCaptionRows  # noqa: E402
from hf_vlm.data.feature_cache import VisionFeatureCache  # noqa: E402
from hf_vlm.presets import tiny_text_config  # noqa: E402
from hf_vlm.synthetic import DEFAULT_PROMPT, draw_facts, make_synthetic_dataset, write_report  # noqa: E402
from hf_vlm.tokenization import train_report_tokenizer  # noqa: E402

IMAGE_SIZE = 224


def build(root: str, rows: int):
    """Synthetic 224-px CT rows, a ViT-384x6 tower and the tiny Mamba LLM, both frozen."""
    rng = random.Random(0)
    tokenizer = train_report_tokenizer(
        [write_report(draw_facts(rng), rng) for _ in range(300)] + [DEFAULT_PROMPT + "\n"] * 20, vocab_size=600
    )
    processor = MambaVLMProcessor(
        ViTImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}), tokenizer, max_visual_tokens=16
    )
    vision = ViTConfig(
        hidden_size=384,
        num_hidden_layers=6,
        num_attention_heads=6,
        intermediate_size=1536,
        image_size=IMAGE_SIZE,
        patch_size=16,
    )
    config = MambaVLMConfig(
        vision_config=vision,
        max_visual_tokens=16,
        image_token_id=processor.image_token_id,
        text_config=tiny_text_config(len(tokenizer), "tiny", pad_token_id=tokenizer.pad_token_id),
    )
    torch.manual_seed(0)
    model = MambaVLMForConditionalGeneration(config)
    model.vision_tower.requires_grad_(False)
    model.language_model.requires_grad_(False)
    dataset = load_caption_dataset(make_synthetic_dataset(os.path.join(root, "data"), rows, image_size=IMAGE_SIZE))
    counts = {
        name: sum(p.numel() for p in getattr(model, name).parameters()) / 1e6
        for name in ("vision_tower", "bridge", "language_model")
    }
    print("parameters (M): " + ", ".join(f"{k} {v:.2f}" for k, v in counts.items()))
    return model, processor, dataset


def run_epoch(model, loader, optimizer) -> tuple[float, float, float]:
    """One training epoch of the bridge; returns (wall s, CPU s, mean loss)."""
    model.train()
    losses = []
    wall, cpu = time.perf_counter(), time.process_time()
    for batch in loader:
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach().item())
    return time.perf_counter() - wall, time.process_time() - cpu, sum(losses) / len(losses)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=2, help="epochs timed per mode")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--target", type=float, default=3.0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    try:
        from hf_vlm.ops import install_fast_scan

        print("scan backend:", install_fast_scan())
    except Exception as e:  # the ops module is optional for this comparison
        print(f"scan backend: transformers reference ({type(e).__name__}: {e})")

    with tempfile.TemporaryDirectory() as root:
        model, processor, dataset = build(root, args.rows)
        collator = DataCollatorForMambaVLM(processor.tokenizer.pad_token_id, log_first_example=False)
        initial = {k: v.clone() for k, v in model.bridge.state_dict().items()}
        cache = VisionFeatureCache(os.path.join(root, "cache"), model, processor)
        results = {}
        for mode in ("uncached", "cached"):
            if mode == "cached":
                wall, cpu = time.perf_counter(), time.process_time()
                cache.precompute(dataset, batch_size=args.batch_size, progress=False)
                results["precompute"] = [(time.perf_counter() - wall, time.process_time() - cpu, float("nan"))]
            transform = cache.transform() if mode == "cached" else EncodeCaptionRows(processor)
            loader = DataLoader(dataset.with_transform(transform), batch_size=args.batch_size, collate_fn=collator)
            model.bridge.load_state_dict(initial)
            optimizer = torch.optim.AdamW(model.bridge.parameters(), lr=1e-4)
            results[mode] = [run_epoch(model, loader, optimizer) for _ in range(args.epochs)]

    print(
        f"\n{args.rows} rows, batch {args.batch_size}, {args.threads} thread(s), ViT-384x6 @ {IMAGE_SIZE}px "
        "+ Mamba 128x2, bridge trained\n"
    )
    print("| mode | epoch | wall s | CPU s | mean loss |\n|---|---:|---:|---:|---:|")
    for mode in ("uncached", "precompute", "cached"):
        for i, (wall, cpu, loss) in enumerate(results[mode], 1):
            label = "one-off" if mode == "precompute" else str(i)
            print(f"| {mode} | {label} | {wall:.2f} | {cpu:.2f} | {loss:.4f} |")
    best = {m: (min(r[0] for r in results[m]), min(r[1] for r in results[m])) for m in ("uncached", "cached")}
    wall_ratio, cpu_ratio = (best["uncached"][i] / best["cached"][i] for i in (0, 1))
    loss_gap = abs(results["uncached"][0][2] - results["cached"][0][2])
    print(
        f"\nspeed-up (best epoch, uncached / cached): CPU time {cpu_ratio:.1f}x, wall time {wall_ratio:.1f}x; "
        f"first-epoch loss gap {loss_gap:.2e}"
    )
    verdict = cpu_ratio >= args.target and loss_gap < 1e-3
    print(f"{'PASS' if verdict else 'FAIL'}: target >= {args.target:.1f}x (CPU time), equal first-epoch loss")
    return 0 if verdict else 1


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark: generation speed vs report length, with and without Mamba's recurrent cache (issue 6).

With the cache (`use_cache=True`, the default) the image and prompt are consumed once and
each new token is one recurrent step over a fixed-size state, so the cost per token must
not grow with the length of the report. The baseline, `use_cache=False`, re-runs the whole
sequence (image included) for every new token, so its cost per token grows linearly and
its total quadratically. Same model, same image and prompt, greedy decoding, exactly N new
tokens (`min_new_tokens = max_new_tokens`), batch 1.

Reported per (mode, N): best-of-`--reps` wall and CPU seconds, tokens/s, ms per token, and
for the cache the marginal ms/token between successive lengths (prefill excluded). CPU time
(torch threads = --threads) ignores waiting for a core held by other jobs; wall does not.

Usage: python benchmarks/bench_generation.py [--lengths 32 128 512] [--reps 2] [--threads 1]
       [--no-cache-max 512]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
from _tiny_vlm import build_tiny_vlm  # noqa: E402

from hf_vlm.synthetic import draw_facts, render_slice  # noqa: E402


def build(hidden: int, layers: int):
    """Tiny ViT (64 px) + 16 visual tokens + a Mamba LLM of `hidden` x `layers`, and one prompt."""
    rng = random.Random(0)
    model, processor, _ = build_tiny_vlm(hidden, layers, rng)
    size = model.config.vision_config.image_size
    inputs = processor(images=[[render_slice(draw_facts(rng), size, rng)]], text=[None])
    return model.eval(), processor, inputs


def timed_generate(model, inputs, new_tokens: int, use_cache: bool, pad_id: int):
    wall, cpu = time.perf_counter(), time.process_time()
    with torch.no_grad():
        out = model.generate(
            **inputs,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            use_cache=use_cache,
            pad_token_id=pad_id,
        )
    return time.perf_counter() - wall, time.process_time() - cpu, out[0, inputs["input_ids"].shape[1] :]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[32, 128, 512])
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--no-cache-max", type=int, default=512, help="skip the baseline above this length")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    try:
        from hf_vlm.ops import install_fast_scan

        print("scan backend (prefill / no-cache forward):", install_fast_scan())
    except Exception as e:
        print(f"scan backend: transformers reference ({type(e).__name__}: {e})")
    model, processor, inputs = build(args.hidden, args.layers)
    pad = processor.tokenizer.pad_token_id
    prompt_len = inputs["input_ids"].shape[1]
    timed_generate(model, inputs, 4, True, pad)  # warm-up

    rows, tokens = [], {}
    for use_cache in (True, False):
        for n in args.lengths:
            if not use_cache and n > args.no_cache_max:
                continue
            runs = [timed_generate(model, inputs, n, use_cache, pad) for _ in range(args.reps)]
            wall, cpu = min(r[0] for r in runs), min(r[1] for r in runs)
            tokens[(use_cache, n)] = runs[0][2]
            rows.append((use_cache, n, wall, cpu, [r[0] for r in runs]))

    print(
        f"\nMamba {args.hidden}x{args.layers} + ViT-64x2 (16 visual tokens), prompt {prompt_len} tokens, batch 1, "
        f"greedy, {args.threads} thread(s), best of {args.reps}\n"
    )
    print("| cache | new tokens | wall s (runs) | CPU s | tokens/s (CPU) | ms/token (CPU) | marginal ms/token (CPU) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    previous = {}
    for use_cache, n, wall, cpu, walls in rows:
        marginal = ""
        if use_cache in previous:
            n0, cpu0 = previous[use_cache]
            marginal = f"{1000 * (cpu - cpu0) / (n - n0):.2f}"
        previous[use_cache] = (n, cpu)
        runs = ", ".join(f"{w:.2f}" for w in walls)
        print(
            f"| {'yes' if use_cache else 'no'} | {n} | {wall:.2f} ({runs}) | {cpu:.2f} | {n / cpu:.0f} | "
            f"{1000 * cpu / n:.2f} | {marginal} |"
        )
    by_mode = {c: {n: cpu for uc, n, _, cpu, _ in rows if uc == c} for c in (True, False)}
    for c, label in ((True, "with cache"), (False, "without cache")):
        lengths = sorted(by_mode[c])
        if len(lengths) >= 2:
            lo, hi = lengths[0], lengths[-1]
            growth = (by_mode[c][hi] / hi) / (by_mode[c][lo] / lo)
            print(f"{label}: ms/token at {hi} / ms/token at {lo} = {growth:.2f}x")
    shared = [n for n in args.lengths if (True, n) in tokens and (False, n) in tokens]
    for n in shared:
        same = (tokens[(True, n)] == tokens[(False, n)]).float().mean().item()
        print(f"greedy tokens identical with and without cache at N={n}: {same:.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

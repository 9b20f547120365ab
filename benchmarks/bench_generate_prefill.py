"""Benchmark: `hf-vlm generate` prefill (image + prompt = 608 tokens) before/after issue 9, same run.

Before issue 9 the fast scan was only installed inside `hf-vlm train` / `preflight` / `doctor`:
`hf-vlm generate`, `serve`, `eval` and a user's own loop ran transformers' sequential scan.
Now every MambaVLM model routes its Mamba layers through the ladder (hf_vlm.ops.kernels).

"before" = routing off (`set_scan_scope("off")`, what HF_VLM_FAST_SCAN=0 gives: transformers'
path); "after" = the default. Same checkpoint, loaded the way `hf-vlm generate` loads it
(`hf_vlm.inference.load_for_inference`), same study and prompt, one new token, greedy, batch 1:
the time is the prefill. The model is tiny but not toy: a 4-layer d_model=768 Mamba (as in
bench_scan.py) behind a small ViT, 96 visual tokens + a 512-token prompt.

Usage: python benchmarks/bench_generate_prefill.py [--reps 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
from transformers import MambaConfig, ViTConfig, ViTImageProcessorPil  # noqa: E402

from hf_vlm import MambaVLMConfig, MambaVLMForConditionalGeneration, MambaVLMProcessor  # noqa: E402
from hf_vlm.inference import generate_batch, load_for_inference  # noqa: E402
from hf_vlm.ops import backend_usage, reset_backend_usage, set_scan_scope  # noqa: E402
from hf_vlm.synthetic import DEFAULT_PROMPT, draw_facts, render_slice, write_report  # noqa: E402
from hf_vlm.tokenization import train_report_tokenizer  # noqa: E402

VISUAL_TOKENS, PROMPT_TOKENS = 96, 512


def build_checkpoint(path: str) -> tuple[str, object]:
    rng = random.Random(0)
    reports = [write_report(draw_facts(rng), rng) for _ in range(300)]
    tokenizer = train_report_tokenizer(reports + [DEFAULT_PROMPT + "\n"] * 20, vocab_size=600)
    vision = ViTConfig(
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=256,
        image_size=160,
        patch_size=16,
    )  # 100 patches -> 96 visual tokens
    processor = MambaVLMProcessor(
        ViTImageProcessorPil(size={"height": 160, "width": 160}), tokenizer, max_visual_tokens=VISUAL_TOKENS
    )
    text = MambaConfig(
        vocab_size=len(tokenizer),
        hidden_size=768,
        num_hidden_layers=4,
        state_size=16,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = MambaVLMForConditionalGeneration(
        MambaVLMConfig(
            vision_config=vision,
            text_config=text,
            max_visual_tokens=VISUAL_TOKENS,
            image_token_id=processor.image_token_id,
        )
    )
    model.save_pretrained(path)
    processor.save_pretrained(path)
    # a prompt of about PROMPT_TOKENS tokens: report text the tokenizer knows
    prompt = ""
    while len(processor.tokenize_prompt(prompt + "。", 1)) <= VISUAL_TOKENS + PROMPT_TOKENS:
        prompt += rng.choice(reports) if len(processor.tokenize_prompt(prompt, 1)) < 560 else "。"
    return prompt, render_slice(draw_facts(rng), 160, rng)


def timed(model, processor, image, prompt):
    wall, cpu = time.perf_counter(), time.process_time()
    generate_batch(model, processor, [[image]], [prompt], max_new_tokens=1, min_new_tokens=1)
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        prompt, image = build_checkpoint(tmp)
        model, processor, _ = load_for_inference(tmp, device="cpu")
        length = processor(images=[[image]], text=[prompt])["input_ids"].shape[1]
        results = {}
        for label, scope in (("before (transformers' scan)", "off"), ("after (hf_vlm default)", "hf_vlm")):
            set_scan_scope(scope)
            timed(model, processor, image, prompt)  # warm-up
            reset_backend_usage()
            runs = [timed(model, processor, image, prompt) for _ in range(args.reps)]
            used = backend_usage()
            results[label] = (min(r[0] for r in runs), min(r[1] for r in runs), [r[0] for r in runs], used)
    print(
        f"\n`hf-vlm generate` prefill: Mamba 768x4 + ViT-160/16, {length} tokens "
        f"({VISUAL_TOKENS} visual + prompt), batch 1, 1 new token, {args.threads} thread(s), best of {args.reps}\n"
    )
    print("| scan | backend calls | wall s (runs) | CPU s |")
    print("|---|---|---:|---:|")
    for label, (wall, cpu, walls, used) in results.items():
        calls = ", ".join(f"{k} x{v}" for k, v in sorted(used.items())) or "-"
        print(f"| {label} | {calls} | {wall:.3f} ({', '.join(f'{w:.3f}' for w in walls)}) | {cpu:.3f} |")
    (_, before, *_), (_, after, *_) = results.values()
    print(f"\nspeed-up of the prefill (CPU time): {before / after:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())

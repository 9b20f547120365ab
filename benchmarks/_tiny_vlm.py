"""Shared by the generation, training-step and probe-overhead benchmarks: a tiny ViT + a Mamba LLM of
chosen size, a batch of encoded rows, and a step clock.

The tokenizer is trained locally on synthetic reports (no network); the vision tower is the
`tiny` preset (64 px, 16 visual tokens), so the LLM width/depth is what the benchmarks vary.
"""

from __future__ import annotations

import random
import time

import torch
from transformers import MambaConfig, TrainerCallback, ViTImageProcessorPil

from hf_vlm import MambaVLMConfig, MambaVLMForConditionalGeneration, MambaVLMProcessor
from hf_vlm.presets import tiny_vision_config
from hf_vlm.synthetic import DEFAULT_PROMPT, draw_facts, render_slice, write_report
from hf_vlm.tokenization import train_report_tokenizer


def build_tiny_vlm(hidden: int, layers: int, rng: random.Random):
    """(model, processor, reports): `reports` are the synthetic texts the tokenizer was trained on."""
    reports = [write_report(draw_facts(rng), rng) for _ in range(300)]
    tokenizer = train_report_tokenizer(reports + [DEFAULT_PROMPT + "\n"] * 20, vocab_size=600)
    vision = tiny_vision_config("tiny")
    processor = MambaVLMProcessor(
        ViTImageProcessorPil(size={"height": vision.image_size, "width": vision.image_size}),
        tokenizer,
        max_visual_tokens=16,
    )
    text = MambaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        num_hidden_layers=layers,
        state_size=16,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = MambaVLMForConditionalGeneration(
        MambaVLMConfig(
            vision_config=vision, text_config=text, max_visual_tokens=16, image_token_id=processor.image_token_id
        )
    )
    return model, processor, reports


BATCH = 4


class StepClock(TrainerCallback):
    """Wall and CPU timestamps at every step end."""

    def __init__(self):
        self.marks = []

    def on_step_end(self, args, state, control, **kwargs):
        self.marks.append((time.perf_counter(), time.process_time()))


def build_training_rows(hidden: int, layers: int):
    """`build_tiny_vlm` (seed 0) and BATCH encoded training rows of 8 reports each."""
    rng = random.Random(0)
    model, processor, reports = build_tiny_vlm(hidden, layers, rng)
    size = model.config.vision_config.image_size
    rows = [
        processor.encode_example([render_slice(draw_facts(rng), size, rng)], None, "".join(reports[8 * i : 8 * i + 8]))
        for i in range(BATCH)
    ]
    return model, processor, rows

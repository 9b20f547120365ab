"""Batched report generation shared by the demo, evaluation and `hf-vlm generate`.

Prompts are left-padded (the processor does it) so that new tokens follow every prompt
directly; padded positions are zeroed inside the Mamba mixer, so a batched greedy decode
gives the same tokens as decoding each image alone (tested).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm


@torch.no_grad()
def generate_reports(
    model,
    processor,
    images: Sequence[Sequence],
    prompts: Sequence[str | None] | None = None,
    batch_size: int = 8,
    progress: bool = False,
    **generate_kwargs,
) -> list[str]:
    """Generate one report per entry of `images` (each entry: the list of images of one study)."""
    prompts = list(prompts) if prompts is not None else [None] * len(images)
    generate_kwargs.setdefault("max_new_tokens", 64)
    generate_kwargs.setdefault("do_sample", False)
    generate_kwargs.setdefault("pad_token_id", processor.tokenizer.pad_token_id)
    generate_kwargs.setdefault("eos_token_id", processor.tokenizer.eos_token_id)
    was_training = model.training
    model.eval()
    reports: list[str] = []
    starts = range(0, len(images), batch_size)
    for start in tqdm(starts, desc="generate", disable=not progress):
        batch_images = [list(group) for group in images[start : start + batch_size]]
        inputs = processor(images=batch_images, text=prompts[start : start + batch_size])
        inputs = {k: v.to(model.device) for k, v in inputs.items()}
        output = model.generate(**inputs, **generate_kwargs)
        reports.extend(processor.batch_decode(output[:, inputs["input_ids"].shape[1] :]))
    model.train(was_training)
    return [r.strip() for r in reports]

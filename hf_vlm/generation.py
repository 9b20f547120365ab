"""Batched report generation shared by the demo, evaluation and `hf-vlm generate`.

A thin batching loop over `hf_vlm.inference.generate_batch`. Prompts are left-padded (the
processor does it) so that new tokens follow every prompt directly; padded positions are
zeroed inside the Mamba mixer, so a batched greedy decode gives the same tokens as decoding
each image alone (tested).
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
    from .inference import generate_batch

    prompts = list(prompts) if prompts is not None else [None] * len(images)
    was_training = model.training
    model.eval()
    reports: list[str] = []
    try:
        for start in tqdm(range(0, len(images), batch_size), desc="generate", disable=not progress):
            stop = start + batch_size
            reports.extend(generate_batch(model, processor, images[start:stop], prompts[start:stop], **generate_kwargs))
    finally:
        model.train(was_training)
    return reports

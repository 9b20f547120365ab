"""Stage 0 for the demo's vision tower: a few hundred steps of lesion marking on synthetic CT slices.

Why: the 3-D demo stands in for a user's pretrained CT encoder with a tiny ViT built from a
config (nothing is downloaded). Left random, that tower reads a single slice well enough (a
VLM given the slice through the nodule learns side / lobe / level, see docs/benchmarks.md),
but across a whole study its features do not single out a 4-20 mm nodule from the anatomy that
changes from slice to slice, and every bridge tried stayed blind. A real CT encoder has seen
lesions before; this stage gives the tiny tower that prior, and nothing more: it learns to
mark, per patch, where a nodule is on ONE slice (targets from the generator: each study drawn
again without its nodule, same noise, the difference is the lesion). It never sees a report,
a side, a lobe, a size or a level; reading those off the whole study is left to the bridge and
the LM, as in a real run. The slices go through the demo recipe's own preprocessing
(`load_study`'s settings), so the tower is trained on what it will encode.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch import nn

logger = logging.getLogger(__name__)

LESION_DELTA = 0.05  # a pixel whose windowed value the nodule changed by more than this is lesion
NUM_TRAINING_STUDIES = 200  # slices of this many training studies (every lung slice) train the tower


def lesion_slices(settings, num_studies: int, seed: int, image_size: int):
    """(pixels (N, C, H, W), lesion masks (N, H, W) bool) for every lung slice of `num_studies` studies,
    drawn as `make_synthetic_studies` draws them (seed, i) and preprocessed with `settings`."""
    from .data.studies import preprocess_volume
    from .synthetic_volumes import draw_study

    pixels, masks = [], []
    for i in range(num_studies):
        volume, affine, _ = draw_study(np.random.default_rng([seed, i]), size=image_size)
        clean, _, _ = draw_study(np.random.default_rng([seed, i]), size=image_size, with_nodule=False)
        study = preprocess_volume(volume, affine, settings)
        empty = preprocess_volume(clean, affine, settings)
        pixels.append(study.pixels)
        masks.append((study.pixels - empty.pixels).abs().amax(1) > LESION_DELTA)
    return torch.cat(pixels), torch.cat(masks)


def patch_targets(masks: torch.Tensor, grid: int) -> torch.Tensor:
    """(N, H, W) bool -> (N, grid * grid) share of each ViT patch (row-major, as the ViT orders them)
    that is lesion; `grid` = image_size // patch_size of the tower."""
    return nn.functional.adaptive_avg_pool2d(masks[:, None].float(), grid).flatten(1)


def patch_auc(scores: torch.Tensor, targets: torch.Tensor) -> float:
    """Area under the ROC curve of patch scores: lesion patches (share > 0.25) against lesion-free ones
    (0.5 = no better than chance, 1 = every lesion patch above every clean one)."""
    keep = (targets > 0.25) | (targets == 0)
    scores, positive = scores[keep], targets[keep] > 0.25
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = scores.argsort().argsort().double() + 1  # ties are rare for float logits
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def pretrain_lesion_tower(
    tower,
    settings,
    *,
    image_mean,
    image_std,
    seed: int = 0,
    steps: int = 300,
    batch_size: int = 64,
    feature_layer: int = -2,
    num_studies: int = NUM_TRAINING_STUDIES,
) -> dict:
    """Train `tower` (a transformers ViTModel) in place to mark lesion patches at `feature_layer`
    (the layer the VLM reads); returns the final loss and the held-out `patch_auc`. `image_mean` /
    `image_std`: the per-channel normalisation of the image processor the VLM will use."""
    cfg = tower.config
    generator = torch.Generator().manual_seed(seed)
    pixels, masks = lesion_slices(settings, num_studies, seed=seed + 7919, image_size=cfg.image_size)
    targets = patch_targets(masks, cfg.image_size // cfg.patch_size)
    if pixels.shape[-1] != cfg.image_size:  # as the image processor resizes the slices for the tower
        pixels = nn.functional.interpolate(pixels, size=cfg.image_size, mode="bilinear", antialias=True)
    positive = (targets.amax(1) > 0).nonzero().flatten()
    split = int(0.9 * len(pixels))
    head = nn.Linear(cfg.hidden_size, 1)
    optimizer = torch.optim.AdamW(list(tower.parameters()) + list(head.parameters()), lr=1e-3, weight_decay=0.0)
    mean, std = (torch.tensor(v, dtype=torch.float32).view(1, -1, 1, 1) for v in (image_mean, image_std))

    def logits(batch):
        hidden = tower(pixel_values=(batch - mean) / std, output_hidden_states=True).hidden_states[feature_layer]
        return head(hidden[:, 1:]).squeeze(-1)  # patch tokens (the VLM drops CLS too)

    tower.train()
    train_pos = positive[positive < split]
    loss = torch.tensor(float("nan"))
    for _ in range(steps):  # half the batch holds a nodule: most slices do not
        idx = torch.cat(
            [
                train_pos[torch.randint(len(train_pos), (batch_size // 2,), generator=generator)],
                torch.randint(split, (batch_size - batch_size // 2,), generator=generator),
            ]
        )
        loss = nn.functional.binary_cross_entropy_with_logits(logits(pixels[idx]), targets[idx])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    tower.eval()
    with torch.no_grad():
        scores = torch.cat([logits(chunk) for chunk in pixels[split:].split(256)])
    stats = {"loss": float(loss.detach()), "held_out_patch_auc": patch_auc(scores, targets[split:])}
    logger.info("Stage 0 (vision, %d steps on %d slices): %s", steps, split, stats)
    return stats


__all__ = ["lesion_slices", "patch_auc", "patch_targets", "pretrain_lesion_tower"]

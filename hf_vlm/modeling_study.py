"""Study encoder: S slices x P patches of one CT study -> exactly `max_visual_tokens` tokens.

Why: a report describes a whole study, and a nodule in the upper lobe is rarely on the middle
slice; feeding N slices as N images of `max_visual_tokens` each overflows the sequence (8 x 96
tokens > the recipes' 608). Here the 2-D tower encodes every selected slice on its own (frozen
by default, so the vision feature cache stores one `(P, Dv)` entry per slice), a learned
slice-position embedding of the relative z tells the bridge where each slice lies, and the
bridge turns the whole study into one fixed budget, whatever S is:

* `mlp`: 3-D adaptive pooling over (z, h, w) to `study_depth_tokens` z bins x a square in-plane
  grid (`max_visual_tokens / study_depth_tokens` tokens per bin), plus the mean position
  embedding of each bin's slices, then the bridge's MLP. The embedding is added AFTER pooling
  (for avg pooling the same as before it): the frozen features then need no backward pass, so a
  32-slice step costs little more than a one-slice step (benchmarks/bench_study_step.py). With
  `bridge_pooling: attention` each box is a learned weighted mean of its patches (feature +
  embedding): what finds a one-slice nodule among S x P patches (the 3-D demo's setting);
* `qformer`: the learned queries cross-attend over the patches of all S slices at once (each
  patch feature plus its slice's embedding).

One `<image>` placeholder per study, so the count check and the collator are unchanged. A 2-D
image is a study of one slice at z = 0.5; a model without a slice-position embedding and with
one depth bin (every checkpoint from before studies) takes exactly the old 2-D path, so its
logits do not change. See docs/architecture.md ("Studies").

Batch layout: `pixel_values` / `vision_features` hold the slices of all studies one after the
other (`(sum S, ...)`), `slice_counts` `(B,)` says how many belong to each study and `slice_z`
`(sum S,)` their relative z. Studies with the same S are encoded together (no padding, so a
batch gives the same tokens as one-by-one calls).

The bridge modules live in `bridges.py`; this module only arranges their input. The position
embedding is registered as `bridge.slice_position`, so the freeze policy, the LR groups and the
checkpoint treat it as part of the bridge.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .bridges import pool_tokens

POSITION_FREQUENCIES = 8  # sin/cos of z * pi * 2^k, k < 8: resolves 1/256 of the study extent
SINGLE_SLICE_Z = 0.5  # relative z of a 2-D image (the centre of a one-slice extent)


class SlicePositionEmbedding(nn.Module):
    """Relative z in [0, 1] -> a `(Dv,)` vector added to every patch feature of that slice.

    Fourier features then a learned linear map: smooth in z (neighbouring slices get similar
    vectors) and defined for any S, so a model trained on 32 slices also takes 7 or 1.
    """

    def __init__(self, vision_dim: int, num_frequencies: int = POSITION_FREQUENCIES):
        super().__init__()
        self.num_frequencies = num_frequencies
        self.proj = nn.Linear(2 * num_frequencies, vision_dim)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        # computed, not a buffer: nothing to go missing when a checkpoint is loaded on the meta device
        freqs = math.pi * 2.0 ** torch.arange(self.num_frequencies, device=z.device, dtype=torch.float32)
        angles = z.float()[:, None] * freqs  # (N, F)
        features = torch.cat([angles.sin(), angles.cos()], dim=-1).to(self.proj.weight.dtype)
        return self.proj(features)  # (N, Dv)


def _z_bins(num_slices: int, depth_tokens: int) -> list[tuple[int, int]]:
    """[start, stop) slice range of each z bin, as torch's adaptive pooling draws them."""
    return [((i * num_slices) // depth_tokens, -((-(i + 1) * num_slices) // depth_tokens)) for i in range(depth_tokens)]


def pool_study_tokens(features: torch.Tensor, num_tokens: int, depth_tokens: int, mode: str = "avg") -> torch.Tensor:
    """`(n, S, P, D)` slices of n studies -> `(n, num_tokens, D)`, z-major (bin 0 = most inferior).

    3-D adaptive pooling over (z, h, w), computed separably (exact for avg and max: a pooling box
    is a z range x an in-plane cell): z first, by reducing contiguous slice ranges (one pass over
    the S slices, no transposed copy of them), then each bin's patch grid as in `pool_tokens`
    (2-D for a square grid and square per-bin budget, else 1-D). S < depth_tokens repeats slices,
    so S = 1 still gives the full budget.
    """
    n, s, p, d = features.shape
    reduce = (lambda x: x.mean(1)) if mode == "avg" else (lambda x: x.amax(1))
    by_z = torch.stack([reduce(features[:, a:b]) for a, b in _z_bins(s, depth_tokens)], dim=1)  # (n, Tz, P, D)
    per_bin = num_tokens // depth_tokens
    return pool_tokens(by_z.reshape(n * depth_tokens, p, d), per_bin, mode).reshape(n, num_tokens, d)


def pool_study_positions(positions: torch.Tensor, num_tokens: int, depth_tokens: int) -> torch.Tensor:
    """`(n, S, Dv)` slice embeddings -> `(n, num_tokens, Dv)`: each z bin gets the mean embedding of
    its slices, shared by its in-plane tokens (the z bins of `pool_study_tokens`)."""
    n, s, d = positions.shape
    by_bin = F.adaptive_avg_pool1d(positions.transpose(1, 2), depth_tokens).transpose(1, 2)  # (n, Tz, Dv)
    return by_bin.repeat_interleave(num_tokens // depth_tokens, dim=1)


def _pool_study(bridge, group, positions, num_tokens: int, depth: int, mode: str) -> torch.Tensor:
    """`(n, S, P, Dv)` slices (+ `(n, S, Dv)` slice embeddings or None) -> `(n, K, Dv)` for the MLP.

    avg / max: pool the features, then add each bin's mean embedding (frozen features need no
    backward pass). attention: each box's weighted mean of feature + embedding, the weights scored
    on the features, so a token carries the z of the slice it attended to (the nodule's level)."""
    if mode != "attention":
        pooled = pool_study_tokens(group, num_tokens, depth, mode)
        if positions is None:
            return pooled
        return pooled + pool_study_positions(positions, num_tokens, depth).to(pooled.dtype)
    values = group if positions is None else group + positions.to(group.dtype)[:, :, None, :]
    return bridge.attention_pool(group, lambda x: pool_study_tokens(x, num_tokens, depth, "avg"), values=values)


def add_study_modules(model) -> None:
    """Attach the slice-position embedding to `model.bridge` when the config asks for it."""
    config = model.config
    if getattr(config, "slice_position_embedding", False):
        model.bridge.add_module("slice_position", SlicePositionEmbedding(config.vision_config.hidden_size))


def uses_study_encoder(model) -> bool:
    """False for a plain 2-D model (no position embedding, one depth bin): the old path, unchanged."""
    return hasattr(model.bridge, "slice_position") or getattr(model.config, "study_depth_tokens", 1) > 1


def encode_studies(
    model, vision_features: torch.Tensor, slice_counts: torch.Tensor | None = None, slice_z: torch.Tensor | None = None
) -> torch.Tensor:
    """`(sum S, P, Dv)` tower features -> `(B, max_visual_tokens, Dt)`, one row per study.

    Without `slice_counts` every image is a study of one slice (z = 0.5).
    """
    bridge, config = model.bridge, model.config
    total = vision_features.shape[0]
    counts = [1] * total if slice_counts is None else [int(c) for c in slice_counts.tolist()]
    if sum(counts) != total or min(counts, default=1) < 1:
        raise ValueError(
            f"slice_counts {counts} (sum {sum(counts)}) do not match the {total} slices given: each study "
            "needs >= 1 slice; build inputs with MambaVLMProcessor"
        )
    if slice_z is None:
        slice_z = torch.full((total,), SINGLE_SLICE_Z, device=vision_features.device)
    if slice_z.shape[0] != total:
        raise ValueError(f"slice_z has {slice_z.shape[0]} entries for {total} slices")
    position = bridge.slice_position(slice_z.to(vision_features.device)) if hasattr(bridge, "slice_position") else None
    depth = getattr(config, "study_depth_tokens", 1)
    if position is None and depth == 1 and all(c == 1 for c in counts):
        return bridge(vision_features)  # 2-D images into a 2-D model: the bridge's own path, unchanged
    if config.bridge_type != "mlp" and position is not None:
        vision_features = vision_features + position.to(vision_features.dtype)[:, None, :]
    chunks = vision_features.split(counts)
    positions = position.split(counts) if position is not None else None
    by_count: dict[int, list[int]] = {}
    for i, count in enumerate(counts):
        by_count.setdefault(count, []).append(i)
    out: list[torch.Tensor | None] = [None] * len(counts)
    for rows in by_count.values():
        if len(by_count) == 1:  # every study has S slices: a view, no copy of the features
            group = vision_features.reshape(len(counts), counts[0], *vision_features.shape[1:])
        else:
            group = torch.stack([chunks[i] for i in rows])  # (n, S, P, Dv)
        n, s, p, d = group.shape
        if config.bridge_type == "mlp":
            group_positions = torch.stack([positions[i] for i in rows]) if positions is not None else None
            pooled = _pool_study(bridge, group, group_positions, config.max_visual_tokens, depth, config.bridge_pooling)
            encoded = bridge.project(pooled)  # (n, K, Dt)
        else:
            encoded = bridge(group.reshape(n, s * p, d))  # queries attend over all slices' patches
        for i, row in zip(rows, encoded):
            out[i] = row
    return torch.stack(out)


__all__ = [
    "SlicePositionEmbedding",
    "add_study_modules",
    "encode_studies",
    "pool_study_positions",
    "pool_study_tokens",
    "uses_study_encoder",
]

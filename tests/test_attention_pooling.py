"""`hf_vlm.bridges.GatedAttentionPooling` on its own (`bridge_pooling: attention`).

What it must do: start as avg pooling (so switching it on changes nothing until it trains), never
divide 0 by 0, and learn to report the one telling patch of a box, which avg pooling divides by
the box size (the 3-D demo's one-slice nodule). On a study model (= avg at init, fixed budget,
save -> load): tests/test_modeling_study.py.
"""

from __future__ import annotations

import torch

from hf_vlm.bridges import GatedAttentionPooling, pool_tokens
from hf_vlm.modeling_study import pool_study_tokens


def test_untrained_pooler_is_avg_pooling():
    features = torch.randn(3, 64, 8)
    pooler = GatedAttentionPooling(8)
    torch.testing.assert_close(pooler(features, lambda x: pool_tokens(x, 16, "avg")), pool_tokens(features, 16, "avg"))


def test_weights_never_underflow_to_nan():
    pooler = GatedAttentionPooling(4)
    with torch.no_grad():
        pooler.score.weight.fill_(1e4)  # scores thousands apart: exp would underflow to 0 / 0
    features = torch.randn(2, 6, 16, 4) * 10
    pooled = pooler(features, lambda x: pool_study_tokens(x, 16, 4, "avg"))
    assert torch.isfinite(pooled).all()


def _needle_batch(generator, n: int = 64, boxes: int = 4, members: int = 32, dim: int = 8):
    """n rows of `boxes` boxes of `members` noise patches; one patch of one box is a needle whose
    channel 1 carries the label (+-1). The answer: which box, and the sign."""
    x = torch.randn(n, boxes * members, dim, generator=generator) * 0.5
    box = torch.randint(boxes, (n,), generator=generator)
    sign = torch.randint(2, (n,), generator=generator)
    where = box * members + torch.randint(members, (n,), generator=generator)
    x[torch.arange(n), where, 0] = 4.0  # what makes it a needle
    x[torch.arange(n), where, 1] = 4.0 * (2 * sign - 1).float()
    return x, box * 2 + sign


def _train_readout(pooling: str, steps: int = 300) -> float:
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    pooler = GatedAttentionPooling(8) if pooling == "attention" else None
    head = torch.nn.Linear(4 * 8, 8)
    params = list(head.parameters()) + (list(pooler.parameters()) if pooler else [])
    optimizer = torch.optim.Adam(params, lr=1e-2)

    def pooled(x):
        if pooler is None:
            return pool_tokens(x, 4, "avg")
        return pooler(x, lambda t: pool_tokens(t, 4, "avg"))

    for _ in range(steps):
        x, y = _needle_batch(generator)
        loss = torch.nn.functional.cross_entropy(head(pooled(x).flatten(1)), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    x, y = _needle_batch(torch.Generator().manual_seed(99), n=512)
    with torch.no_grad():
        return float((head(pooled(x).flatten(1)).argmax(1) == y).float().mean())


def test_attention_learns_to_find_the_needle_that_avg_pooling_dilutes():
    attention, avg = _train_readout("attention"), _train_readout("avg")
    assert attention > 0.9, attention
    assert attention > avg + 0.2, (attention, avg)

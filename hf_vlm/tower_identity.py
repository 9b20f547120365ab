"""A content hash of the vision tower's weights, so an external tower is verified, not trusted by path.

A checkpoint saved without its frozen tower (`save_frozen_vision_weights: false`) re-loads it from
the recorded folder or hub id. When that folder changes (regenerated assets, another model copied
there, an edited record) the checkpoint would silently produce different reports. So the record
holds `vision_tower_sha256` of the tower the model was trained with, and the re-attach refuses a
tower whose hash differs, naming both.

The hash is over the tensors (name, shape, float32 values in name order), not the files: a
re-saved copy with the same weights matches, and the dtype a tower is loaded in for inference
does not matter when the values are the same. The pooler is left out: the model reads patch
tokens of a hidden layer, never the pooled output, and a tower saved without a pooler gets a
freshly initialised one on every load (the re-attach ignores it for the same reason).
"""

from __future__ import annotations

import hashlib

import torch

TOWER_HASH_KEY = "vision_tower_sha256"


class TowerMismatchError(ValueError):
    """The vision tower found at the recorded source is not the one the checkpoint was trained with."""


@torch.no_grad()
def tower_weights_hash(module: torch.nn.Module) -> str:
    """sha256 over the module's state dict: names, shapes and float32 values, in name order."""
    digest = hashlib.sha256()
    state = module.state_dict()
    for name in sorted(state):
        tensor = state[name]
        if not torch.is_tensor(tensor) or name.startswith("pooler.") or ".pooler." in name:
            continue
        digest.update(name.encode("utf-8"))
        digest.update(str(tuple(tensor.shape)).encode("utf-8"))
        values = tensor.detach().to("cpu", torch.float32).contiguous()
        digest.update(values.numpy().tobytes() if values.numel() < 1 << 20 else memoryview(values.numpy()))
    return digest.hexdigest()


def check_tower_hash(module: torch.nn.Module, recorded: str | None, source: str, checkpoint: str) -> str:
    """Raise `TowerMismatchError` when `module` (loaded from `source`) is not the recorded tower."""
    found = tower_weights_hash(module)
    if recorded and found != recorded:
        raise TowerMismatchError(
            f"{checkpoint} was trained with a vision tower of sha256 {recorded}, but the tower at {source} has "
            f"sha256 {found}: it is a different tower (regenerated or replaced), and the reports would silently "
            "differ. Restore the original tower there, or pass vision_model_name_or_path=<the original tower>."
        )
    return found


__all__ = ["TOWER_HASH_KEY", "TowerMismatchError", "check_tower_hash", "tower_weights_hash"]

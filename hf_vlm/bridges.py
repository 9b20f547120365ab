"""Vision bridges: map vision-tower features to exactly `max_visual_tokens` LLM embeddings.

Two designs, chosen by `config.bridge_type`:

* `mlp` (LLaVA-style): pool the patch grid down to the token budget, then a 2-layer MLP
  into the LLM width. Cheap, and a sensible Stage 1 target.
* `qformer` (BLIP-2 style): `max_visual_tokens` learned queries cross-attend to the
  patch features through transformers' `Blip2QFormerModel`, then a linear projection.

Both return `(num_images, max_visual_tokens, text_hidden_size)` whatever the patch count,
so the processor can expand `<image>` to a fixed number of placeholders.
"""

from __future__ import annotations

import logging
import math
import os

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN
from transformers.models.blip_2.modeling_blip_2 import Blip2QFormerModel

logger = logging.getLogger(__name__)


def pool_tokens(features: torch.Tensor, num_tokens: int, mode: str = "avg") -> torch.Tensor:
    """Pool `(N, P, D)` patch features to `(N, num_tokens, D)`.

    A square patch grid pooled to a square budget keeps the 2-D neighbourhoods (what a
    radiologist's "upper/lower lobe" depends on); anything else falls back to 1-D pooling.
    """
    n, p, d = features.shape
    if p == num_tokens:
        return features
    side, out_side = math.isqrt(p), math.isqrt(num_tokens)
    pool2d = F.adaptive_avg_pool2d if mode == "avg" else F.adaptive_max_pool2d
    pool1d = F.adaptive_avg_pool1d if mode == "avg" else F.adaptive_max_pool1d
    if side * side == p and out_side * out_side == num_tokens:
        grid = features.transpose(1, 2).reshape(n, d, side, side)  # (N, D, S, S)
        return pool2d(grid, out_side).flatten(2).transpose(1, 2)  # (N, K, D)
    return pool1d(features.transpose(1, 2), num_tokens).transpose(1, 2)  # (N, K, D)


class MLPBridge(nn.Module):
    """Pool patch features to the budget, then Linear -> act -> Linear into the LLM width."""

    def __init__(self, config):
        super().__init__()
        vision_dim = config.vision_config.hidden_size
        text_dim = config.text_config.hidden_size
        self.num_tokens = config.max_visual_tokens
        self.pooling = config.bridge_pooling
        self.linear_1 = nn.Linear(vision_dim, text_dim)
        self.act = ACT2FN[config.bridge_hidden_act]
        self.linear_2 = nn.Linear(text_dim, text_dim)

    def forward(self, vision_features: torch.Tensor) -> torch.Tensor:
        pooled = pool_tokens(vision_features, self.num_tokens, self.pooling)  # (N, K, Dv)
        return self.linear_2(self.act(self.linear_1(pooled)))  # (N, K, Dt)


class QFormerBridge(nn.Module):
    """BLIP-2 Q-Former with `max_visual_tokens` learned queries and a projection to the LLM."""

    def __init__(self, config):
        super().__init__()
        qconfig = config.qformer_config
        self.query_tokens = nn.Parameter(torch.zeros(1, config.max_visual_tokens, qconfig.hidden_size))
        nn.init.normal_(self.query_tokens, std=qconfig.initializer_range)
        self.qformer = Blip2QFormerModel(qconfig)
        self.language_projection = nn.Linear(qconfig.hidden_size, config.text_config.hidden_size)

    def forward(self, vision_features: torch.Tensor) -> torch.Tensor:
        queries = self.query_tokens.expand(vision_features.shape[0], -1, -1)  # (N, K, Hq)
        attention = torch.ones(vision_features.shape[:2], dtype=torch.long, device=vision_features.device)
        out = self.qformer(
            query_embeds=queries.to(vision_features.dtype),
            encoder_hidden_states=vision_features,
            encoder_attention_mask=attention,
            return_dict=True,
        ).last_hidden_state  # (N, K, Hq)
        return self.language_projection(out.to(self.language_projection.weight.dtype))  # (N, K, Dt)

    def load_blip2_weights(self, name_or_path: str) -> dict:
        """Initialise from a BLIP-2 checkpoint's `qformer.*` and `query_tokens` tensors.

        Shapes that differ (e.g. cross-attention sized for EVA-ViT-g's 1408 channels when the
        tower here is CLIP-L, or 32 BLIP-2 queries vs our budget) are adapted where that is
        meaningful (queries are resampled) and otherwise skipped and reported, never silently.
        """
        state = _read_checkpoint_tensors(name_or_path, prefixes=("qformer.", "query_tokens"))
        own = self.state_dict()
        loaded, skipped = [], []
        updates = {}
        for key, tensor in state.items():
            if key not in own:
                skipped.append(f"{key} (unexpected)")
                continue
            if key == "query_tokens" and tensor.shape[-1] == own[key].shape[-1] and tensor.shape != own[key].shape:
                tensor = F.interpolate(tensor.transpose(1, 2), size=own[key].shape[1], mode="linear").transpose(1, 2)
            if tensor.shape != own[key].shape:
                skipped.append(f"{key} (shape {tuple(tensor.shape)} vs {tuple(own[key].shape)})")
                continue
            updates[key] = tensor.to(own[key].dtype)
            loaded.append(key)
        self.load_state_dict(updates, strict=False)
        missing = sorted(k for k in own if k.startswith(("qformer.", "query_tokens")) and k not in updates)
        logger.info(
            "Q-Former init from %s: %d tensors loaded, %d skipped, %d left at random init",
            name_or_path, len(loaded), len(skipped), len(missing),
        )
        for item in skipped:
            logger.warning("Q-Former init: skipped %s", item)
        return {"loaded": loaded, "skipped": skipped, "missing": missing}


def _read_checkpoint_tensors(name_or_path: str, prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Read the tensors whose names start with `prefixes` from a (possibly sharded) safetensors checkpoint."""
    from huggingface_hub import snapshot_download
    from safetensors import safe_open

    folder = name_or_path if os.path.isdir(name_or_path) else snapshot_download(name_or_path, allow_patterns=["*.safetensors*"])
    files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"No .safetensors files in {folder!r}; cannot initialise the Q-Former from it")
    tensors = {}
    for name in files:
        with safe_open(os.path.join(folder, name), framework="pt") as handle:
            for key in handle.keys():
                if key.startswith(prefixes):
                    tensors[key] = handle.get_tensor(key)
    if not tensors:
        raise ValueError(f"{name_or_path!r} has no tensors starting with {prefixes}: is it a BLIP-2 checkpoint?")
    return tensors


BRIDGES = {"mlp": MLPBridge, "qformer": QFormerBridge}


def build_bridge(config) -> nn.Module:
    """Instantiate the bridge named by `config.bridge_type` (see `BRIDGES`)."""
    return BRIDGES[config.bridge_type](config)

"""Vision bridges: map vision-tower features to exactly `max_visual_tokens` LLM embeddings.

Two designs, chosen by `config.bridge_type`:

* `mlp` (LLaVA-style): pool the patch grid down to the token budget, then a 2-layer MLP
  into the LLM width. Cheap, and a sensible Stage 1 target. Pooling is `avg`, `max` or
  `attention` (`GatedAttentionPooling`: a learned weighted mean inside each pooling box).
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


ATTENTION_HIDDEN = 128  # width of the gated-attention scorer (Ilse et al. use 128 for 500-d features)
MAX_LOG_WEIGHT_RATIO = 60.0  # weights below exp(-60) of a row's largest are clamped there (no 0/0)


class GatedAttentionPooling(nn.Module):
    """Attention-based multiple-instance pooling (Ilse, Tomczak & Welling, 2018): each patch gets a
    score `w . (tanh(V x) * sigmoid(U x))`, and each pooling box gives the softmax-weighted mean of
    its patches instead of their plain mean.

    Why: in a CT study the finding is a needle - a 4 mm nodule is one patch of one slice among
    S x P - and avg pooling divides it by the box size (the 3-D demo stayed blind with every avg /
    max reduction, docs/architecture.md "Studies"); the learned score lets the box report its most
    telling patch. The score layer starts at zero, so an untrained pooler IS avg pooling.

    `box_mean` is the avg pooling that defines the boxes (2-D `pool_tokens` or the study's 3-D
    pooling): the weighted mean of a box is box_mean(e * x) / box_mean(e), the box size cancels.
    """

    def __init__(self, dim: int, hidden: int = ATTENTION_HIDDEN):
        super().__init__()
        self.attention_v = nn.Linear(dim, hidden)
        self.attention_u = nn.Linear(dim, hidden)
        self.score = nn.Linear(hidden, 1)
        self.score._zero_init = True  # read by MambaVLMPreTrainedModel._init_weights
        nn.init.zeros_(self.score.weight)
        nn.init.zeros_(self.score.bias)

    def weights(self, features: torch.Tensor) -> torch.Tensor:
        """`(n, ..., D)` -> `(n, ..., 1)` float32 unnormalised weights exp(score - row max)."""
        gated = torch.tanh(self.attention_v(features)) * torch.sigmoid(self.attention_u(features))
        scores = self.score(gated).float()
        top = scores.flatten(1).amax(1).view(-1, *([1] * (scores.dim() - 1)))
        return torch.exp((scores - top).clamp(min=-MAX_LOG_WEIGHT_RATIO))

    def forward(self, features: torch.Tensor, box_mean, values: torch.Tensor | None = None) -> torch.Tensor:
        """Weighted mean of `values` (default: `features`) in each box of `box_mean`, scored on `features`."""
        weights = self.weights(features)
        values = features if values is None else values
        return (box_mean(weights * values.float()) / box_mean(weights)).to(values.dtype)


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
        self.attention_pool = GatedAttentionPooling(vision_dim) if self.pooling == "attention" else None

    def pool(self, vision_features: torch.Tensor) -> torch.Tensor:
        """`(N, P, Dv)` -> `(N, K, Dv)` with the configured pooling."""
        if self.attention_pool is None:
            return pool_tokens(vision_features, self.num_tokens, self.pooling)
        return self.attention_pool(vision_features, lambda x: pool_tokens(x, self.num_tokens, "avg"))

    def project(self, pooled: torch.Tensor) -> torch.Tensor:
        """`(N, K, Dv)` pooled features -> `(N, K, Dt)` LLM embeddings."""
        return self.linear_2(self.act(self.linear_1(pooled)))

    def forward(self, vision_features: torch.Tensor) -> torch.Tensor:
        return self.project(self.pool(vision_features))  # (N, K, Dt)


class QFormerBridge(nn.Module):
    """BLIP-2 Q-Former with `max_visual_tokens` learned queries and a projection to the LLM.

    The vision features are layer-normed before the cross-attention. BLIP-2's Q-Former reads the
    output of EVA-ViT's final LayerNorm; here it reads hidden layer `vision_feature_layer` (-2 by
    default), a raw residual stream whose scale depends on the tower and the layer. On the demo's
    tower that stream has std 0.17 and differs between images by only 0.03: through 0.02-std
    key/value projections and near-uniform attention, the image's part of each query's output was
    1e-3 of the query's own part, and the bridge was blind (docs/architecture.md, "Q-Former").

    Near-uniform cross-attention is also a mean pool, and a mean of the patch features carries no
    side or lobe (a linear probe on it: 0.30 side+lobe accuracy, chance 0.31; on the 4x4 grid the
    MLP pools to: 0.95). So each query k starts with an additive attention bias of
    `config.qformer_locality_bias` on the patches of grid cell k (`pool_tokens`' cells): at 4.0
    about 3/4 of its attention sits in its cell at init, the rest stays global, and the
    query/key projections can learn any other pattern. 0 (the default with BLIP-2 weights, whose
    queries were trained without it) leaves BLIP-2's cross-attention unchanged.

    A fresh Q-Former's cross-attention value and output projections start at std 1/sqrt(fan_in)
    instead of BERT's 0.02: at 0.02 the cross-attention branch is ~3% of the (layer-normed, unit
    scale) query residual it is added to, and two images' outputs differed by 0.6% of the output
    std (0.5% with the locality bias); at 1/sqrt(fan_in) by 15%, as for the MLP bridge (23%).
    """

    def __init__(self, config):
        super().__init__()
        qconfig = config.qformer_config
        self.vision_layernorm = nn.LayerNorm(config.vision_config.hidden_size, eps=qconfig.layer_norm_eps)
        self.query_tokens = nn.Parameter(torch.zeros(1, config.max_visual_tokens, qconfig.hidden_size))
        nn.init.normal_(self.query_tokens, std=qconfig.initializer_range)
        self.qformer = Blip2QFormerModel(qconfig)
        self.language_projection = nn.Linear(qconfig.hidden_size, config.text_config.hidden_size)
        if not config.qformer_init_from:
            self._init_fresh_cross_attention()
        self._init_projection(getattr(config.text_config, "initializer_range", 0.02))
        self.locality_bias = float(config.qformer_locality_bias)
        self._bias_cache: dict[tuple, torch.Tensor] = {}
        logger.info(
            "Q-Former bridge: %s, hidden %d, %d heads, intermediate %d, %d layers, cross-attention every %d, "
            "locality bias %g",
            f"BLIP-2 size for weights from {config.qformer_init_from}"
            if config.qformer_init_from
            else "fresh, sized from the vision tower",
            qconfig.hidden_size,
            qconfig.num_attention_heads,
            qconfig.intermediate_size,
            qconfig.num_hidden_layers,
            qconfig.cross_attention_frequency,
            self.locality_bias,
        )

    @torch.no_grad()
    def _init_fresh_cross_attention(self) -> None:
        for name, param in self.qformer.named_parameters():
            if ".crossattention." in name and name.endswith(("value.weight", "output.dense.weight")):
                param.normal_(0.0, param.shape[1] ** -0.5)

    @torch.no_grad()
    def _init_projection(self, text_std: float) -> None:
        """Visual tokens start at the LM's embedding scale. The Q-Former's last LayerNorm makes its
        output unit-scale per channel, so the model-wide Linear init (std `text_std`) gave visual tokens
        of std 0.8 in the tiny preset, 8x the text embeddings (the MLP bridge starts at 0.06)."""
        self.language_projection.weight.normal_(0.0, text_std * self.language_projection.in_features**-0.5)
        self.language_projection.bias.zero_()
        self.language_projection._is_hf_initialized = True  # keep it through the model's post_init

    def locality_mask(self, num_patches: int, device, dtype) -> torch.Tensor:
        """`(1, 1, K, P)` additive cross-attention bias: `locality_bias` on query k's grid cell, 0 elsewhere."""
        key = (num_patches, device, dtype)
        if key not in self._bias_cache:
            cells = pool_tokens(torch.eye(num_patches, device=device).unsqueeze(0), self.query_tokens.shape[1])
            self._bias_cache[key] = (self.locality_bias * (cells > 0)).to(dtype).unsqueeze(1)  # (1, 1, K, P)
        return self._bias_cache[key]

    def forward(self, vision_features: torch.Tensor) -> torch.Tensor:
        features = self.vision_layernorm(vision_features)  # (N, P, Dv), unit scale per token
        n, p = features.shape[:2]
        queries = self.query_tokens.expand(n, -1, -1)  # (N, K, Hq)
        if self.locality_bias:
            # an already prepared 4-D mask is used as-is by the Q-Former (added to every cross-attention's logits)
            dtype = self.qformer.layernorm.weight.dtype  # the Q-Former runs in fp32
            attention = self.locality_mask(p, features.device, dtype).expand(n, -1, -1, -1)
        else:
            attention = torch.ones((n, p), dtype=torch.long, device=features.device)
        out = self.qformer(
            query_embeds=queries.to(features.dtype),
            encoder_hidden_states=features,
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
            name_or_path,
            len(loaded),
            len(skipped),
            len(missing),
        )
        for item in skipped:
            logger.warning("Q-Former init: skipped %s", item)
        return {"loaded": loaded, "skipped": skipped, "missing": missing}


def _read_checkpoint_tensors(name_or_path: str, prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Read the tensors whose names start with `prefixes` from a (possibly sharded) safetensors checkpoint."""
    from huggingface_hub import snapshot_download
    from safetensors import safe_open

    folder = (
        name_or_path
        if os.path.isdir(name_or_path)
        else snapshot_download(name_or_path, allow_patterns=["*.safetensors*"])
    )
    files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"No .safetensors files in {folder!r}; cannot initialise the Q-Former from it")
    tensors = {}
    for name in files:
        with safe_open(os.path.join(folder, name), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 - a safe_open handle is not iterable
                if key.startswith(prefixes):
                    tensors[key] = handle.get_tensor(key)
    if not tensors:
        raise ValueError(f"{name_or_path!r} has no tensors starting with {prefixes}: is it a BLIP-2 checkpoint?")
    return tensors


BRIDGES = {"mlp": MLPBridge, "qformer": QFormerBridge}


def build_bridge(config) -> nn.Module:
    """Instantiate the bridge named by `config.bridge_type` (see `BRIDGES`)."""
    return BRIDGES[config.bridge_type](config)

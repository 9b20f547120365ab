"""Vision feature cache: encode each image once with a frozen vision tower, train from disk.

Why: when the tower is frozen (Stage 1 "align"), every epoch recomputes the same tower output
for every image, and with a CLIP-L-sized tower and a small bridge that is most of the step.
`VisionFeatureCache.precompute(dataset)` stores `model.get_vision_features(pixel_values)`
per row once; `cache.transform()` is a `with_transform` callable that yields
`vision_features` instead of `pixel_values` (the collator concatenates them, the model
skips the tower).

Validity. Entries live under `cache_dir/<fingerprint>/`. The fingerprint hashes every byte
of the tower's state_dict (xxh3, ~GB/s; a sampled hash could miss one changed weight), its
config, `vision_feature_layer`, the select strategy, the image processor config and the
decoding settings (max_slices, CT window; for studies the processor's `StudyPreprocessing`
fingerprint: windows, slice count and sampling, spacing, crop, image size, MONAI version). Studies
store one `(S, P, Dv)` entry per row (one tower output per slice) plus the slices' relative z
under `<key>:z`. Anything changes -> another directory; the old
ones are reported as stale (with what changed), never read. Rows are keyed by their image
paths plus file size and mtime, so a replaced image file is a miss too. The cache refuses a
trainable tower (its features would be stale after one step) and is off when image
augmentation is on (the pixels differ each epoch). Features are computed with the tower in
eval mode, i.e. without dropout, which is what a frozen tower should do.

Storage: safetensors shards (append-only, `shard_rows` rows each) plus `index.json`
(row key -> shard). Chosen over Arrow/`datasets` because safetensors keeps bf16 (Arrow
has no bfloat16: a bf16 tower would need fp32 on disk, twice the size), reads one row
zero-copy through mmap by key without converting nested lists, and a partially filled
cache is extended by adding a shard rather than rewriting a table.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import xxhash
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .dataset import decode_batch
from .encoding import EncodeCaptionRows
from .images import DEFAULT_MAX_SLICES, DEFAULT_WINDOW, split_image_paths

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1


class FeatureCacheMiss(KeyError):
    """A row was asked for that `precompute` has not encoded (under this fingerprint)."""


def row_key(source: str) -> str:
    """Key of one row: its image paths with size and mtime, so an edited file is a miss."""
    entries = []
    for path in split_image_paths(source):
        try:
            stat = os.stat(path)
            entries.append([path, stat.st_size, stat.st_mtime_ns])
        except OSError:  # let the image loader raise the real error later
            entries.append([path, -1, -1])
    return xxhash.xxh3_128_hexdigest(json.dumps(entries).encode())


# Vision-tower parts that only act on the pooled output, never on `hidden_states[vision_feature_layer]`
# (ViT/DINOv2 pooler, CLIP's post_layernorm, SigLIP's attention-pooling head). A tower saved without a
# pooler gets a freshly initialised one on every load: hashing it re-encoded the cache at every stage.
POOLED_OUTPUT_ONLY = frozenset({"pooler", "post_layernorm", "head"})


def hash_state_dict(module: torch.nn.Module, skip: frozenset[str] = frozenset()) -> str:
    """xxh3-128 over names, dtypes, shapes and every byte of every tensor of `module`, except tensors
    outside the encoder layers under a module named in `skip`."""
    digest = xxhash.xxh3_128()
    for name, tensor in sorted(module.state_dict().items()):
        parts = name.split(".")
        if skip.intersection(parts) and not {"layer", "layers"}.intersection(parts):
            continue
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


class ShardStore:
    """Append-only safetensors shards plus a JSON index in one directory; picklable (no handles)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._index: dict[str, str] | None = None
        self._handles: dict = {}

    def __getstate__(self):
        return {"path": self.path, "_index": None, "_handles": {}}

    @property
    def index(self) -> dict[str, str]:
        if self._index is None:
            self.reload()
        return self._index

    def reload(self) -> None:
        index_file = self.path / "index.json"
        self._index = json.loads(index_file.read_text()) if index_file.exists() else {}

    def __contains__(self, key: str) -> bool:
        return key in self.index

    def __len__(self) -> int:
        return len(self.index)

    def get(self, key: str) -> torch.Tensor:
        shard = self.index[key]
        if shard not in self._handles:
            self._handles[shard] = safe_open(str(self.path / shard), framework="pt")
        return self._handles[shard].get_tensor(key)

    def write_shard(self, tensors: dict[str, torch.Tensor]) -> None:
        """Write one shard, then the index (both via rename: a crash leaves the old index valid)."""
        self.reload()
        number = len(set(self._index.values()))
        while (self.path / f"shard-{number:05d}.safetensors").exists():
            number += 1
        name = f"shard-{number:05d}.safetensors"
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(self.path / f"{name}.tmp"))
        os.replace(self.path / f"{name}.tmp", self.path / name)
        self._index.update({key: name for key in tensors})
        (self.path / "index.json.tmp").write_text(json.dumps(self._index))
        os.replace(self.path / "index.json.tmp", self.path / "index.json")


@dataclass
class EncodeCaptionRowsCached:
    """`with_transform` callable like `EncodeCaptionRows`, yielding `vision_features` (no image decode)."""

    processor: object
    store: ShardStore

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        out: dict[str, list] = {"input_ids": [], "prompt_length": [], "vision_features": [], "row_id": []}
        sources = batch.get("image_files") or batch["image_path"]
        for i, source in enumerate(sources):
            key = row_key(source)
            if key not in self.store:
                self.store.reload()  # precompute may have run after this transform was built
            if key not in self.store:
                raise FeatureCacheMiss(
                    f"row_id {batch['row_id'][i] if 'row_id' in batch else i} ({source!r}) is not in the vision "
                    f"feature cache {self.store.path}: run VisionFeatureCache.precompute(dataset) on this dataset "
                    "first (an image file changed since then also counts as new)"
                )
            features = self.store.get(key)  # (n_images or S slices, P, Dv)
            prompt = batch["prompt"][i] if "prompt" in batch else ""
            study = getattr(self.processor, "study_preprocessing", None) is not None
            encoded = self.processor.encode_text(prompt or None, batch["caption"][i], 1 if study else features.shape[0])
            if study:
                out.setdefault("slice_z", []).append(self.store.get(f"{key}:z"))
            out["input_ids"].append(encoded["input_ids"])
            out["prompt_length"].append(encoded["prompt_length"])
            out["vision_features"].append(features)
            out["row_id"].append(int(batch["row_id"][i]) if "row_id" in batch else i)
        return out


class VisionFeatureCache:
    """Pre-computed vision-tower features for a frozen tower, keyed by encoder + preprocessing.

    Args:
        cache_dir: root directory; entries go to `cache_dir/<fingerprint[:16]>/`.
        model: a `MambaVLMForConditionalGeneration` whose `vision_tower` is frozen.
        processor: the `MambaVLMProcessor` (its image processor is part of the fingerprint).
        max_slices, window_center, window_width: decoding settings, as for `EncodeCaptionRows`.
        image_augmentation: True turns the cache off (`transform()` yields pixel values).
        shard_rows: rows per safetensors shard.
    """

    def __init__(
        self,
        cache_dir,
        model,
        processor,
        *,
        max_slices: int = DEFAULT_MAX_SLICES,
        window_center: float | None = DEFAULT_WINDOW[0],
        window_width: float | None = DEFAULT_WINDOW[1],
        image_augmentation: bool = False,
        shard_rows: int = 256,
    ):
        self.model, self.processor, self.shard_rows = model, processor, int(shard_rows)
        self.decode = dict(max_slices=max_slices, window_center=window_center, window_width=window_width)
        self.enabled = not image_augmentation
        if not self.enabled:
            logger.info("Vision feature cache off: image augmentation changes the pixels every epoch")
            return
        self._check_frozen()
        self.description = self._describe()
        payload = json.dumps(self.description, sort_keys=True, default=str)
        self.fingerprint = hashlib.sha256(payload.encode()).hexdigest()
        self.path = Path(cache_dir) / self.fingerprint[:16]
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / "fingerprint.json").write_text(json.dumps(self.description, indent=1, sort_keys=True, default=str))
        self.store = ShardStore(self.path)
        self.stale = self.stale_entries()
        for path, changed in self.stale:
            logger.warning(
                "Stale vision feature cache %s (%s changed since it was written): not used; delete it to free disk",
                path,
                ", ".join(changed) or "format",
            )

    def _check_frozen(self) -> None:
        trainable = [n for n, p in self.model.vision_tower.named_parameters() if p.requires_grad]
        if trainable:
            raise ValueError(
                f"The vision feature cache needs a frozen vision tower, but {len(trainable)} of its parameters are "
                f"trainable (e.g. {trainable[0]!r}): cached features would be stale after the first optimizer step. "
                "Freeze it (unfreeze_vision_tower=False, or model.vision_tower.requires_grad_(False)) or do not use "
                "the cache."
            )

    def _describe(self) -> dict:
        """Everything the cached features depend on (written to fingerprint.json, human-readable)."""
        tower, config = self.model.vision_tower, self.model.config
        return {
            "format": CACHE_FORMAT,
            "encoder_weights": hash_state_dict(tower, skip=POOLED_OUTPUT_ONLY),
            "encoder_dtype": str(next(tower.parameters()).dtype),
            "vision_config": config.vision_config.to_dict(),
            "vision_feature_layer": config.vision_feature_layer,
            "vision_feature_select_strategy": config.vision_feature_select_strategy,
            "image_processor": self.processor.image_processor.to_dict(),
            "decode": self.decode,
            **({"study": settings.fingerprint()} if (settings := self._study_settings()) is not None else {}),
        }

    def _study_settings(self):
        return getattr(self.processor, "study_settings", None)

    def stale_entries(self) -> list[tuple[Path, list[str]]]:
        """Sibling cache directories written for another fingerprint, with the fields that differ."""
        stale = []
        for other in sorted(self.path.parent.iterdir()):
            description_file = other / "fingerprint.json"
            if other == self.path or not description_file.exists():
                continue
            old = json.loads(description_file.read_text())
            mine = json.loads(json.dumps(self.description, default=str))
            stale.append((other, sorted(k for k in set(old) | set(mine) if old.get(k) != mine.get(k))))
        return stale

    def transform(self):
        """`with_transform` callable: cached `vision_features` when on, plain pixel values when off."""
        if not self.enabled:
            return EncodeCaptionRows(self.processor, **self.decode)
        return EncodeCaptionRowsCached(self.processor, self.store)

    @torch.no_grad()
    def precompute(self, dataset, batch_size: int = 16, progress: bool = True) -> dict[str, int]:
        """Encode every row of `dataset` (a caption dataset) not yet cached; returns counts.

        Run it in one process (the main one under DDP): shards are append-only, not locked.
        """
        if not self.enabled:
            logger.info("Vision feature cache off (image augmentation): nothing to precompute")
            return {"cached": 0, "encoded": 0}
        self._check_frozen()
        rows = dataset.with_format(None)  # the raw CSV columns, whatever transform is set
        tower = self.model.vision_tower
        device, was_training = next(tower.parameters()).device, tower.training
        tower.eval()
        stats, pending = {"cached": 0, "encoded": 0}, {}
        try:
            for start in tqdm(range(0, len(rows), batch_size), desc="vision features", disable=not progress):
                batch = rows[start : start + batch_size]
                keys = [row_key(s) for s in (batch.get("image_files") or batch["image_path"])]
                todo = [i for i, k in enumerate(keys) if k not in self.store and k not in pending]
                stats["cached"] += len(keys) - len(todo)
                if not todo:
                    continue
                settings = self._study_settings()
                decoded = decode_batch(
                    {c: [v[i] for i in todo] for c, v in batch.items()},
                    image_root=None,
                    path_map=None,
                    study_settings=settings,
                    **self.decode,
                )
                if settings is not None:  # one study per row: every slice encoded on its own
                    studies = [self.processor.encode_study(ims) for ims in decoded["images"]]
                    pixels = [s["pixel_values"] for s in studies]
                    for i, s in zip(todo, studies):
                        pending[f"{keys[i]}:z"] = s["slice_z"].clone()
                else:
                    pixels = [
                        self.processor.image_processor(images=ims, return_tensors="pt")["pixel_values"]
                        for ims in decoded["images"]
                    ]
                features = torch.cat(
                    [
                        self.model.get_vision_features(chunk.to(device)).cpu()  # (N, P, Dv)
                        for chunk in torch.cat(pixels).split(batch_size * 4)
                    ]
                )
                for i, chunk in zip(todo, features.split([p.shape[0] for p in pixels])):
                    pending[keys[i]] = chunk.clone()
                stats["encoded"] += len(todo)
                if len(pending) >= self.shard_rows * (2 if settings is not None else 1):
                    self.store.write_shard(pending)
                    pending = {}
            if pending:
                self.store.write_shard(pending)
        finally:
            tower.train(was_training)
        logger.info(
            "Vision feature cache %s: %d rows encoded, %d already cached", self.path, stats["encoded"], stats["cached"]
        )
        return stats


__all__ = ["VisionFeatureCache", "EncodeCaptionRowsCached", "FeatureCacheMiss", "ShardStore", "row_key"]

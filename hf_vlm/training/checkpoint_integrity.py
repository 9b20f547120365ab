"""Checkpoints you can trust: finite weights before a save, a completion marker written last.

Why: a `kill -9` during a save leaves `checkpoint-20` with a config only (or a 0-byte
`optimizer.pt`), and "resume from the last checkpoint" then picked it and failed, ignoring the
intact `checkpoint-10`; a NaN run kept a checkpoint whose every tensor was inf as "the last good
one". So:

* `nonfinite_parameters` runs before every save (on every rank: under FSDP each holds a shard);
  weights with NaN/Inf are never written.
* The Trainer writes `checkpoint-N` as usual; then, after a barrier, the main process writes
  `hf_vlm_complete.json` LAST: the step, the loss and the size of every file. Only a checkpoint
  with that marker whose files still have those sizes is complete (`checkpoint_problems`).
* Old checkpoints are rotated (`save_total_limit`) only after the new one is marked complete,
  and only complete ones count, so an interrupted save can never cost the last good checkpoint.
* A checkpoint whose weights then gave a NaN/Inf loss or gradient is *rejected*: the marker is
  renamed to `hf_vlm_rejected.json` with the reason. It stays on disk for inspection, but
  `newest_complete` (what `resume_from_checkpoint: last` means) never returns it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil

import torch

from .distributed import any_rank
from .distributed import local_tensor as _local

logger = logging.getLogger(__name__)

COMPLETE_MARKER = "hf_vlm_complete.json"
REJECTED_MARKER = "hf_vlm_rejected.json"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


# --- weights ----------------------------------------------------------------------------------
def nonfinite_parameters(model, limit: int = 5) -> list[str]:
    """Names of (up to `limit`) floating-point parameters holding NaN/Inf, on any process.

    Collective under DDP/FSDP: every process must call it. Returns the local names when some
    other process found the problem (the list may then be empty, but the check still fails:
    the result is `["(on another process)"]`).
    """
    bad = [
        name
        for name, p in model.named_parameters()
        if p.is_floating_point() and _local(p).numel() and not bool(torch.isfinite(_local(p).detach()).all())
    ]
    if any_rank(bool(bad)):
        return bad[:limit] or ["(on another process)"]
    return []


# --- files ------------------------------------------------------------------------------------
def _file_sizes(path: str) -> dict[str, int]:
    sizes = {}
    for root, _dirs, files in os.walk(path):
        for name in files:
            if name in (COMPLETE_MARKER, REJECTED_MARKER) or name.endswith(".tmp"):
                continue
            full = os.path.join(root, name)
            sizes[os.path.relpath(full, path).replace(os.sep, "/")] = os.path.getsize(full)
    return sizes


def _structural_problems(path: str, sizes: dict[str, int]) -> list[str]:
    """What a complete Trainer checkpoint must hold: a config, non-empty weights, trainer state."""
    problems = [f"{name} is empty (0 bytes)" for name, size in sizes.items() if size == 0]
    weights = [n for n in sizes if n.endswith(".safetensors") or n.endswith(".bin") or "fsdp" in n]
    if not weights:
        problems.append("no model weights")
    if "trainer_state.json" not in sizes:
        problems.append("no trainer_state.json")
    for name in weights:
        if name.endswith(".safetensors") and sizes[name]:
            try:
                from safetensors import safe_open

                with safe_open(os.path.join(path, name), "pt") as handle:
                    handle.keys()
            except Exception as error:  # noqa: BLE001 - a truncated header is what we look for
                problems.append(f"{name} is unreadable ({type(error).__name__}: {error})")
    return problems


def _write_json(path: str, data: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def mark_complete(path: str, step: int, loss: float | None = None) -> dict:
    """Write the completion marker of `path` (main process, after every file is on disk)."""
    sizes = _file_sizes(path)
    problems = _structural_problems(path, sizes)
    if problems:
        raise RuntimeError(f"{path} is incomplete right after saving: {'; '.join(problems)}")
    marker = {"step": int(step), "loss": loss, "weights_finite": True, "files": sizes}
    _write_json(os.path.join(path, COMPLETE_MARKER), marker)
    return marker


def reject(path: str, reason: str) -> None:
    """Take `path` out of the complete checkpoints (kept on disk, with the reason)."""
    marker = os.path.join(path, COMPLETE_MARKER)
    data = {}
    if os.path.isfile(marker):
        with open(marker, encoding="utf-8") as handle:
            data = json.load(handle)
    data["rejected"] = reason
    _write_json(os.path.join(path, REJECTED_MARKER), data)
    if os.path.isfile(marker):
        os.remove(marker)
    logger.error("%s rejected: %s", path, reason)


def checkpoint_problems(path: str) -> list[str]:
    """Why `path` is not a complete checkpoint to resume from (empty list: it is)."""
    if not os.path.isdir(path):
        return ["not a directory"]
    rejected = os.path.join(path, REJECTED_MARKER)
    if os.path.isfile(rejected):
        with open(rejected, encoding="utf-8") as handle:
            return [f"rejected: {json.load(handle).get('rejected', 'no reason recorded')}"]
    marker = os.path.join(path, COMPLETE_MARKER)
    if not os.path.isfile(marker):
        sizes = _file_sizes(path)
        found = _structural_problems(path, sizes)
        return [f"no {COMPLETE_MARKER}: the save was interrupted" + (f" ({'; '.join(found)})" if found else "")]
    with open(marker, encoding="utf-8") as handle:
        recorded = json.load(handle).get("files", {})
    sizes = _file_sizes(path)
    problems = []
    for name, size in recorded.items():
        if name not in sizes:
            problems.append(f"{name} is missing")
        elif sizes[name] != size:
            problems.append(f"{name} has {sizes[name]} bytes, {size} when saved")
    return problems


def checkpoint_dirs(output_dir: str) -> list[tuple[int, str]]:
    """`(step, path)` of every `checkpoint-N` folder in `output_dir`, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        match = _CHECKPOINT_RE.match(name)
        if match and os.path.isdir(os.path.join(output_dir, name)):
            found.append((int(match.group(1)), os.path.join(output_dir, name)))
    return sorted(found)


def newest_complete(output_dir: str) -> tuple[str | None, list[tuple[str, list[str]]]]:
    """The newest complete checkpoint, and the newer ones skipped with their problems."""
    skipped = []
    for _step, path in reversed(checkpoint_dirs(output_dir)):
        problems = checkpoint_problems(path)
        if not problems:
            return path, skipped
        skipped.append((path, problems))
    return None, skipped


def clear_incomplete(path: str) -> None:
    """Remove the leftover of an interrupted save of this same checkpoint before writing it again."""
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, COMPLETE_MARKER)):
        logger.warning("Removing %s: an interrupted save left it incomplete; it is written again now", path)
        shutil.rmtree(path)


def rotate_complete(output_dir: str, limit: int | None, keep: str | None = None) -> list[str]:
    """Keep the newest `limit` complete checkpoints (and `keep`, the best one); delete older complete ones."""
    if not limit or limit <= 0:
        return []
    complete = [path for _step, path in checkpoint_dirs(output_dir) if not checkpoint_problems(path)]
    protected = {os.path.abspath(keep)} if keep else set()
    surplus = len(complete) - limit
    deleted = []
    for path in complete:
        if surplus <= 0:
            break
        if os.path.abspath(path) in protected or path == complete[-1]:
            continue
        shutil.rmtree(path, ignore_errors=True)
        deleted.append(path)
        surplus -= 1
    return deleted


__all__ = [
    "COMPLETE_MARKER",
    "REJECTED_MARKER",
    "checkpoint_dirs",
    "checkpoint_problems",
    "clear_incomplete",
    "mark_complete",
    "newest_complete",
    "nonfinite_parameters",
    "reject",
    "rotate_complete",
]

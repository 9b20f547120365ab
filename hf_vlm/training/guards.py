"""Guards that catch the silent failures users lost weeks to, each saying what to do.

Callbacks only see logs, not batches or losses, so a guard can also implement three trainer
hooks that `MambaVLMTrainer` calls (plain `Trainer` simply never calls them):

* `observe_batch(args, state, control, inputs, model)`: before the forward of a training batch;
* `observe_loss(args, state, control, loss, outputs, inputs)`: after it, per micro-batch;
* `annotate_logs(args, state, logs)`: before the logs reach the other callbacks.

`guard_action` decides what a tripped guard does: "stop" ends training cleanly
(`control.should_training_stop`) or raises `GuardError` where continuing cannot be useful;
"warn" logs and emits a `GuardWarning`. A NaN/Inf loss always stops, drops that step's
gradients and blocks every checkpoint after it, so the last good checkpoint survives.
"""

from __future__ import annotations

import logging
import math
import re
import warnings

import torch
from transformers import TrainerCallback

from ..data.collator import IGNORE_INDEX
from .distributed import any_rank, gather_names, local_tensor
from .freeze import component_of, intended_trainable, num_llm_layers

logger = logging.getLogger(__name__)


class GuardError(RuntimeError):
    """A guard found a configuration or data error that makes training meaningless."""


class GuardWarning(UserWarning):
    """A guard found something suspicious; training goes on (guard_action="warn")."""


class Guard(TrainerCallback):
    """Base: a named callback with `trip()` and no-op trainer hooks."""

    name = "Guard"

    def __init__(self, action: str = "stop"):
        self.action = action
        self.trips: list[str] = []

    def trip(self, message: str, control=None, *, stop: bool | None = None, error: bool = False) -> None:
        """Report `message`; stop (or raise when `error`) if the action says so, else warn."""
        text = f"[hf_vlm {self.name}] {message}"
        self.trips.append(text)
        stop = (self.action == "stop") if stop is None else stop
        if stop and error:
            raise GuardError(text)
        if stop and control is not None:
            logger.error("%s Training stopped.", text)
            control.should_training_stop = True
            return
        logger.warning(text)
        warnings.warn(text, GuardWarning, stacklevel=2)

    def observe_batch(self, args, state, control, inputs, model) -> None:
        pass

    def observe_loss(self, args, state, control, loss, outputs, inputs) -> None:
        pass

    def annotate_logs(self, args, state, logs) -> None:
        pass


def _name_list(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


def _fingerprint(tensor: torch.Tensor, clone_limit: int = 1_000_000):
    """Exact copy for small tensors; (sum, abs-sum, strided sample) for large ones (this rank's shard)."""
    t = local_tensor(tensor.detach())
    if t.numel() <= clone_limit:
        return t.to("cpu", copy=True)
    flat = t.reshape(-1)
    wide = flat.double()
    return (float(wide.sum()), float(wide.abs().sum()), flat[:: max(flat.numel() // 4096, 1)].to("cpu", copy=True))


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return a.shape == b.shape and torch.equal(a, b)
    return a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])


_LORA_PAIR = re.compile(r"(?<=\.lora_)(embedding_)?([AB])(?=\.|$)")


def lora_partner(name: str) -> str | None:
    """`...lora_A.default.weight` <-> `...lora_B.default.weight` (and `lora_embedding_A/B`), else None."""
    match = _LORA_PAIR.search(name)
    if match is None:
        return None
    swapped = (match.group(1) or "") + ("B" if match.group(2) == "A" else "A")
    return name[: match.start()] + swapped + name[match.end() :]


class FreezeGuard(Guard):
    """Before step 1: the trainable set matches the freeze policy of `args`. After
    `freeze_check_steps` steps: frozen weights are bit-identical and trainable ones moved.

    A LoRA adapter is judged as a pair: B starts at zero, so A gets an exactly zero gradient until
    B has moved (two steps when the LR warms up from 0), and "A did not move" alone is no sign of
    an unused adapter (docs/architecture.md, PEFT and Mamba). A pair counts as stuck when neither moved.
    """

    name = "FreezeGuard"

    def __init__(self, action: str = "stop", check_steps: int = 2):
        super().__init__(action)
        self.check_steps = check_steps
        self._frozen: dict[str, object] = {}
        self._trainable: dict[str, object] = {}
        self._check_at = -1

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        n_layers = num_llm_layers(model)
        unexpected, missing = [], []
        for name, param in model.named_parameters():
            wanted = intended_trainable(name, args, n_layers)
            if param.requires_grad and not wanted:
                unexpected.append(name)
            elif not param.requires_grad and wanted and param.is_floating_point():
                missing.append(name)
        if not any(p.requires_grad for p in model.parameters()):
            raise GuardError(f"[hf_vlm {self.name}] No parameter requires grad: nothing would be trained.")
        if unexpected:
            parts = sorted({component_of(n) for n in unexpected})
            self.trip(
                f"stage={args.stage!r} with unfreeze_llm_layers={args.unfreeze_llm_layers}, "
                f"unfreeze_vision_tower={args.unfreeze_vision_tower} keeps {parts} frozen, but "
                f"{len(unexpected)} parameter tensor(s) require grad: {_name_list(unexpected)}. Something "
                "unfroze them after apply_freeze_policy (e.g. model.requires_grad_(True)). What to do: apply "
                "the freeze policy last, or opt in explicitly with unfreeze_llm_layers=N (-1 = all) / "
                "unfreeze_vision_tower=True.",
                control,
                error=True,
            )
        if missing:
            self.trip(
                f"{len(missing)} parameter tensor(s) the policy trains are frozen: {_name_list(missing)}. "
                "They will not learn. What to do: do not freeze them after apply_freeze_policy.",
                control,
                error=True,
            )
        if self.check_steps > 0:
            self._check_at = state.global_step + self.check_steps  # also right after a resume
            for name, param in model.named_parameters():
                target = self._trainable if param.requires_grad else self._frozen
                target[name] = _fingerprint(param)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step != self._check_at or not (self._frozen or self._trainable):
            return
        params = dict(model.named_parameters())
        changed = [n for n, fp in self._frozen.items() if n in params and not _same(fp, _fingerprint(params[n]))]
        stuck = [
            n
            for n, fp in self._trainable.items()
            if n in params and _same(fp, _fingerprint(params[n])) and local_tensor(params[n]).numel()
        ]
        held = [n for n in self._trainable if n in params and local_tensor(params[n]).numel()]
        # under FSDP each rank holds shards: a tensor changed if it changed anywhere, is stuck if stuck everywhere
        ranks_changed, ranks_stuck, ranks_held = gather_names(changed), gather_names(stuck), gather_names(held)
        changed = sorted({n for names in ranks_changed for n in names})
        moved = {n for held_by, stuck_by in zip(ranks_held, ranks_stuck) for n in set(held_by) - set(stuck_by)}
        stuck = {n for names in ranks_stuck for n in names} - moved
        stuck = sorted(n for n in stuck if not (lora_partner(n) in self._trainable and lora_partner(n) not in stuck))
        n_trainable = len(self._trainable)
        self._frozen, self._trainable = {}, {}
        if changed:
            self.trip(
                f"after {state.global_step} steps, {len(changed)} frozen parameter tensor(s) changed: "
                f"{_name_list(changed)}. Frozen weights are being updated (an optimizer built before the "
                "freeze, weight tying with a trainable tensor, or in-place edits). What to do: build the "
                "trainer after apply_freeze_policy and do not edit weights in place.",
                control,
                error=True,
            )
        if stuck and len(stuck) == n_trainable:
            self.trip(
                f"after {state.global_step} steps no trainable parameter moved ({_name_list(stuck)}). "
                "What to do: check the learning rates are > 0, that gradients reach the bridge, and that "
                "the loss has supervised tokens.",
                control,
                error=True,
            )
        elif stuck:
            logger.warning(
                "[hf_vlm %s] %d trainable tensor(s) did not move in %d steps (unused by the forward?): %s",
                self.name,
                len(stuck),
                state.global_step,
                _name_list(stuck),
            )


class MaskGuard(Guard):
    """Every training batch supervises some answer tokens and no visual/prompt position."""

    name = "MaskGuard"

    def __init__(self, action: str = "stop", min_first_step_loss: float = 0.1):
        super().__init__(action)
        self.min_first_step_loss = min_first_step_loss
        self._first_checked = False

    def observe_batch(self, args, state, control, inputs, model) -> None:
        labels, input_ids = inputs.get("labels"), inputs.get("input_ids")
        if labels is None:
            return
        supervised = labels != IGNORE_INDEX  # (B, L)
        if not bool(supervised.any()):
            raise GuardError(
                f"[hf_vlm {self.name}] a training batch (step {state.global_step}) has no supervised token: "
                "every label is -100, so the loss is undefined and nothing is learned. What to do: check that "
                "answers are not empty and not truncated away (raise max_length), and that the collator sets "
                "labels on the answer + EOS."
            )
        image_token_id = getattr(getattr(model, "config", None), "image_token_id", None)
        if input_ids is None or image_token_id is None:
            return
        is_image = input_ids == image_token_id  # (B, L)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        last_image = torch.where(is_image, positions, torch.full_like(positions, -1)).max(dim=1).values  # (B,)
        visual = int((supervised & is_image).sum())
        prompt = int((supervised & ~is_image & (positions <= last_image[:, None])).sum())
        if visual or prompt:
            raise GuardError(
                f"[hf_vlm {self.name}] labels supervise {visual} visual and {prompt} prompt position(s) in a "
                f"training batch (step {state.global_step}). The masks are wrong: visual + prompt tokens must "
                "be -100, only the answer and its EOS are supervised. What to do: use "
                "DataCollatorForMambaVLM (masks by position from the processor's prompt_length), never "
                "labels = input_ids.clone()."
            )

    def observe_loss(self, args, state, control, loss, outputs, inputs) -> None:
        if self._first_checked or state.global_step != 0:
            return
        self._first_checked = True
        value = float(loss)
        if math.isfinite(value) and value < self.min_first_step_loss:
            self.trip(
                f"first-step caption loss {value:.4f} < {self.min_first_step_loss}: the masks are probably "
                "wrong (visual + prompt must be -100) or answers leak into the prompt. A fresh bridge starts "
                "around 3-8. What to do: print one batch's labels and check only the report is supervised.",
                control,
                stop=False,
            )


class CollapseGuard(Guard):
    """Visual embeddings collapsing to zero (the dead-Stage-1 failure) and NaN/Inf loss or grads."""

    name = "CollapseGuard"

    def __init__(self, action="stop", std_threshold=1e-3, relative_threshold=0.01, patience=3):
        super().__init__(action)
        self.std_threshold, self.relative_threshold, self.patience = std_threshold, relative_threshold, patience
        self.reference_std: float | None = None
        self.collapsed_logs = 0
        self.nonfinite_step: int | None = None  # step at which NaN/Inf appeared; blocks checkpoints
        self._pending_nonfinite = False
        self._nonfinite_since_log = False  # the Trainer's NaN filter would log that loss as 0.0

    def observe_loss(self, args, state, control, loss, outputs, inputs) -> None:
        if not bool(torch.isfinite(loss.detach()).all()):
            self._nonfinite_since_log = True
            self._nonfinite(state, control, f"loss is {float(loss)}")

    def annotate_logs(self, args, state, logs) -> None:
        if self._nonfinite_since_log and "loss" in logs:
            logs["loss"] = float("nan")  # the CSV log and the console say nan, never 0.0
            self._nonfinite_since_log = False

    def _nonfinite(self, state, control, what: str, step: int | None = None) -> None:
        self._pending_nonfinite = True
        if self.nonfinite_step is not None:
            return
        self.nonfinite_step = state.global_step + 1 if step is None else step
        self.trip(
            f"{what} at step {self.nonfinite_step}. That step's update was skipped, training stops and no "
            "checkpoint is written after this point: the last good checkpoint in output_dir is kept. What to "
            "do: use bf16 or fp32 (never fp16 with Mamba, state-spaces/mamba#6), lower the learning rate, "
            "keep max_grad_norm=1.0, and check the batch for corrupt images or empty reports.",
            control,
            stop=True,
        )

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        groups = optimizer.param_groups if optimizer is not None else []
        grads = [local_tensor(p.grad) for g in groups for p in g["params"] if p.grad is not None]
        grads = [g for g in grads if g.numel()]  # FSDP2: this rank's shards
        local_bad = False
        if grads and not self._pending_nonfinite:
            norms = torch.stack([n.float().to(grads[0].device) for n in torch._foreach_norm(grads)])
            local_bad = not bool(torch.isfinite(norms).all())
        # every rank stops at the same step, or the next collective deadlocks (a NaN may sit in one shard)
        if any_rank(local_bad or self._pending_nonfinite) and not self._pending_nonfinite:
            self._nonfinite(
                state,
                control,
                "the gradient is NaN/Inf" if local_bad else "the loss or gradient is NaN/Inf on another process",
            )
        if self._pending_nonfinite and optimizer is not None:
            optimizer.zero_grad(set_to_none=True)  # params without grad are skipped by the step

    def on_step_end(self, args, state, control, **kwargs):
        if self._pending_nonfinite:
            self._pending_nonfinite = False
            control.should_training_stop = True
            control.should_save = False
            control.should_evaluate = False

    on_epoch_end = on_step_end

    def on_log(self, args, state, control, logs=None, **kwargs):
        std = (logs or {}).get("visual_std")
        if std is None or self.collapsed_logs < 0:
            return
        if self.reference_std is None:
            self.reference_std = std
        floor = max(self.std_threshold, self.relative_threshold * self.reference_std)
        self.collapsed_logs = self.collapsed_logs + 1 if std < floor else 0
        if self.collapsed_logs >= self.patience:
            self.collapsed_logs = -1  # trip once
            self.trip(
                f"visual embedding std fell from {self.reference_std:.4g} (first log) to {std:.3g} "
                f"(norm {logs.get('visual_norm', float('nan')):.3g}) for {self.patience} logs: the visual "
                "features are collapsing to zero (the Stage 1 'proxy loss 0.00005, vision features dead' "
                "failure), so the LLM cannot see the image. What to do: do not initialise the next stage from "
                "this checkpoint; restart the bridge with from_scratch=True, lower bridge_learning_rate "
                "(e.g. 1e-5), and train on the caption loss, not a feature-norm proxy.",
                control,
            )


__all__ = ["CollapseGuard", "FreezeGuard", "Guard", "GuardError", "GuardWarning", "MaskGuard"]

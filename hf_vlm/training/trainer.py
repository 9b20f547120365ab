"""`MambaVLMTrainer`: the HF Trainer with per-module learning rates, extra metrics and guards.

* Parameter groups per module (bridge / qformer / lora / llm / vision), each with its own LR;
  weight decay only on >= 2-D weights (never biases, norms, Mamba's `A_log`/`D`, or queries).
* `compute_loss` also gathers visual-embedding std/norm, the supervised-token fraction,
  any per-part losses the model returns and what a guard's `observe_batch` returns (the
  train-time vision probe); `log()` averages them across micro-batches and processes and clears
  them (the TRL pattern).
* The guard callbacks are installed from the arguments; the trainer feeds them what
  callbacks cannot see (batches, per-micro-batch losses, logs before they are printed).
* Never non-finite weights on disk: weights are checked before every save, nothing is written
  after a NaN/Inf, checkpoints are marked complete last (`checkpoint_integrity`), and a
  checkpoint whose weights then gave a NaN/Inf loss is rejected, so "last" is always good.
"""

from __future__ import annotations

import logging
import math
import os
from collections import defaultdict

import torch
from transformers import Trainer

from ..checkpoints import tower_is_frozen, without_frozen_tower
from ..data.collator import IGNORE_INDEX
from .arguments import FRESH_QFORMER_LR, PRETRAINED_QFORMER_LR, MambaVLMTrainingArguments
from .callbacks import CollapseGuard, VisionProbe, default_callbacks
from .checkpoint_integrity import (
    checkpoint_problems,
    clear_incomplete,
    mark_complete,
    newest_complete,
    nonfinite_parameters,
    reject,
    rotate_complete,
)
from .distributed import enable_fsdp2_on_cpu
from .freeze import apply_freeze_policy, component_of, describe_trainable, format_trainable_table, policy_key

logger = logging.getLogger(__name__)

GROUP_ORDER = ("bridge", "qformer", "lora", "language_model", "vision_tower", "other")
_NO_DECAY_SUFFIXES = (".A_log", ".D", "query_tokens")  # Mamba SSM parameters, Q-Former queries


class MambaVLMTrainer(Trainer):
    """Trainer for `MambaVLMForConditionalGeneration` with `MambaVLMTrainingArguments`.

    The freeze policy is applied here unless the model already carries the same policy
    (then what the caller did is kept, and the FreezeGuard checks it). `install_guards=False`
    leaves only the callbacks passed in.
    """

    def __init__(
        self,
        model=None,
        args: MambaVLMTrainingArguments | None = None,
        *pos,
        callbacks=None,
        install_guards: bool = True,
        **kwargs,
    ):
        if not isinstance(args, MambaVLMTrainingArguments):
            raise TypeError("MambaVLMTrainer needs MambaVLMTrainingArguments (stage, LRs and guard settings)")
        if model is not None and getattr(model, "_hf_vlm_freeze_policy", None) != policy_key(args):
            model = apply_freeze_policy(model, args)
        if kwargs.get("data_collator") is None and not pos:
            kwargs["data_collator"] = self._default_collator(kwargs.get("processing_class"))
        installed = default_callbacks(args) if install_guards else []
        super().__init__(model, args, *pos, callbacks=installed + list(callbacks or []), **kwargs)
        self._metrics: dict[str, dict[str, list]] = {"train": defaultdict(list), "eval": defaultdict(list)}
        self._weights_nonfinite_at: int | None = None  # set when a save found NaN/Inf weights

    def create_accelerator_and_postprocess(self):
        super().create_accelerator_and_postprocess()
        if enable_fsdp2_on_cpu(self.accelerator, self.args):  # accelerate alone would train DDP here
            self.is_fsdp_enabled = True

    @staticmethod
    def _default_collator(processor):
        if processor is None or getattr(processor, "image_token_id", None) is None:
            return None
        from ..data.collator import DataCollatorForMambaVLM

        tokenizer = processor.tokenizer
        return DataCollatorForMambaVLM(
            tokenizer.pad_token_id, image_token_id=processor.image_token_id, tokenizer=tokenizer
        )

    # --- hooks for the guards ------------------------------------------------------------------
    def _hooks(self):
        return [cb for cb in self.callback_handler.callbacks if hasattr(cb, "observe_batch")]

    @property
    def guard_trips(self) -> list[str]:
        """Every message a guard reported so far (also logged)."""
        return [t for cb in self._hooks() for t in getattr(cb, "trips", [])]

    @property
    def nonfinite_step(self) -> int | None:
        """First step with a NaN/Inf loss, gradient or weights (None: all finite so far)."""
        steps = [cb.nonfinite_step for cb in self._hooks() if isinstance(cb, CollapseGuard) and cb.nonfinite_step]
        if getattr(self, "_weights_nonfinite_at", None) is not None:
            steps.append(self._weights_nonfinite_at)
        return min(steps) if steps else None

    # --- optimizer -----------------------------------------------------------------------------
    def _group_lr(self, component: str) -> float:
        args = self.args
        if component == "qformer":  # only then: it logs the Q-Former LR it chose
            return self._qformer_lr()
        return {
            "bridge": args.bridge_learning_rate,
            "lora": args.lora_learning_rate,
            "language_model": args.llm_learning_rate if args.llm_learning_rate is not None else args.learning_rate,
            "vision_tower": args.vision_learning_rate if args.vision_learning_rate is not None else args.learning_rate,
        }.get(component, args.learning_rate)

    def _qformer_lr(self) -> float:
        """`qformer_learning_rate`, or by default: BLIP-2's 1e-5 for a pretrained body, the bridge's LR
        capped at `FRESH_QFORMER_LR` (1e-4) for a fresh one.

        Both ends were measured blind (docs/architecture.md, "Q-Former"): 1e-5 trains a new module too
        slowly, and the MLP bridge's 3e-3 is too fast for a post-LN transformer body.
        """
        args = self.args
        if args.qformer_learning_rate is not None:
            return args.qformer_learning_rate
        config = getattr(self.model, "config", None)
        pretrained = bool(getattr(config, "qformer_init_from", None))
        lr = PRETRAINED_QFORMER_LR if pretrained else min(args.bridge_learning_rate, FRESH_QFORMER_LR)
        if not getattr(self, "_qformer_lr_logged", False):
            self._qformer_lr_logged = True
            logger.info(
                "Q-Former body LR %g (%s)",
                lr,
                f"BLIP-2 weights from {config.qformer_init_from}"
                if pretrained
                else f"fresh Q-Former: bridge_learning_rate capped at {FRESH_QFORMER_LR:g}",
            )
        return lr

    def build_parameter_groups(self, model) -> list[dict]:
        """One (decay, no-decay) pair of groups per module, each with the module's LR and a `name`."""
        buckets: dict[tuple[str, bool], list] = defaultdict(list)
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            component = component_of(name)
            decay = param.ndim >= 2 and not name.endswith(_NO_DECAY_SUFFIXES)
            buckets[(component if component in GROUP_ORDER else "other", decay)].append(param)
        groups = []
        for component in GROUP_ORDER:
            for decay in (True, False):
                if buckets.get((component, decay)):
                    groups.append(
                        {
                            "params": buckets[(component, decay)],
                            "lr": self._group_lr(component),
                            "weight_decay": self.args.weight_decay if decay else 0.0,
                            "name": f"{component}{'' if decay else '_no_decay'}",
                        }
                    )
        return groups

    def create_optimizer(self, model=None):
        opt_model = self.model if model is None else model
        if self.optimizer is not None:
            return self.optimizer
        if self.optimizer_cls_and_kwargs is not None:
            optimizer_cls, optimizer_kwargs = self.optimizer_cls_and_kwargs
        else:
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        if not isinstance(optimizer_cls, type) or {"params", "model", "optimizer_dict"} & set(optimizer_kwargs):
            logger.warning("optim=%s builds its own groups: per-module learning rates are not applied", self.args.optim)
            return super().create_optimizer(model)
        groups = self.build_parameter_groups(opt_model)
        self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        summary = ", ".join(f"{g['name']} lr={g['lr']:g} ({len(g['params'])} tensors)" for g in groups)
        logger.info("Optimizer groups: %s", summary)
        return self.optimizer

    # --- training ------------------------------------------------------------------------------
    def train(self, *args, **kwargs):
        table = format_trainable_table(describe_trainable(self.model))
        logger.info("Trainable parameters (stage=%s):\n%s", self.args.stage, table)
        self._weights_nonfinite_at = None
        output = super().train(*args, **kwargs)
        self._reject_checkpoint_before_nonfinite_loss()
        self.accelerator.wait_for_everyone()  # every rank then reads the same "last good" checkpoint
        return output

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        training = model.training
        if training:
            for hook in self._hooks():  # a hook may return 0-d tensors to log (gathered like the metrics below)
                extra = hook.observe_batch(self.args, self.state, self.control, inputs, self.model)
                for key, value in (extra or {}).items():
                    self._metrics["train"][key].append(value)
        # a shallow copy: the parent pops "labels" when a custom loss function is set
        loss, outputs = super().compute_loss(model, dict(inputs), True, num_items_in_batch)
        batch_loss = self._batch_mean_loss(loss, inputs, num_items_in_batch)
        self._gather_metrics("train" if training else "eval", outputs, inputs)
        if training:
            for hook in self._hooks():
                hook.observe_loss(self.args, self.state, self.control, batch_loss, outputs, inputs)
        return (loss, outputs) if return_outputs else loss

    def _batch_mean_loss(self, loss, inputs, num_items_in_batch):
        """Per-token mean loss of this micro-batch (the Trainer may scale it for accumulation)."""
        labels = inputs.get("labels")
        if num_items_in_batch is None or labels is None:
            return loss.detach()
        local = (labels[..., 1:] != IGNORE_INDEX).sum().clamp(min=1)
        scale = self.accelerator.num_processes if self.args.average_tokens_across_devices else 1
        return loss.detach() * num_items_in_batch / (local * scale)

    def _gather_metrics(self, mode: str, outputs, inputs) -> None:
        metrics = self._metrics[mode]
        visual = getattr(outputs, "image_hidden_states", None)
        if visual is not None and visual.numel() > 1:
            visual = visual.detach().float()  # (N, K, D)
            metrics["visual_std"].append(visual.std())
            metrics["visual_norm"].append(visual.norm(dim=-1).mean())
        labels = inputs.get("labels")
        if labels is not None:
            mask = inputs.get("attention_mask")
            total = mask.sum() if mask is not None else torch.tensor(labels.numel())
            metrics["supervised_fraction"].append((labels != IGNORE_INDEX).sum() / total.clamp(min=1))
        if hasattr(outputs, "items"):
            for key, value in outputs.items():
                if key != "loss" and key.endswith("_loss") and torch.is_tensor(value) and value.numel() == 1:
                    metrics[key].append(value.detach().float())

    def _global_means(self, mode: str) -> dict[str, float]:
        """Means of the gathered metrics over every micro-batch of every process since the last log.

        Each process averages its own values, then the per-process means are gathered
        (`accelerator.gather_for_metrics`) and averaged, so DDP/FSDP logs are global, not rank 0's.
        Every rank runs the same forward code, so all hold the same keys (sorted: same order).
        """
        metrics = self._metrics[mode]
        keys = sorted(k for k, values in metrics.items() if values)
        if not keys:
            metrics.clear()
            return {}
        local = torch.stack([torch.stack([v.float().reshape(()).cpu() for v in metrics[k]]).mean() for k in keys])
        metrics.clear()
        if self.accelerator.num_processes > 1:
            local = self.accelerator.gather_for_metrics(local.to(self.accelerator.device)).reshape(-1, len(keys))
            local = local.float().mean(0).cpu()
        return {k: float(v) for k, v in zip(keys, local)}

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        if mode == "eval" or "loss" in logs:
            prefix = "eval_" if mode == "eval" else ""
            logs.update({prefix + key: value for key, value in self._global_means(mode).items()})
        if mode == "train" and "loss" in logs and self.optimizer is not None and "learning_rate" in logs:
            # every group follows the same schedule: scale each group's peak LR like the logged one
            groups = self.optimizer.param_groups
            factor = logs["learning_rate"] / (groups[0].get("initial_lr") or groups[0]["lr"] or 1.0)
            for group in groups:
                name = group.get("name", "")
                if name and not name.endswith("_no_decay"):
                    logs[f"learning_rate_{name}"] = group.get("initial_lr", group["lr"]) * factor
        for hook in self._hooks():
            hook.annotate_logs(self.args, self.state, logs)
        super().log(logs, start_time)

    # --- evaluation: the vision probe ----------------------------------------------------------
    def evaluation_loop(
        self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix: str = "eval"
    ):
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        probes = [cb for cb in self._hooks() if isinstance(cb, VisionProbe)]
        if probes and output.metrics is not None:
            result = probes[0].probe(
                self.model, dataloader, prepare=self._prepare_inputs, context=self.compute_loss_context_manager
            )
            if result is not None:
                for key, value in result.items():
                    output.metrics[f"{metric_key_prefix}_{key}"] = value
                probes[0].check(result, self.state.global_step)
        return output

    # --- saving: never non-finite weights, never an incomplete "last" checkpoint ------------------
    def _save_checkpoint(self, model, trial):
        """Write `checkpoint-N` only with finite weights, mark it complete last, rotate after that.

        See `checkpoint_integrity`: the marker makes an interrupted save visible, and old
        checkpoints are only deleted once the new one is complete.
        """
        if self.nonfinite_step is not None:
            logger.error(
                "Not writing checkpoint-%d: the loss/gradient was NaN/Inf at step %d; the last good checkpoint is kept",
                self.state.global_step,
                self.nonfinite_step,
            )
            return
        if self._stop_on_nonfinite_weights():
            return
        run_dir = self._get_output_dir(trial=trial)
        path = os.path.join(run_dir, f"checkpoint-{self.state.global_step}")
        if self.args.should_save:
            clear_incomplete(path)
        self.accelerator.wait_for_everyone()
        limit, self.args.save_total_limit = self.args.save_total_limit, None  # rotate once marked complete
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = limit
        self.accelerator.wait_for_everyone()  # every rank's files (optimizer shards, RNG states) are on disk
        if self.args.should_save:
            for callback in self.callback_handler.callbacks:
                if hasattr(callback, "write_checkpoint_record"):
                    callback.write_checkpoint_record(path, self.args, self.state)
            mark_complete(path, self.state.global_step, self._last_finite_loss())
            rotate_complete(run_dir, limit, self.state.best_model_checkpoint)
        self.accelerator.wait_for_everyone()

    def _last_finite_loss(self) -> float | None:
        losses = [h["loss"] for h in self.state.log_history if "loss" in h and math.isfinite(h["loss"])]
        return losses[-1] if losses else None

    def _stop_on_nonfinite_weights(self) -> bool:
        """Check the weights (every rank); on NaN/Inf stop training and report it. True when stopped."""
        bad = nonfinite_parameters(self.model)
        if not bad:
            return False
        step = self.state.global_step
        self._weights_nonfinite_at = step
        message = (
            f"the weights are NaN/Inf after the update of step {step} ({', '.join(bad)}): the learning rate "
            "blew them up. Nothing is written from here on; the last good checkpoint is kept"
        )
        guards = [cb for cb in self._hooks() if isinstance(cb, CollapseGuard)]
        if guards:
            guards[0]._nonfinite(self.state, self.control, message, step=step)
        else:
            logger.error("[hf_vlm] %s", message)
        self.control.should_training_stop = True
        return True

    def last_good_checkpoint(self) -> str | None:
        """The newest complete (finite, verified, not rejected) checkpoint in output_dir."""
        return newest_complete(self.args.output_dir)[0]

    def _reject_checkpoint_before_nonfinite_loss(self) -> None:
        """A NaN/Inf loss or gradient at step s was computed with the weights of checkpoint-(s-1)."""
        guard_steps = [cb.nonfinite_step for cb in self._hooks() if isinstance(cb, CollapseGuard) and cb.nonfinite_step]
        if not guard_steps or self._weights_nonfinite_at is not None or not self.args.should_save:
            return
        step = min(guard_steps)
        path = os.path.join(self.args.output_dir, f"checkpoint-{step - 1}")
        if os.path.isdir(path) and not checkpoint_problems(path):
            reject(path, f"its weights gave a NaN/Inf loss or gradient at step {step}")

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        if self.nonfinite_step is not None:
            logger.error(
                "Not saving to %s: the loss/gradient/weights were NaN/Inf at step %d", output_dir, self.nonfinite_step
            )
            return
        bad = nonfinite_parameters(self.model)
        if bad:
            logger.error("Not saving to %s: the weights contain NaN/Inf (%s)", output_dir, ", ".join(bad))
            return
        super().save_model(output_dir, _internal_call)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if (
            not self.args.save_frozen_vision_weights
            and getattr(self.model, "vision_tower", None) is not None
            and tower_is_frozen(self.model)
        ):
            # frozen tower: re-loaded from vision_model_name_or_path, not copied into every checkpoint
            # (under FSDP the gathered full state dict arrives here: it is filtered the same way)
            state_dict = without_frozen_tower(self.model.state_dict() if state_dict is None else state_dict)
        super()._save(output_dir, state_dict)

    # --- loading a checkpoint into a model with a bitsandbytes LLM --------------------------------
    # The Trainer's resume and load_best_model_at_end call `model.load_state_dict(checkpoint)`, which
    # bitsandbytes refuses for int8 layers off CUDA ("Loading a quantized checkpoint into non-quantized
    # Linear8bitLt is not supported"). Quantised layers are frozen (a quantised LLM never trains), so
    # their tensors are equal in every checkpoint of the run: only the other tensors are loaded.
    def _quantized_prefixes(self) -> tuple[str, ...]:
        try:
            import bitsandbytes as bnb
        except ImportError:
            return ()
        kinds = (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit)
        return tuple(f"{name}." for name, module in self.model.named_modules() if isinstance(module, kinds))

    def _load_unquantized(self, checkpoint: str, prefixes: tuple[str, ...]) -> None:
        from safetensors.torch import load_file

        from ..checkpoints import weight_names

        index = os.path.join(checkpoint, "model.safetensors.index.json")
        if os.path.isfile(index):
            import json

            with open(index, encoding="utf-8") as handle:
                files = sorted(set(json.load(handle)["weight_map"].values()))
        else:
            files = ["model.safetensors"]
        if not weight_names(checkpoint):
            raise FileNotFoundError(f"{checkpoint}: no model.safetensors to load")
        state = {}
        for name in files:
            state.update(load_file(os.path.join(checkpoint, name), device="cpu"))
        kept = {k: v for k, v in state.items() if not k.startswith(prefixes)}
        result = self.model.load_state_dict(kept, strict=False)
        if result.unexpected_keys:
            raise RuntimeError(f"{checkpoint} does not fit the model: unexpected {result.unexpected_keys[:5]}")
        logger.info(
            "Loaded %d tensors from %s (%d of its bitsandbytes-quantised, frozen tensors kept as loaded)",
            len(kept),
            checkpoint,
            len(state) - len(kept),
        )

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        prefixes = self._quantized_prefixes()
        if not prefixes or self.is_fsdp_enabled or self.is_deepspeed_enabled:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        return self._load_unquantized(resume_from_checkpoint, prefixes)

    def _load_best_model(self) -> None:
        prefixes = self._quantized_prefixes()
        if not prefixes or self.is_fsdp_enabled or self.is_deepspeed_enabled:
            return super()._load_best_model()
        logger.info("Loading best model from %s (score: %s)", self.state.best_model_checkpoint, self.state.best_metric)
        return self._load_unquantized(self.state.best_model_checkpoint, prefixes)


__all__ = ["MambaVLMTrainer"]

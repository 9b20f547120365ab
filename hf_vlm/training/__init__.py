"""Training: arguments, freeze policy, the guarded `MambaVLMTrainer` and its callbacks.

Names are resolved lazily so that `hf_vlm.training.arguments` can be imported (e.g. by the
CLI to build its parser) without pulling in the Trainer, peft or matplotlib.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "MambaVLMTrainingArguments": "arguments",
    "ModelArguments": "arguments",
    "DataArguments": "arguments",
    "apply_freeze_policy": "freeze",
    "describe_trainable": "freeze",
    "MambaVLMTrainer": "trainer",
    "plot_loss_curve": "outputs",
    "GuardError": "guards",
    "GuardWarning": "guards",
    "default_callbacks": "callbacks",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))

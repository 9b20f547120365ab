"""Choose the Mamba selective-scan backend used by transformers' ``MambaMixer``.

Why: without mamba-ssm's CUDA kernels transformers runs a sequential Python loop over
time (``modeling_mamba.mamba_selective_scan``) that is ~250x slower than the matmuls
around it and stores ``(B, D, L, N)`` tensors (DESIGN.md section 3). ``MambaMixer.forward``
looks that function up as a module global at call time, so replacing the module attribute
swaps the backend for every Mamba model, already built or not.

Backends (``active_scan_backend()``):

* ``"mamba_ssm"``: mamba-ssm + causal-conv1d importable and CUDA available; transformers'
  own path is left untouched (it already uses the fused kernels).
* ``"hf_vlm_chunked"``: our chunked pure-PyTorch scan (:mod:`hf_vlm.ops.selective_scan`).
* ``"transformers_reference"``: transformers' sequential fallback (nothing installed).

The one-token recurrent step (``mamba_selective_state_update``) is cheap and left to
transformers; our scan returns the final state in the layout it expects.
"""

from __future__ import annotations

import importlib
import logging
import threading

import torch

from .selective_scan import selective_scan

__all__ = [
    "mamba_kernels_available",
    "install_fast_scan",
    "uninstall_fast_scan",
    "active_scan_backend",
]

logger = logging.getLogger("hf_vlm.ops")

_MAMBA_MODULE = "transformers.models.mamba.modeling_mamba"
_HUB_KERNELS_LOGGER = "transformers.integrations.hub_kernels"
# Functions whose "falling back to its reference PyTorch implementation" warning we replace.
_FALLBACK_FUNCS = (
    "selective_scan_fn",
    "selective_state_update",
    "mamba_inner_fn",
    "causal_conv1d_fn",
    "causal_conv1d_update",
)

_lock = threading.Lock()
_state: dict = {"original": None, "filter": None, "announced": set()}


class _FallbackWarningFilter(logging.Filter):
    """Drops transformers' per-function Mamba fallback warnings while our scan is active."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if "falling back to its reference PyTorch implementation" not in msg:
            return True
        return not any(f"`{name}`" in msg for name in _FALLBACK_FUNCS)


def mamba_kernels_available() -> bool:
    """True when mamba-ssm and causal-conv1d import and a CUDA device is present."""
    try:
        importlib.import_module("mamba_ssm")
        importlib.import_module("causal_conv1d")
    except Exception:  # ImportError, or a broken CUDA extension build
        return False
    return torch.cuda.is_available()


def _fast_mamba_selective_scan(hidden_states, dt, A, B, C, D=None, z=None, delta_bias=None,
                               delta_softplus=False, return_last_state=False, **kwargs):
    """Drop-in for transformers' ``mamba_selective_scan``; ignores ``use_mambapy``,
    ``use_associative_scan`` and any other backend-selection kwargs."""
    return selective_scan(hidden_states, dt, A, B, C, D=D, z=z, delta_bias=delta_bias,
                          delta_softplus=delta_softplus, return_last_state=return_last_state)


_fast_mamba_selective_scan._hf_vlm_fast_scan = True


def _announce(backend: str, detail: str) -> None:
    if backend not in _state["announced"]:
        _state["announced"].add(backend)
        logger.info("Mamba selective scan backend: %s (%s)", backend, detail)


def install_fast_scan(force: bool = False) -> str:
    """Route transformers' Mamba scan through our chunked scan unless mamba-ssm is active.

    Idempotent. ``force=True`` installs ours even when the CUDA kernels are available
    (benchmarks, tests). Returns the active backend name.
    """
    with _lock:
        mod = importlib.import_module(_MAMBA_MODULE)
        if getattr(mod.mamba_selective_scan, "_hf_vlm_fast_scan", False):
            return "hf_vlm_chunked"
        if not force and mamba_kernels_available():
            _announce("mamba_ssm", "fused CUDA kernels from mamba-ssm/causal-conv1d")
            return "mamba_ssm"
        _state["original"] = mod.mamba_selective_scan
        mod.mamba_selective_scan = _fast_mamba_selective_scan
        flt = _FallbackWarningFilter()
        logging.getLogger(_HUB_KERNELS_LOGGER).addFilter(flt)
        _state["filter"] = flt
        _announce(
            "hf_vlm_chunked",
            "pure-PyTorch chunked scan; mamba-ssm CUDA kernels not in use, convolution and "
            "one-token step use transformers' PyTorch path",
        )
        return "hf_vlm_chunked"


def uninstall_fast_scan() -> None:
    """Restore transformers' original ``mamba_selective_scan`` (no-op if not installed)."""
    with _lock:
        mod = importlib.import_module(_MAMBA_MODULE)
        if _state["original"] is not None and getattr(mod.mamba_selective_scan, "_hf_vlm_fast_scan", False):
            mod.mamba_selective_scan = _state["original"]
        _state["original"] = None
        if _state["filter"] is not None:
            logging.getLogger(_HUB_KERNELS_LOGGER).removeFilter(_state["filter"])
            _state["filter"] = None
        _state["announced"].discard("hf_vlm_chunked")


def active_scan_backend() -> str:
    """``"hf_vlm_chunked"``, ``"mamba_ssm"`` or ``"transformers_reference"``."""
    mod = importlib.import_module(_MAMBA_MODULE)
    if getattr(mod.mamba_selective_scan, "_hf_vlm_fast_scan", False):
        return "hf_vlm_chunked"
    return "mamba_ssm" if mamba_kernels_available() else "transformers_reference"

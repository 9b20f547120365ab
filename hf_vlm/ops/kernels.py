"""Which selective-scan implementation the Mamba-1 layers of an hf_vlm model run.

Why: without mamba-ssm's CUDA kernels transformers runs a sequential Python loop over time
(`mamba_selective_scan`) that is two orders of magnitude slower than the matmuls around it and
stores `(B, D, L, N)` tensors (docs/architecture.md, "Facts that bite"). The Mamba-1 mixers
(`MambaMixer`, `FalconMambaMixer`, `JambaMambaMixer`) look that function up as a module global
at call time (`hf_vlm.compat.scan_patch_points`), so hf_vlm puts a small dispatcher there.

Scope, so nobody is surprised: the dispatcher only changes the scan of mixers that belong to a
model hf_vlm built or loaded (`MambaVLMForConditionalGeneration` calls `attach_fast_scan` on its
language model; forward hooks mark "this mixer is ours" for the duration of its forward, which
also covers activation-checkpointing recomputation). A plain `MambaForCausalLM` in the same
process keeps transformers' own path. `HF_VLM_FAST_SCAN=0` (or `set_scan_scope("off")`) turns
the routing off; `HF_VLM_FAST_SCAN=global` (or `install_fast_scan()`) extends it to every Mamba-1
layer in the process.

The ladder (first usable rung wins, per call, by the tensors' device; logged once per rung):

1. `mamba_ssm`: mamba-ssm + causal-conv1d importable and the inputs on CUDA; transformers' own
   function already calls the fused kernel, so it is used as is;
2. `hub_kernels`: transformers' `kernels` integration when the user enabled it (never in tests);
3. `hf_vlm_triton`: our Triton kernels (`hf_vlm.ops.triton_scan`) when triton is installed and the
   inputs are on CUDA; triton is imported on the first CUDA call, never at `import hf_vlm`;
4. `hf_vlm_chunked`: our chunked pure-PyTorch scan (`hf_vlm.ops.selective_scan`);
5. `transformers_reference`: transformers' sequential fallback.

`HF_VLM_SCAN_BACKEND=<rung>` (or `set_scan_backend`) forces one rung. `backend_usage()` counts
the calls per rung, which is how the tests prove which scan actually ran.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
import os
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .. import compat
from .selective_scan import selective_scan

__all__ = [
    "SCAN_BACKENDS",
    "ScanRung",
    "active_scan_backend",
    "attach_fast_scan",
    "backend_usage",
    "install_fast_scan",
    "mamba_kernels_available",
    "register_scan_rung",
    "reset_backend_usage",
    "scan_ladder_report",
    "set_scan_backend",
    "set_scan_scope",
    "uninstall_fast_scan",
]

logger = logging.getLogger("hf_vlm.ops")

SCAN_BACKENDS = ("mamba_ssm", "hub_kernels", "hf_vlm_triton", "hf_vlm_chunked", "transformers_reference")
SCOPES = ("hf_vlm", "global", "off")
SCOPE_ENV, BACKEND_ENV = "HF_VLM_FAST_SCAN", "HF_VLM_SCAN_BACKEND"
# transformers' per-function "falling back to its reference PyTorch implementation" notes that
# are wrong while our scan serves the call
_FALLBACK_FUNCS = (
    "selective_scan_fn",
    "selective_state_update",
    "mamba_inner_fn",
    "causal_conv1d_fn",
    "causal_conv1d_update",
)


@functools.cache
def mamba_kernels_available() -> bool:
    """True when mamba-ssm and causal-conv1d import and a CUDA device is present (checked once)."""
    try:
        importlib.import_module("mamba_ssm")
        importlib.import_module("causal_conv1d")
    except Exception:  # ImportError, or a broken CUDA extension build
        return False
    return torch.cuda.is_available()


def _hub_kernels_enabled() -> bool:
    """transformers routes through Hub kernels only when the `kernels` package is installed and the
    user opted in (`USE_HUB_KERNELS`); hf_vlm never downloads one itself."""
    if os.environ.get("USE_HUB_KERNELS", "").lower() not in ("1", "true", "yes"):
        return False
    try:
        importlib.import_module("kernels")
    except ImportError:
        return False
    return True


@functools.cache
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None  # looked up, not imported


@functools.cache
def _triton_import_error() -> str | None:
    try:
        importlib.import_module("hf_vlm.ops.triton_scan")
    except Exception as exc:  # a broken or too old triton install
        return f"triton import failed: {type(exc).__name__}: {exc}"
    return None


def _triton_unavailable(device: torch.device) -> str | None:
    if not _triton_installed():
        return "triton not installed (pip install triton; on Windows: pip install triton-windows)"
    if device.type != "cuda":
        return "needs CUDA tensors"
    return _triton_import_error()


def _triton_scan(
    hidden_states, dt, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False, **kwargs
):
    """Our Triton scan with transformers' `mamba_selective_scan` signature; fp64 calls (which the
    fp32 kernels refuse) go to the chunked scan."""
    if torch.float64 in (hidden_states.dtype, dt.dtype, A.dtype):
        return _chunked_scan(hidden_states, dt, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    from .triton_scan import selective_scan as triton_selective_scan

    return triton_selective_scan(
        hidden_states,
        dt,
        A,
        B,
        C,
        D=D,
        z=z,
        delta_bias=delta_bias,
        delta_softplus=delta_softplus,
        return_last_state=return_last_state,
    )


def _chunked_scan(
    hidden_states, dt, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False, **kwargs
):
    """Our chunked scan with transformers' `mamba_selective_scan` signature (ignores `use_mambapy`,
    `use_associative_scan` and other backend-selection keywords)."""
    return selective_scan(
        hidden_states,
        dt,
        A,
        B,
        C,
        D=D,
        z=z,
        delta_bias=delta_bias,
        delta_softplus=delta_softplus,
        return_last_state=return_last_state,
    )


@dataclass
class ScanRung:
    """One rung of the ladder: `unavailable(device)` returns why it cannot serve (None = it can);
    `fn` is the implementation (None = transformers' own function at the patch point)."""

    name: str
    unavailable: Callable[[torch.device], str | None]
    fn: Callable | None = None


def _cuda_only(reason_missing: str, check: Callable[[], bool]) -> Callable[[torch.device], str | None]:
    def unavailable(device: torch.device) -> str | None:
        if device.type != "cuda":
            return "needs CUDA tensors"
        return None if check() else reason_missing

    return unavailable


_RUNGS: dict[str, ScanRung] = {
    "mamba_ssm": ScanRung("mamba_ssm", _cuda_only("mamba-ssm / causal-conv1d not importable", mamba_kernels_available)),
    "hub_kernels": ScanRung(
        "hub_kernels", _cuda_only("`kernels` not installed or USE_HUB_KERNELS not set", _hub_kernels_enabled)
    ),
    "hf_vlm_triton": ScanRung("hf_vlm_triton", _triton_unavailable, _triton_scan),
    "hf_vlm_chunked": ScanRung("hf_vlm_chunked", lambda device: None, _chunked_scan),
    "transformers_reference": ScanRung("transformers_reference", lambda device: None),
}


def register_scan_rung(rung: ScanRung) -> None:
    """Replace a rung of the ladder (the Triton scan registers itself this way)."""
    if rung.name not in SCAN_BACKENDS:
        raise ValueError(f"unknown scan backend {rung.name!r}; one of {SCAN_BACKENDS}")
    _RUNGS[rung.name] = rung


def _env_choice(name: str, allowed: tuple[str, ...], default: str | None, aliases: dict) -> str | None:
    raw = os.environ.get(name, "").strip().lower()
    if not raw:
        return default
    value = aliases.get(raw, raw)
    if value not in allowed:
        raise ValueError(f"{name}={raw!r}: use one of {allowed}")
    return value


_lock = threading.Lock()
_local = threading.local()  # .depth: how many hf_vlm mixers are currently inside their forward
_state: dict = {
    "originals": {},  # module path -> transformers' mamba_selective_scan
    "scope": _env_choice(SCOPE_ENV, SCOPES, "hf_vlm", {"1": "hf_vlm", "on": "hf_vlm", "0": "off", "false": "off"}),
    "forced": _env_choice(BACKEND_ENV, SCAN_BACKENDS, None, {}),
    "usage": Counter(),
    "announced": set(),
    "filter": None,
}


class _FallbackWarningFilter(logging.Filter):
    """Drops transformers' per-function Mamba fallback notes while our scan serves the calls."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if "falling back to its reference PyTorch implementation" not in msg:
            return True
        return not any(f"`{name}`" in msg for name in _FALLBACK_FUNCS)


def _in_scope() -> bool:
    scope = _state["scope"]
    return scope == "global" or (scope == "hf_vlm" and getattr(_local, "depth", 0) > 0)


def choose_rung(device: torch.device, in_scope: bool = True) -> tuple[str, str]:
    """(rung name, why) for a call on `device`: the forced rung, else the first usable one."""
    if not in_scope:
        if mamba_kernels_available() and device.type == "cuda":
            return "mamba_ssm", "outside hf_vlm's scope: transformers' own path (fused kernels)"
        return "transformers_reference", "outside hf_vlm's scope: transformers' own path"
    forced = _state["forced"]
    if forced is not None:
        reason = _RUNGS[forced].unavailable(device)
        if reason is None:
            return forced, f"forced by {BACKEND_ENV} / set_scan_backend"
        raise RuntimeError(f"Scan backend {forced!r} was forced but cannot run here: {reason}")
    skipped = []
    for name in SCAN_BACKENDS:
        reason = _RUNGS[name].unavailable(device)
        if reason is None:
            return name, "; ".join(skipped) or "first rung of the ladder"
        skipped.append(f"{name}: {reason}")
    return "transformers_reference", "; ".join(skipped)


def _announce(name: str, why: str) -> None:
    if name not in _state["announced"]:
        _state["announced"].add(name)
        logger.info("Mamba selective scan backend: %s (%s)", name, why)


def _make_dispatcher(original: Callable) -> Callable:
    def mamba_selective_scan(hidden_states, *args, **kwargs):
        name, why = choose_rung(hidden_states.device, _in_scope())
        _state["usage"][name] += 1
        fn = _RUNGS[name].fn
        if fn is None:
            return original(hidden_states, *args, **kwargs)
        _announce(name, why)
        return fn(hidden_states, *args, **kwargs)

    mamba_selective_scan._hf_vlm_original = original
    return mamba_selective_scan


def _install_dispatchers() -> None:
    """Put the dispatcher at every patch point (idempotent) and quiet the wrong fallback notes."""
    with _lock:
        for path, module in compat.scan_patch_points().items():
            current = getattr(module, compat.SCAN_FUNCTION)
            if getattr(current, "_hf_vlm_original", None) is None:
                _state["originals"][path] = current
                setattr(module, compat.SCAN_FUNCTION, _make_dispatcher(current))
        if _state["filter"] is None:
            _state["filter"] = _FallbackWarningFilter()
            logging.getLogger(compat.HUB_KERNELS_LOGGER).addFilter(_state["filter"])


def _enter(module, args):
    _local.depth = getattr(_local, "depth", 0) + 1


def _leave(module, args, output):
    _local.depth = max(getattr(_local, "depth", 1) - 1, 0)


def attach_fast_scan(language_model: torch.nn.Module) -> int:
    """Route the scan of every Mamba-1 mixer inside `language_model` through the ladder.

    Called by `MambaVLMForConditionalGeneration.__init__`, so every load path (from_pretrained,
    the Auto classes, from_components, the trainer) gets it. Returns the number of mixers hooked.
    """
    if _state["scope"] == "off":
        return 0
    classes = compat.mixer_classes()
    mixers = [m for m in language_model.modules() if classes and isinstance(m, classes)]
    if not mixers:
        return 0
    _install_dispatchers()
    for mixer in mixers:
        if not getattr(mixer, "_hf_vlm_scan_hooked", False):
            mixer.register_forward_pre_hook(_enter)
            mixer.register_forward_hook(_leave, always_call=True)
            mixer._hf_vlm_scan_hooked = True
    return len(mixers)


def set_scan_scope(scope: str) -> None:
    """ "hf_vlm" (default: hf_vlm models only), "global" (every Mamba-1 layer) or "off"."""
    if scope not in SCOPES:
        raise ValueError(f"scan scope must be one of {SCOPES}, got {scope!r}")
    _state["scope"] = scope
    if scope != "off":
        _install_dispatchers()


def set_scan_backend(name: str | None) -> None:
    """Force one rung of the ladder for calls in scope (None: choose automatically)."""
    if name is not None and name not in SCAN_BACKENDS:
        raise ValueError(f"scan backend must be one of {SCAN_BACKENDS} or None, got {name!r}")
    _state["forced"] = name


def install_fast_scan(force: bool = False) -> str:
    """Opt in for every Mamba-1 layer in the process (plain `MambaForCausalLM` included).

    `force=True` also forces our chunked scan over mamba-ssm's kernels (benchmarks, tests).
    Returns the rung a CPU call would now take.
    """
    set_scan_scope("global")
    if force:
        set_scan_backend("hf_vlm_chunked")
    return active_scan_backend()


def uninstall_fast_scan() -> None:
    """Put transformers' functions back and reset scope, forcing and the announcements."""
    with _lock:
        for path, module in compat.scan_patch_points().items():
            original = _state["originals"].pop(path, None)
            if original is not None:
                setattr(module, compat.SCAN_FUNCTION, original)
        if _state["filter"] is not None:
            logging.getLogger(compat.HUB_KERNELS_LOGGER).removeFilter(_state["filter"])
            _state["filter"] = None
        _state["scope"], _state["forced"] = "hf_vlm", None
        _state["announced"].clear()


def active_scan_backend(device: str | torch.device = "cpu", scoped: bool = True) -> str:
    """The rung a call on `device` takes now: inside an hf_vlm model (`scoped`) or a plain model."""
    scope = _state["scope"]
    in_scope = scope == "global" and bool(_state["originals"]) if not scoped else scope != "off"
    return choose_rung(torch.device(device), in_scope)[0]


def scan_ladder_report(device: str | torch.device = "cpu") -> list[tuple[str, str]]:
    """(rung, "used" / "available" / why not) for every rung on `device` (`hf-vlm doctor`)."""
    device = torch.device(device)
    chosen = choose_rung(device, _state["scope"] != "off")[0]
    rows = []
    for name in SCAN_BACKENDS:
        reason = _RUNGS[name].unavailable(device)
        rows.append((name, "used" if name == chosen else "available" if reason is None else reason))
    return rows


def backend_usage() -> dict[str, int]:
    """Calls per rung since the last `reset_backend_usage()`."""
    return dict(_state["usage"])


def reset_backend_usage() -> None:
    _state["usage"].clear()

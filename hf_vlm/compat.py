"""Every use of a transformers internal, in one place.

hf_vlm leans on a few transformers details that are not public API and that releases move
(transformers 5.24 renamed Mamba's `cache_params` to `cache`, deprecated until 5.40). Each is
named here once, detected from the installed release rather than from a version number, and
the rest of the package imports it from this module, so a release that moves one breaks one
place (and `tests/test_compat.py` says which). See docs/architecture.md ("Facts that bite").

* `CACHE_FIELD`: the name of the recurrent cache in Mamba outputs and forward keywords.
* `SCAN_PATCH_POINTS`: modules whose `mamba_selective_scan` global the Mamba-1 mixers look up
  at call time (our fast scan is routed in there, see `hf_vlm.ops.kernels`).
* `MIXER_CLASS_NAMES`: the Mamba-1 mixer classes of those modules (the scope of the fast scan).
* `HUB_KERNELS_LOGGER`: where transformers logs its "falling back to the PyTorch path" notes.
* `modeling_module(model_type)`: transformers' modeling module of a model type (the state-space
  families keep their scan and fused-kernel entry points there as module globals).
* `SSD_SCAN_FUNCTION`: the chunked SSD function the Mamba-2 mixers call (the benchmark swaps in
  its scan-free floor there).
* `FUSED_KERNEL_FUNCTIONS`: mamba-ssm's fused training kernels, which receive mixer weights as raw
  tensors (`tests/test_backbones.py` records what they get to derive the LoRA / int8 lists).
* Generation hooks: `GenerationMixin.prepare_inputs_for_generation` and
  `_expand_inputs_for_generation` are overridden by the model; their keyword contracts are
  checked by `generation_hooks_compatible()` (run by the tests on every release we test).
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

import transformers
from transformers.models.mamba import modeling_mamba

TRANSFORMERS_VERSION = transformers.__version__


def _detect_cache_field() -> str:
    """ "cache" on transformers >= 5.24, "cache_params" before (read off Mamba's own output class)."""
    fields = getattr(modeling_mamba.MambaCausalLMOutput, "__dataclass_fields__", {})
    return "cache" if "cache" in fields else "cache_params"


CACHE_FIELD = _detect_cache_field()
LEGACY_CACHE_FIELD = "cache_params"
# Before 5.24 the Mamba-2 hybrids (Falcon-H1, Jamba, Zamba2, Bamba, ...) kept their cache under
# the attention models' name; 5.24 moved them to `cache` too.
HYBRID_CACHE_FIELD = "past_key_values"
_CACHE_NAMES = tuple(dict.fromkeys((CACHE_FIELD, LEGACY_CACHE_FIELD, HYBRID_CACHE_FIELD)))

# module path -> Mamba-1 mixer class name. Each module defines a `mamba_selective_scan`
# function that its mixer calls as a module global (so replacing the attribute re-routes it).
_SCAN_MODULES = {
    "transformers.models.mamba.modeling_mamba": "MambaMixer",
    "transformers.models.falcon_mamba.modeling_falcon_mamba": "FalconMambaMixer",
    "transformers.models.jamba.modeling_jamba": "JambaMambaMixer",
}
SCAN_FUNCTION = "mamba_selective_scan"
SSD_SCAN_FUNCTION = "mamba2_chunk_scan"
SSD_CHUNK_ATTRIBUTE = "chunk_size"  # read by the Mamba-2 mixers at every forward
# Mamba-1 training kernel, Mamba-2 training kernel (each returns None without mamba-ssm: the torch path runs)
FUSED_KERNEL_FUNCTIONS = ("mamba_inner_fn", "mamba2_split_conv1d_scan_combined")
HUB_KERNELS_LOGGER = "transformers.integrations.hub_kernels"


def modeling_module(model_type: str):
    """`transformers.models.<type>.modeling_<type>` (the layout every supported SSM family follows)."""
    return importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")


def scan_patch_points() -> dict[str, Any]:
    """Importable modules (by path) that expose `mamba_selective_scan`; missing ones are skipped."""
    found = {}
    for path in _SCAN_MODULES:
        try:
            module = importlib.import_module(path)
        except ImportError:
            continue
        if callable(getattr(module, SCAN_FUNCTION, None)):
            found[path] = module
    return found


def mixer_classes() -> tuple[type, ...]:
    """The Mamba-1 mixer classes whose scan hf_vlm can replace."""
    classes = []
    for path, module in scan_patch_points().items():
        cls = getattr(module, _SCAN_MODULES[path], None)
        if isinstance(cls, type):
            classes.append(cls)
    return tuple(classes)


def lm_cache(outputs) -> Any:
    """The recurrent cache of a language-model output, whatever this release and family call it."""
    for name in _CACHE_NAMES:
        value = getattr(outputs, name, None)
        if value is not None:
            return value
    return None


def pop_cache_kwarg(kwargs: dict) -> Any:
    """Take the cache out of forward keywords given under any of its names (generation passes one)."""
    found = [kwargs.pop(name, None) for name in ("cache", *_CACHE_NAMES)]
    return next((cache for cache in found if cache is not None), None)


def cache_keyword(model) -> str:
    """The keyword `model.forward` takes its cache under (per family on releases before 5.24)."""
    if callable(getattr(model, "get_base_model", None)):  # a peft wrapper forwards **kwargs
        model = model.get_base_model()
    cls = type(model)
    if cls not in _CACHE_KEYWORDS:
        params = inspect.signature(cls.forward).parameters
        _CACHE_KEYWORDS[cls] = next((name for name in _CACHE_NAMES if name in params), CACHE_FIELD)
    return _CACHE_KEYWORDS[cls]


_CACHE_KEYWORDS: dict[type, str] = {}


def cache_kwargs(cache, model=None) -> dict:
    """`{name: cache}` for calling a transformers SSM language model (`model`) of this release."""
    return {CACHE_FIELD if model is None else cache_keyword(model): cache}


def generation_hooks_compatible() -> list[str]:
    """Problems with the generation hooks the model overrides (empty when all is as expected)."""
    from transformers import GenerationMixin

    problems = []
    expand = inspect.signature(GenerationMixin._expand_inputs_for_generation).parameters
    for name in ("expand_size", "is_encoder_decoder", "input_ids"):
        if name not in expand:
            problems.append(f"GenerationMixin._expand_inputs_for_generation has no {name!r} parameter")
    prepare = inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters
    for name in ("input_ids", "attention_mask", "is_first_iteration"):
        if name not in prepare:
            problems.append(f"GenerationMixin.prepare_inputs_for_generation has no {name!r} parameter")
    return problems


__all__ = [
    "CACHE_FIELD",
    "FUSED_KERNEL_FUNCTIONS",
    "HUB_KERNELS_LOGGER",
    "HYBRID_CACHE_FIELD",
    "LEGACY_CACHE_FIELD",
    "SCAN_FUNCTION",
    "SSD_CHUNK_ATTRIBUTE",
    "SSD_SCAN_FUNCTION",
    "TRANSFORMERS_VERSION",
    "cache_keyword",
    "cache_kwargs",
    "generation_hooks_compatible",
    "lm_cache",
    "mixer_classes",
    "modeling_module",
    "pop_cache_kwarg",
    "scan_patch_points",
]

"""What differs between the state-space language models transformers ships, in one registry.

hf_vlm joins a vision bridge to any of nine SSM / hybrid causal LMs loaded through
`AutoModelForCausalLM`. They share the recurrent `DynamicCache` of transformers 5.24 and zero
padded positions inside their mixers, but differ in the facts that decide whether training and
generation are *right*: which weights mamba-ssm's fused kernels read as raw tensors (so a LoRA
adapter there is bypassed on GPU and an int8 weight breaks the kernel), whether the attention
layers still need the padding mask after the prefill, where the layers and the final norm live,
and what the config calls its sizes. Prismatic `materialize.py` style: one frozen dataclass per
family, read through `get_family`, which names the supported types when it refuses one.

Every entry is checked against the real modules by `tests/test_backbones.py` (tiny configs, CPU):
save/load, batched == one-by-one greedy decoding with the family's cache, LoRA on the safe targets
(and the reasons for the refused ones), 8-bit / 4-bit bitsandbytes, the layer pattern and the dims.
The scan backend per family and why Mamba-2 layers keep transformers' own path: `SSMFamily.attach_scan`
and `benchmarks/bench_families.py`.
"""

from __future__ import annotations

import importlib
import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from .loading import MAMBA_INT8_SKIP_MODULES

logger = logging.getLogger(__name__)

SCAN_MAMBA1, SCAN_MAMBA2 = "mamba1", "mamba2"
LAYER_PATTERN = r"(?:^|\.)layers\.(\d+)\."  # every family keeps its blocks in a `layers` ModuleList

# Why a target is refused; the same fact holds in several families.
_CONV = (
    "depthwise Conv1d (groups = channels): PEFT refuses it for Mamba model types and otherwise accepts only "
    "ranks divisible by the groups, and mamba-ssm's fused kernels read conv1d.weight as a raw tensor"
)
_OUT_M1 = "PEFT refuses it, and mamba-ssm's fused mamba_inner_fn reads out_proj.weight raw (adapter bypassed on GPU)"
_X_M1 = "mamba-ssm's fused mamba_inner_fn reads x_proj.weight raw, so the adapter is bypassed on GPU"
_DT = (
    "the mixer computes `dt_proj.weight @ x` itself on the PyTorch path (and the fused kernel reads it raw): "
    "the adapter is bypassed everywhere, it never receives a gradient"
)
_OUT_M2 = (
    "mamba-ssm's fused training kernel (mamba_split_conv1d_scan_combined) reads out_proj.weight raw, so the "
    "adapter is bypassed on GPU (PEFT refuses it for mamba2/falcon_h1/nemotron_h; TII's Falcon-H1 "
    "fine-tuning guide excludes it)"
)
_EXPERTS = "MoE experts are 3-D nn.Parameters, not nn.Linear modules: LoRA target_modules cannot reach them"
_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_M2_REFUSED = {"out_proj": _OUT_M2, "conv1d": _CONV}


@dataclass(frozen=True)
class ConfigNames:
    """Attribute names of a family's config (the memory estimate and `SSMFamily.dims` read them)."""

    state: str
    expand: str = "expand"  # d_inner = expand * hidden, unless `inner` names it directly
    inner: str | None = None
    heads: str | None = None  # Mamba-2 heads (head_dim * heads = d_inner)
    head_dim: str | None = None
    groups: str | None = None
    chunk: str | None = None
    dt_rank: str | None = None  # Mamba-1 only
    mlp: str | None = None  # MLP intermediate size of the hybrids


@dataclass(frozen=True)
class SSMDims:
    """Sizes of one language model, read from its config (see `SSMFamily.dims`)."""

    hidden: int
    layers: int
    ssm_layers: int
    attention_layers: int
    inner: int
    state: int
    heads: int | None
    head_dim: int | None
    groups: int | None
    chunk: int | None
    dt_rank: int | None
    mlp: int | None
    vocab: int


@dataclass(frozen=True)
class SSMFamily:
    """The facts hf_vlm needs about one `model_type` (each field says why it matters)."""

    model_type: str
    causal_lm_class: str
    mixer_class: str  # the SSM mixer module class (one per SSM layer)
    scan: str  # SCAN_MAMBA1 (selective scan) or SCAN_MAMBA2 (SSD)
    names: ConfigNames
    lora_safe_targets: tuple[str, ...]  # called as modules on every path (torch and fused kernels)
    lora_refused_targets: Mapping[str, str]  # target -> why
    int8_skip_modules: tuple[str, ...]  # bitsandbytes llm_int8_skip_modules (8-bit and 4-bit)
    no_split_modules: tuple[str, ...]  # FSDP wrap / device_map units
    final_norm: str  # dotted path of the final norm in the causal LM ("unfreeze last N" trains it too)
    decode_needs_attention_mask: bool  # attention layers mask padded keys of the KV cache at every step
    decode_needs_position_ids: bool = False  # without them, decode steps restart RoPE positions at 0
    input_ids_embedding_scale: str | None = None  # config attr the LM applies to input_ids only, not inputs_embeds
    shared_modules: tuple[str, ...] = ()  # blocks tied across layers (not owned by one layer index)
    notes: str = ""
    layer_pattern: str = LAYER_PATTERN
    _layer_re: re.Pattern = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "_layer_re", re.compile(self.layer_pattern))

    # --- config --------------------------------------------------------------------------
    def dims(self, config) -> SSMDims:
        n = self.names
        hidden, layers = int(config.hidden_size), int(config.num_hidden_layers)
        types = list(getattr(config, "layer_types", None) or ["linear_attention"] * layers)
        inner = int(getattr(config, n.inner)) if n.inner else int(getattr(config, n.expand) * hidden)

        def get(name):
            return None if name is None else int(getattr(config, name))

        return SSMDims(
            hidden=hidden,
            layers=layers,
            ssm_layers=sum(t in ("linear_attention", "hybrid") for t in types),
            attention_layers=sum(t in ("full_attention", "hybrid") for t in types),
            inner=inner,
            state=get(n.state),
            heads=get(n.heads),
            head_dim=get(n.head_dim),
            groups=get(n.groups),
            chunk=get(n.chunk),
            dt_rank=get(n.dt_rank),
            mlp=get(n.mlp),
            vocab=int(config.vocab_size),
        )

    # --- layers ----------------------------------------------------------------------------
    def layer_index(self, name: str) -> int | None:
        """Decoder-layer index of a parameter / module name (None outside the layers)."""
        match = self._layer_re.search(name + ".")
        return int(match.group(1)) if match else None

    def layer_indices(self, model: nn.Module) -> set[int]:
        return {i for name, _ in model.named_modules() if (i := self.layer_index(name)) is not None}

    def mixers(self, model: nn.Module) -> list[nn.Module]:
        return [m for m in model.modules() if type(m).__name__ == self.mixer_class]

    # --- LoRA ------------------------------------------------------------------------------
    def validate_lora_targets(self, targets) -> list[str]:
        """The targets as a list; a refused or unknown one is a ValueError that says why."""
        targets = [targets] if isinstance(targets, str) else list(targets)
        for target in targets:
            if target in self.lora_refused_targets:
                raise ValueError(
                    f"lora_target_modules: {target!r} is refused for {self.model_type} "
                    f"({self.lora_refused_targets[target]}). Allowed: {self.lora_safe_targets}."
                )
            if target not in self.lora_safe_targets:
                raise ValueError(
                    f"lora_target_modules: {target!r} is not a known-safe target for {self.model_type}; "
                    f"allowed: {self.lora_safe_targets}"
                )
        return targets

    # --- embeddings and scan ---------------------------------------------------------------
    def input_embeddings(self, language_model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings exactly as the LM's own `input_ids` path computes them: `(B, L, D)`.

        Falcon-H1 multiplies by `embedding_multiplier` (~5.7 in its checkpoints) only when it embeds
        `input_ids` itself; a VLM passing `inputs_embeds` must apply it or feed every text token at the
        wrong scale.
        """
        embeds = language_model.get_input_embeddings()(input_ids)  # (B, L, D)
        if self.input_ids_embedding_scale:
            embeds = embeds * getattr(language_model.config, self.input_ids_embedding_scale)
        return embeds

    def attach_scan(self, language_model: nn.Module) -> int:
        """Route the Mamba-1 layers through hf_vlm's scan ladder (`hf_vlm.ops.kernels`). Returns the mixers hooked.

        Mamba-2 layers keep transformers' chunked SSD path (mamba-ssm's fused kernels when installed): on CPU
        it runs fwd+bwd in 1.6-1.9x the scan-free floor's time, close to our Mamba-1 scan, so it needs no
        faster kernel; it does keep 1.9-2.8x the floor's activations (`benchmarks/bench_families.py`), which
        activation checkpointing bounds to one layer (the hybrid recipes turn it on).
        """
        if self.scan != SCAN_MAMBA1:
            return 0
        # by absolute name: this module also ships as remote code, where hf_vlm.ops may be absent
        try:
            kernels = importlib.import_module("hf_vlm.ops.kernels")
        except ImportError:
            return 0
        return kernels.attach_fast_scan(language_model)

    # --- bitsandbytes ------------------------------------------------------------------------
    def quantization_config(self, bits: int, compute_dtype: torch.dtype = torch.float32):
        """bitsandbytes config keeping `int8_skip_modules` in full precision (NF4 for 4-bit)."""
        try:
            import bitsandbytes  # noqa: F401
            from transformers import BitsAndBytesConfig
        except ImportError as error:
            raise ImportError(
                f"{bits}-bit loading of the {self.model_type} language model needs bitsandbytes "
                f"(pip install bitsandbytes): {error}"
            ) from error
        skip = list(self.int8_skip_modules)
        if bits == 8:
            return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
        if bits == 4:
            return BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_compute_dtype=compute_dtype,
                llm_int8_skip_modules=skip,
            )
        raise ValueError(f"quantization bits must be 8 or 4, got {bits!r}")


def _mamba2_family(
    model_type,
    causal_lm_class,
    mixer_class,
    names,
    extra_safe,
    no_split,
    final_norm,
    hybrid=True,
    refused=None,
    **kwargs,
) -> SSMFamily:
    return SSMFamily(
        model_type,
        causal_lm_class,
        mixer_class,
        SCAN_MAMBA2,
        names,
        lora_safe_targets=("in_proj",) + extra_safe,
        lora_refused_targets={**_M2_REFUSED, **(refused or {})},
        int8_skip_modules=("out_proj", "lm_head"),
        no_split_modules=no_split,
        final_norm=final_norm,
        decode_needs_attention_mask=hybrid,
        **kwargs,
    )


# The skip list of the original Mamba, each entry's reason in hf_vlm.loading (docs/quantization.md).
_M1_SKIP = tuple(MAMBA_INT8_SKIP_MODULES)
_M1_REFUSED = {"out_proj": _OUT_M1, "conv1d": _CONV, "x_proj": _X_M1, "dt_proj": _DT}
_M1_NAMES = ConfigNames(state="state_size", inner="intermediate_size", dt_rank="time_step_rank")
_HYB_NAMES = dict(
    state="mamba_d_state",
    expand="mamba_expand",
    heads="mamba_n_heads",
    head_dim="mamba_d_head",
    groups="mamba_n_groups",
    chunk="mamba_chunk_size",
    mlp="intermediate_size",
)

FAMILIES: dict[str, SSMFamily] = {
    f.model_type: f
    for f in (
        SSMFamily(
            "mamba",
            "MambaForCausalLM",
            "MambaMixer",
            SCAN_MAMBA1,
            _M1_NAMES,
            ("in_proj", "embeddings"),
            _M1_REFUSED,
            _M1_SKIP,
            ("MambaBlock", "MambaMixer"),
            "backbone.norm_f",
            decode_needs_attention_mask=False,
            notes="GPT-NeoX tokenizer: pad = eos = bos = 0, so generate() cannot infer the padding mask: pass it.",
        ),
        SSMFamily(
            "falcon_mamba",
            "FalconMambaForCausalLM",
            "FalconMambaMixer",
            SCAN_MAMBA1,
            _M1_NAMES,
            ("in_proj", "embeddings"),
            _M1_REFUSED,
            _M1_SKIP,
            ("FalconMambaBlock", "FalconMambaMixer"),
            "backbone.norm_f",
            decode_needs_attention_mask=False,
            notes="Quantised, the torch path calls dt_proj as a module; the fused kernel still reads x/dt/out_proj raw.",  # noqa: E501
        ),
        _mamba2_family(
            "mamba2",
            "Mamba2ForCausalLM",
            "Mamba2Mixer",
            ConfigNames(
                state="state_size", heads="num_heads", head_dim="head_dim", groups="n_groups", chunk="chunk_size"
            ),
            ("embeddings",),
            ("Mamba2Block",),
            "backbone.norm_f",
            hybrid=False,
        ),
        _mamba2_family(
            "falcon_h1",
            "FalconH1ForCausalLM",
            "FalconH1Mixer",
            ConfigNames(**{**_HYB_NAMES, "inner": "mamba_d_ssm"}),
            _ATTN + ("gate_proj", "up_proj", "down_proj", "embed_tokens"),
            ("FalconH1DecoderLayer",),
            "model.final_layernorm",
            input_ids_embedding_scale="embedding_multiplier",
            notes="Parallel hybrid: every layer runs attention (RoPE) and Mamba-2 side by side.",
        ),
        _mamba2_family(
            "granitemoehybrid",
            "GraniteMoeHybridForCausalLM",
            "GraniteMoeHybridMambaLayer",
            ConfigNames(**{**_HYB_NAMES, "mlp": "shared_intermediate_size"}),
            _ATTN + ("input_linear", "output_linear", "embed_tokens"),
            ("GraniteMoeHybridDecoderLayer",),
            "model.norm",
            refused={"experts": _EXPERTS},
            notes="Granite 4.0-H: ~9 Mamba-2 layers per attention layer, no positional encoding; "
            "embedding_multiplier is applied to inputs_embeds too.",
        ),
        _mamba2_family(
            "bamba",
            "BambaForCausalLM",
            "BambaMixer",
            ConfigNames(**_HYB_NAMES),
            _ATTN + ("gate_proj", "up_proj", "down_proj", "embed_tokens"),
            ("BambaDecoderLayer",),
            "model.final_layernorm",
            decode_needs_position_ids=True,
            notes="transformers 5.24 BambaModel defaults position_ids to arange(seq_len) without the cache "
            "offset (the other hybrids add cache.get_seq_length()): a caller that does not pass "
            "position_ids decodes every new token at RoPE position 0.",
        ),
        _mamba2_family(
            "zamba2",
            "Zamba2ForCausalLM",
            "Zamba2MambaMixer",
            ConfigNames(
                state="mamba_d_state",
                expand="mamba_expand",
                heads="n_mamba_heads",
                head_dim="mamba_headdim",
                groups="mamba_ngroups",
                chunk="chunk_size",
                mlp="intermediate_size",
            ),
            _ATTN + ("gate_up_proj", "down_proj", "linear", "embed_tokens"),
            ("Zamba2HybridLayer", "Zamba2MambaDecoderLayer"),
            "model.final_layernorm",
            shared_modules=("shared_transformer",),
            notes="The shared transformer's weights are tied across all hybrid layers: named_parameters() "
            "lists them under the first one only, so 'unfreeze the last N layers' does not own them.",
        ),
        _mamba2_family(
            "nemotron_h",
            "NemotronHForCausalLM",
            "NemotronHMamba2Mixer",
            ConfigNames(
                state="ssm_state_size",
                heads="mamba_num_heads",
                head_dim="mamba_head_dim",
                groups="n_groups",
                chunk="chunk_size",
                mlp="intermediate_size",
            ),
            _ATTN + ("up_proj", "down_proj", "embeddings"),
            ("NemotronHBlock",),
            "model.norm_f",
            refused={"experts": _EXPERTS},
        ),
        SSMFamily(
            "jamba",
            "JambaForCausalLM",
            "JambaMambaMixer",
            SCAN_MAMBA1,
            ConfigNames(state="mamba_d_state", expand="mamba_expand", dt_rank="mamba_dt_rank", mlp="intermediate_size"),
            ("in_proj", "x_proj", "out_proj") + _ATTN + ("gate_proj", "up_proj", "down_proj", "embed_tokens"),
            {"dt_proj": _DT, "conv1d": _CONV, "experts": _EXPERTS},
            ("lm_head",),
            ("JambaAttentionDecoderLayer", "JambaMambaDecoderLayer"),
            "model.final_layernorm",
            decode_needs_attention_mask=True,
            notes="transformers 5.24 has no fused mamba_inner_fn path for Jamba: x_proj/out_proj are module calls "
            "everywhere, and quantised, dt_proj is called as a module too (only the output head is kept).",
        ),
    )
}


def supported_model_types() -> tuple[str, ...]:
    return tuple(FAMILIES)


def get_family(config_or_model_type) -> SSMFamily:
    """The registry entry for a model type, a config (a VLM config: its `text_config`) or a model."""
    obj = config_or_model_type
    if not isinstance(obj, str):
        obj = getattr(obj, "config", obj)
        obj = getattr(obj, "text_config", None) or obj
        obj = getattr(obj, "model_type", None)
    if obj not in FAMILIES:
        raise ValueError(
            f"Language model type {obj!r} is not supported! hf_vlm supports the state-space language "
            f"models: {', '.join(FAMILIES)}"
        )
    return FAMILIES[obj]


def load_language_model(name_or_path: str, quantization=None, dtype: torch.dtype | None = None) -> nn.Module:
    """Any supported SSM / hybrid LM through `AutoModelForCausalLM`, from a local path or hub id.

    `quantization`: None, 8 / "8bit", 4 / "4bit" (bitsandbytes with the family's skip list), or a
    `BitsAndBytesConfig` (warned about when its skip list lacks the family's). A quantised LM stays frozen.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from .loading import disable_cpu_4bit_packing

    family = get_family(AutoConfig.from_pretrained(name_or_path))
    kwargs = {"dtype": dtype} if dtype is not None else {}
    if isinstance(quantization, (int, str)):
        bits = {"8bit": 8, "4bit": 4, 8: 8, 4: 4}.get(quantization)
        if bits is None:
            raise ValueError(
                f"quantization must be None, 8 / '8bit', 4 / '4bit' or a BitsAndBytesConfig, got {quantization!r}"
            )
        quantization = family.quantization_config(bits, dtype or torch.float32)
    if quantization is not None:
        missing = [m for m in family.int8_skip_modules if m not in (quantization.llm_int8_skip_modules or [])]
        if missing:
            logger.warning(
                "llm_int8_skip_modules lacks %s: %s reads these weights directly (or they are the tied "
                "output head); use hf_vlm.backbones.get_family(...).quantization_config()",
                missing,
                family.model_type,
            )
        kwargs["quantization_config"] = quantization
    model = AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)
    if getattr(quantization, "load_in_4bit", False):
        disable_cpu_4bit_packing(model)
    logger.info(
        "%s loaded from %s (%.1fM parameters)",
        type(model).__name__,
        name_or_path,
        sum(p.numel() for p in model.parameters()) / 1e6,
    )
    return model


def example_config(
    model_type: str,
    *,
    vocab_size: int,
    hidden_size: int = 32,
    num_layers: int = 2,
    state_size: int = 8,
    head_dim: int = 8,
    chunk_size: int = 8,
    groups: int = 1,
    experts: int = 0,
    **overrides,
):
    """A small config of any family in its typical layout (the last layer is the attention one), for the
    tests, the benchmark and tiny demos. Mamba-2 heads = 2 * hidden / head_dim; MLP width 2 * hidden."""
    import transformers

    h, n, mlp, heads = hidden_size, num_layers, 2 * hidden_size, max(2 * hidden_size // head_dim, 1)
    attn = dict(num_attention_heads=max(h // 64, 4), num_key_value_heads=2, max_position_embeddings=4096)
    m2 = dict(mamba_n_heads=heads, mamba_d_state=state_size, mamba_n_groups=groups, mamba_chunk_size=chunk_size)
    kw = {
        "mamba": dict(state_size=state_size, expand=2),
        "falcon_mamba": dict(state_size=state_size, expand=2),
        "mamba2": dict(
            state_size=state_size, expand=2, num_heads=heads, head_dim=head_dim, n_groups=groups, chunk_size=chunk_size
        ),
        "falcon_h1": dict(intermediate_size=mlp, mamba_d_ssm=2 * h, mamba_d_head=head_dim, **m2, **attn),
        "granitemoehybrid": dict(
            intermediate_size=mlp,
            shared_intermediate_size=mlp,
            num_local_experts=experts,
            num_experts_per_tok=min(experts, 1) or 1,
            position_embedding_type=None,
            layer_types=["mamba"] * (n - 1) + ["attention"],
            **m2,
            **attn,
        ),
        "bamba": dict(intermediate_size=mlp, attn_layer_indices=[n - 1], **m2, **attn),
        "zamba2": dict(
            layers_block_type=["mamba" if i != n // 2 else "hybrid" for i in range(n)],
            mamba_d_state=state_size,
            n_mamba_heads=heads,
            mamba_ngroups=groups,
            chunk_size=chunk_size,
            intermediate_size=mlp,
            use_mem_rope=True,
            **{k: v for k, v in attn.items() if k != "num_key_value_heads"},
        ),
        "nemotron_h": dict(
            layers_block_type=["linear_attention" if i % 2 == 0 else "mlp" for i in range(n - 1)] + ["full_attention"],
            head_dim=max(h // attn["num_attention_heads"], 8),
            intermediate_size=mlp,
            ssm_state_size=state_size,
            mamba_num_heads=heads,
            mamba_head_dim=head_dim,
            n_groups=groups,
            chunk_size=chunk_size,
            **attn,
        ),
        "jamba": dict(
            intermediate_size=mlp,
            attn_layer_period=n,
            attn_layer_offset=n - 1,
            expert_layer_period=2,
            expert_layer_offset=1,
            num_experts=max(experts, 1),
            num_experts_per_tok=1,
            mamba_d_state=state_size,
            **attn,
        ),
    }[get_family(model_type).model_type]
    if model_type != "nemotron_h":
        kw["num_hidden_layers"] = n
    kw.update(overrides)
    config_cls = getattr(transformers, get_family(model_type).causal_lm_class.replace("ForCausalLM", "Config"))
    return config_cls(vocab_size=vocab_size, hidden_size=h, **kw)


def ssd_chunk_tensor_bytes(dims: SSMDims, seq_len: int, batch: int = 1) -> int:
    """Bytes of one `(B, H, C, T, T)` fp32 tensor of transformers' SSD torch path (`segment_sum` and the
    intra-chunk scores; C = ceil(L / T) chunks of T = chunk_size): several exist per layer in a backward."""
    chunks = math.ceil(seq_len / dims.chunk)
    return batch * dims.heads * chunks * dims.chunk * dims.chunk * 4


__all__ = [
    "FAMILIES",
    "SCAN_MAMBA1",
    "SCAN_MAMBA2",
    "ConfigNames",
    "SSMDims",
    "SSMFamily",
    "example_config",
    "get_family",
    "load_language_model",
    "ssd_chunk_tensor_bytes",
    "supported_model_types",
]

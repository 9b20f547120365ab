"""Argument dataclasses for `hf-vlm train`: model, data and training (stage, LRs, guards).

TRL style: every field carries `help` metadata (so `HfArgumentParser` and the recipe YAMLs
document themselves) and `__post_init__` refuses settings that are known to fail silently,
naming the allowed values. The guard thresholds live here because the failures they catch
(dead visual features, wrong masks, an LLM that was meant to be frozen) are configuration
mistakes first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from transformers import TrainingArguments

from ..backbones import FAMILIES
from ..configuration_mamba_vlm import BRIDGE_TYPES
from ..data.images import DEFAULT_MAX_SLICES
from ..data.validation import IMAGE_CHECKS
from .outputs import DEFAULT_CSV_LOG

STAGES = ("align", "finetune")
GUARD_ACTIONS = ("warn", "stop")
PRETRAINED_QFORMER_LR = 1e-5  # BLIP-2's fine-tuning rate: for a Q-Former body loaded from BLIP-2 only
# A fresh Q-Former is a post-LN transformer trained from scratch: at the tiny demo's bridge rate (3e-3)
# it stayed blind (eval_vision_gap ~1e-6 after 200-400 steps), at 3e-4 / 1e-4 it reached 0.14 / 0.22
# in 200 steps (docs/architecture.md, "Q-Former"). New transformer modules train at 1e-4.
FRESH_QFORMER_LR = 1e-4
# LoRA targets differ per language-model family (hf_vlm.backbones: which the fused kernels read raw,
# which PEFT refuses). Here only a name no family knows is refused; the family's own list is applied
# with its reasons when the adapters are added (hf_vlm.training.freeze), once the LM is known.
KNOWN_LORA_TARGETS = tuple(dict.fromkeys(t for family in FAMILIES.values() for t in family.lora_safe_targets))


def _help(text: str, **kwargs):
    return field(metadata={"help": text}, **kwargs)


@dataclass
class ModelArguments:
    """Which vision tower, LLM and bridge to join, and where earlier weights come from."""

    vision_model_name_or_path: str | None = _help(
        "Vision tower: local path or hub id (e.g. openai/clip-vit-large-patch14).", default=None
    )
    language_model_name_or_path: str | None = _help(
        "Mamba LLM (MambaForCausalLM): local path or hub id (e.g. state-spaces/mamba-2.8b-hf).", default=None
    )
    processor_name_or_path: str | None = _help(
        "Saved MambaVLMProcessor (tokenizer + image processor + template); defaults to init_from.", default=None
    )
    tiny_preset: str | None = _help(
        "Build tiny random parts from hf_vlm.presets ('tiny' or 'micro') instead of loading: tests and demo.",
        default=None,
    )
    tiny_lm_family: str = _help(
        "With tiny_preset: the family of the tiny LM (any of hf_vlm.backbones, e.g. mamba2, falcon_h1).",
        default="mamba",
    )
    bridge_type: str = _help(f"Vision bridge: one of {BRIDGE_TYPES}.", default="mlp")
    max_visual_tokens: int = _help("Visual tokens per image after the bridge (96 fits 32 GB with 2.8B).", default=96)
    vision_feature_layer: int = _help("Vision-tower hidden layer fed to the bridge (-2 = penultimate).", default=-2)
    init_from: str | None = _help(
        "Checkpoint directory of a previous stage (e.g. the Stage 1 output) to start from.", default=None
    )
    from_scratch: bool = _help(
        "Ignore init_from / old bridge weights and start the bridge from random init. Use it when a previous "
        "Stage 1 collapsed (proxy loss ~0.0000x = dead visual features).",
        default=False,
    )
    llm_8bit: bool = _help("Load the LLM in 8-bit (bitsandbytes), skipping directly-read Mamba modules.", default=False)
    llm_4bit: bool = _help("Load the LLM in 4-bit (bitsandbytes NF4).", default=False)
    qformer_init_from: str | None = _help(
        "BLIP-2 checkpoint to initialise the Q-Former bridge from (bridge_type='qformer' only).", default=None
    )
    bridge_pooling: str = _help(
        "MLP bridge: how patches (and slices) are pooled to the budget: avg, max or attention (a learned "
        "weighted mean per pooling box, which finds a small finding in a study; hf_vlm.bridges).",
        default="avg",
    )
    slice_position_embedding: bool = _help(
        "Studies: add a learned embedding of each slice's relative z to its patch features (hf_vlm.modeling_study).",
        default=False,
    )
    study_depth_tokens: int = _help(
        "Studies, mlp bridge: z bins of the 3-D pooling (max_visual_tokens / this many in-plane tokens per bin); "
        "1 = 2-D pooling.",
        default=1,
    )

    def __post_init__(self):
        if self.bridge_type not in BRIDGE_TYPES:
            raise ValueError(f"bridge_type must be one of {BRIDGE_TYPES}, got {self.bridge_type!r}")
        if self.tiny_preset is not None:
            from ..presets import TINY_PRESETS

            if self.tiny_preset not in TINY_PRESETS:
                raise ValueError(f"tiny_preset must be one of {tuple(TINY_PRESETS)}, got {self.tiny_preset!r}")
        if self.tiny_lm_family not in FAMILIES:
            raise ValueError(f"tiny_lm_family must be one of {tuple(FAMILIES)}, got {self.tiny_lm_family!r}")
        if self.max_visual_tokens < 1:
            raise ValueError(f"max_visual_tokens must be >= 1, got {self.max_visual_tokens}")
        if self.llm_8bit and self.llm_4bit:
            raise ValueError("Choose one of llm_8bit / llm_4bit, not both")
        if self.qformer_init_from and self.bridge_type != "qformer":
            raise ValueError("qformer_init_from needs bridge_type='qformer'")


@dataclass
class DataArguments:
    """Where the cleaned caption CSVs and images are, and the token budget."""

    train_file: str | None = _help("Cleaned caption CSV for training (see `hf-vlm clean`).", default=None)
    eval_file: str | None = _help("Cleaned caption CSV for evaluation.", default=None)
    image_root: str | None = _help("Directory that relative image paths in the CSV are resolved against.", default=None)
    path_map: list[str] | None = _help(
        "Path prefix rewrites 'OLD=NEW' (e.g. 'D:/data=/mnt/d/data') for CSVs written on another machine.",
        default=None,
    )
    max_length: int | None = _help(
        "Total token budget per row (visual + prompt + answer). Answers are truncated (counted), never the prompt.",
        default=None,
    )
    max_slices: int = _help(
        "Slices per study (each slice is one image of max_visual_tokens tokens).", default=DEFAULT_MAX_SLICES
    )
    eval_samples: int = _help("Fixed eval subset size used for generation metrics and sample reports.", default=32)
    validate_images: str = _help(
        f"Check every image of train_file and eval_file before step 0: one of {IMAGE_CHECKS} ('header' opens "
        "each file's header, cheap; 'decode' decodes each fully; 'off'). A bad image is an error naming the "
        "CSV, the row_id and the file, instead of a crash at step N.",
        default="header",
    )
    studies: bool = _help(
        "Each CSV row is ONE CT study (NIfTI, DICOM series folder, slices): its slices are encoded together into "
        "max_visual_tokens tokens, loaded with the study_* settings below, which are saved in the processor "
        "and applied by generate/serve/eval and the feature cache (hf_vlm.data.study_settings).",
        default=False,
    )
    study_windows: list[str] = _help(
        "Studies: CT windows, one per channel or one repeated (lung, mediastinum, bone or 'W1500/L-600').",
        default_factory=lambda: ["lung"],
    )
    study_num_slices: int = _help("Studies: slices taken by slice_sampling 'uniform', slabs made by 'mip'.", default=32)
    study_slice_sampling: str = _help(
        "Studies: uniform, all, stride, middle (the old one-slice loader) or mip (num_slices slab MIPs).",
        default="uniform",
    )
    study_slice_stride: int = _help("Studies: step of slice_sampling 'stride'.", default=2)
    study_extent: str = _help("Studies: z range sampled: body, lung or full.", default="body")
    study_target_spacing: list[float] | None = _help(
        "Studies: resample to (x, y, z) mm first (None keeps the header's spacing).", default=None
    )
    study_crop: str = _help("Studies: body (crop each slice to the body) or none.", default="body")
    study_image_size: int | None = _help(
        "Studies: slices padded to a square and resized to this many pixels (None: the image processor resizes).",
        default=None,
    )
    vision_feature_cache: str | None = _help(
        "Directory of the vision feature cache: with a frozen vision tower, each image is encoded once and the "
        "bridge trains from stored features (invalidated automatically when the encoder or preprocessing changes).",
        default=None,
    )

    def study_preprocessing(self):
        """The `StudyPreprocessing` of the study_* keys, or None when `studies` is off."""
        if not self.studies:
            return None
        from ..data.study_settings import StudyPreprocessing

        return StudyPreprocessing(
            windows=tuple(self.study_windows),
            slice_sampling=self.study_slice_sampling,
            num_slices=self.study_num_slices,
            slice_stride=self.study_slice_stride,
            extent=self.study_extent,
            target_spacing=tuple(self.study_target_spacing) if self.study_target_spacing else None,
            crop=self.study_crop,
            image_size=self.study_image_size,
        )

    @property
    def path_map_spec(self) -> str | None:
        """`path_map` in the form `hf_vlm.data.images.parse_path_map` reads ("A=B,C=D")."""
        return ",".join(self.path_map) if self.path_map else None

    def __post_init__(self):
        if self.max_length is not None and self.max_length < 2:
            raise ValueError(f"max_length must be >= 2 or None, got {self.max_length}")
        if self.max_slices < 1:
            raise ValueError(f"max_slices must be >= 1, got {self.max_slices}")
        if self.eval_samples < 0:
            raise ValueError(f"eval_samples must be >= 0, got {self.eval_samples}")
        if self.validate_images not in IMAGE_CHECKS:
            raise ValueError(f"validate_images must be one of {IMAGE_CHECKS}, got {self.validate_images!r}")
        if self.studies and self.max_slices != DEFAULT_MAX_SLICES:
            raise ValueError(
                f"max_slices={self.max_slices} is the 2-D loader's setting; with studies: true set "
                "study_num_slices (and study_slice_sampling) instead"
            )
        self.study_preprocessing()  # the settings are checked now, not at the first row
        from ..data.images import parse_path_map

        parse_path_map(self.path_map_spec)  # the same check that runs when images are loaded


def _bf16_available() -> bool:
    return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())


@dataclass
class MambaVLMTrainingArguments(TrainingArguments):
    """`TrainingArguments` plus the stage, the freeze policy, per-module LRs and guard thresholds."""

    # --- stage and freeze policy ---------------------------------------------------------------
    stage: str = _help(
        f"One of {STAGES}. 'align' trains the bridge only; 'finetune' trains the bridge plus optional LoRA "
        "on the LLM (LLM base weights stay frozen).",
        default="align",
    )
    use_lora: bool = _help("Stage 'finetune': add LoRA adapters (peft) to the LLM.", default=False)
    lora_r: int = _help("LoRA rank.", default=16)
    lora_alpha: int = _help("LoRA alpha (scale = alpha / r).", default=32)
    lora_dropout: float = _help("LoRA dropout.", default=0.05)
    lora_target_modules: list[str] = _help(
        "LoRA target modules, checked against the language model's family (hf_vlm.backbones): for Mamba "
        "in_proj / embeddings; out_proj/conv1d/x_proj/dt_proj are refused with the reason (PEFT refuses some, "
        "the fused CUDA path bypasses the others); hybrids also allow their attention / MLP projections.",
        default_factory=lambda: ["in_proj"],
    )
    unfreeze_vision_tower: bool = _help("Train the vision tower too (rarely useful; costs memory).", default=False)
    unfreeze_llm_layers: int = _help(
        "Make the last N Mamba layers (plus final norm) trainable; -1 = the whole LLM (explicit opt-in).", default=0
    )
    # --- per-module learning rates -------------------------------------------------------------
    bridge_learning_rate: float = _help("LR of the bridge (MLP / projection / Q-Former queries).", default=1e-4)
    qformer_learning_rate: float | None = _help(
        f"LR of the Q-Former body. Default: {PRETRAINED_QFORMER_LR} when its weights came from BLIP-2 "
        f"(qformer_init_from), else min(bridge_learning_rate, {FRESH_QFORMER_LR}) (a fresh Q-Former is a new "
        "transformer: above ~3e-4 it does not learn to see).",
        default=None,
    )
    lora_learning_rate: float = _help("LR of the LoRA adapters.", default=2e-5)
    llm_learning_rate: float | None = _help("LR of unfrozen LLM layers (default: learning_rate).", default=None)
    vision_learning_rate: float | None = _help(
        "LR of the unfrozen vision tower (default: learning_rate).", default=None
    )
    # --- guards --------------------------------------------------------------------------------
    guard_action: str = _help(f"What a tripped guard does: one of {GUARD_ACTIONS}.", default="stop")
    collapse_std_threshold: float = _help(
        "Visual-embedding std below this absolute value counts as collapsed.",
        default=1e-3,
    )
    collapse_relative_threshold: float = _help(
        "Visual-embedding std below this fraction of its first logged value counts as collapsed.", default=0.01
    )
    collapse_patience: int = _help("Consecutive collapsed logs before the CollapseGuard trips.", default=3)
    min_first_step_loss: float = _help(
        "A first-step caption loss below this means the masks are probably wrong.", default=0.1
    )
    healthy_loss_band: list[float] = _help(
        "Caption-loss band [start_low, start_high, target_low, target_high] drawn on the loss plot as context "
        "(the seeds' rule of thumb for long free-text reports; the health verdict uses the vision gap and the "
        "trend instead, see hf_vlm/training/verdict.py).",
        default_factory=lambda: [3.0, 8.0, 0.5, 1.0],
    )
    suspicious_loss: float = _help(
        "A probed caption loss below this with the true AND with other rows' images means the answer is reachable "
        "without the image (the 'leak' verdict); also drawn on the plot.",
        default=0.1,
    )
    suspicious_loss_patience: int = _help("Consecutive vision probes below suspicious_loss before 'leak'.", default=2)
    vision_probe_steps: int = _help(
        "Every N optimizer steps (and on the first batch), compute the caption loss of the current training batch "
        "with its own and with other rows' images, without gradients: train_vision_gap in the log (0 = off). "
        "A probe costs about 2/3 of a training step: 1.8% of the CPU time of a 110-step run at the default "
        "(benchmarks/bench_probe_overhead.py).",
        default=50,
    )
    vision_gap_min: float = _help(
        "train_vision_gap (shuffled - true caption loss) at or above this, with vision_gap_min_relative, counts as "
        "'the loss depends on the image'.",
        default=0.02,
    )
    vision_gap_min_relative: float = _help(
        "Minimum train_vision_gap_rel (gap / shuffled loss) for a clear gap.", default=0.02
    )
    plateau_window_fraction: float = _help(
        "Plateau window as a fraction of max_steps (at least 4 logs): the smoothed loss must improve by "
        "plateau_min_improvement over it. 0.2: a fresh Q-Former's loss stays flat for ~15% of the tiny demo "
        "before it starts to see (a 0.1 window stopped that run at step 120 of 800).",
        default=0.2,
    )
    plateau_min_improvement: float = _help(
        "Relative improvement of the smoothed loss over the plateau window below which the loss counts as flat.",
        default=0.02,
    )
    collapse_gap_fraction: float = _help(
        "A clear vision gap that falls below this fraction of its peak on two probes is a visual collapse.",
        default=0.25,
    )
    freeze_check_steps: int = _help(
        "After this many optimizer steps, check frozen weights are bit-identical and trainable ones moved (0 = off).",
        default=2,
    )
    vision_probe: bool = _help(
        "At evaluation, compare the caption loss with true vs shuffled images (is the model blind?).", default=True
    )
    vision_probe_min_gap: float = _help(
        "eval_vision_gap (shuffled - true loss) below this warns that the model ignores the image.", default=0.01
    )
    vision_probe_batches: int = _help("Eval batches the vision probe runs on (true vs shuffled images).", default=4)
    csv_log_name: str = _help("Per-step CSV log written into output_dir.", default=DEFAULT_CSV_LOG)
    plot_loss: bool = _help("Write a loss-curve PNG with the healthy band at the end of training.", default=True)
    save_frozen_vision_weights: bool = _help(
        "Save the frozen vision-tower weights in checkpoints (self-contained). Off: smaller checkpoints, and "
        "the tower must be re-loaded from vision_model_name_or_path.",
        default=True,
    )
    overwrite_output_dir: bool = _help(
        "Write into an output_dir that already holds a run (its checkpoints are removed first). Without it, "
        "a non-empty output_dir is refused unless resume_from_checkpoint is set.",
        default=False,
    )
    # --- overridden defaults -------------------------------------------------------------------
    bf16: bool | None = _help(
        "BF16 autocast with fp32 master weights. Default: on when CUDA supports bf16, else off.", default=None
    )
    remove_unused_columns: bool = _help(
        "Must stay False: the dataset is encoded lazily with `with_transform`.", default=False
    )

    def __post_init__(self):
        self._validate_hf_vlm()
        if self.bf16 is None:
            self.bf16 = _bf16_available() and not getattr(self, "use_cpu", False)
        if self.fp16:
            raise ValueError(
                "fp16 is refused: Mamba's selective scan overflows in fp16 (state-spaces/mamba#6). "
                "Use bf16=True on a GPU that supports it, or fp32."
            )
        if self.remove_unused_columns:
            raise ValueError(
                "remove_unused_columns must be False: the dataset is encoded on the fly with `with_transform`, "
                "and the Trainer would drop the raw columns the transform needs"
            )
        super().__post_init__()

    def _validate_hf_vlm(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {self.stage!r}")
        if self.guard_action not in GUARD_ACTIONS:
            raise ValueError(f"guard_action must be one of {GUARD_ACTIONS}, got {self.guard_action!r}")
        if self.use_lora and self.stage != "finetune":
            raise ValueError("use_lora needs stage='finetune' (stage 'align' trains the bridge only)")
        targets = [self.lora_target_modules] if isinstance(self.lora_target_modules, str) else self.lora_target_modules
        self.lora_target_modules = list(targets)
        for target in self.lora_target_modules:
            if target not in KNOWN_LORA_TARGETS:
                mamba = FAMILIES["mamba"]
                reason = f" ({mamba.lora_refused_targets[target]})" if target in mamba.lora_refused_targets else ""
                raise ValueError(
                    f"lora_target_modules: {target!r} is not a safe target for any supported "
                    f"language model{reason}; known: {KNOWN_LORA_TARGETS}"
                )
        if self.lora_r < 1:
            raise ValueError(f"lora_r must be >= 1, got {self.lora_r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.unfreeze_llm_layers < -1:
            raise ValueError(f"unfreeze_llm_layers must be -1 (all), 0 (none) or N > 0, got {self.unfreeze_llm_layers}")
        for name in ("bridge_learning_rate", "qformer_learning_rate", "lora_learning_rate"):
            value = getattr(self, name)
            if value is None and name == "qformer_learning_rate":
                continue
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        band = [float(x) for x in self.healthy_loss_band]
        if len(band) != 4 or not (band[0] <= band[1] and band[2] <= band[3]):
            raise ValueError(
                "healthy_loss_band is [start_low, start_high, target_low, target_high] with low <= high, "
                f"got {self.healthy_loss_band}"
            )
        self.healthy_loss_band = band
        if self.collapse_patience < 1:
            raise ValueError(f"collapse_patience must be >= 1, got {self.collapse_patience}")
        if self.vision_probe_steps < 0:
            raise ValueError(f"vision_probe_steps must be >= 0 (0 = off), got {self.vision_probe_steps}")
        if self.suspicious_loss_patience < 1:
            raise ValueError(f"suspicious_loss_patience must be >= 1, got {self.suspicious_loss_patience}")
        for name in ("plateau_window_fraction", "collapse_gap_fraction"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in (0, 1], got {getattr(self, name)}")
        if self.freeze_check_steps < 0:
            raise ValueError(f"freeze_check_steps must be >= 0, got {self.freeze_check_steps}")

    @property
    def llm_trainable(self) -> bool:
        """True when some LLM *base* weights are meant to train (unfreeze_llm_layers != 0)."""
        return self.unfreeze_llm_layers != 0


__all__ = ["DataArguments", "MambaVLMTrainingArguments", "ModelArguments", "KNOWN_LORA_TARGETS", "STAGES"]

"""Vision tower + vision bridge + `MambaForCausalLM`, as one `PreTrainedModel`.

Modelled on transformers' LLaVA: the image is encoded, the bridge turns it into exactly
`max_visual_tokens` embeddings, and those are scattered into the Mamba input embeddings at
the `<image>` placeholder positions, with a count check that fails loudly (the most common
VLM training complaint is "image features and image tokens do not match").

Generation uses Mamba's recurrent cache (`cache`; `cache_params` before transformers 5.24, see
`hf_vlm.compat`): the image and prompt are consumed
once in the prefill, after which each new token costs one recurrent step regardless of
how long the report already is.
"""

from __future__ import annotations

import importlib
import inspect
import logging
from dataclasses import field, make_dataclass

import torch
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, GenerationMixin, MambaForCausalLM, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.utils import ModelOutput

from .backbones import get_family
from .bridges import build_bridge
from .compat import CACHE_FIELD, cache_kwargs, lm_cache, pop_cache_kwarg
from .configuration_mamba_vlm import MambaVLMConfig
from .modeling_study import add_study_modules, encode_studies, uses_study_encoder

logger = logging.getLogger(__name__)


def _attach_fast_scan(language_model) -> None:
    """Give our Mamba layers the best available scan (hf_vlm.ops.kernels). Imported by absolute
    name: a checkpoint loaded with trust_remote_code where hf_vlm is absent keeps transformers' scan."""
    try:
        kernels = importlib.import_module("hf_vlm.ops.kernels")
    except ImportError:
        return
    kernels.attach_fast_scan(language_model)


# Causal-LM output plus the visual embeddings (the collapse guard watches their std). The cache
# field carries the name this transformers release uses (`CACHE_FIELD`): generation
# finds the recurrent state in the output by that name.
MambaVLMCausalLMOutput = make_dataclass(
    "MambaVLMCausalLMOutput",
    [
        ("loss", torch.Tensor | None, field(default=None)),
        ("logits", torch.Tensor | None, field(default=None)),
        (CACHE_FIELD, Cache | None, field(default=None)),
        ("hidden_states", tuple[torch.Tensor, ...] | None, field(default=None)),
        ("image_hidden_states", torch.Tensor | None, field(default=None)),
    ],
    bases=(ModelOutput,),
    namespace={"__module__": __name__, "__doc__": "Causal-LM output plus the visual embeddings."},
)


class MambaVLMPreTrainedModel(PreTrainedModel):
    config_class = MambaVLMConfig
    config: MambaVLMConfig
    base_model_prefix = ""  # a composite: vision_tower + bridge + language_model, no single base
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _is_stateful = True
    _no_split_modules = ["MambaBlock"]  # post_init adds each sub-model's own (any LM family, the tower)
    _skip_keys_device_placement = [CACHE_FIELD]

    def initialize_weights(self):
        """transformers' own pass, then the language model's again with its module flags cleared.

        Why: this class is "custom code" to transformers, and for custom code its initialiser marks a
        module done when the module itself owns no parameters or buffers. That skips a model-level
        `_init_weights` that fills its layers' non-persistent buffers (Falcon-H1's `mup_vector`: it is
        never saved, so a reloaded VLM got uninitialised memory and NaN logits). The second pass only
        touches what loading did not fill: transformers' init functions skip loaded parameters.
        """
        super().initialize_weights()
        language_model = getattr(self, "language_model", None)
        if isinstance(language_model, PreTrainedModel) and not language_model.is_custom_code():
            for module in language_model.modules():
                module.__dict__.pop("_is_hf_initialized", None)
            language_model.initialize_weights()

    @torch.no_grad()
    def _init_weights(self, module):
        # Sub-models (vision tower, Mamba) dispatch to their own `_init_weights`; this covers the bridge.
        std = getattr(self.config.text_config, "initializer_range", 0.02)
        if isinstance(module, nn.Linear) and getattr(module, "_zero_init", False):
            module.weight.zero_()  # an attention-pooling scorer starts as avg pooling (hf_vlm.bridges)
            module.bias.zero_()
        elif isinstance(module, nn.Linear):
            module.weight.normal_(mean=0.0, std=std)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.LayerNorm):
            module.weight.fill_(1.0)
            module.bias.zero_()


class MambaVLMForConditionalGeneration(MambaVLMPreTrainedModel, GenerationMixin):
    """`pixel_values` + `input_ids` with `<image>` placeholders -> next-token logits and loss.

    Sub-modules: `vision_tower` (any transformers vision model), `bridge` (see `hf_vlm.bridges`)
    and `language_model` (`MambaForCausalLM`). Pre-loaded sub-models can be passed in (see
    `from_components`) so that real checkpoints are not initialised twice.
    """

    def __init__(self, config: MambaVLMConfig, vision_tower: nn.Module | None = None, language_model=None):
        super().__init__(config)
        self.vision_tower = vision_tower if vision_tower is not None else AutoModel.from_config(config.vision_config)
        self.bridge = build_bridge(config)
        add_study_modules(self)  # slice-position embedding (studies), see modeling_study.py
        if language_model is None:  # any family of hf_vlm.backbones, from its config (Mamba by default)
            language_model = AutoModelForCausalLM.from_config(config.text_config)
        self.language_model = language_model
        self._lm_family = get_family(language_model.config)  # an unsupported LM type: error naming the supported
        lm_forward = getattr(language_model, "get_base_model", lambda: language_model)().forward
        self._lm_takes_position_ids = "position_ids" in inspect.signature(lm_forward).parameters
        self.post_init()
        _attach_fast_scan(self.language_model)

    # --- embeddings plumbing expected by transformers / peft -------------------------------
    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.language_model.lm_head

    # --- vision path ------------------------------------------------------------------------
    def _num_prefix_tokens(self, seq_len: int) -> int:
        """Tokens before the patch grid (CLS, registers): dropped by the "default" strategy."""
        if self.config.vision_feature_select_strategy == "full":
            return 0
        vcfg = self.config.vision_config
        image_size, patch_size = getattr(vcfg, "image_size", None), getattr(vcfg, "patch_size", None)
        if isinstance(image_size, int) and isinstance(patch_size, int) and patch_size > 0:
            return max(seq_len - (image_size // patch_size) ** 2, 0)
        return 0

    def get_vision_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Vision-tower hidden states at `vision_feature_layer`, patch tokens only: `(N, P, Dv)`.

        This is the tensor the vision feature cache stores when the tower is frozen.
        """
        dtype = next(self.vision_tower.parameters()).dtype
        outputs = self.vision_tower(pixel_values.to(dtype), output_hidden_states=True, return_dict=True)
        hidden = outputs.hidden_states[self.config.vision_feature_layer]  # (N, S, Dv)
        return hidden[:, self._num_prefix_tokens(hidden.shape[1]) :]

    def get_image_features(
        self,
        pixel_values: torch.Tensor | None = None,
        vision_features: torch.Tensor | None = None,
        slice_counts: torch.Tensor | None = None,
        slice_z: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Bridge output for each study (or image): `(B, max_visual_tokens, D_text)`.

        `slice_counts` / `slice_z` describe studies of several slices (see `modeling_study`);
        without them each image is a study of one slice.
        """
        if vision_features is None:
            vision_features = self.get_vision_features(pixel_values)
        bridge_dtype = next(self.bridge.parameters()).dtype
        if slice_counts is None and not uses_study_encoder(self):
            return self.bridge(vision_features.to(bridge_dtype))
        return encode_studies(self, vision_features.to(bridge_dtype), slice_counts, slice_z)

    def get_placeholder_mask(self, input_ids: torch.LongTensor, image_features: torch.Tensor) -> torch.Tensor:
        """Boolean `(B, L)` mask of `<image>` positions; raises if it does not match the features."""
        mask = input_ids == self.config.image_token_id
        n_tokens, (n_images, per_image) = int(mask.sum()), image_features.shape[:2]
        if n_tokens != n_images * per_image:
            raise ValueError(
                "Image features and image tokens do not match: input_ids hold "
                f"{n_tokens} <image> tokens (id {self.config.image_token_id}) but {n_images} image(s) x "
                f"{per_image} visual tokens = {n_images * per_image} features. Build inputs with "
                "MambaVLMProcessor (it expands each <image> to max_visual_tokens placeholders) and "
                "make sure the processor and model use the same max_visual_tokens."
            )
        return mask

    def embed_inputs(
        self,
        input_ids: torch.LongTensor,
        pixel_values: torch.Tensor | None = None,
        vision_features: torch.Tensor | None = None,
        slice_counts: torch.Tensor | None = None,
        slice_z: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Token embeddings with visual embeddings scattered in: `(B, L, D)`, plus the visual part."""
        image_mask = input_ids == self.config.image_token_id
        # the placeholder id may lie outside the LLM vocabulary: never look it up
        # as the LM's own input_ids path embeds them (Falcon-H1 scales by embedding_multiplier there)
        inputs_embeds = self._lm_family.input_embeddings(self.language_model, input_ids.masked_fill(image_mask, 0))
        if pixel_values is None and vision_features is None:
            if image_mask.any():
                raise ValueError(
                    f"input_ids contain {int(image_mask.sum())} <image> tokens but no pixel_values were given"
                )
            return inputs_embeds, None
        image_features = self.get_image_features(pixel_values, vision_features, slice_counts, slice_z)  # (N, K, D)
        mask = self.get_placeholder_mask(input_ids, image_features)
        image_features = image_features.to(inputs_embeds.dtype)
        inputs_embeds = inputs_embeds.masked_scatter(mask.unsqueeze(-1), image_features)
        return inputs_embeds, image_features

    # --- forward / generation ---------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.LongTensor | None = None,
        labels: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        vision_features: torch.Tensor | None = None,
        slice_counts: torch.LongTensor | None = None,
        slice_z: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        return_dict: bool | None = None,
        **kwargs,
    ) -> MambaVLMCausalLMOutput:
        """`vision_features` (cached vision-tower output, see `get_vision_features`) replaces
        `pixel_values` when the tower is frozen and features were pre-computed. `slice_counts` (B,)
        and `slice_z` (sum S,) group the slices into studies (see `modeling_study`). The recurrent
        cache comes as `cache` (or the pre-5.24 `cache_params`) in `kwargs`. `position_ids` reach
        LMs with attention layers (hybrids: RoPE positions of left-padded rows during generation)."""
        cache = pop_cache_kwarg(kwargs)
        image_features = None
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("Pass input_ids (with <image> placeholders) or inputs_embeds")
            inputs_embeds, image_features = self.embed_inputs(
                input_ids, pixel_values, vision_features, slice_counts, slice_z
            )
        outputs = self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            logits_to_keep=logits_to_keep,
            return_dict=True,
            **cache_kwargs(cache, self.language_model),
            **({"position_ids": position_ids} if position_ids is not None and self._lm_takes_position_ids else {}),
        )
        loss = None
        if labels is not None:
            loss = self.loss_function(
                logits=outputs.logits,
                labels=labels,
                vocab_size=self.config.text_config.vocab_size,
                num_items_in_batch=kwargs.get("num_items_in_batch"),
            )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        output = MambaVLMCausalLMOutput(
            loss=loss,
            logits=outputs.logits,
            hidden_states=outputs.hidden_states,
            image_hidden_states=image_features,
            **{CACHE_FIELD: lm_cache(outputs)},
        )
        return output if return_dict else output.to_tuple()

    def prepare_inputs_for_generation(
        self, input_ids, use_cache=None, is_first_iteration: bool | None = False, **kwargs
    ):
        # the cache keyword (`cache` / `cache_params`, see hf_vlm.compat) passes through untouched
        model_inputs = super().prepare_inputs_for_generation(
            input_ids, use_cache=use_cache, is_first_iteration=is_first_iteration, **kwargs
        )
        if use_cache and not is_first_iteration:
            # the recurrent state already holds image + prompt: feed only the newest token; hybrids
            # keep the mask, their attention layers must not attend to the padded keys in the KV cache
            if not self._lm_family.decode_needs_attention_mask:
                model_inputs["attention_mask"] = None
            model_inputs.pop("pixel_values", None)
            model_inputs.pop("vision_features", None)
            model_inputs.pop("slice_counts", None)
            model_inputs.pop("slice_z", None)
        return model_inputs

    def _expand_inputs_for_generation(
        self, expand_size: int = 1, is_encoder_decoder: bool = False, input_ids=None, **model_kwargs
    ):
        """Beam search / num_return_sequences: repeat each study's images, not each image.

        The base class repeats every tensor row by row; `pixel_values` has one row per image, so a
        two-image study would hand its beams the images a1 a1 a2 a2 instead of a1 a2 a1 a2.
        """
        per_image = {
            k: model_kwargs.pop(k)
            for k in ("pixel_values", "vision_features", "slice_z")
            if model_kwargs.get(k) is not None
        }
        if expand_size > 1 and per_image and input_ids is not None:
            if model_kwargs.get("slice_counts") is not None:  # studies: one per row, slice_counts[i] slices
                images_per_row = [int(c) for c in model_kwargs["slice_counts"].tolist()]
            else:
                images_per_row = (
                    (input_ids == self.config.image_token_id).sum(-1) // self.config.max_visual_tokens
                ).tolist()
            for key, value in per_image.items():
                groups = value.split(images_per_row)
                per_image[key] = torch.cat([g for g in groups for _ in range(expand_size)])
        input_ids, model_kwargs = super()._expand_inputs_for_generation(
            expand_size, is_encoder_decoder, input_ids, **model_kwargs
        )
        model_kwargs.update(per_image)
        return input_ids, model_kwargs

    # --- building from real checkpoints -----------------------------------------------------
    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path, *args, vision_model_name_or_path: str | None = None, **kwargs
    ):
        """`PreTrainedModel.from_pretrained`, plus re-attaching a frozen vision tower that the
        checkpoint left out (`save_frozen_vision_weights: false`), so no load path ends up with
        a randomly initialised tower."""
        from .checkpoints import reattach_vision_tower

        model = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        reattach_vision_tower(model, str(pretrained_model_name_or_path), vision_model_name_or_path)
        return model

    @classmethod
    def from_components(
        cls,
        vision_model: str | nn.Module,
        language_model: str | MambaForCausalLM,
        *,
        llm_quantization_config=None,
        dtype: torch.dtype | None = None,
        **bridge_kwargs,
    ) -> MambaVLMForConditionalGeneration:
        """Join a pretrained vision tower and a pretrained Mamba LLM with a fresh bridge.

        `vision_model` / `language_model` are local paths or hub ids (e.g. a local copy of
        `openai/clip-vit-large-patch14` and `state-spaces/mamba-2.8b-hf`) or loaded modules.
        `bridge_kwargs` go to `MambaVLMConfig` (bridge_type, max_visual_tokens, image_token_id …).
        """
        from .loading import load_language_model, load_vision_tower

        tower = load_vision_tower(vision_model, dtype=dtype) if isinstance(vision_model, str) else vision_model
        llm = (
            load_language_model(language_model, quantization_config=llm_quantization_config, dtype=dtype)
            if isinstance(language_model, str)
            else language_model
        )
        config = MambaVLMConfig(vision_config=tower.config, text_config=llm.config, **bridge_kwargs)
        model = cls(config, vision_tower=tower, language_model=llm)
        if config.bridge_type == "qformer" and config.qformer_init_from:
            model.bridge.load_blip2_weights(config.qformer_init_from)
        if dtype is not None:
            model.bridge.to(dtype)
        return model


__all__ = ["MambaVLMForConditionalGeneration", "MambaVLMPreTrainedModel", "MambaVLMCausalLMOutput"]

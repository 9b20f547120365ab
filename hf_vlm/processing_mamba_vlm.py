"""Processor: image processor + tokenizer + prompt template.

It turns (images, prompt, answer) into token ids in which every `<image>` is expanded to
exactly `max_visual_tokens` placeholder ids, and records where the prompt ends so that the
collator can mask by *position*. Prompt and answer are tokenised separately and
concatenated, so a BPE merge can never straddle the boundary and move it.
"""

from __future__ import annotations

import torch
from transformers import AutoProcessor, BatchFeature, ProcessorMixin

from .tokenization import IMAGE_TOKEN, ensure_image_token


def _study_module(name: str):
    """`hf_vlm.data.<name>` by absolute name, at call time: remote code copies flat files only, and
    transformers refuses a remote module whose import statements name a package that is absent, so a
    2-D processor must load where hf_vlm is not installed; studies need it (the error says so)."""
    import importlib

    try:
        return importlib.import_module(f"hf_vlm.data.{name}")
    except ImportError as error:
        raise ImportError(f"CT studies need the hf_vlm package (pip install hf_vlm): {error}") from error


DEFAULT_TEMPLATE = "{prompt}\n{images}"
DEFAULT_PROMPT = "请根据CT图像写出影像所见。"


class MambaVLMProcessor(ProcessorMixin):
    """`processor(images=..., text=...)` for generation; `encode_example(...)` for training.

    Args:
        image_processor: any transformers image processor (CLIP, SigLIP, ViT …).
        tokenizer: the LLM tokenizer; `<image>` is added if missing.
        max_visual_tokens: visual tokens per image (must equal the model config's).
        prompt_template: must contain `{prompt}`; `{images}` is where the `<image>` markers go
            when the prompt itself has none.
        default_prompt: used when a row has no prompt.
        study_preprocessing: `StudyPreprocessing.to_dict()` (windows, slice count and sampling,
            spacing, crop, image size): set, each row is ONE study (one `<image>`, its slices
            encoded together, see `hf_vlm.modeling_study`) and every consumer (training, generate,
            serve, eval, the feature cache) loads studies with these settings; None = 2-D images,
            one `<image>` each (processors saved before studies).
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        max_visual_tokens: int = 64,
        prompt_template: str = DEFAULT_TEMPLATE,
        default_prompt: str = DEFAULT_PROMPT,
        study_preprocessing: dict | None = None,
        **kwargs,
    ):
        if "{prompt}" not in prompt_template:
            raise ValueError(f"prompt_template must contain '{{prompt}}', got {prompt_template!r}")
        self.max_visual_tokens = int(max_visual_tokens)
        self.prompt_template = prompt_template
        self.default_prompt = default_prompt
        self.study_preprocessing = None
        self.study_settings = study_preprocessing  # validated; stored as its JSON-safe dict
        super().__init__(image_processor, tokenizer, **kwargs)
        self.image_token_id = ensure_image_token(self.tokenizer)

    # --- studies ------------------------------------------------------------------------------
    @property
    def study_settings(self):
        """The `StudyPreprocessing` of this processor, or None (2-D images)."""
        if self.study_preprocessing is None:
            return None
        return _study_module("study_settings").StudyPreprocessing.from_dict(self.study_preprocessing)

    @study_settings.setter
    def study_settings(self, value) -> None:
        if value is None:  # 2-D: nothing of hf_vlm.data needed (remote code without hf_vlm stays usable)
            self.study_preprocessing = None
            return
        settings_class = _study_module("study_settings").StudyPreprocessing
        if not isinstance(value, settings_class):
            value = settings_class.from_dict(value)
        self.study_preprocessing = value.to_dict()

    def encode_study(self, images) -> dict:
        """One study -> `pixel_values` (S, C, H, W) and `slice_z` (S,).

        `images` is a `Study` (from `hf_vlm.data.studies.load_study`), or a list holding one, or
        a list of PIL slices in inferior -> superior order (z = slice centres).
        """
        Study = _study_module("studies").Study

        if isinstance(images, (list, tuple)) and len(images) == 1 and isinstance(images[0], Study):
            images = images[0]
        if isinstance(images, Study):
            slices, z = images.to_pil(), images.z.float()
        else:
            slices = list(images) if isinstance(images, (list, tuple)) else [images]
            if any(isinstance(im, Study) for im in slices):
                raise ValueError(f"{len(slices)} studies given where one study was expected: one <image> per study")
            z = (torch.arange(len(slices), dtype=torch.float32) + 0.5) / max(len(slices), 1)
        pixels = self.image_processor(images=slices, return_tensors="pt")["pixel_values"]
        return {"pixel_values": pixels, "slice_z": z}

    # --- text ---------------------------------------------------------------------------------
    def format_prompt(self, prompt: str | None, num_images: int) -> str:
        """Fill the template; `<image>` markers already in the prompt are kept where they are."""
        prompt = prompt if prompt else self.default_prompt
        if IMAGE_TOKEN in prompt or IMAGE_TOKEN in self.prompt_template.replace("{images}", ""):
            return self.prompt_template.format(images="", prompt=prompt)
        return self.prompt_template.format(images=IMAGE_TOKEN * num_images + "\n", prompt=prompt)

    def tokenize_prompt(self, prompt: str | None, num_images: int) -> list[int]:
        """Prompt ids with each `<image>` expanded to `max_visual_tokens` placeholders."""
        text = self.format_prompt(prompt, num_images)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        expanded: list[int] = []
        for token in ids:
            expanded.extend([token] * self.max_visual_tokens if token == self.image_token_id else [token])
        found = ids.count(self.image_token_id)
        if found != num_images:
            raise ValueError(
                f"Prompt has {found} {IMAGE_TOKEN} marker(s) but {num_images} image(s) were given: {text!r}"
            )
        return expanded

    def encode_text(self, prompt: str | None, answer: str | None, num_images: int) -> dict:
        """Token ids (prompt + answer + EOS) and the prompt length, without touching pixels.

        Used directly when vision features come from the feature cache.
        """
        if answer is None or not str(answer).strip():
            raise ValueError(
                f"Empty answer for prompt {prompt!r}: a training row needs a non-empty report "
                "(clean the CSV with `hf-vlm clean`)"
            )
        prompt_ids = self.tokenize_prompt(prompt, num_images)
        answer_ids = self.tokenizer(str(answer), add_special_tokens=False)["input_ids"]
        return {"input_ids": prompt_ids + answer_ids + [self.tokenizer.eos_token_id], "prompt_length": len(prompt_ids)}

    def encode_example(self, images, prompt: str | None, answer: str | None) -> dict:
        """One training example: ids (prompt + answer + EOS), prompt length, pixel values.

        Truncation is left to the collator, which must never cut visual or prompt tokens.
        """
        if self.study_preprocessing is not None:
            example = self.encode_text(prompt, answer, 1)
            example.update(self.encode_study(images))
            return example
        images = list(images) if isinstance(images, (list, tuple)) else [images]
        example = self.encode_text(prompt, answer, len(images))
        example["pixel_values"] = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
        return example

    # --- batched inference --------------------------------------------------------------------
    def __call__(self, images=None, text=None, return_tensors: str = "pt", **kwargs) -> BatchFeature:
        """Batch of prompts (one list of images per prompt), LEFT-padded for generation.

        With study settings each prompt's images form one study (a `Study` or its slices): the
        batch then also holds `slice_counts` and `slice_z`.

        Returns a `BatchFeature` (`input_ids`, `attention_mask`, `pixel_values`), so
        `processor(...).to(model.device)` works as with any transformers processor.
        """
        if text is None or isinstance(text, str):
            text = [text]
        if images is None:
            per_prompt = [[] for _ in text]
        elif not isinstance(images, (list, tuple)):
            per_prompt = [[images]]
        else:
            per_prompt = [list(im) if isinstance(im, (list, tuple)) else [im] for im in images]
        if len(per_prompt) != len(text):
            raise ValueError(f"{len(text)} prompts but {len(per_prompt)} image groups")
        study = self.study_preprocessing is not None
        rows = [self.tokenize_prompt(p, 1 if study and ims else len(ims)) for p, ims in zip(text, per_prompt)]
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], dtype=torch.long)
        attention_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long)
        out = {"input_ids": input_ids, "attention_mask": attention_mask}
        flat = [im for ims in per_prompt for im in ims]
        if study and flat:
            if not all(per_prompt):
                raise ValueError("a study processor needs one study per prompt (some prompts have no images)")
            encoded = [self.encode_study(ims) for ims in per_prompt]
            out["pixel_values"] = torch.cat([e["pixel_values"] for e in encoded])
            out["slice_z"] = torch.cat([e["slice_z"] for e in encoded])
            out["slice_counts"] = torch.tensor([len(e["slice_z"]) for e in encoded], dtype=torch.long)
        elif flat:
            out["pixel_values"] = self.image_processor(images=flat, return_tensors="pt")["pixel_values"]
        return BatchFeature(data=out, tensor_type=return_tensors)

    def batch_decode(self, sequences, skip_special_tokens: bool = True, **kwargs) -> list[str]:
        """Reports without EOS/pad/`<image>` by default; pass `skip_special_tokens=False` to see them."""
        return self.tokenizer.batch_decode(sequences, skip_special_tokens=skip_special_tokens, **kwargs)

    def decode(self, sequence, skip_special_tokens: bool = True, **kwargs) -> str:
        return self.tokenizer.decode(sequence, skip_special_tokens=skip_special_tokens, **kwargs)


def register_processor(config_class) -> None:
    AutoProcessor.register(config_class, MambaVLMProcessor, exist_ok=True)


__all__ = ["MambaVLMProcessor", "DEFAULT_PROMPT", "DEFAULT_TEMPLATE"]

"""hf_vlm/compat.py: each transformers internal hf_vlm relies on is still where we expect it.

When a transformers release moves one, the failing test here names it (the canary runs these on
the newest releases, `make test-lowest` on the lowest declared).
"""

from __future__ import annotations

import inspect

import pytest
import torch

from hf_vlm import compat


def test_cache_field_matches_the_installed_mamba_and_our_output():
    from transformers import MambaForCausalLM
    from transformers.models.mamba.modeling_mamba import MambaCausalLMOutput

    from hf_vlm.modeling_mamba_vlm import MambaVLMCausalLMOutput

    assert compat.CACHE_FIELD in MambaCausalLMOutput.__dataclass_fields__
    assert compat.CACHE_FIELD in MambaVLMCausalLMOutput.__dataclass_fields__
    assert compat.CACHE_FIELD in inspect.signature(MambaForCausalLM.forward).parameters
    # the old keyword is still accepted by our output where transformers passes it (>= 5.24 renames it)
    legacy = MambaVLMCausalLMOutput(**{compat.LEGACY_CACHE_FIELD: "state"})
    assert compat.lm_cache(legacy) == "state"


def test_cache_keyword_is_taken_under_either_name():
    assert compat.pop_cache_kwarg({"cache": 1}) == 1
    assert compat.pop_cache_kwarg({"cache_params": 2}) == 2
    kwargs = {"cache": None, "cache_params": 3, "other": 4}
    assert compat.pop_cache_kwarg(kwargs) == 3 and kwargs == {"other": 4}
    # the Mamba-2 hybrids used the attention models' name before 5.24
    kwargs = {compat.HYBRID_CACHE_FIELD: 5}
    assert compat.pop_cache_kwarg(kwargs) == 5 and kwargs == {}


class _Output:
    past_key_values = "hybrid state"


def test_cache_is_found_and_passed_under_the_name_the_family_uses():
    from transformers import AutoModelForCausalLM

    from hf_vlm.backbones import example_config

    assert compat.lm_cache(_Output()) == "hybrid state"
    for model_type in ("mamba", "falcon_h1"):
        model = AutoModelForCausalLM.from_config(example_config(model_type, vocab_size=64, num_layers=2))
        (name,) = compat.cache_kwargs(None, model)
        assert name == compat.cache_keyword(model) in inspect.signature(type(model).forward).parameters


def test_scan_patch_points_and_mixers_exist():
    points = compat.scan_patch_points()
    assert "transformers.models.mamba.modeling_mamba" in points
    names = {cls.__name__ for cls in compat.mixer_classes()}
    assert {"MambaMixer", "FalconMambaMixer"} <= names


def test_generation_hooks_the_model_overrides_keep_their_keywords():
    assert compat.generation_hooks_compatible() == []


@pytest.mark.parametrize("family", ["mamba", "falcon_h1"])
def test_vlm_generation_carries_the_recurrent_cache(family, micro_config, micro_processor, ct_images):
    """One forward per new token after the prefill, each fed a single token: the cache is found
    under this release's (and, before 5.24, this family's) name (a wrong name makes generate
    re-feed the whole sequence, or decode without the prompt's state)."""
    from hf_vlm import MambaVLMForConditionalGeneration
    from hf_vlm.backbones import example_config

    overrides = {}
    if family != "mamba":
        tokenizer = micro_processor.tokenizer
        overrides["text_config"] = example_config(
            family, vocab_size=len(tokenizer), num_layers=2, pad_token_id=tokenizer.pad_token_id
        )
    torch.manual_seed(0)
    micro_model = MambaVLMForConditionalGeneration(micro_config(**overrides)).eval()
    lengths = []
    hook = micro_model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: lengths.append(kwargs["inputs_embeds"].shape[1]), with_kwargs=True
    )
    inputs = micro_processor(images=[[ct_images[0]]], text=[None])
    try:
        with torch.no_grad():
            micro_model.generate(**inputs, max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0)
    finally:
        hook.remove()
    assert lengths[0] == inputs["input_ids"].shape[1] and lengths[1:] == [1, 1, 1, 1], lengths

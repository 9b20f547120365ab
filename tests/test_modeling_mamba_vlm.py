"""Model behaviour: Auto round-trip, placeholder checks, generation with the recurrent cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor

from hf_vlm import MambaVLMConfig, MambaVLMForConditionalGeneration


def _inputs(processor, images, prompts=None):
    prompts = prompts or [None] * len(images)
    return processor(images=[[im] for im in images], text=prompts)


@pytest.mark.parametrize("bridge_type", ["mlp", "qformer"])
def test_save_load_through_auto_classes_gives_identical_logits(
    micro_config, tmp_path, micro_processor, ct_images, bridge_type
):
    torch.manual_seed(0)
    model = MambaVLMForConditionalGeneration(micro_config(bridge_type=bridge_type)).eval()
    model.save_pretrained(tmp_path)
    micro_processor.save_pretrained(tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).bridge_type == bridge_type
    processor = AutoProcessor.from_pretrained(tmp_path)
    assert processor.max_visual_tokens == micro_processor.max_visual_tokens
    inputs = _inputs(processor, ct_images[:2])
    for auto_cls in (AutoModel, AutoModelForImageTextToText):
        loaded = auto_cls.from_pretrained(tmp_path).eval()
        assert isinstance(loaded, MambaVLMForConditionalGeneration)
        with torch.no_grad():
            assert torch.equal(model(**inputs).logits, loaded(**inputs).logits)


@pytest.mark.parametrize("family", ["falcon_h1", "bamba", "mamba2"])
def test_a_vlm_on_another_ssm_family_saves_reloads_and_generates(
    family, micro_config, micro_processor, ct_images, tmp_path
):
    """The language model is built from `text_config` through the Auto classes, so a saved VLM on a
    Mamba-2 / hybrid backbone (hf_vlm.backbones) reloads as that family, with the same logits, and
    batched generation equals one-by-one."""
    from hf_vlm.backbones import example_config

    tokenizer = micro_processor.tokenizer
    text_config = example_config(
        family,
        vocab_size=len(tokenizer),
        num_layers=2,
        pad_token_id=tokenizer.pad_token_id,
        **({"embedding_multiplier": 5.0} if family == "falcon_h1" else {}),
    )
    torch.manual_seed(0)
    model = MambaVLMForConditionalGeneration(micro_config(text_config=text_config)).eval()
    model.save_pretrained(tmp_path)
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    assert loaded.language_model.config.model_type == family
    assert set(type(loaded.language_model)._no_split_modules) <= set(loaded._no_split_modules)  # FSDP units
    inputs = _inputs(micro_processor, ct_images[:2], ["请描述。", None])
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, loaded(**inputs).logits)
        # text tokens reach the LM at the scale its own input_ids path gives them (Falcon-H1: x embedding_multiplier)
        text_ids = torch.tensor([tokenizer("左肺上叶见一约8mm结节")["input_ids"]])
        torch.testing.assert_close(loaded(input_ids=text_ids).logits, loaded.language_model(input_ids=text_ids).logits)
    # left-padded batch == one by one, logits included: hybrids keep the decode mask (padded KV
    # keys) and get position_ids (Bamba's RoPE), Falcon-H1 its embedding multiplier
    kwargs = dict(
        max_new_tokens=6,
        min_new_tokens=6,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        return_dict_in_generate=True,
        output_logits=True,
    )
    batched = loaded.generate(**inputs, **kwargs)
    for i, prompt in enumerate(["请描述。", None]):
        single = loaded.generate(**_inputs(micro_processor, [ct_images[i]], [prompt]), **kwargs)
        assert batched.sequences[i, -6:].tolist() == single.sequences[0, -6:].tolist()
        for step in range(6):
            torch.testing.assert_close(batched.logits[step][i], single.logits[step][0], rtol=1e-4, atol=1e-5)


def test_placeholder_count_mismatch_raises(micro_model, micro_processor, ct_images):
    inputs = _inputs(micro_processor, ct_images[:1])
    keep = torch.ones(inputs["input_ids"].shape[1], dtype=torch.bool)
    keep[(inputs["input_ids"][0] == micro_processor.image_token_id).nonzero()[0]] = False  # drop one <image>
    inputs["input_ids"], inputs["attention_mask"] = inputs["input_ids"][:, keep], inputs["attention_mask"][:, keep]
    with pytest.raises(ValueError, match="Image features and image tokens do not match"):
        micro_model(**inputs)
    text_only = micro_processor(text=["x"])
    text_only["input_ids"][0, 0] = micro_processor.image_token_id
    with pytest.raises(ValueError, match="no pixel_values"):
        micro_model(**text_only)


def test_visual_embeddings_land_at_placeholders(micro_model, micro_processor, ct_images):
    inputs = _inputs(micro_processor, ct_images[:1])
    embeds, image_features = micro_model.embed_inputs(inputs["input_ids"], inputs["pixel_values"])
    mask = inputs["input_ids"][0] == micro_processor.image_token_id
    assert torch.equal(embeds[0, mask], image_features[0])
    assert image_features.shape == (1, micro_processor.max_visual_tokens, micro_model.config.text_config.hidden_size)


def test_from_components_keeps_pretrained_weights(micro_config, tmp_path, micro_processor):
    from transformers import MambaForCausalLM, ViTModel

    config = micro_config()
    torch.manual_seed(1)
    ViTModel(config.vision_config, add_pooling_layer=False).save_pretrained(tmp_path / "vit")
    MambaForCausalLM(config.text_config).save_pretrained(tmp_path / "llm")
    model = MambaVLMForConditionalGeneration.from_components(
        str(tmp_path / "vit"), str(tmp_path / "llm"), max_visual_tokens=4, image_token_id=micro_processor.image_token_id
    )
    reference_llm = MambaForCausalLM.from_pretrained(tmp_path / "llm")
    reference_vit = ViTModel.from_pretrained(tmp_path / "vit", add_pooling_layer=False)
    for name, tensor in reference_llm.state_dict().items():
        assert torch.equal(model.language_model.state_dict()[name], tensor), name
    for name, tensor in reference_vit.state_dict().items():
        assert torch.equal(model.vision_tower.state_dict()[name], tensor), name


def test_batched_greedy_generation_equals_one_by_one(micro_config, micro_processor, ct_images, tokenizer):
    torch.manual_seed(3)
    model = MambaVLMForConditionalGeneration(micro_config()).eval()
    prompts = ["请描述。", "请根据CT图像写出影像所见，注意结节位置。", None]
    kwargs = dict(max_new_tokens=12, do_sample=False, repetition_penalty=1.0)
    batched = model.generate(**_inputs(micro_processor, ct_images[:3], prompts), **kwargs)
    width = batched.shape[1] - 12
    for i, prompt in enumerate(prompts):
        single = model.generate(**_inputs(micro_processor, [ct_images[i]], [prompt]), **kwargs)
        assert batched[i, width:].tolist() == single[0, -12:].tolist()


def test_generation_uses_recurrent_cache_one_token_per_step(micro_model, micro_processor, ct_images):
    lengths = []
    handle = micro_model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: lengths.append(kwargs["inputs_embeds"].shape[1]), with_kwargs=True
    )
    inputs = _inputs(micro_processor, ct_images[:1])
    micro_model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    handle.remove()
    assert lengths[0] == inputs["input_ids"].shape[1]  # one prefill with image + prompt
    assert lengths[1:] == [1] * (len(lengths) - 1) and len(lengths) >= 5  # then one token per step


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(do_sample=False, repetition_penalty=1.3, no_repeat_ngram_size=3),
        dict(do_sample=True, temperature=0.7, top_p=0.9),
    ],
)
def test_generate_options(micro_model, micro_processor, ct_images, kwargs):
    torch.manual_seed(0)
    inputs = _inputs(micro_processor, ct_images[:2])
    out = micro_model.generate(**inputs, max_new_tokens=8, min_new_tokens=8, **kwargs)
    assert out.shape == (2, inputs["input_ids"].shape[1] + 8)
    if kwargs.get("no_repeat_ngram_size"):
        for row in out[:, inputs["input_ids"].shape[1] :].tolist():
            trigrams = [tuple(row[i : i + 3]) for i in range(len(row) - 2)]
            assert len(trigrams) == len(set(trigrams))


def test_register_for_auto_class_loads_without_hf_vlm(tmp_path, micro_model, micro_processor, ct_images):
    """A pushed checkpoint carries its code: it loads with trust_remote_code where hf_vlm is absent."""
    MambaVLMConfig.register_for_auto_class()
    MambaVLMForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")
    try:
        micro_model.save_pretrained(tmp_path)
    finally:
        MambaVLMConfig._auto_class = None
        MambaVLMForConditionalGeneration._auto_class = None
    config = json.loads((tmp_path / "config.json").read_text())
    assert "AutoModelForImageTextToText" in config["auto_map"]
    inputs = _inputs(micro_processor, ct_images[:1])
    torch.save(dict(inputs), tmp_path / "inputs.pt")
    with torch.no_grad():
        expected = micro_model(**inputs).logits
    script = (
        "import sys, torch; sys.modules['hf_vlm'] = None\n"  # make `import hf_vlm` impossible
        "from transformers import AutoModelForImageTextToText\n"
        f"m = AutoModelForImageTextToText.from_pretrained({str(tmp_path)!r}, trust_remote_code=True).eval()\n"
        f"inputs = torch.load({str(tmp_path / 'inputs.pt')!r})\n"
        f"torch.save(m(**inputs).logits, {str(tmp_path / 'out.pt')!r})\n"
    )
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "modules"))
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path, env=env)
    assert torch.allclose(torch.load(tmp_path / "out.pt"), expected, atol=1e-6)

"""bitsandbytes 8-bit / 4-bit loading of the Mamba LLM, on CPU.

Proves what docs/architecture.md ("8-bit") asks: the quantised LLM runs forward, lets the gradient
through into the bridge while frozen, generates, and stays close to the full-precision model;
and that every entry of `MAMBA_INT8_SKIP_MODULES` is needed (each failure is reproduced).
Tolerances below are bounds with margin over what was measured (docs/quantization.md).
"""

from __future__ import annotations

import logging

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")

from transformers import MambaForCausalLM, ViTModel  # noqa: E402

from hf_vlm import MambaVLMForConditionalGeneration  # noqa: E402
from hf_vlm.loading import MAMBA_INT8_SKIP_MODULES, bnb_quantization_config, load_language_model  # noqa: E402


def _cpu_int8_works() -> str | None:
    try:
        layer = bnb.nn.Linear8bitLt(64, 64, bias=False, has_fp16_weights=False)
        layer.load_state_dict({"weight": torch.randn(64, 64)})
        layer(torch.randn(2, 64))
    except Exception as e:  # no CPU backend in this build
        return f"bitsandbytes {bnb.__version__} cannot run int8 on this CPU: {type(e).__name__}: {e}"
    return None


_reason = _cpu_int8_works()
pytestmark = [
    pytest.mark.skipif(_reason is not None, reason=_reason or ""),
    pytest.mark.filterwarnings("ignore::UserWarning"),  # "inputs will be cast from float32 to float16"
]
BNB_LINEAR = (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit)


def _int8_config(skip):
    """A hand-made 8-bit config with the given skip list (hf_vlm's own is `bnb_quantization_config()`)."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=list(skip))


def _quantised_names(model) -> set[str]:
    return {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, BNB_LINEAR)}


@pytest.fixture(scope="module")
def parts(micro_config, tmp_path_factory, micro_processor):
    """Micro ViT + micro Mamba LLM saved to disk, as a real checkpoint would be."""
    root = tmp_path_factory.mktemp("quant")
    config = micro_config()
    torch.manual_seed(1)
    ViTModel(config.vision_config, add_pooling_layer=False).save_pretrained(root / "vit")
    MambaForCausalLM(config.text_config).save_pretrained(root / "llm")
    return root


@pytest.fixture(scope="module")
def token_batch(micro_processor, report_texts):
    text = "".join(report_texts[:8])  # one long report, cut into 4 rows of 24 tokens
    ids = micro_processor.tokenizer(text, add_special_tokens=False)["input_ids"][:96]
    return torch.tensor(ids).view(4, 24)


@pytest.mark.parametrize(
    "skip,error,match",
    [
        (["lm_head"], RuntimeError, "expected scalar type Float but found Char"),  # dt_proj read raw
        (["dt_proj", "x_proj", "out_proj"], AttributeError, "CB"),  # tied lm_head quantised
        (MAMBA_INT8_SKIP_MODULES, None, None),
    ],
    ids=["without-dt_proj", "without-lm_head", "hf_vlm-list"],
)
def test_each_skipped_module_is_needed_for_int8(parts, token_batch, skip, error, match):
    llm = MambaForCausalLM.from_pretrained(parts / "llm", quantization_config=_int8_config(skip)).eval()
    assert "conv1d" not in _quantised_names(llm)  # bitsandbytes only converts nn.Linear
    if error is None:
        assert _quantised_names(llm) == {"in_proj"}
        with torch.no_grad():
            assert torch.isfinite(llm(input_ids=token_batch).logits).all()
        return
    with pytest.raises(error, match=match), torch.no_grad():
        llm(input_ids=token_batch)


def test_fused_training_kernel_gets_full_precision_weights(monkeypatch, parts, token_batch):
    """The mamba-ssm training kernel (`mamba_inner_fn`) receives x_proj/dt_proj/out_proj `.weight`
    tensors raw; record what it would get (then fall back, as without the kernel)."""
    import transformers.models.mamba.modeling_mamba as modeling_mamba

    received = []

    def recording_inner_fn(xz, conv_w, conv_b, x_proj_w, dt_proj_w, out_proj_w, *args, **kwargs):
        received.append({"x_proj": x_proj_w.dtype, "dt_proj": dt_proj_w.dtype, "out_proj": out_proj_w.dtype})
        return None

    monkeypatch.setattr(modeling_mamba, "mamba_inner_fn", recording_inner_fn)
    for skip, expect_int8 in ((MAMBA_INT8_SKIP_MODULES, set()), (["dt_proj", "lm_head"], {"x_proj", "out_proj"})):
        received.clear()
        llm = MambaForCausalLM.from_pretrained(parts / "llm", quantization_config=_int8_config(skip)).train()
        llm(input_ids=token_batch)
        assert received, "MambaMixer no longer calls mamba_inner_fn in training: re-check the skip list"
        int8 = {name for call in received for name, dtype in call.items() if dtype == torch.int8}
        assert int8 == expect_int8


@pytest.mark.parametrize("bits,max_rel", [(8, 0.03), (4, 0.3)])
def test_quantised_llm_logits_close_to_full_precision(parts, token_batch, bits, max_rel):
    reference = MambaForCausalLM.from_pretrained(parts / "llm").eval()
    llm = load_language_model(str(parts / "llm"), quantization_config=bnb_quantization_config(bits == 4)).eval()
    assert _quantised_names(llm) == {"in_proj"}
    with torch.no_grad():
        expected, got = reference(input_ids=token_batch).logits, llm(input_ids=token_batch).logits
    rel = float((got - expected).abs().max() / expected.abs().max())
    assert rel < max_rel, f"{bits}-bit logits differ by {rel:.3%} of max |logit|"
    if bits == 8:
        assert (got.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.95


def test_load_language_model_warns_about_incomplete_skip_list(parts, caplog):
    with caplog.at_level(logging.WARNING, logger="hf_vlm.loading"):
        load_language_model(str(parts / "llm"), quantization_config=_int8_config(["dt_proj", "lm_head"]))
    assert "lacks ['x_proj', 'out_proj']" in caplog.text


def _vlm(parts, processor, quantization_config):
    torch.manual_seed(5)  # same bridge init for every variant
    model = MambaVLMForConditionalGeneration.from_components(
        str(parts / "vit"),
        str(parts / "llm"),
        llm_quantization_config=quantization_config,
        max_visual_tokens=processor.max_visual_tokens,
        image_token_id=processor.image_token_id,
    )
    model.vision_tower.requires_grad_(False)
    model.language_model.requires_grad_(False)
    return model


def _bridge_grad(model, inputs, labels, evaluate_first: bool) -> torch.Tensor:
    if evaluate_first:  # an evaluation pass before training (what the Trainer does at eval steps)
        model.eval()
        with torch.no_grad():
            model(**inputs)
    model.train()
    model.zero_grad()
    model(**inputs, labels=labels).loss.backward()
    return torch.cat([p.grad.flatten() for p in model.bridge.parameters()])


@pytest.mark.parametrize("bits,min_cos", [(8, 0.999), (4, 0.8)])
def test_vlm_with_quantised_llm_end_to_end(parts, micro_processor, ct_images, bits, min_cos):
    """from_components: vision tower + bridge fp32, LLM quantised; forward, backward, generate."""
    inputs = micro_processor(images=[[im] for im in ct_images[:2]], text=[None, "请描述。"])
    labels = inputs["input_ids"].masked_fill(inputs["input_ids"] == micro_processor.image_token_id, -100)
    reference = _vlm(parts, micro_processor, None)
    model = _vlm(parts, micro_processor, bnb_quantization_config(load_in_4bit=bits == 4))
    assert _quantised_names(model.language_model) == {"in_proj"}
    assert _quantised_names(model.vision_tower) == set() and _quantised_names(model.bridge) == set()
    assert all(p.dtype == torch.float32 for p in model.bridge.parameters())

    expected = _bridge_grad(reference, inputs, labels, evaluate_first=False)
    for evaluate_first in (False, True):  # 4-bit: the CPU repacking after eval must stay disabled
        grad = _bridge_grad(model, inputs, labels, evaluate_first)
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0
        cos = torch.nn.functional.cosine_similarity(grad, expected, dim=0)
        assert cos > min_cos, f"{bits}-bit bridge gradient cosine {cos:.4f} (evaluate_first={evaluate_first})"

    kwargs = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False)
    out = model.eval().generate(**inputs, **kwargs)
    assert out.shape == (2, inputs["input_ids"].shape[1] + 12)
    if bits == 8:
        assert torch.equal(out, reference.eval().generate(**inputs, **kwargs))

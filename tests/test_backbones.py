"""Every guarantee of `hf_vlm.backbones`, for every supported SSM / hybrid family, in one table.

Tiny configs of each family (`example_config`, 3 layers, CPU, no download) are saved and loaded
back through the Auto classes. Each registry fact is reproduced from the real modules, never
assumed: the LoRA refusals and int8 skips are derived by recording which weights mamba-ssm's fused
kernels would receive (the kernels are replaced by recorders that return None, i.e. "no kernel",
so the torch path runs as it does here), and the padding-mask semantics by decoding with and
without the mask after the prefill.
"""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_vlm import compat
from hf_vlm.backbones import FAMILIES, SCAN_MAMBA1, example_config, get_family, load_language_model
from hf_vlm.ops import (
    backend_usage,
    mamba_kernels_available,
    reset_backend_usage,
    set_scan_backend,
    uninstall_fast_scan,
)

VOCAB = 96
TYPES = tuple(FAMILIES)
# Non-default multipliers, so that a missing one shows (real Falcon-H1 checkpoints use ~5.7)
EXTRA = {"falcon_h1": dict(embedding_multiplier=5.0), "granitemoehybrid": dict(embedding_multiplier=2.0)}
MOE = {"granitemoehybrid", "jamba"}  # built with 2 experts, so their `experts` refusal is exercised


def _peft_mamba_types() -> set[str]:
    """The model types peft's own LoRA-on-Mamba check covers in the installed release (it grew:
    0.18 lacks nemotron_h), read off the set literal in that check."""
    from peft.tuners import tuners_utils

    check = getattr(tuners_utils, "_check_lora_target_modules_mamba", None)
    for const in getattr(getattr(check, "__code__", None), "co_consts", ()):
        if isinstance(const, frozenset) and "mamba" in const:
            return set(const)
    return set()


PEFT_GUARDED = _peft_mamba_types()


def tiny_config(model_type: str, **overrides):
    kwargs = dict(vocab_size=VOCAB, num_layers=3, experts=2 if model_type in MOE else 0, **EXTRA.get(model_type, {}))
    return example_config(model_type, **{**kwargs, **overrides})


@pytest.fixture(scope="module", params=TYPES)
def saved(request, tmp_path_factory):
    """(family, checkpoint dir, the model that was saved) per family."""
    family = FAMILIES[request.param]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(family.model_type)).eval()
    path = tmp_path_factory.mktemp(family.model_type)
    model.save_pretrained(path)
    return family, path, model


def _ids(batch=2, length=12, seed=1):
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_unsupported_model_type_lists_the_supported_ones():
    with pytest.raises(ValueError, match=r"'llama' is not supported!.*mamba, falcon_mamba, mamba2, falcon_h1"):
        get_family("llama")
    assert set(TYPES) == {
        "mamba",
        "falcon_mamba",
        "mamba2",
        "falcon_h1",
        "granitemoehybrid",
        "bamba",
        "zamba2",
        "nemotron_h",
        "jamba",
    }


def test_static_facts_match_the_modules(saved):
    family, _, model = saved
    config = model.config
    assert type(model).__name__ == family.causal_lm_class and get_family(model) is family
    assert get_family(copy.copy(config)) is family and get_family(family.model_type) is family
    assert set(type(model)._no_split_modules) == set(family.no_split_modules)
    assert family.layer_indices(model) == set(range(config.num_hidden_layers))
    norm = model.get_submodule(family.final_norm)
    assert "norm" in type(norm).__name__.lower() and family.layer_index(family.final_norm) is None
    dims = family.dims(config)
    mixers = family.mixers(model)
    assert len(mixers) == dims.ssm_layers >= 1 and dims.layers == config.num_hidden_layers
    for mixer in mixers:  # the config attribute names give the real module shapes
        in_proj = next(m for n, m in mixer.named_modules() if n.endswith("in_proj"))
        conv = next(m for n, m in mixer.named_modules() if n.endswith("conv1d"))
        if family.scan == SCAN_MAMBA1:
            assert in_proj.out_features == 2 * dims.inner and conv.in_channels == dims.inner
            x_proj = next(m for n, m in mixer.named_modules() if n.endswith("x_proj"))
            assert x_proj.out_features == dims.dt_rank + 2 * dims.state
        else:
            assert conv.in_channels == dims.inner + 2 * dims.groups * dims.state
            assert in_proj.out_features == dims.inner + conv.in_channels + dims.heads
            assert dims.heads * dims.head_dim == dims.inner and mixer.A_log.shape == (dims.heads,)


def test_save_load_through_auto_classes_gives_identical_logits(saved):
    family, path, model = saved
    loaded = AutoModelForCausalLM.from_pretrained(path).eval()
    assert type(loaded).__name__ == family.causal_lm_class
    with torch.no_grad():
        assert torch.equal(model(input_ids=_ids()).logits, loaded(input_ids=_ids()).logits)


def test_input_embeddings_reproduce_the_input_ids_path(saved):
    family, _, model = saved
    ids = _ids()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        torch.testing.assert_close(model(inputs_embeds=family.input_embeddings(model, ids)).logits, expected)
        plain = model(inputs_embeds=model.get_input_embeddings()(ids)).logits
    # Falcon-H1 scales only its own input_ids lookup: without the registry's scale the logits differ
    assert torch.allclose(plain, expected, atol=1e-5) == (family.input_ids_embedding_scale is None)


def _pad_id(model) -> int:
    return 0 if model.config.pad_token_id is None else model.config.pad_token_id  # Granite leaves it unset


def _left_padded(pad_id: int):
    prompts = [torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(n)) for n in (5, 9, 12)]
    ids = torch.full((3, 12), pad_id)
    mask = torch.zeros(3, 12, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, 12 - len(p) :], mask[i, 12 - len(p) :] = p, 1
    return prompts, ids, mask


def _generate(model, ids, mask, drop_decode_mask=False, drop_position_ids=False):
    """Greedy, 6 tokens, with the family's cache; records each forward's input length. `drop_*` remove what a
    caller might not pass (a VLM passing inputs_embeds gets no position_ids from generate unless it asks)."""
    lengths = []

    def hook(module, args, kwargs):
        lengths.append(kwargs["input_ids"].shape[1])
        if drop_position_ids:
            kwargs.pop("position_ids", None)
        if drop_decode_mask and kwargs["input_ids"].shape[1] == 1:
            kwargs["attention_mask"] = None
        return args, kwargs

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=6,
                min_new_tokens=6,
                do_sample=False,
                use_cache=True,
                pad_token_id=_pad_id(model),
                return_dict_in_generate=True,
                output_logits=True,
            )
    finally:
        handle.remove()
    return out, lengths


def test_batched_left_padded_greedy_equals_one_by_one_with_the_family_cache(saved):
    _, _, model = saved
    prompts, ids, mask = _left_padded(_pad_id(model))
    batched, lengths = _generate(model, ids, mask)
    assert lengths == [12, 1, 1, 1, 1, 1]  # prefill once, then one token per step
    with torch.no_grad():  # found under this release's / family's name, fed back under the name forward takes
        cache = compat.lm_cache(model(input_ids=ids, attention_mask=mask, use_cache=True))
    assert type(cache).__name__ == "DynamicCache" and len(cache.layers) == model.config.num_hidden_layers
    assert compat.cache_keyword(model) in inspect.signature(type(model).forward).parameters
    for i, prompt in enumerate(prompts):
        single, single_lengths = _generate(model, prompt[None], torch.ones(1, len(prompt), dtype=torch.long))
        assert single_lengths == [len(prompt)] + [1] * 5
        assert torch.equal(batched.sequences[i, 12:], single.sequences[0, len(prompt) :])
        for step in range(6):
            torch.testing.assert_close(batched.logits[step][i], single.logits[step][0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dropped", ["decode_attention_mask", "position_ids"])
def test_what_decode_steps_need_is_what_the_registry_says(saved, dropped):
    """Pure SSMs carry no padding in their state after the prefill; attention layers keep padded keys in the
    KV cache and need the 2-D mask at every decode step; Bamba also needs position_ids (transformers 5.24)."""
    family, _, model = saved
    _, ids, mask = _left_padded(_pad_id(model))
    full, _ = _generate(model, ids, mask)
    if dropped == "position_ids":
        partial, _ = _generate(model, ids, mask, drop_position_ids=True)
        needed = family.decode_needs_position_ids
    else:
        partial, _ = _generate(model, ids, mask, drop_decode_mask=True)
        needed = family.decode_needs_attention_mask
    gap = max(float((a[:2] - b[:2]).abs().max()) for a, b in zip(full.logits, partial.logits))  # padded rows
    assert (gap > 1e-5) == needed, gap


def _lora(model, targets):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=2, lora_alpha=4, lora_dropout=0.0, target_modules=list(targets)))


def test_lora_on_the_safe_targets_moves_only_adapters(saved):
    family, path, _ = saved
    torch.manual_seed(0)
    model = _lora(AutoModelForCausalLM.from_pretrained(path), family.validate_lora_targets(family.lora_safe_targets))
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    optimizer = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.0)
    ids = _ids(2, 16)
    for _ in range(2):
        optimizer.zero_grad()
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        optimizer.step()
    for name, param in model.named_parameters():
        moved = not torch.equal(param, before[name])
        assert moved == ("lora_" in name), f"{name}: moved={moved}"  # every adapter trains: none is bypassed
    targeted = {n.split(".")[-1] for n, m in model.named_modules() if hasattr(m, "lora_A")}
    assert targeted == set(family.lora_safe_targets) & {n.split(".")[-1] for n, _ in model.named_modules()}


def _fused_weight_reads(model, monkeypatch) -> dict[str, torch.dtype]:
    """{module leaf name: dtype} of every weight mamba-ssm's fused training kernels would receive raw."""
    module = compat.modeling_module(get_family(model).model_type)
    owner = {p.data_ptr(): (n.rsplit(".", 2)[-2], p.dtype) for n, p in model.named_parameters() if p.dim() >= 2}
    received = {}

    def recorder(*args, **kwargs):
        for value in list(args) + list(kwargs.values()):
            if isinstance(value, torch.Tensor) and value.data_ptr() in owner:
                name, dtype = owner[value.data_ptr()]
                received[name] = dtype
        return None  # "no kernel": the mixer takes its torch path

    for name in compat.FUSED_KERNEL_FUNCTIONS:
        if hasattr(module, name):
            monkeypatch.setattr(module, name, recorder)
    model.train()
    ids = _ids()
    model(input_ids=ids, labels=ids, use_cache=False)
    return received


def test_peft_guard_set_is_read_from_the_installed_release():
    assert {"mamba", "falcon_mamba", "mamba2", "falcon_h1"} <= PEFT_GUARDED  # peft >= 0.18


def test_refused_targets_are_refused_with_the_reason(saved, monkeypatch):
    family, path, model = saved
    for target in family.lora_refused_targets:
        with pytest.raises(ValueError, match=rf"{target!r} is refused for {family.model_type} \(.+\)"):
            family.validate_lora_targets(["in_proj", target])
    with pytest.raises(ValueError, match="not a known-safe target"):
        family.validate_lora_targets(["lm_head_typo"])
    # each reason reproduced: the fused kernels read exactly the refused Linear / conv weights raw
    read = set(_fused_weight_reads(model, monkeypatch))
    expected = (
        {"x_proj", "dt_proj", "out_proj", "conv1d"}
        if family.model_type in ("mamba", "falcon_mamba")
        else set()
        if family.model_type == "jamba"
        else {"out_proj", "conv1d"}
    )
    assert read == expected and read <= set(family.lora_refused_targets)
    present = {n.split(".")[-1] for n, _ in model.named_modules()}
    for target in family.lora_refused_targets.keys() & present:
        fresh = AutoModelForCausalLM.from_pretrained(path)
        if target == "dt_proj":  # the mixer reads dt_proj.weight itself: the adapter gets no gradient
            peft_model = _lora(fresh, [target]).train()
            assert any("lora_B" in n for n, p in peft_model.named_parameters() if p.requires_grad)
            assert not peft_model(input_ids=_ids(), labels=_ids(), use_cache=False).loss.requires_grad
        elif target in ("out_proj", "conv1d") and family.model_type in PEFT_GUARDED:
            with pytest.raises(ValueError, match="incompatible with Mamba-based models"):
                _lora(fresh, [target])
        elif target in ("conv1d", "experts"):  # peft's grouped-conv limit; experts are not modules it wraps
            with pytest.raises(ValueError, match="rank is divisible by groups|is not supported"):
                _lora(fresh, [target])


def test_zamba2_shared_transformer_is_tied_across_hybrid_layers():
    config = tiny_config("zamba2", num_layers=4, layers_block_type=["mamba", "hybrid", "mamba", "hybrid"])
    model = AutoModelForCausalLM.from_config(config)
    names = [n for n, _ in model.named_parameters() if "shared_transformer" in n]
    assert names and {get_family(model).layer_index(n) for n in names} == {1}  # layer 3 owns none by name
    q1 = model.model.layers[1].shared_transformer.self_attn.q_proj.weight
    assert q1 is model.model.layers[3].shared_transformer.self_attn.q_proj.weight


@pytest.mark.parametrize("model_type", sorted(t for t, f in FAMILIES.items() if f.scan == SCAN_MAMBA1))
def test_mamba1_families_run_the_chunked_scan_with_reference_parity(model_type):
    if mamba_kernels_available():
        pytest.skip("with CUDA kernels the ladder picks mamba_ssm")
    uninstall_fast_scan()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type)).train()
    family = get_family(model)
    ids = _ids(2, 23)

    def run():
        reset_backend_usage()
        model.zero_grad(set_to_none=True)
        out = model(input_ids=ids, labels=ids, use_cache=False)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return out.logits.detach(), grads, backend_usage()

    try:
        assert family.attach_scan(model) == len(family.mixers(model)) == family.dims(model.config).ssm_layers
        fast, fast_grads, usage = run()
        assert usage == {"hf_vlm_chunked": family.dims(model.config).ssm_layers}
        set_scan_backend("transformers_reference")
        ref, ref_grads, usage = run()
        assert usage == {"transformers_reference": family.dims(model.config).ssm_layers}
    finally:
        uninstall_fast_scan()
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)
    assert fast_grads.keys() == ref_grads.keys() and any("A_log" in n for n in fast_grads)
    for name, grad in fast_grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-4, atol=1e-5, msg=name)


def test_mamba2_families_keep_transformers_ssd_path():
    for family in FAMILIES.values():
        if family.scan != SCAN_MAMBA1:
            assert family.attach_scan(AutoModelForCausalLM.from_config(tiny_config(family.model_type))) == 0


def _bnb_cpu_problem() -> str | None:
    try:
        import bitsandbytes as bnb

        layer = bnb.nn.Linear8bitLt(64, 64, bias=False, has_fp16_weights=False)
        layer.load_state_dict({"weight": torch.randn(64, 64)})
        layer(torch.randn(2, 64))
    except Exception as error:  # not installed, or no CPU backend in this build
        return f"bitsandbytes cannot run int8 on this CPU: {type(error).__name__}: {error}"
    return None


needs_bnb = pytest.mark.skipif(_bnb_cpu_problem() is not None, reason=str(_bnb_cpu_problem()))


def _quantised_leaves(model) -> set[str]:
    import bitsandbytes as bnb

    return {
        n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit))
    }


@needs_bnb
@pytest.mark.filterwarnings("ignore::UserWarning")  # "inputs will be cast from float32 to float16"
@pytest.mark.parametrize("bits,max_rel", [(8, 0.05), (4, 0.5)])
def test_quantised_lm_runs_forward_and_backward_to_its_inputs(saved, bits, max_rel, monkeypatch):
    family, path, reference = saved
    lm = load_language_model(str(path), quantization=f"{bits}bit")
    quantised = _quantised_leaves(lm)
    assert quantised and not quantised & set(family.int8_skip_modules) and "in_proj" in quantised
    ids = _ids()
    for train in (False, True):  # eval first: the CPU 4-bit repacking must stay off (hf_vlm.loading)
        lm.train(train)
        embeds = family.input_embeddings(lm, ids).detach().requires_grad_(True)
        out = lm(inputs_embeds=embeds, labels=ids, use_cache=False)
        out.loss.backward()
        assert torch.isfinite(embeds.grad).all() and embeds.grad.abs().sum() > 0
    with torch.no_grad():
        expected, got = reference(input_ids=ids).logits, lm.eval()(input_ids=ids).logits
    assert float((got - expected).abs().max() / expected.abs().max()) < max_rel
    reads = _fused_weight_reads(lm, monkeypatch)  # the fused kernels would get full-precision weights only
    assert all(dtype.is_floating_point for dtype in reads.values()), reads


@needs_bnb
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_each_int8_skip_is_a_weight_the_fused_kernel_reads(saved, monkeypatch):
    """Skipping only the output head, the fused kernels would receive int8 exactly for the other skips."""
    from transformers import BitsAndBytesConfig

    family, path, _ = saved
    lm = AutoModelForCausalLM.from_pretrained(
        path, quantization_config=BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=["lm_head"])
    )
    try:
        reads = _fused_weight_reads(lm, monkeypatch)
    except RuntimeError as error:  # Mamba's torch path then fails on its raw dt_proj matmul
        assert family.model_type == "mamba" and "expected scalar type Float but found Char" in str(error)
        reads = {"x_proj": torch.int8, "dt_proj": torch.int8, "out_proj": torch.int8}
    assert {n for n, dtype in reads.items() if not dtype.is_floating_point} == set(family.int8_skip_modules) - {
        "lm_head"
    }


def test_quantisation_without_bitsandbytes_is_refused_naming_the_family(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(ImportError, match="8-bit loading of the falcon_h1 language model needs bitsandbytes"):
        FAMILIES["falcon_h1"].quantization_config(8)


@needs_bnb
def test_loader_warns_about_an_incomplete_skip_list(saved, caplog):
    import logging

    from transformers import BitsAndBytesConfig

    family, path, _ = saved
    with caplog.at_level(logging.WARNING, logger="hf_vlm.backbones"):
        load_language_model(str(path), BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=["in_proj"]))
    assert f"lacks {list(family.int8_skip_modules)}" in caplog.text and family.model_type in caplog.text


@pytest.mark.parametrize("name", ["stage1_align_falcon_h1", "stage2_finetune_falcon_h1"])
def test_family_recipes_parse_and_name_a_supported_backbone(name):
    from pathlib import Path

    from hf_vlm.training.recipe import parse_recipe

    path = Path(__file__).resolve().parent.parent / "recipes" / "families" / f"{name}.yaml"
    model_args, data_args, _, training_args, _ = parse_recipe(path)
    assert model_args.language_model_name_or_path == "tiiuae/Falcon-H1-1.5B-Deep-Instruct"
    assert data_args.max_length == model_args.max_visual_tokens + 512 and training_args.activation_checkpointing
    if training_args.use_lora:
        get_family("falcon_h1").validate_lora_targets(training_args.lora_target_modules)

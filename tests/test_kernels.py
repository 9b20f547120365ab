"""Which scan the Mamba layers run: hf_vlm models get the fast one, plain models keep theirs.

The routing is proven by the per-rung call counter (`backend_usage`) and by numerical parity
with transformers' sequential scan, never by timing.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest
import torch

from hf_vlm.ops import (
    active_scan_backend,
    backend_usage,
    install_fast_scan,
    mamba_kernels_available,
    reset_backend_usage,
    selective_scan_ref,
    set_scan_backend,
    set_scan_scope,
    uninstall_fast_scan,
)

pytestmark = pytest.mark.skipif(mamba_kernels_available(), reason="with CUDA kernels the ladder picks mamba_ssm")


@pytest.fixture
def clean_backend():
    uninstall_fast_scan()
    reset_backend_usage()
    yield
    uninstall_fast_scan()
    reset_backend_usage()


def plain_mamba():
    from transformers import MambaConfig, MambaForCausalLM

    torch.manual_seed(0)
    return MambaForCausalLM(MambaConfig(hidden_size=32, num_hidden_layers=2, vocab_size=100, state_size=8))


def _logits_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids, use_cache=False)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), grads


def test_hf_vlm_model_runs_the_chunked_scan_and_a_plain_mamba_keeps_transformers(
    clean_backend, micro_model, micro_processor, ct_images
):
    import copy

    import transformers.models.mamba.modeling_mamba as mm

    plain = plain_mamba()
    ids = torch.randint(0, 100, (2, 23), generator=torch.Generator().manual_seed(0))
    # building the VLM (the micro_model fixture) installed the dispatcher without any call by the user
    vlm = copy.deepcopy(micro_model)  # deep copies keep the routing (hooks are module state)
    assert getattr(mm.mamba_selective_scan, "_hf_vlm_original", None) is not None
    assert active_scan_backend() == "hf_vlm_chunked" and active_scan_backend(scoped=False) == "transformers_reference"
    reset_backend_usage()
    with torch.no_grad():
        plain(input_ids=ids)
    assert backend_usage() == {"transformers_reference": 2}  # two layers, transformers' own path
    reset_backend_usage()
    inputs = micro_processor(images=[[ct_images[0]]], text=[None])
    with torch.no_grad():
        fast = vlm(**inputs).logits
    assert backend_usage() == {"hf_vlm_chunked": 2}
    set_scan_backend("transformers_reference")  # parity with transformers' sequential scan
    reset_backend_usage()
    with torch.no_grad():
        reference = vlm(**inputs).logits
    assert backend_usage() == {"transformers_reference": 2}
    torch.testing.assert_close(fast, reference, rtol=1e-5, atol=1e-5)


def test_activation_checkpointing_recompute_stays_on_the_fast_scan(
    clean_backend, micro_model, micro_processor, ct_images
):
    model = micro_model.train()
    model.activation_checkpointing_enable()
    inputs = micro_processor(images=[[ct_images[0]], [ct_images[1]]], text=[None, None])
    labels = inputs["input_ids"].clone()
    reset_backend_usage()
    model(**inputs, labels=labels).loss.backward()
    usage = backend_usage()
    assert set(usage) == {"hf_vlm_chunked"} and usage["hf_vlm_chunked"] >= 4, usage  # forward + recompute


def test_global_opt_in_covers_plain_models_with_the_same_numbers(clean_backend, caplog):
    import transformers.models.mamba.modeling_mamba as mm

    original = mm.mamba_selective_scan
    model = plain_mamba().train()
    ids = torch.randint(0, 100, (2, 23), generator=torch.Generator().manual_seed(0))
    ref_logits, ref_grads = _logits_and_grads(model, ids)
    with caplog.at_level(logging.INFO, logger="hf_vlm.ops"):
        assert install_fast_scan() == "hf_vlm_chunked"
        assert install_fast_scan() == "hf_vlm_chunked"  # idempotent
        logits, grads = _logits_and_grads(model, ids)
        _logits_and_grads(model, ids)
    announced = [r for r in caplog.records if r.name == "hf_vlm.ops" and "hf_vlm_chunked" in r.getMessage()]
    assert len(announced) == 1  # one clear line, not one per call
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    assert grads.keys() == ref_grads.keys() and any("A_log" in n for n in grads)
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-4, atol=1e-5, msg=name)
    model.eval()
    kw = dict(max_new_tokens=12, do_sample=False, use_cache=True, pad_token_id=0)
    with torch.no_grad():
        fast = model.generate(ids[:1, :11], **kw)
        uninstall_fast_scan()
        ref = model.generate(ids[:1, :11], **kw)
    assert mm.mamba_selective_scan is original  # uninstall puts transformers' function back
    assert fast.shape == (1, 23) and torch.equal(fast, ref)


def test_dispatcher_ignores_backend_selection_kwargs_and_filters_the_wrong_fallback_note(clean_backend):
    import transformers.models.mamba.modeling_mamba as mm

    set_scan_scope("global")
    g = torch.Generator().manual_seed(0)
    u, delta, B, C = (torch.randn(2, *shape, generator=g) for shape in ((5, 6), (5, 6), (4, 6), (4, 6)))
    args = [u, delta.abs() * 0.5, -torch.rand(5, 4, generator=g) - 0.1, B, C]  # (B, D, L), A (D, N), (B, N, L)
    torch.testing.assert_close(
        mm.mamba_selective_scan(*args, use_mambapy=True, use_associative_scan=True), selective_scan_ref(*args)
    )
    hub_logger = logging.getLogger("transformers.integrations.hub_kernels")
    note = hub_logger.makeRecord(
        hub_logger.name,
        logging.WARNING,
        __file__,
        0,
        "`selective_scan_fn` is falling back to its reference PyTorch implementation "
        "because `mamba-ssm` is not installed.",
        (),
        None,
    )
    assert hub_logger.filter(note) is False
    uninstall_fast_scan()
    assert hub_logger.filter(note)


def test_forcing_an_unavailable_rung_is_a_clear_error(clean_backend, micro_model, micro_processor, ct_images):
    set_scan_backend("hf_vlm_triton")
    with pytest.raises(RuntimeError, match="hf_vlm_triton.*forced.*cannot run here"):
        micro_model(**micro_processor(images=[[ct_images[0]]], text=[None]))
    with pytest.raises(ValueError, match="one of"):
        set_scan_backend("fastest")


SUBPROCESS_CHECK = r"""
import json, sys, torch
import hf_vlm
from transformers import AutoModelForImageTextToText, AutoProcessor
from hf_vlm.ops import backend_usage, reset_backend_usage, set_scan_backend
model = AutoModelForImageTextToText.from_pretrained(sys.argv[1]).eval()
inputs = torch.load(sys.argv[2])
reset_backend_usage()
with torch.no_grad():
    fast = model(**inputs).logits
usage = backend_usage()
set_scan_backend("transformers_reference")
with torch.no_grad():
    reference = model(**inputs).logits
print(json.dumps({"usage": usage, "diff": float((fast - reference).abs().max())}))
"""


def _run_check(checkpoint, inputs_file, env_extra=None):
    env = dict(os.environ, **(env_extra or {}))
    done = subprocess.run(
        [sys.executable, "-c", SUBPROCESS_CHECK, str(checkpoint), str(inputs_file)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    import json

    return json.loads(done.stdout.strip().splitlines()[-1])


def test_bare_import_and_auto_class_load_runs_the_fast_scan(tmp_path, micro_model, micro_processor, ct_images):
    micro_model.save_pretrained(tmp_path / "ckpt")
    micro_processor.save_pretrained(tmp_path / "ckpt")
    torch.save(dict(micro_processor(images=[[ct_images[0]]], text=[None])), tmp_path / "inputs.pt")
    result = _run_check(tmp_path / "ckpt", tmp_path / "inputs.pt")
    assert result["usage"] == {"hf_vlm_chunked": 2} and result["diff"] < 1e-5, result
    off = _run_check(tmp_path / "ckpt", tmp_path / "inputs.pt", {"HF_VLM_FAST_SCAN": "0"})
    assert off["usage"] == {}, off  # the switch: no routing at all, transformers' function untouched


def test_hf_vlm_generate_prefill_runs_the_fast_scan_with_identical_reports(clean_backend, tiny_checkpoint, tmp_path):
    import csv

    from hf_vlm.cli import main

    checkpoint, assets = tiny_checkpoint(tmp_path)
    args = [
        "generate",
        "--checkpoint",
        str(checkpoint),
        "--images",
        assets.eval_csv,
        "--max_new_tokens",
        "6",
        "--no_progress",
    ]
    reset_backend_usage()
    assert main(args + ["--output", str(tmp_path / "fast.csv")]) == 0
    usage = backend_usage()
    assert set(usage) == {"hf_vlm_chunked"} and usage["hf_vlm_chunked"] >= 2, usage
    set_scan_backend("transformers_reference")
    assert main(args + ["--output", str(tmp_path / "ref.csv")]) == 0

    def reports(name):
        with open(tmp_path / name, encoding="utf-8-sig") as handle:
            return [row["report"] for row in csv.DictReader(handle)]

    assert reports("fast.csv") == reports("ref.csv") and any(reports("fast.csv"))

"""The Triton selective scan against the sequential reference, on CPU through the Triton interpreter.

CI has no GPU: `TRITON_INTERPRET=1` makes `@triton.jit` (it reads the variable when a kernel is
decorated) return interpreted kernels that run the same kernel code on CPU tensors with numpy.
The `ts` fixture sets it and reloads `hf_vlm.ops.triton_scan`, so the kernels are decorated
again in interpreted mode, and reloads it once more at the end (compiled mode) for later tests.

The interpreter runs `tl.associative_scan` and `tl.reduce` with a custom combine function one
element at a time (~0.3 ms each), far too slow for whole tiles; `_sliced` runs the same sequential
loop with the same combine function one slice along the axis at a time.
`test_sliced_interpreter_loops_equal_the_interpreters_own` proves both give identical bits, so the
speed-up changes nothing that is checked.

triton is part of the test extra: without it these tests fail (they never skip).
"""

from __future__ import annotations

import importlib
import importlib.util
import os

import numpy as np
import pytest
import torch

from hf_vlm.ops import selective_scan_ref
from tests.test_selective_scan import NAMES, assert_close_all, make_inputs, run

HAVE_TRITON = importlib.util.find_spec("triton") is not None


def _sliced(op, input, axis):
    """The interpreter's element loop along `axis` (first element, then acc = combine(acc, next)),
    vectorised across the other axes. Returns every prefix as numpy arrays (the scan)."""
    datas = [arg.handle.data for arg in input]
    outs = [np.empty_like(d) for d in datas]

    def at(i):
        return (slice(None),) * axis + (i,)

    for o, d in zip(outs, datas):
        o[at(0)] = d[at(0)]
    for i in range(1, datas[0].shape[axis]):
        acc = tuple(op.to_tensor(o[at(i - 1)], arg.dtype) for o, arg in zip(outs, input))
        cur = tuple(op.to_tensor(d[at(i)], arg.dtype) for d, arg in zip(datas, input))
        ret = op.combine_fn.fn(*acc, *cur)
        for o, r in zip(outs, ret if isinstance(ret, tuple) else (ret,)):
            o[at(i)] = r.handle.data
    return outs


def _sliced_scan(self, input):
    return [self.to_tensor(o, arg.dtype) for o, arg in zip(_sliced(self, input, self.axis), input)]


def _sliced_reduce(self, input):
    assert self.axis is not None and not self.keep_dims, "only what the scan kernels use"
    outs = _sliced(self, input, self.axis)
    last = (slice(None),) * self.axis + (-1,)
    return [self.to_tensor(o[last], arg.dtype) for o, arg in zip(outs, input)]


@pytest.fixture(scope="module")
def interpreter():
    """(the reloaded module, the interpreter's own element-wise scan and reduce)."""
    if not HAVE_TRITON:
        pytest.fail("triton is not installed; it is part of the test extra (pip install -e '.[test]')")
    from triton.runtime.interpreter import ReduceOps, ScanOps

    import hf_vlm.ops.triton_scan as module

    mp = pytest.MonkeyPatch()
    mp.setenv("TRITON_INTERPRET", "1")
    importlib.reload(module)
    assert module._interpreted()
    originals = ScanOps.generic_scan, ReduceOps.generic_reduce
    mp.setattr(ScanOps, "generic_scan", _sliced_scan)
    mp.setattr(ReduceOps, "generic_reduce", _sliced_reduce)
    yield module, originals
    mp.undo()
    importlib.reload(module)
    assert not module._interpreted()


@pytest.fixture
def ts(interpreter):
    return interpreter[0]


def _leaves_like(ins, dtype):
    return {k: (None if v is None else v.detach().to(dtype).requires_grad_()) for k, v in ins.items()}


CASES = [  # (L, chunk, block_d, use_D, use_z, use_bias, softplus)
    (1, 2, 4, True, True, True, True),
    (7, 4, 2, True, True, True, True),
    (16, 16, 8, True, False, True, True),
    (37, 8, 4, True, True, True, True),
    (37, 8, 2, False, False, False, False),
    (37, 8, 8, False, True, False, True),
    (37, 8, 4, True, False, True, False),
    (50, 64, 4, True, True, False, True),
    (65, 16, 2, True, True, True, True),
]


@pytest.mark.parametrize("L,chunk,block_d,use_D,use_z,use_bias,softplus", CASES)
def test_fp32_matches_reference(ts, L, chunk, block_d, use_D, use_z, use_bias, softplus):
    """Output, final state and every gradient; odd lengths, partial chunks and channel blocks (width 5)."""
    kw = dict(use_D=use_D, use_z=use_z, use_bias=use_bias, positive_dt=not softplus)
    got = run(ts.selective_scan, make_inputs(L, dtype=torch.float32, **kw), softplus, chunk_size=chunk, block_d=block_d)
    ref = run(selective_scan_ref, make_inputs(L, dtype=torch.float64, **kw), softplus)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32
    assert set(got[2]) == {n for n in NAMES if make_inputs(1, **kw)[n] is not None}
    assert_close_all(got, ref, 2e-4, 2e-5)


def test_bf16_inputs_as_transformers_passes_them(ts):
    """u, delta, B, C, z in bf16; A, D, delta_bias in fp32 (the mixer's `.float()` calls)."""
    ins = make_inputs(45, batch=2, width=6, state=8, dtype=torch.float32, seed=3)
    low = {
        k: (v.detach().to(torch.bfloat16) if k in ("u", "delta", "B", "C", "z") else v.detach()) for k, v in ins.items()
    }
    low = {k: v.requires_grad_() for k, v in low.items()}
    got = run(ts.selective_scan, low, True, chunk_size=16, block_d=4)
    assert got[0].dtype == torch.bfloat16 and got[1].dtype == torch.float32
    assert {n: g.dtype for n, g in got[2].items()} == {n: v.dtype for n, v in low.items()}
    ref = run(selective_scan_ref, _leaves_like(low, torch.float64), True)
    assert_close_all(got, ref, 2e-2, 2e-2)  # bf16 rounding of the outputs and input gradients


def test_long_sequence_large_decay_is_stable(ts):
    """L=1000 with dt up to ~5 and A ~ -10: dt*A ~ -50 per step, ~-2e4 cumulated (exp(-cumsum)
    would overflow fp32 after a few steps)."""
    ins = make_inputs(1000, batch=1, width=3, state=4, dtype=torch.float32, use_bias=False, seed=1, a_scale=10.0)
    with torch.no_grad():
        ins["delta"].mul_(4.0).add_(2.0)
    got = run(ts.selective_scan, ins, True, chunk_size=32, block_d=4)
    ref = run(selective_scan_ref, _leaves_like(ins, torch.float64), True)
    for t in (got[0], got[1], *got[2].values()):
        assert torch.isfinite(t).all()
    assert_close_all(got, ref, 1e-3, 1e-4)


@pytest.mark.parametrize("L,chunk", [(1, 2), (17, 16), (40, 8)])
def test_no_grad_path_keeps_no_states_and_matches(ts, L, chunk):
    ins = make_inputs(L, dtype=torch.float32)
    args = [ins[n].detach() for n in NAMES]
    with torch.no_grad():
        out, last = ts.selective_scan(*args, delta_softplus=True, return_last_state=True, chunk_size=chunk, block_d=4)
    ref_out, ref_last = selective_scan_ref(*[a.double() for a in args], delta_softplus=True, return_last_state=True)
    assert out.grad_fn is None
    torch.testing.assert_close(out, ref_out.float(), rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(last, ref_last.float(), rtol=2e-5, atol=2e-6)


def test_strided_inputs_like_the_mamba_mixer(ts):
    """The mixer passes u and B/C as transposed views of (B, L, X) tensors and gets a
    non-contiguous output gradient; results must equal those of contiguous inputs."""
    ins = make_inputs(21, batch=2, width=5, state=4, dtype=torch.float32, seed=4)
    det = {k: v.detach() for k, v in ins.items()}
    u = det["u"].transpose(1, 2).contiguous().requires_grad_()  # (B, L, D)
    bc = torch.cat([det["B"], det["C"]], 1).transpose(1, 2).contiguous().requires_grad_()  # (B, L, 2N)
    rest = {k: det[k].clone().requires_grad_() for k in ("delta", "A", "D", "z", "delta_bias")}
    out, last = ts.selective_scan(
        u.transpose(1, 2),
        rest["delta"],
        rest["A"],
        bc[..., :4].transpose(1, 2),
        bc[..., 4:].transpose(1, 2),
        D=rest["D"],
        z=rest["z"],
        delta_bias=rest["delta_bias"],
        delta_softplus=True,
        return_last_state=True,
        chunk_size=8,
        block_d=2,
    )
    g_out = torch.randn(2, 21, 5, generator=torch.Generator().manual_seed(9)).transpose(1, 2)  # strided
    (out * g_out).sum().backward()
    ref = {k: v.clone().requires_grad_() for k, v in det.items()}
    ref_out = selective_scan_ref(*[ref[n] for n in NAMES], delta_softplus=True)
    (ref_out * g_out).sum().backward()
    torch.testing.assert_close(out, ref_out, rtol=2e-4, atol=2e-5)
    torch.testing.assert_close(u.grad.transpose(1, 2), ref["u"].grad, rtol=2e-4, atol=2e-5)
    torch.testing.assert_close(
        bc.grad.transpose(1, 2), torch.cat([ref["B"].grad, ref["C"].grad], 1), rtol=2e-4, atol=2e-5
    )
    for k in rest:
        torch.testing.assert_close(rest[k].grad, ref[k].grad, rtol=2e-4, atol=2e-5, msg=k)


@pytest.mark.parametrize("loss_on", ["out", "last"])
def test_gradient_through_one_output_only(ts, loss_on):
    """Autograd passes None for the output that does not reach the loss."""
    ins = make_inputs(19, dtype=torch.float32)
    ref_ins = _leaves_like(ins, torch.float64)
    results = []
    for fn, src, kw in ((ts.selective_scan, ins, dict(chunk_size=8, block_d=4)), (selective_scan_ref, ref_ins, {})):
        out, last = fn(*[src[n] for n in NAMES], delta_softplus=True, return_last_state=True, **kw)
        loss = out.square().sum() if loss_on == "out" else last.square().sum()
        grads = torch.autograd.grad(loss, [src[n] for n in NAMES], allow_unused=True)
        results.append([torch.zeros_like(src[n]) if g is None else g for n, g in zip(NAMES, grads)])
    for name, g, r in zip(NAMES, *results):
        torch.testing.assert_close(g, r.float(), rtol=2e-4, atol=2e-5 * max(1.0, r.abs().max().item()), msg=name)


def test_sliced_interpreter_loops_equal_the_interpreters_own(interpreter):
    ts, (scan, reduce) = interpreter
    from triton.runtime.interpreter import ReduceOps, ScanOps

    ins = make_inputs(6, batch=1, width=3, state=2, dtype=torch.float32, seed=5)
    fast = run(ts.selective_scan, ins, True, chunk_size=4, block_d=2)
    with pytest.MonkeyPatch.context() as inner:
        inner.setattr(ScanOps, "generic_scan", scan)
        inner.setattr(ReduceOps, "generic_reduce", reduce)
        slow = run(ts.selective_scan, ins, True, chunk_size=4, block_d=2)
    assert torch.equal(fast[0], slow[0]) and torch.equal(fast[1], slow[1])
    for name in fast[2]:
        assert torch.equal(fast[2][name], slow[2][name]), name


def test_clear_errors(ts, monkeypatch):
    ins = {k: v.detach() for k, v in make_inputs(5, dtype=torch.float32).items()}
    args = [ins[n] for n in ("u", "delta", "A", "B", "C")]
    with pytest.raises(TypeError, match="fp64"):
        ts.selective_scan(*[a.double() for a in args])
    with pytest.raises(ValueError, match="power of two"):
        ts.selective_scan(*args, chunk_size=12)
    with pytest.raises(ValueError, match=r"\(B, N, L\)"):
        ts.selective_scan(args[0], args[1], args[2], args[3][0], args[4][0])
    monkeypatch.setattr(ts, "_interpreted", lambda: False)
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        ts.selective_scan(*args)


def test_ladder_says_why_the_triton_rung_cannot_serve(monkeypatch):
    from hf_vlm.ops import kernels

    rung = kernels._RUNGS["hf_vlm_triton"]
    assert rung.unavailable(torch.device("cpu")) == "needs CUDA tensors"
    assert dict(kernels.scan_ladder_report("cpu"))["hf_vlm_triton"] == "needs CUDA tensors"
    if not kernels.mamba_kernels_available():  # a CUDA call would take the Triton rung
        assert rung.unavailable(torch.device("cuda")) is None
        assert dict(kernels.scan_ladder_report("cuda"))["hf_vlm_triton"] == "used"
    monkeypatch.setattr(kernels, "_triton_import_error", lambda: "triton import failed: ImportError: libcuda")
    assert rung.unavailable(torch.device("cuda")) == "triton import failed: ImportError: libcuda"
    monkeypatch.setattr(kernels, "_triton_installed", lambda: False)
    for device in ("cpu", "cuda"):
        reason = rung.unavailable(torch.device(device))
        assert reason.startswith("triton not installed") and "triton-windows" in reason


def test_a_mamba_model_trains_and_generates_through_the_triton_rung(ts, monkeypatch):
    """The rung's adapter behind transformers' patch point (interpreted kernels on CPU): same
    logits, gradients and greedy tokens as transformers' own sequential scan."""
    from transformers import MambaConfig, MambaForCausalLM

    from hf_vlm.ops import kernels
    from tests.test_kernels import _logits_and_grads

    kernels.uninstall_fast_scan()
    kernels.reset_backend_usage()
    torch.manual_seed(0)  # d_inner 16: two channel blocks of 8
    model = MambaForCausalLM(MambaConfig(hidden_size=8, num_hidden_layers=2, vocab_size=100, state_size=4)).train()
    ids = torch.randint(0, 100, (2, 13), generator=torch.Generator().manual_seed(0))
    ref_logits, ref_grads = _logits_and_grads(model, ids)
    cpu_rung = kernels.ScanRung("hf_vlm_triton", lambda device: None, kernels._triton_scan)
    monkeypatch.setitem(kernels._RUNGS, "hf_vlm_triton", cpu_rung)
    try:
        kernels.set_scan_scope("global")
        kernels.set_scan_backend("hf_vlm_triton")
        logits, grads = _logits_and_grads(model, ids)
        assert kernels.backend_usage() == {"hf_vlm_triton": 2}  # two layers, forward (backward is ours)
        torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-5)
        assert grads.keys() == ref_grads.keys() and any("A_log" in n for n in grads)
        for name, g in grads.items():
            torch.testing.assert_close(g, ref_grads[name], rtol=1e-3, atol=1e-5, msg=name)
        model.eval()
        kw = dict(max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
        with torch.no_grad():
            fast = model.generate(ids[:1, :9], **kw)
            assert kernels.backend_usage() == {"hf_vlm_triton": 4}  # + the prefill (decoding has its own path)
            kernels.uninstall_fast_scan()
            ref = model.generate(ids[:1, :9], **kw)
        assert fast.shape == (1, 15) and torch.equal(fast, ref)
    finally:
        kernels.uninstall_fast_scan()
        kernels.reset_backend_usage()


@pytest.mark.slow
@pytest.mark.parametrize("arch", [86, 90, 120])  # RTX 30xx, H100/H200, RTX 50xx
def test_kernels_compile_for_cuda_without_a_gpu(arch, monkeypatch):
    """The interpreter cannot catch what only the compiler rejects: compile both kernels ahead of
    time (no driver needed) with bf16 inputs and every feature on, through ptxas to a cubin."""
    if not HAVE_TRITON:
        pytest.fail("triton is not installed; it is part of the test extra (pip install -e '.[test]')")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import hf_vlm.ops

    # a private copy decorated in compiled mode (the shared module may be the interpreted one)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    path = os.path.join(os.path.dirname(hf_vlm.ops.__file__), "triton_scan.py")
    spec = importlib.util.spec_from_file_location("hf_vlm.ops._triton_scan_aot", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert not module._interpreted()
    bf16 = {"u_ptr", "dt_ptr", "B_ptr", "C_ptr", "z_ptr", "out_ptr", "gout_ptr", "gu_ptr", "gdt_ptr", "gz_ptr"}
    flags = dict(HAS_D=True, HAS_Z=True, HAS_BIAS=True, SOFTPLUS=True, BLOCK_D=8, BLOCK_N=16, BLOCK_L=32)
    for kernel, extra in (
        (module._scan_fwd_kernel, {"STORE_STATES": True}),
        (module._scan_bwd_kernel, {"HAS_GLAST": True}),
    ):
        constexprs = dict(flags, **extra)
        signature = {
            name: "constexpr"
            if name in constexprs
            else (("*bf16" if name in bf16 else "*fp32") if name.endswith("_ptr") else "i32")
            for name in kernel.arg_names
        }
        compiled = triton.compile(
            ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
            target=GPUTarget("cuda", arch, 32),
            options={"num_warps": 8, "enable_fp_fusion": True},
        )
        assert compiled.asm["cubin"], kernel.__name__

"""One-command GPU benchmark of the Mamba selective-scan rungs (issue 15).

``python benchmarks/bench_gpu.py`` prints, in one run (a few minutes on one GPU):

1. **correctness on this GPU**: the Triton scan against the sequential reference (fp32: output,
   final state, every gradient) and against the chunked torch scan at 2.8b shapes (bf16) --
   the compiled kernels are only ever checked here, CI runs them in the Triton interpreter;
2. **scan and layer fwd+bwd**: time and peak memory of the scan call alone (inputs laid out as
   transformers' `MambaMixer` passes them) and of one whole `MambaMixer` with the rung forced,
   at mamba-130m / 370m / 2.8b layer shapes (from `MambaConfig`), L = 608 and 1024, bf16, for
   every rung on this machine: `mamba_ssm` (when importable; ``--install-mamba-ssm`` tries
   ``pip install mamba-ssm causal-conv1d`` first), `hf_vlm_triton`, `hf_vlm_chunked` and
   `transformers_reference` (its sequential loop);
3. **generation** at 2.8b shapes (random weights): prefill ms and decode ms/token per rung, and
   the share of transformers' one-token torch state update (the part a fused decode kernel
   could save);
4. **stage-2 step** (mamba-2.8b + CLIP ViT-L/14, 96 visual + 512 text tokens, bridge + LoRA on
   in_proj, bf16, AdamW): peak GPU memory and step time per rung;
5. the issue's targets next to the numbers: Triton fwd+bwd <= 1.5x mamba-ssm and >= 20x
   transformers' fallback at 2.8b shapes; stage-2 step <= 12 GB.

Models are built from configs with random weights (nothing is downloaded). Peak memory is
`torch.cuda.max_memory_allocated` (scan/layer: above what was allocated before the call; stage
2: absolute, weights included). ``--smoke`` runs every section at tiny shapes on the CPU (the
rungs that run there; ``--interpret`` adds the Triton scan through the interpreter, slowly):
that is what the test suite runs, so the script cannot rot without a GPU.

Usage: python benchmarks/bench_gpu.py [--smoke [--interpret]] [--install-mamba-ssm] [--batch 1]
       [--stage2-reference] [--out results.md]
"""

from __future__ import annotations

import argparse
import inspect
import os
import statistics
import subprocess
import sys
import time

if "--interpret" in sys.argv:  # triton reads it when a kernel is decorated: before anything imports it
    os.environ["TRITON_INTERPRET"] = "1"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import contextlib

import torch  # noqa: E402
import transformers.models.mamba.modeling_mamba as mm  # noqa: E402
from transformers import CLIPVisionConfig, MambaConfig, MambaForCausalLM  # noqa: E402

from hf_vlm.ops import (  # noqa: E402
    backend_usage,
    install_fast_scan,
    reset_backend_usage,
    scan_ladder_report,
    selective_scan,
    selective_scan_ref,
    set_scan_backend,
    uninstall_fast_scan,
)

MODELS = {"mamba-130m": (768, 24), "mamba-370m": (1024, 48), "mamba-2.8b": (2560, 64)}  # d_model, layers
SMOKE_MODELS = {"tiny": (16, 2)}
LENGTHS, SMOKE_LENGTHS = (608, 1024), (24, 40)
VOCAB = 50280  # the state-spaces/mamba-*-hf vocabulary
RUNGS = ("mamba_ssm", "hf_vlm_triton", "hf_vlm_chunked", "transformers_reference")
TARGET_MODEL = "mamba-2.8b"
VISUAL, TEXT = 96, 512  # stage-2 tokens (recipes/stage2_finetune.yaml: max_visual_tokens 96, max_length 608)
STAGE2_LIMIT_GB = 12.0


def mamba_config(name: str, smoke: bool, **kw) -> MambaConfig:
    d_model, layers = (SMOKE_MODELS if smoke else MODELS)[name]
    return MambaConfig(
        hidden_size=d_model,
        num_hidden_layers=layers,
        vocab_size=256 if smoke else VOCAB,
        state_size=4 if smoke else 16,
        **kw,
    )


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn, device, reps: int, warmup: int = 1) -> dict:
    """Median seconds of `fn()` over `reps` after `warmup` calls, and peak MB above the start."""
    first = time.perf_counter()
    for _ in range(warmup):
        fn()
    sync(device)
    first = time.perf_counter() - first
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20 if device.type == "cuda" else None
    return {"s": statistics.median(times), "peak_mb": peak, "first_s": first}


def guarded(fn):
    try:
        return fn()
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return {"error": "OOM"}
    except Exception as exc:  # noqa: BLE001 - a failing cell is a finding, the other cells still run
        return {"error": f"{type(exc).__name__}: {str(exc)[:90]}"}


def scan_rungs(device) -> dict:
    """rung -> scan function with `selective_scan_fn` semantics, or the reason it is absent."""
    reasons = dict(scan_ladder_report(device))
    rungs = {}
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

        rungs["mamba_ssm"] = selective_scan_fn if device.type == "cuda" else "needs CUDA tensors"
    except Exception as exc:  # noqa: BLE001
        rungs["mamba_ssm"] = f"not importable ({type(exc).__name__})"
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if reasons["hf_vlm_triton"] in ("used", "available") or (interpreted and device.type == "cpu"):
        from hf_vlm.ops.triton_scan import selective_scan as triton_scan

        rungs["hf_vlm_triton"] = triton_scan
    else:
        rungs["hf_vlm_triton"] = reasons["hf_vlm_triton"]
    rungs["hf_vlm_chunked"] = selective_scan
    original = getattr(mm.mamba_selective_scan, "_hf_vlm_original", mm.mamba_selective_scan)
    rungs["transformers_reference"] = inspect.unwrap(original)  # the torch loop under the Hub-kernel wrapper
    return rungs


def mixer_inputs(cfg: MambaConfig, batch: int, length: int, device, dtype, seed: int = 0) -> dict:
    """Scan inputs with the values and strides `MambaMixer` produces (z a view of in_proj's output,
    B/C transposed views of x_proj's output, A/D/delta_bias in fp32)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    d, n, r = cfg.intermediate_size, cfg.state_size, cfg.time_step_rank

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    xz = rnd(batch, 2 * d, length)
    bcdt = rnd(batch, length, r + 2 * n)
    dt_init = torch.exp(
        torch.rand(d, generator=g) * (torch.log(torch.tensor(0.1)) - torch.log(torch.tensor(1e-3)))
        + torch.log(torch.tensor(1e-3))
    )
    return {
        "u": xz[:, :d].contiguous(),
        "delta": rnd(batch, d, length, scale=0.1),
        "A": -torch.arange(1, n + 1, dtype=torch.float32).repeat(d, 1).to(device),
        "B": bcdt[..., r : r + n].transpose(1, 2),
        "C": bcdt[..., r + n :].transpose(1, 2),
        "D": torch.ones(d, device=device),
        "z": xz[:, d:],
        "delta_bias": (dt_init + torch.log(-torch.expm1(-dt_init))).to(device),
    }


def scan_step(fn, ins: dict, last_grad: bool = True):
    """fwd+bwd of one scan call; returns (out, last, grads) for the correctness checks. Training
    never backpropagates into the final state (and mamba-ssm's backward ignores its gradient):
    `last_grad=False` for timings and for comparisons with mamba-ssm."""
    leaves = {k: v.detach().requires_grad_() for k, v in ins.items()}
    out, last = fn(
        leaves["u"],
        leaves["delta"],
        leaves["A"],
        leaves["B"],
        leaves["C"],
        D=leaves["D"],
        z=leaves["z"],
        delta_bias=leaves["delta_bias"],
        delta_softplus=True,
        return_last_state=True,
    )
    g = torch.Generator(device="cpu").manual_seed(1)
    g_out = torch.randn(out.shape, generator=g).to(out)
    g_last = torch.randn(last.shape, generator=g).to(last)
    torch.autograd.backward([out, last] if last_grad else [out], [g_out, g_last] if last_grad else [g_out])
    return out.detach(), last.detach(), {k: v.grad for k, v in leaves.items()}


def rel_err(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def correctness(args, device, rungs) -> list[str]:
    triton_fn = rungs["hf_vlm_triton"]
    if isinstance(triton_fn, str):
        return [f"Triton scan not checked: {triton_fn}"]
    lines = []
    small = MambaConfig(hidden_size=8 if args.smoke else 128, state_size=4 if args.smoke else 16)
    for length, scale in ((37, 1.0), (100, 4.0)) if args.smoke else ((333, 1.0), (4096, 4.0)):
        ins = mixer_inputs(small, 2, length, device, torch.float32, seed=length)
        ins["delta"] = ins["delta"] * 10 * scale  # large dt*A (up to ~-16 * scale per step)
        got = scan_step(triton_fn, ins)
        ref = scan_step(selective_scan_ref, {k: v.double() for k, v in ins.items()})
        errs = {"out": rel_err(got[0], ref[0]), "last": rel_err(got[1], ref[1])}
        errs.update({f"d{k}": rel_err(got[2][k], ref[2][k]) for k in got[2]})
        worst = max(errs.values())
        finite = all(torch.isfinite(t).all() for t in (got[0], got[1], *got[2].values()))
        lines.append(
            f"fp32 vs sequential reference, d_inner {small.intermediate_size}, L={length}: worst "
            f"relative error {worst:.1e} ({max(errs, key=errs.get)}) -> "
            f"{'PASS' if worst < 1e-3 and finite else 'FAIL'} (< 1e-3, finite)"
        )
    cfg = mamba_config("tiny" if args.smoke else TARGET_MODEL, args.smoke)
    dtype = torch.float32 if args.smoke else torch.bfloat16
    ins = mixer_inputs(cfg, args.batch, SMOKE_LENGTHS[0] if args.smoke else LENGTHS[0], device, dtype)
    ref = scan_step(selective_scan, ins, last_grad=False)
    for name in ("hf_vlm_triton", "mamba_ssm"):
        if not isinstance(rungs[name], str):
            got = scan_step(rungs[name], ins, last_grad=False)
            errs = [rel_err(got[0], ref[0]), rel_err(got[1], ref[1])] + [rel_err(got[2][k], ref[2][k]) for k in got[2]]
            lines.append(
                f"{name} vs hf_vlm_chunked, {dtype} at {'tiny' if args.smoke else TARGET_MODEL} shapes: "
                f"worst relative error {max(errs):.1e} over output, state and 8 gradients "
                f"-> {'PASS' if max(errs) < 5e-2 else 'FAIL'} (< 5e-2)"
            )
    return lines


def bench_scan_and_layer(args, device, rungs) -> dict:
    dtype = torch.float32 if args.smoke else torch.bfloat16
    results = {}
    install_fast_scan()
    for model in SMOKE_MODELS if args.smoke else MODELS:
        cfg = mamba_config(model, args.smoke)
        torch.manual_seed(0)
        mixer = mm.MambaMixer(cfg, layer_idx=0).to(device=device, dtype=dtype).train()
        for length in SMOKE_LENGTHS if args.smoke else LENGTHS:
            ins = mixer_inputs(cfg, args.batch, length, device, dtype)
            hidden = torch.randn(args.batch, length, cfg.hidden_size, device=device, dtype=dtype, requires_grad=True)
            for rung in RUNGS:
                fn = rungs[rung]
                reps = 2 if rung == "transformers_reference" else args.reps
                if isinstance(fn, str):
                    results[model, length, rung] = {"scan": {"error": fn}, "layer": {"error": fn}}
                    continue
                scan = guarded(
                    lambda fn=fn, ins=ins, reps=reps: measure(lambda: scan_step(fn, ins, last_grad=False), device, reps)
                )
                layer = guarded(
                    lambda mixer=mixer, hidden=hidden, rung=rung, reps=reps: forced_layer(
                        mixer, hidden, rung, device, reps
                    )
                )
                results[model, length, rung] = {"scan": scan, "layer": layer}
            del ins, hidden
        del mixer
    set_scan_backend(None)
    return results


def forced_layer(mixer, hidden, rung, device, reps) -> dict:
    """One MambaMixer fwd+bwd with the ladder forced to `rung`; notes when the call bypassed it
    (with mamba-ssm installed, training uses its fused `mamba_inner_fn`, which our dispatcher never sees)."""
    if rung == "hf_vlm_triton" and device.type == "cpu":
        return {"error": "needs CUDA tensors (ladder)"}
    set_scan_backend(rung)
    reset_backend_usage()

    def step():
        mixer(hidden).float().square().mean().backward()
        hidden.grad = None
        mixer.zero_grad(set_to_none=True)

    out = measure(step, device, reps)
    if backend_usage().get(rung, 0) == 0:
        out["note"] = "bypassed: fused mamba_inner_fn" if rung != "mamba_ssm" else "fused mamba_inner_fn"
    return out


def build_lm(cfg, device, dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            torch.manual_seed(0)
            return MambaForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(old)


def bench_generation(args, device, rungs, lm) -> dict:
    new = 8 if args.smoke else 64
    prompt = torch.randint(
        0,
        lm.config.vocab_size,
        (1, 16 if args.smoke else 128),
        device=device,
        generator=torch.Generator(device=device).manual_seed(2),
    )
    kw = dict(do_sample=False, use_cache=True, pad_token_id=0, eos_token_id=None)
    results = {}
    install_fast_scan()
    for rung in RUNGS:
        if isinstance(rungs[rung], str) or (rung == "hf_vlm_triton" and device.type == "cpu"):
            results[rung] = {"error": rungs[rung] if isinstance(rungs[rung], str) else "needs CUDA tensors (ladder)"}
            continue
        set_scan_backend(rung)

        def gen(n):
            with torch.no_grad():
                return lm.generate(prompt, max_new_tokens=n, min_new_tokens=n, **kw)

        def run():
            one = measure(lambda: gen(1), device, 2)
            full = measure(lambda: gen(new), device, 2)
            return {"prefill_ms": one["s"] * 1e3, "ms_per_token": (full["s"] - one["s"]) / (new - 1) * 1e3}

        results[rung] = guarded(run)
    set_scan_backend(None)
    cfg = lm.config
    update = inspect.unwrap(mm.mamba_selective_state_update)  # transformers' torch decode step
    dtype = next(lm.parameters()).dtype
    state = torch.zeros(1, cfg.intermediate_size, cfg.state_size, device=device, dtype=dtype)
    x = torch.randn(1, cfg.intermediate_size, device=device, dtype=dtype)
    bc = torch.randn(1, cfg.state_size, device=device, dtype=dtype)
    A = -torch.ones(cfg.intermediate_size, cfg.state_size, device=device)
    D = torch.ones(cfg.intermediate_size, device=device)
    with torch.no_grad():
        t = measure(lambda: update(state, x, x, A, bc, bc, D, dt_softplus=True, z=x), device, 50)
    results["state_update_ms_per_token"] = t["s"] * 1e3 * cfg.num_hidden_layers
    return results


def bench_stage2(args, device, rungs, lm) -> dict:
    from types import SimpleNamespace

    from hf_vlm import MambaVLMConfig, MambaVLMForConditionalGeneration
    from hf_vlm.training.freeze import apply_freeze_policy

    dtype = torch.float32 if args.smoke else torch.bfloat16
    if args.smoke:
        vision = CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=28,
            patch_size=14,
        )
        visual, text = 4, 20
    else:  # ViT-L/14 at 224 px (openai/clip-vit-large-patch14)
        vision = CLIPVisionConfig(
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=24,
            num_attention_heads=16,
            image_size=224,
            patch_size=14,
            projection_dim=768,
        )
        visual, text = VISUAL, TEXT
    config = MambaVLMConfig(
        vision_config=vision, text_config=lm.config, max_visual_tokens=visual, image_token_id=lm.config.vocab_size - 3
    )
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            from transformers import CLIPVisionModel

            model = MambaVLMForConditionalGeneration(
                config, vision_tower=CLIPVisionModel(vision), language_model=lm.train()
            )
    finally:
        torch.set_default_dtype(old)
    policy = SimpleNamespace(
        stage="finetune",
        use_lora=True,
        lora_r=16,
        lora_alpha=32,
        lora_dropout=0.05,
        lora_target_modules=["in_proj"],
        unfreeze_llm_layers=0,
        unfreeze_vision_tower=False,
    )
    model = apply_freeze_policy(model, policy).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-5)
    g = torch.Generator(device="cpu").manual_seed(3)
    ids = torch.cat(
        [
            torch.full((1, visual), config.image_token_id),
            torch.randint(0, min(1000, config.image_token_id), (1, text), generator=g),
        ],
        1,
    )
    labels = ids.masked_fill(ids == config.image_token_id, -100)
    pixels = torch.randn(1, 3, vision.image_size, vision.image_size, generator=g)
    ids, labels, pixels = ids.to(device), labels.to(device), pixels.to(device=device, dtype=dtype)

    def step():
        model(input_ids=ids, pixel_values=pixels, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    results = {"trainable": sum(p.numel() for p in params), "tokens": (visual, text)}
    install_fast_scan()
    for rung in RUNGS:
        if rung == "transformers_reference" and not (args.stage2_reference or args.smoke):
            results[rung] = {"error": "skipped (--stage2-reference runs it)"}
            continue
        if isinstance(rungs[rung], str) or (rung == "hf_vlm_triton" and device.type == "cpu"):
            results[rung] = {"error": rungs[rung] if isinstance(rungs[rung], str) else "needs CUDA tensors (ladder)"}
            continue
        set_scan_backend(rung)

        def run():
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            out = measure(step, device, 2)
            if device.type == "cuda":
                out["peak_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
            return out

        results[rung] = guarded(run)
    set_scan_backend(None)
    return results


def _ms(cell, key="s", scale=1e3, fmt="{:.2f}"):
    if "error" in cell:
        return cell["error"]
    value = cell.get(key)
    text = "n/a" if value is None else fmt.format(value * scale)
    return text + (f" ({cell['note']})" if cell.get("note") else "")


def _versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    parts = [f"torch {torch.__version__}"]
    for name in ("transformers", "triton", "triton-windows", "mamba-ssm", "causal-conv1d"):
        with contextlib.suppress(PackageNotFoundError):
            parts.append(f"{name} {version(name)}")
    return ", ".join(parts)


def _ratio(num, den):
    if "s" in num and "s" in den and den["s"] > 0:
        return num["s"] / den["s"]
    return None


def report(args, device, rungs, checks, scans, gen, stage2) -> str:
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (smoke mode: not speed numbers)"
    out = [
        f"Device: {gpu}; {_versions()}; batch {args.batch}, "
        f"{'fp32' if args.smoke else 'bf16'}, delta_softplus, D and z as MambaMixer passes them.",
        "",
    ]
    out += ["Rungs: " + "; ".join(f"{r}: {'present' if not isinstance(f, str) else f}" for r, f in rungs.items()), ""]
    out += ["## Correctness on this device", ""] + [f"- {line}" for line in checks] + [""]
    out += [
        "## Scan and layer fwd+bwd (median ms; peak MB above the inputs; first = warm-up call incl. "
        "compile/autotune, s)",
        "",
        "| model | L | rung | scan ms | scan peak MB | first s | layer ms | layer peak MB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (model, length, rung), cell in scans.items():
        sc, ly = cell["scan"], cell["layer"]
        if isinstance(rungs[rung], str):
            out.append(f"| {model} | {length} | {rung} | not run: {rungs[rung]} | | | | |")
            continue
        out.append(
            f"| {model} | {length} | {rung} | {_ms(sc)} | {_ms(sc, 'peak_mb', 1, '{:.0f}')} | "
            f"{_ms(sc, 'first_s', 1, '{:.1f}')} | {_ms(ly)} | {_ms(ly, 'peak_mb', 1, '{:.0f}')} |"
        )
    out += [
        "",
        f"## Generation ({'tiny' if args.smoke else TARGET_MODEL}, random weights, batch 1, greedy)",
        "",
        "| prefill rung | prefill ms (1 token out) | decode ms/token |",
        "|---|---|---|",
    ]
    for rung in RUNGS:
        cell = gen[rung]
        out.append(f"| {rung} | {_ms(cell, 'prefill_ms', 1)} | {_ms(cell, 'ms_per_token', 1)} |")
    out += [
        "",
        f"Decoding always runs transformers' one-token update (mamba-ssm's kernel when installed, else "
        f"torch): the torch update alone takes {gen['state_update_ms_per_token']:.2f} ms per token over all "
        "layers, the most a fused Triton decode kernel could save.",
        "",
    ]
    visual, text = stage2["tokens"]
    out += [
        f"## Stage-2 step ({'tiny parts' if args.smoke else 'mamba-2.8b + CLIP ViT-L/14'}, {visual} visual "
        f"+ {text} text tokens, bridge + LoRA r=16 on in_proj, {stage2['trainable']:,} trainable parameters, "
        "AdamW)",
        "",
        "| rung | step s | peak GB (absolute) |",
        "|---|---|---|",
    ]
    for rung in RUNGS:
        cell = stage2[rung]
        out.append(f"| {rung} | {_ms(cell, 's', 1)} | {_ms(cell, 'peak_gb', 1)} |")
    out += ["", "## Targets", ""]
    target = TARGET_MODEL if not args.smoke else "tiny"
    for length in LENGTHS if not args.smoke else SMOKE_LENGTHS:
        tri = scans[target, length, "hf_vlm_triton"]["scan"]
        vs_ssm = _ratio(tri, scans[target, length, "mamba_ssm"]["scan"])
        vs_ref = _ratio(scans[target, length, "transformers_reference"]["scan"], tri)
        out.append(
            f"- {target} L={length}: Triton fwd+bwd / mamba-ssm = "
            + (
                "N/A (not both measured)"
                if vs_ssm is None
                else f"{vs_ssm:.2f}x -> " + ("PASS" if vs_ssm <= 1.5 else "FAIL")
            )
            + " (target <= 1.5x); transformers' fallback / "
            "Triton = "
            + (
                "N/A (not both measured)"
                if vs_ref is None
                else f"{vs_ref:.1f}x -> " + ("PASS" if vs_ref >= 20 else "FAIL")
            )
            + " (target >= 20x)"
        )
    for rung in ("hf_vlm_triton", "hf_vlm_chunked"):
        peak = stage2[rung].get("peak_gb")
        out.append(
            f"- stage-2 step with {rung}: "
            + (
                "N/A (not measured)"
                if peak is None
                else f"{peak:.2f} GB -> {'PASS' if peak <= STAGE2_LIMIT_GB else 'FAIL'}"
            )
            + f" (target <= {STAGE2_LIMIT_GB:g} GB)"
        )
    return "\n".join(out)


def install_mamba_ssm() -> None:
    """Try `pip install mamba-ssm causal-conv1d` (needs network and a CUDA toolchain), then re-run
    this script in a fresh process so transformers picks the kernels up at import."""
    cmd = [sys.executable, "-m", "pip", "install", "mamba-ssm", "causal-conv1d", "--no-build-isolation"]
    print("$", " ".join(cmd), flush=True)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        print((proc.stdout + proc.stderr).strip().splitlines()[-1:] or ["(no output)"], flush=True)
    except subprocess.TimeoutExpired:
        print("pip install mamba-ssm timed out after 300 s; continuing without it", flush=True)
    argv = [a for a in sys.argv if a != "--install-mamba-ssm"]
    os.execv(sys.executable, [sys.executable] + argv)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (what the tests run)")
    parser.add_argument("--interpret", action="store_true", help="with --smoke: the Triton scan in the interpreter")
    parser.add_argument("--install-mamba-ssm", action="store_true", help="pip install mamba-ssm causal-conv1d first")
    parser.add_argument(
        "--stage2-reference",
        action="store_true",
        help="also run the stage-2 step on transformers' sequential scan (slow, ~40 GB)",
    )
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--out", help="also write the report (markdown) here")
    args = parser.parse_args(argv)
    if args.install_mamba_ssm:
        install_mamba_ssm()
    if args.smoke:
        args.reps = min(args.reps, 2)
        torch.set_num_threads(1)  # tiny ops: threads only contend
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if device.type == "cpu" and not args.smoke:
        parser.error("no CUDA device: run with --smoke for the CPU check of this script")
    t0 = time.time()
    rungs = scan_rungs(device)
    checks = correctness(args, device, rungs)
    print("\n".join(checks), flush=True)
    scans = bench_scan_and_layer(args, device, rungs)
    print(f"scan/layer table done ({time.time() - t0:.0f} s)", flush=True)
    lm = build_lm(
        mamba_config("tiny" if args.smoke else TARGET_MODEL, args.smoke),
        device,
        torch.float32 if args.smoke else torch.bfloat16,
    )
    gen = bench_generation(args, device, rungs, lm)
    print(f"generation done ({time.time() - t0:.0f} s)", flush=True)
    stage2 = bench_stage2(args, device, rungs, lm)
    uninstall_fast_scan()
    text = report(args, device, rungs, checks, scans, gen, stage2) + f"\n\nTotal {time.time() - t0:.0f} s."
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

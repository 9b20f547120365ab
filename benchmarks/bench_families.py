"""Benchmark every supported SSM / hybrid LM family on CPU against its scan-free floor (issue 12).

For each family: a 4-layer, d_model=768 causal LM in the family's own layout (`hf_vlm.backbones.
example_config`; Mamba-1 state 16, Mamba-2 state 128 with 64-dim heads and the family's chunk size),
batch 1, fp32, one forward + loss.backward at L tokens (default 608 = 96 visual + 512 text), with:

* ``best``:  the best path this CPU has: Mamba-1 layers (mamba, falcon_mamba, jamba) through hf_vlm's
             chunked scan (`SSMFamily.attach_scan`, proven by the `backend_usage()` counter), Mamba-2
             layers through transformers' chunked SSD torch path (`mamba2_chunk_scan`, counted too);
* ``floor``: the same model with the scan replaced by O(B*L*D) work that still touches every input,
             so everything else (projections, conv, norms, attention, MLP, loss) runs: the best any
             scan can do (Mamba-1: `bench_scan._floor_scan`; Mamba-2: `_floor_ssd` below);
* ``ssd_recompute`` (Mamba-2 only): the same SSD function with its intermediates recomputed in the
             backward (`torch.utils.checkpoint` around `mamba2_chunk_scan`): what memory that saves;
* ``ssd_T<n>`` (``--ssd-chunks n ...``, Mamba-2 only): the SSD path with a smaller chunk (same maths);
* ``reference`` (``--with-reference``, Mamba-1 only): transformers' sequential loop.

Each (family, backend) runs in a fresh subprocess so peak memory is honest (peak RSS increase after
the model and inputs exist, the method of `bench_scan.py`). Time is the minimum over ``--reps`` runs;
ratios use CPU time with one thread (``--threads 1``: other jobs on a shared core do not count), wall
time otherwise. For Mamba-2 families the table also gives the size of one `(B, H, C, T, T)` fp32
tensor of the SSD path (`segment_sum` and the intra-chunk scores, C = ceil(L/T) chunks of T tokens).

Each (family, backend) may run ``--repeat`` times (the process with the lowest time is kept).

Usage: python benchmarks/bench_families.py [--families mamba2 falcon_h1 ...] [--length 608]
       [--width 768] [--reps 3] [--repeat 2] [--threads 1] [--ssd-chunks 64] [--with-reference]
       [--out results.md]
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BACKENDS = ("best", "floor", "reference")
# family -> example_config overrides: realistic state / heads / chunk per family
BENCH_SETTINGS = {
    "mamba": dict(state_size=16),
    "falcon_mamba": dict(state_size=16),
    "jamba": dict(state_size=16),
    "mamba2": dict(groups=8),
    "nemotron_h": dict(groups=8, chunk_size=128),
    "falcon_h1": {},
    "granitemoehybrid": {},
    "bamba": {},
    "zamba2": {},
}
M2_DEFAULTS = dict(state_size=128, head_dim=64, chunk_size=256)


def _floor_ssd(
    hidden_states,
    dt,
    A,
    B,
    C,
    chunk_size,
    D=None,
    dt_bias=None,
    initial_states=None,
    dt_softplus=False,
    dt_limit=(0.0, float("inf")),
    return_final_states=False,
    **kwargs,
):
    """Scan-free stand-in for `mamba2_chunk_scan`: y = x * (D + softplus(dt) * A * sum_n(B * C))."""
    import torch.nn.functional as F

    b, _, h, p = hidden_states.shape  # (B, L, H, P); B, C are (B, L, G, N)
    if dt_bias is not None:
        dt = dt + dt_bias
    if dt_softplus:
        dt = F.softplus(dt)
    bc = (B * C).sum(-1).repeat_interleave(h // B.shape[2], dim=2)  # (B, L, H)
    y = hidden_states * (D[None, None, :, None] + (dt * A * bc)[..., None])
    if return_final_states:
        return y, hidden_states.new_zeros(b, h, p, B.shape[-1])
    return y


def _bench_config(model_type: str, width: int, vocab: int):
    from hf_vlm.backbones import SCAN_MAMBA2, example_config, get_family

    settings = dict(M2_DEFAULTS) if get_family(model_type).scan == SCAN_MAMBA2 else {}
    settings.update(BENCH_SETTINGS[model_type])
    if "head_dim" in settings:  # groups must divide the heads (small --width smoke runs)
        settings["groups"] = math.gcd(settings.get("groups", 1), max(2 * width // settings["head_dim"], 1))
    return example_config(model_type, vocab_size=vocab, hidden_size=width, num_layers=4, **settings)


def worker(args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from benchmarks.bench_scan import _floor_scan, _PeakRSS
    from hf_vlm import compat
    from hf_vlm.backbones import SCAN_MAMBA1, get_family, ssd_chunk_tensor_bytes
    from hf_vlm.ops import backend_usage, reset_backend_usage, uninstall_fast_scan

    if args.threads:
        torch.set_num_threads(args.threads)
    uninstall_fast_scan()
    family = get_family(args.family)
    config = _bench_config(args.family, args.width, args.vocab)
    dims = family.dims(config)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).train()
    module = compat.modeling_module(args.family)
    calls = {"ssd": 0}
    variant = args.backend.startswith(("ssd_T", "ssd_recompute"))
    if variant and family.scan == SCAN_MAMBA1:
        return {"skipped": "Mamba-1 layers have no SSD path"}
    if args.backend.startswith("ssd_T"):  # transformers' SSD path with a smaller chunk (same maths)
        for mixer in family.mixers(model):
            setattr(mixer, compat.SSD_CHUNK_ATTRIBUTE, int(args.backend[5:]))
    if args.backend == "ssd_recompute":  # the same function, its intermediates recomputed in backward
        original = getattr(module, compat.SSD_SCAN_FUNCTION)

        def recomputed(*a, **k):
            if not torch.is_grad_enabled():
                return original(*a, **k)
            return torch.utils.checkpoint.checkpoint(original, *a, use_reentrant=False, **k)

        setattr(module, compat.SSD_SCAN_FUNCTION, recomputed)
    if family.scan == SCAN_MAMBA1:
        if args.backend == "best":
            family.attach_scan(model)
        elif args.backend == "floor":
            setattr(module, compat.SCAN_FUNCTION, _floor_scan)
    else:
        if args.backend == "reference":
            return {"skipped": "Mamba-2: the SSD torch path is the reference"}
        ssd = _floor_ssd if args.backend == "floor" else getattr(module, compat.SSD_SCAN_FUNCTION)

        def counted(*a, **k):
            calls["ssd"] += 1
            return ssd(*a, **k)

        setattr(module, compat.SSD_SCAN_FUNCTION, counted)
    ids = torch.randint(0, args.vocab, (1, args.length), generator=torch.Generator().manual_seed(1))

    def step() -> float:
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        return float(loss)

    reps = 1 if args.backend == "reference" else args.reps
    gc.collect()
    times, cpus = [], []
    reset_backend_usage()
    for rep in range(reps):
        with _PeakRSS() as mem:
            t0, c0 = time.perf_counter(), time.process_time()
            loss = step()
            times.append(time.perf_counter() - t0)
            cpus.append(time.process_time() - c0)
        if rep == 0:
            peak, first_loss = mem.delta_mb, loss
    usage = backend_usage()
    scan_calls = usage.get("hf_vlm_chunked", 0) if family.scan == SCAN_MAMBA1 else calls["ssd"]
    return {
        "wall": min(times),
        "cpu": min(cpus),
        "peak_mb": peak,
        "loss": first_loss,
        "scan_calls": scan_calls // reps,
        "usage": usage,
        "ssm_layers": dims.ssm_layers,
        "attention_layers": dims.attention_layers,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "ssd_tensor_mb": ssd_chunk_tensor_bytes(dims, args.length) / 2**20 if dims.chunk else None,
        "peak_method": "VmHWM" if mem.kernel else "sampled",
    }


def run_one(args, family: str, backend: str) -> dict:
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--worker",
        "--family",
        family,
        "--backend",
        backend,
        "--width",
        str(args.width),
        "--length",
        str(args.length),
        "--reps",
        str(args.reps),
        "--vocab",
        str(args.vocab),
        "--threads",
        str(args.threads or 0),
    ]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.worker_timeout)
    except subprocess.TimeoutExpired:
        return {"skipped": f"timeout > {args.worker_timeout}s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1][:160]}
    return json.loads(lines[-1])


def _ratio(a: dict, b: dict, key: str):
    return a[key] / b[key] if key in a and key in b and b[key] > 0 else None


def report(args, results: dict) -> str:
    from hf_vlm.backbones import get_family

    k = args.metric
    out = [
        f"L={args.length}, d_model={args.width}, 4 layers, batch 1, fp32, {args.threads or 'default'} thread(s); "
        f"fwd+bwd time in s (wall / CPU), ratios on {'CPU' if k == 'cpu' else 'wall'} time; peak = peak RSS "
        "increase in MB.",
        "",
        "| family | scan | layers (SSM+attn) | params | backend | fwd+bwd s | peak MB | × floor time | "
        "× floor mem | scan calls | SSD T×T tensor MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for family, by in results.items():
        fl = by["floor"]
        for backend, r in by.items():
            if "wall" not in r:
                if r.get("skipped") != "off":
                    out.append(f"| {family} | | | | {backend} | {r.get('skipped') or r.get('error')} | | | | | |")
                continue
            tx, mx = _ratio(r, fl, k), _ratio(r, fl, "peak_mb")
            ssd = "-" if r["ssd_tensor_mb"] is None else f"{r['ssd_tensor_mb']:.1f}"
            out.append(
                f"| {family} | {get_family(family).scan} | {r['ssm_layers']}+{r['attention_layers']} | "
                f"{r['params_m']:.1f}M | {backend} | {r['wall']:.2f} / {r['cpu']:.2f} | {r['peak_mb']:.0f} | "
                f"{'-' if tx is None else f'{tx:.2f}×'} | {'-' if mx is None else f'{mx:.2f}×'} | "
                f"{r['scan_calls']} | {ssd} |"
            )
    return "\n".join(out)


def main(argv=None):
    from hf_vlm.backbones import SCAN_MAMBA1, get_family, supported_model_types

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--families", nargs="+", default=list(supported_model_types()), choices=supported_model_types())
    p.add_argument("--length", type=int, default=608)
    p.add_argument("--width", type=int, default=768)
    p.add_argument("--reps", type=int, default=3, help="timed steps per process (the minimum is kept)")
    p.add_argument("--repeat", type=int, default=1, help="processes per (family, backend); the fastest is kept")
    p.add_argument("--vocab", type=int, default=1024, help="small, so the LM head does not dominate")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--metric", choices=("cpu", "wall"), default=None)
    p.add_argument("--with-reference", action="store_true", help="also transformers' sequential Mamba-1 loop (slow)")
    p.add_argument("--worker-timeout", type=float, default=1800.0)
    p.add_argument("--out", default=None, help="also write the markdown table here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--family", help=argparse.SUPPRESS)
    p.add_argument(
        "--ssd-chunks",
        type=int,
        nargs="*",
        default=[],
        help="also run the Mamba-2 families' SSD path with these chunk sizes (e.g. 64 128)",
    )
    p.add_argument("--backend", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return
    args.metric = args.metric or ("cpu" if args.threads == 1 else "wall")
    results = {}
    for family in args.families:
        results[family] = {}
        mamba1 = get_family(family).scan == SCAN_MAMBA1
        for backend in BACKENDS + ("ssd_recompute",) + tuple(f"ssd_T{n}" for n in args.ssd_chunks):
            if (backend == "reference" and not args.with_reference) or (backend.startswith("ssd_") and mamba1):
                results[family][backend] = {"skipped": "off"}
                continue
            runs = [run_one(args, family, backend) for _ in range(args.repeat)]  # fresh process each
            timed = [r for r in runs if "cpu" in r]
            r = min(timed, key=lambda x: x[args.metric]) if timed else runs[-1]
            results[family][backend] = r
            print(f"[bench] {family:16s} {backend:9s} {json.dumps(r)}", file=sys.stderr, flush=True)
    table = report(args, results)
    print(table)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    main()

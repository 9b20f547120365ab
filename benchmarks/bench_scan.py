"""Benchmark Mamba selective-scan backends on CPU (issue 6).

Compares, for a 4-layer ``MambaForCausalLM`` at each width and length (batch 1, fp32, same
weights and token ids for every backend):

* ``sequential``: transformers' reference loop (what runs without mamba-ssm);
* ``mambapy``:    transformers with ``use_mambapy=True`` (needs ``pip install mambapy``);
* ``hf_vlm``:     ``hf_vlm.ops.install_fast_scan(force=True)``, the chunked scan;
* ``floor``:      the scan replaced by O(B*D*L) work that still touches every input, so
                  everything else (matmuls, conv, norms, loss) runs: the best any scan can do.

Each (backend, mode) runs in a fresh subprocess so peak memory is honest: the peak RSS
counter is reset (``/proc/self/clear_refs``) after the model and inputs exist, and the
first run's high-water mark minus the RSS before it is reported. Time is the minimum over
the runs of wall time and of process CPU time; ratios use ``--metric`` (default: CPU time
with one thread, where it equals wall time on an idle core but ignores waiting for a core
shared with other jobs; wall time otherwise). ``fwd`` is a ``no_grad`` forward; ``fwd+bwd``
is forward + loss.backward.

Usage: python benchmarks/bench_scan.py [--quick] [--lengths 256 608 1024] [--widths 256 768]
       [--skip-sequential-above L] [--reps 3] [--threads N] [--out results.md]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import threading
import time

BACKENDS = ("sequential", "mambapy", "hf_vlm", "floor")
MODES = ("fwd", "fwdbwd")
TARGET_LENGTHS = (608, 1024)


def _floor_scan(
    hidden_states, dt, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False, **kwargs
):
    """Scan-free stand-in with the same inputs/outputs: y = u*D + dt * (B.C) * mean(A)."""
    import torch.nn.functional as F

    if delta_bias is not None:
        dt = dt + delta_bias[:, None]
    if delta_softplus:
        dt = F.softplus(dt)
    y = hidden_states * D[:, None] + dt * (B * C).sum(1, keepdim=True) * A.mean(1)[:, None]
    out = y * F.silu(z)
    if return_last_state:
        return out, hidden_states.new_zeros(*hidden_states.shape[:2], A.shape[1])
    return out


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    return 0


class _PeakRSS:
    """Peak resident memory of this process from now on (kernel counter, else sampling)."""

    def __enter__(self):
        self.base = _rss_kb("VmRSS:")
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.kernel = _rss_kb("VmHWM:") <= self.base + 1024
        except OSError:
            self.kernel = False
        self.peak, self._stop = self.base, threading.Event()
        if not self.kernel:
            self._t = threading.Thread(target=self._sample, daemon=True)
            self._t.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, _rss_kb("VmRSS:"))

    def __exit__(self, *exc):
        if self.kernel:
            self.peak = _rss_kb("VmHWM:")
        else:
            self._stop.set()
            self._t.join()
        self.delta_mb = (self.peak - self.base) / 1024.0


def worker(args) -> dict:
    import torch
    import transformers.models.mamba.modeling_mamba as mm
    from transformers import MambaConfig, MambaForCausalLM
    from transformers.utils.import_utils import is_mambapy_available

    from hf_vlm.ops import install_fast_scan, uninstall_fast_scan

    if args.threads:
        torch.set_num_threads(args.threads)
    uninstall_fast_scan()
    if args.backend == "mambapy" and not is_mambapy_available():
        return {"unavailable": "mambapy not importable (pip install mambapy)"}
    cfg = MambaConfig(
        hidden_size=args.width,
        num_hidden_layers=4,
        vocab_size=args.vocab,
        state_size=16,
        use_mambapy=args.backend == "mambapy",
    )
    torch.manual_seed(0)
    model = MambaForCausalLM(cfg).train()
    if args.backend == "hf_vlm":
        install_fast_scan(force=True)
    elif args.backend == "floor":
        mm.mamba_selective_scan = _floor_scan
    ids = torch.randint(0, args.vocab, (1, args.length), generator=torch.Generator().manual_seed(1))

    def step() -> float:
        if args.mode == "fwd":
            with torch.no_grad():
                return float(model(input_ids=ids, labels=ids, use_cache=False).loss)
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        return float(loss)

    gc.collect()
    times, cpus = [], []
    for rep in range(args.reps):
        with _PeakRSS() as mem:
            t0, c0 = time.perf_counter(), time.process_time()
            loss_value = step()
            times.append(time.perf_counter() - t0)
            cpus.append(time.process_time() - c0)
        if rep == 0:
            peak, loss = mem.delta_mb, loss_value
    return {
        "wall": min(times),
        "cpu": min(cpus),
        "walls": times,
        "cpus": cpus,
        "peak_mb": peak,
        "loss": loss,
        "threads": torch.get_num_threads(),
        "peak_method": "VmHWM" if mem.kernel else "sampled",
    }


def run_one(args, width, length, backend, mode) -> dict:
    if backend not in args.backends:
        return {"skipped": "not selected"}
    if backend == "sequential" and args.skip_sequential_above is not None and length > args.skip_sequential_above:
        return {"skipped": f"L > {args.skip_sequential_above}"}
    reps = 1 if backend == "sequential" else args.reps
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--worker",
        "--backend",
        backend,
        "--mode",
        mode,
        "--width",
        str(width),
        "--length",
        str(length),
        "--reps",
        str(reps),
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
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1][:120]}
    return json.loads(lines[-1])


def _cell(r, key, fmt):
    if key in r:
        return fmt.format(r[key])
    return "skipped" if "skipped" in r else ("n/a" if "unavailable" in r else "error")


def _times(r):
    if "wall" in r:
        return f"{r['wall']:.3f} / {r['cpu']:.3f}"
    return _cell(r, "wall", "")


def _ratio(a, b, key):
    if key in a and key in b and b[key] > 0:
        return a[key] / b[key]
    return None


def report(args, res) -> str:
    k = args.metric
    out = [
        f"Ratios use {'CPU' if k == 'cpu' else 'wall'} time. Times in s (wall / CPU), peak = peak RSS increase in MB.",
        "",
        "| width | L | backend | fwd s | fwd peak | fwd+bwd s | fwd+bwd peak | fwd+bwd × floor "
        "| seq ÷ this (fwd+bwd) | mem × floor | loss |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    checks = []
    for (w, n), by in res.items():
        fl, sq = by["floor"]["fwdbwd"], by["sequential"]["fwdbwd"]
        for b in BACKENDS:
            f, fb = by[b]["fwd"], by[b]["fwdbwd"]
            tx, sp, mx = _ratio(fb, fl, k), _ratio(sq, fb, k), _ratio(fb, fl, "peak_mb")
            out.append(
                f"| {w} | {n} | {b} | {_times(f)} | {_cell(f, 'peak_mb', '{:.0f}')} | "
                f"{_times(fb)} | {_cell(fb, 'peak_mb', '{:.0f}')} | "
                f"{'-' if tx is None else f'{tx:.2f}×'} | {'-' if sp is None else f'{sp:.1f}×'} | "
                f"{'-' if mx is None else f'{mx:.2f}×'} | {_cell(fb, 'loss', '{:.6f}')} |"
            )
        if n in TARGET_LENGTHS:
            h, mp = by["hf_vlm"]["fwdbwd"], by["mambapy"]["fwdbwd"]
            for name, val, ok in (
                ("fwd+bwd time ≤ 2× floor", _ratio(h, fl, k), lambda v: v <= 2.0),
                ("≥ 60× faster than sequential", _ratio(sq, h, k), lambda v: v >= 60.0),
                ("≥ 4× faster than mamba.py", _ratio(mp, h, k), lambda v: v >= 4.0),
                ("peak memory ≤ 1.25× floor", _ratio(h, fl, "peak_mb"), lambda v: v <= 1.25),
            ):
                verdict = "N/A (not measured)" if val is None else ("PASS" if ok(val) else "FAIL")
                checks.append(f"- width {w}, L={n}: {name}: {'-' if val is None else f'{val:.2f}'} → {verdict}")
    return "\n".join(out + ([""] + checks if checks else []))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="width 256, L 256, 1 rep")
    p.add_argument("--lengths", type=int, nargs="+", default=[256, 608, 1024])
    p.add_argument("--widths", type=int, nargs="+", default=[256, 768])
    p.add_argument("--skip-sequential-above", type=int, default=None, metavar="L")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    p.add_argument("--vocab", type=int, default=1024, help="small, so the LM head does not dominate")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument(
        "--metric",
        choices=("cpu", "wall"),
        default=None,
        help="time used for ratios (default: cpu if --threads 1 else wall)",
    )
    p.add_argument("--worker-timeout", type=float, default=3600.0, help="seconds per config")
    p.add_argument("--out", default=None, help="also write the markdown table here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--backend", choices=BACKENDS, help=argparse.SUPPRESS)
    p.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    p.add_argument("--width", type=int, help=argparse.SUPPRESS)
    p.add_argument("--length", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return
    if args.quick:
        args.lengths, args.widths, args.reps = [256], [256], 1
    args.metric = args.metric or ("cpu" if args.threads == 1 else "wall")
    res = {}
    for w in args.widths:
        for n in args.lengths:
            res[(w, n)] = {b: {} for b in BACKENDS}
            for b in BACKENDS:
                for m in MODES:
                    r = run_one(args, w, n, b, m)
                    res[(w, n)][b][m] = r
                    print(f"[bench] width={w} L={n} {b:10s} {m:6s} {json.dumps(r)}", file=sys.stderr, flush=True)
    table = report(args, res)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

if __name__ == "__main__":
    main()

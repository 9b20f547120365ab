"""Benchmark: cost of the train-time vision probe (issue 11) against probe-off, in one run.

Same model, same batches, `MambaVLMTrainer` with its defaults; only `vision_probe_steps` differs:
0 (off), the default (50) and, for scale, a dense 10. A probe is two no-grad forwards (true and
other rows' images) on one micro-batch, so its cost lands on single steps: the table gives the
MEAN step time (process CPU and wall) over all steps after `--warmup` (the probes at steps 50,
100, ... are inside), and the whole run divided by its steps (the early probe at step 0
included). The decisive figure is measured inside each probed run: the CPU time spent in the
probe / the run's CPU time (target <= 5% at the default), because on a shared machine two
runs of the same configuration differ by more than the probe costs; the A/B difference of the
best runs is printed beside it. Configurations run `--reps` times, interleaved.

Usage: python benchmarks/bench_probe_overhead.py [--steps 150] [--warmup 3] [--reps 2] [--threads 1]
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
from _tiny_vlm import BATCH, StepClock, build_training_rows  # noqa: E402

from hf_vlm.data.collator import DataCollatorForMambaVLM  # noqa: E402
from hf_vlm.training.arguments import MambaVLMTrainingArguments  # noqa: E402
from hf_vlm.training.freeze import apply_freeze_policy  # noqa: E402
from hf_vlm.training.health import TrainVisionProbe  # noqa: E402
from hf_vlm.training.trainer import MambaVLMTrainer  # noqa: E402


def run(model, processor, dataset, collator, out, steps, every):
    args = MambaVLMTrainingArguments(
        output_dir=out,
        max_steps=steps,
        per_device_train_batch_size=BATCH,
        logging_steps=10,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
        learning_rate=1e-4,
        vision_probe_steps=every,
        plot_loss=False,
        guard_action="warn",
    )
    clock = StepClock()
    trainer = MambaVLMTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=collator,
        processing_class=processor,
        callbacks=[clock],
    )
    probe = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, TrainVisionProbe))
    spent = [0.0]
    observe = probe.observe_batch

    def timed(*a, **k):  # CPU time inside the probe, measured in the same run as the steps
        t0 = time.process_time()
        try:
            return observe(*a, **k)
        finally:
            spent[0] += time.process_time() - t0

    probe.observe_batch = timed
    start = (time.perf_counter(), time.process_time())
    trainer.train()
    return clock.marks, start, probe.probes, spent[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--target", type=float, default=0.05)
    cli = parser.parse_args()
    torch.set_num_threads(cli.threads)
    logging.basicConfig(level=logging.ERROR)
    default_every = MambaVLMTrainingArguments.__dataclass_fields__["vision_probe_steps"].default
    configs = {"probe off": 0, f"every {default_every} (default)": default_every, "every 10": 10}

    model, processor, rows = build_training_rows(cli.hidden, cli.layers)
    dataset = rows * (cli.steps + 1)
    collator = DataCollatorForMambaVLM(
        processor.tokenizer.pad_token_id, image_token_id=processor.image_token_id, log_first_example=False
    )
    results: dict[str, list] = {name: [] for name in configs}
    with tempfile.TemporaryDirectory() as out:
        apply_freeze_policy(model, MambaVLMTrainingArguments(output_dir=out, use_cpu=True, report_to="none"))
        initial = {k: v.clone() for k, v in model.state_dict().items()}
        for _ in range(cli.reps):
            for name, every in configs.items():
                model.load_state_dict(initial)
                marks, start, probes, spent = run(model, processor, dataset, collator, out, cli.steps, every)
                deltas = [(b[0] - a[0], b[1] - a[1]) for a, b in zip(marks[cli.warmup :], marks[cli.warmup + 1 :])]
                whole = ((marks[-1][0] - start[0]) / len(marks), (marks[-1][1] - start[1]) / len(marks))
                results[name].append(
                    (
                        statistics.mean(d[1] for d in deltas),
                        statistics.mean(d[0] for d in deltas),
                        statistics.median(d[1] for d in deltas),
                        *whole,
                        probes,
                        spent / (marks[-1][1] - start[1]),
                    )
                )

    seq = len(collator(rows)["input_ids"][0])
    print(
        f"\nMamba {cli.hidden}x{cli.layers} + ViT-64x2, batch {BATCH} x {seq} tokens, stage align, {cli.steps} steps "
        f"({cli.warmup} warm-up not timed in the means), {cli.threads} thread(s)\n"
    )
    print(
        "| probe | run | probes | probe share of run CPU | mean CPU ms/step | mean wall ms/step | median CPU ms "
        "| whole run CPU ms/step | whole run wall ms/step |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, runs in results.items():
        for i, (mc, mw, medc, ww, wc, probes, share) in enumerate(runs, 1):
            print(
                f"| {name} | {i} | {probes} | {share:.2%} | {1000 * mc:.1f} | {1000 * mw:.1f} | {1000 * medc:.1f} | "
                f"{1000 * wc:.1f} | {1000 * ww:.1f} |"
            )
    off = min(r[0] for r in results["probe off"])
    off_whole = min(r[4] for r in results["probe off"])
    spread = max(r[0] for r in results["probe off"]) / off - 1
    passed = True
    for name in list(configs)[1:]:
        overhead = min(r[0] for r in results[name]) / off - 1
        whole = min(r[4] for r in results[name]) / off_whole - 1
        share = max(r[6] for r in results[name])
        print(
            f"{name}: probe share of the run's CPU time {share:.2%} (in-run, the decisive figure); A/B vs probe "
            f"off: mean CPU per step {overhead:+.1%}, whole run {whole:+.1%} (probe-off runs differ by "
            f"{spread:.1%} between themselves)"
        )
        passed &= configs[name] != default_every or share <= cli.target
    print(f"{'PASS' if passed else 'FAIL'}: probe share at the default interval <= {cli.target:.0%}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark: training-step overhead of hf_vlm's trainer vs a bare PyTorch loop (issue 6).

Same model, same batch (the same 4 rows every step), same optimizer class and hyper-parameters,
same gradient clipping and LR schedule. Three loops:

* ``bare``:            DataLoader + collator, forward, backward, clip, optimizer and scheduler step;
* ``hf Trainer``:      `transformers.Trainer` with the same arguments and no extra callbacks;
* ``MambaVLMTrainer``: hf_vlm's trainer with its defaults, guard callbacks on (freeze, mask,
                       collapse/NaN, loss health, CSV log, loss plot; no eval, so no vision probe).

A step's time is taken between consecutive step ends (so data loading, callbacks and
logging in between count), after `--warmup` steps; the table gives the median and mean of
wall and process-CPU time (torch threads = --threads; CPU time ignores waiting for a core
held by other jobs). Overhead = trainer / bare - 1 on the median CPU time; target <= 10%.
Every loop runs `--reps` times, interleaved, and each run is listed.

Usage: python benchmarks/bench_train_step.py [--steps 20] [--warmup 3] [--reps 2] [--threads 1]
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
from torch.utils.data import DataLoader  # noqa: E402
from transformers import Trainer  # noqa: E402

from hf_vlm.data.collator import DataCollatorForMambaVLM  # noqa: E402
from hf_vlm.training.arguments import MambaVLMTrainingArguments  # noqa: E402
from hf_vlm.training.freeze import apply_freeze_policy  # noqa: E402
from hf_vlm.training.trainer import MambaVLMTrainer  # noqa: E402


def bare_loop(model, dataset, collator, args, optimizer_cls, optimizer_kwargs, steps):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = optimizer_cls(params, **optimizer_kwargs)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: max(0.0, 1 - s / steps))
    loader = DataLoader(dataset, batch_size=BATCH, shuffle=True, collate_fn=collator)
    model.train()
    marks = []
    for batch in loader:
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        marks.append((time.perf_counter(), time.process_time()))
    return marks


def trainer_loop(kind, model, dataset, collator, args, processor):
    clock = StepClock()
    if kind == "MambaVLMTrainer":
        trainer = MambaVLMTrainer(
            model=model,
            args=args,
            train_dataset=dataset,
            data_collator=collator,
            processing_class=processor,
            callbacks=[clock],
        )
    else:
        trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator, callbacks=[clock])
    trainer.train()
    return clock.marks


def summarise(marks, warmup):
    deltas = [(b[0] - a[0], b[1] - a[1]) for a, b in zip(marks[warmup:], marks[warmup + 1 :])]
    walls, cpus = [d[0] for d in deltas], [d[1] for d in deltas]
    return statistics.median(walls), statistics.mean(walls), statistics.median(cpus), statistics.mean(cpus)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--target", type=float, default=0.10)
    cli = parser.parse_args()
    torch.set_num_threads(cli.threads)
    logging.basicConfig(level=logging.ERROR)
    from hf_vlm.ops import install_fast_scan

    print("scan backend:", install_fast_scan())  # MambaVLMTrainer installs it anyway: same for all loops
    model, processor, rows = build_training_rows(cli.hidden, cli.layers)
    total = cli.steps + cli.warmup + 1
    dataset = rows * total  # every batch is the same 4 rows (in shuffled order)
    collator = DataCollatorForMambaVLM(
        processor.tokenizer.pad_token_id, image_token_id=processor.image_token_id, log_first_example=False
    )
    results: dict[str, list] = {"bare": [], "hf Trainer": [], "MambaVLMTrainer": []}
    with tempfile.TemporaryDirectory() as out:
        args = MambaVLMTrainingArguments(
            output_dir=out,
            max_steps=total,
            per_device_train_batch_size=BATCH,
            logging_steps=5,
            save_strategy="no",
            report_to="none",
            use_cpu=True,
            dataloader_num_workers=0,
            disable_tqdm=True,
            learning_rate=1e-4,
        )
        apply_freeze_policy(model, args)  # stage "align": bridge trainable, tower and LLM frozen
        optimizer_cls, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
        optimizer_kwargs = {**optimizer_kwargs, "lr": args.learning_rate, "weight_decay": args.weight_decay}
        initial = {k: v.clone() for k, v in model.state_dict().items()}
        for _ in range(cli.reps):
            for kind in results:
                model.load_state_dict(initial)
                start = time.perf_counter()
                if kind == "bare":
                    marks = bare_loop(model, dataset, collator, args, optimizer_cls, optimizer_kwargs, total)
                else:
                    marks = trainer_loop(kind, model, dataset, collator, args, processor)
                results[kind].append((*summarise(marks, cli.warmup), (time.perf_counter() - start) / len(marks)))

    seq = len(collator(rows)["input_ids"][0])
    print(
        f"\nMamba {cli.hidden}x{cli.layers} + ViT-64x2, batch {BATCH} x {seq} tokens, stage align (bridge trains), "
        f"{cli.steps} timed steps after {cli.warmup} warm-up, {cli.threads} thread(s), optimizer "
        f"{optimizer_cls.__name__}\n"
    )
    print("| loop | run | median wall ms | mean wall ms | median CPU ms | mean CPU ms | whole run / step ms |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for kind, runs in results.items():
        for i, (mw, aw, mc, ac, whole) in enumerate(runs, 1):
            print(
                f"| {kind} | {i} | {1000 * mw:.0f} | {1000 * aw:.0f} | {1000 * mc:.0f} | {1000 * ac:.0f} | "
                f"{1000 * whole:.0f} |"
            )
    bare_cpu = min(r[2] for r in results["bare"])
    verdict = True
    for kind in ("hf Trainer", "MambaVLMTrainer"):
        overhead = min(r[2] for r in results[kind]) / bare_cpu - 1
        wall_overhead = min(r[0] for r in results[kind]) / min(r[0] for r in results["bare"]) - 1
        print(f"{kind}: overhead vs bare (best median step) CPU {overhead:+.1%}, wall {wall_overhead:+.1%}")
        verdict &= kind != "MambaVLMTrainer" or overhead <= cli.target
    print(f"{'PASS' if verdict else 'FAIL'}: MambaVLMTrainer overhead <= {cli.target:.0%} (median CPU time per step)")
    return 0 if verdict else 1


if __name__ == "__main__":
    sys.exit(main())

"""`benchmarks/bench_gpu.py --smoke`: every section of the GPU benchmark runs end to end on the CPU
(tiny shapes), so the one-command GPU run cannot rot while CI has no GPU. No timing is asserted."""

from __future__ import annotations

import importlib.util
import os
import re

import torch

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "bench_gpu.py")


def test_smoke_mode_prints_every_section(capsys):
    spec = importlib.util.spec_from_file_location("bench_gpu", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    threads = torch.get_num_threads()
    try:
        assert bench.main(["--smoke"]) == 0
    finally:
        torch.set_num_threads(threads)
    text = capsys.readouterr().out
    for heading in (
        "## Correctness on this device",
        "## Scan and layer fwd+bwd",
        "## Generation",
        "## Stage-2 step",
        "## Targets",
    ):
        assert heading in text, heading
    number = r"\d+\.\d+"
    for length in bench.SMOKE_LENGTHS:  # the CPU rungs produced numbers for the scan and the layer
        for rung in ("hf_vlm_chunked", "transformers_reference"):
            assert re.search(
                rf"\| tiny \| {length} \| {rung} \| {number} \| n/a \| {number} \| {number} \| n/a \|", text
            ), (length, rung)
        assert re.search(
            rf"\| tiny \| {length} \| hf_vlm_triton \| not run: (needs CUDA tensors|triton not installed)", text
        )
    assert re.search(rf"\| hf_vlm_chunked \| {number} \| {number} \|", text)  # generation
    assert re.search(rf"\| hf_vlm_chunked \| {number} \| n/a \|", text)  # stage-2 step
    assert "target <= 1.5x" in text and "target >= 20x" in text and "target <= 12 GB" in text

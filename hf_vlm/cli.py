"""`hf-vlm` command line: one sub-command per module in `hf_vlm.commands`.

Each command module exposes ``add_arguments(parser)`` and ``run(args) -> int``. Modules are
imported lazily so that `hf-vlm clean` does not pay for importing torch models, and so that
`accelerate launch -m hf_vlm.cli train recipe.yaml` works on every platform (no POSIX-only
paths, no fork-only multiprocessing).
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
COMMANDS = {
    "demo": ("hf_vlm.commands.demo", "synthetic CT data -> train the bridge -> generate reports (CPU, minutes)"),
    "train": (
        "hf_vlm.commands.train",
        "train from a recipe YAML (launch with `accelerate launch -m hf_vlm.cli train`)",
    ),
    "preflight": ("hf_vlm.commands.preflight", "run one step of a recipe and check masks, freeze policy, memory"),
    "doctor": ("hf_vlm.commands.doctor", "report torch/CUDA/bf16, mamba-ssm kernels, bitsandbytes, memory estimate"),
    "clean": ("hf_vlm.commands.clean", "clean a caption CSV/Excel into *_clean.csv + *_rejects.csv"),
    "generate": ("hf_vlm.commands.generate", "generate reports for a folder or CSV of images"),
    "eval": ("hf_vlm.commands.evaluate", "score generated reports against references (BLEU/ROUGE-L/CIDEr/findings-F1)"),
    "serve": ("hf_vlm.commands.serve", "small gradio web demo for one checkpoint"),
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-vlm", description="Mamba vision-language training toolkit")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        if only is not None and name != only:
            continue  # avoid importing every command module just to parse one
        module = importlib.import_module(module_name)
        module.add_arguments(sub)
        sub.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and argv[0] in COMMANDS else None
    parser = build_parser(only=command)
    args = parser.parse_args(argv)
    if command is None or not hasattr(args, "_module"):
        parser.print_help()
        return 0 if not argv else 2
    return int(args._module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

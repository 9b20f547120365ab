"""Old entry point: Excel report table -> cleaned caption CSV (same code as `hf-vlm clean`).

    python scripts/excel_total_to_caption_csv.py total.xlsx --sheet 0 --image_column 影像路径 \
        --text_column 影像所见 --min_answer_chars 50 --require_keywords "结节|mm|肺叶|段|病灶"

Writes ``<stem>_clean.csv`` and ``<stem>_rejects.csv``; ``--output_csv PATH`` names the clean
file instead (rejects go next to it as ``<PATH stem>_rejects.csv``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from hf_vlm.commands.clean import add_arguments, run  # noqa: E402

if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="excel_total_to_caption_csv.py", description=__doc__.splitlines()[0])
    add_arguments(parser)
    parser.add_argument("--output_csv", default=None, help="path of the clean CSV (default: <stem>_clean.csv)")
    args = parser.parse_args()
    if args.output_csv and len(args.inputs) != 1:
        parser.error("--output_csv takes exactly one INPUT")
    if args.output_csv:
        args.output_dir = str(Path(args.output_csv).parent)
    status = run(args)
    if args.output_csv:
        stem, out = Path(args.inputs[0]).stem, Path(args.output_csv)
        Path(args.output_dir, f"{stem}_clean.csv").replace(out)
        Path(args.output_dir, f"{stem}_rejects.csv").replace(out.with_name(f"{out.stem}_rejects.csv"))
        print(f"clean CSV -> {out}")
    sys.exit(status)

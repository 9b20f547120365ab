"""`hf-vlm generate`: reports for a folder, a CSV or a single image.

    hf-vlm generate --checkpoint outputs/run/final --images test_clean.csv --output reports.csv
    hf-vlm generate --checkpoint outputs/run/final --images scan.png      # streams to the terminal

A folder may hold studies: NIfTI files and DICOM series sub-folders (a sub-folder with DICOM
files is one study), next to 2-D images. With a study checkpoint (its processor carries
`study_preprocessing`) every row is one study loaded with the checkpoint's settings; the
`--num_slices`, `--slice_sampling`, `--windows` and `--max_slices` flags may only repeat them.

Every input image or study gets exactly one output row (`image_path, prompt, report, error`): an image
that cannot be read gets an empty report and the reason in `error`, so a run over 10,000
studies never loses rows silently and `hf-vlm eval` can join predictions by `image_path`.
CSV output is utf-8-sig (Excel opens the Chinese text correctly); JSONL keeps the characters
(`ensure_ascii=False`). Settings that must match training (`--max_visual_tokens`,
`--llm_8bit`) default to the checkpoint's and are an error when they contradict it.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

from ..data.images import DEFAULT_MAX_SLICES, IMAGE_SUFFIXES

FIELDS = ("image_path", "prompt", "report", "error")


def add_checkpoint_arguments(parser: argparse.ArgumentParser) -> None:
    """How a checkpoint is loaded for inference (`load_for_inference`): shared by generate and serve."""
    parser.add_argument(
        "--max_visual_tokens", type=int, default=None, help="must equal the checkpoint's (default: read from it)"
    )
    parser.add_argument(
        "--llm_8bit",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="LLM in 8-bit (default: as the checkpoint was trained); --no-llm_8bit runs an "
        "8-bit-trained checkpoint in full precision (a note is printed)",
    )
    parser.add_argument(
        "--llm_4bit",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="LLM in 4-bit NF4 (default: as the checkpoint was trained); --no-llm_4bit: full precision",
    )
    parser.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:1 …")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="folder with the saved model and processor")
    parser.add_argument(
        "--images", required=True, help="an image file, a folder of images, or a CSV with an image_path column"
    )
    parser.add_argument(
        "--output", default=None, help="reports.csv or reports.jsonl (default: reports.csv; one image: print only)"
    )
    parser.add_argument("--recursive", action="store_true", help="also take images from sub-folders of --images")
    parser.add_argument(
        "--prompt", default=None, help="prompt for rows without one (default: the processor's training prompt)"
    )
    parser.add_argument(
        "--image_root", default=None, help="folder that relative CSV paths are relative to (default: the CSV's folder)"
    )
    parser.add_argument("--path_map", default=None, help="rewrite path prefixes, e.g. 'D:/data=/mnt/d/data'")
    parser.add_argument(
        "--max_slices",
        type=int,
        default=None,
        help=f"2-D checkpoints: slices taken from a DICOM series / NIfTI volume (default "
        f"{DEFAULT_MAX_SLICES}); study checkpoints: must equal their num_slices",
    )
    parser.add_argument("--num_slices", type=int, default=None, help="study checkpoints: must equal the saved setting")
    parser.add_argument("--slice_sampling", default=None, help="study checkpoints: must equal the saved setting")
    parser.add_argument("--windows", nargs="+", default=None, help="study checkpoints: must equal the saved CT windows")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_new_tokens", type=int, default=256)
    parser.add_argument("--num_beams", type=int, default=None, help="beam search width (default: greedy)")
    parser.add_argument("--do_sample", action="store_true", help="sample instead of greedy / beam decoding")
    parser.add_argument("--temperature", type=float, default=None, help="sampling temperature (with --do_sample)")
    parser.add_argument("--top_p", type=float, default=None, help="nucleus sampling mass (with --do_sample)")
    parser.add_argument(
        "--repetition_penalty", type=float, default=None, help=">1 discourages loops such as '左肺上叶左肺上叶…'"
    )
    parser.add_argument(
        "--no_repeat_ngram_size", type=int, default=None, help="forbid repeating any n-gram of this size"
    )
    add_checkpoint_arguments(parser)
    parser.add_argument("--no_progress", action="store_true", help="hide the progress bar")


def list_inputs(args) -> tuple[list[dict], str | None]:
    """Rows `{"image_path", "prompt", "source"}` and the base folder for relative CSV paths."""
    source = Path(args.images)
    if source.is_dir():
        files = _folder_inputs(source, args.recursive)
        if not files:
            raise ValueError(
                f"{source}: no images ({', '.join(IMAGE_SUFFIXES)}){'' if args.recursive else '; try --recursive'}"
            )
        return [{"image_path": str(p), "prompt": args.prompt or "", "source": str(p)} for p in files], None
    if not source.is_file():
        raise ValueError(f"{source}: no such file or folder")
    if source.suffix.lower() != ".csv":
        return [{"image_path": str(source), "prompt": args.prompt or "", "source": str(source)}], None
    from ..data.text_cleaning import detect_encoding

    encoding, errors = detect_encoding(source)
    with open(source, encoding=encoding, errors=errors, newline="") as handle:
        reader = csv.DictReader(handle)
        if "image_path" not in (reader.fieldnames or []):
            raise ValueError(f"{source}: no image_path column (columns: {', '.join(reader.fieldnames or [])})")
        rows = [
            {
                "image_path": r["image_path"] or "",
                "prompt": (r.get("prompt") or "").strip() or args.prompt or "",
                "source": r["image_path"] or "",
            }
            for r in reader
        ]
    if not rows:
        raise ValueError(f"{source}: no rows")
    return rows, str(source.parent)


def _is_series(folder: Path) -> bool:
    from ..data.images import is_dicom

    return any(f.is_file() and is_dicom(f) for f in folder.iterdir())


def _folder_inputs(folder: Path, recursive: bool, top: bool = True) -> list[Path]:
    """Images and NIfTI files of `folder`, and each sub-folder holding DICOM files as ONE study
    (a series); `recursive` also descends into the other sub-folders."""
    found = []
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.name.lower().endswith(IMAGE_SUFFIXES):
            found.append(path)
        elif path.is_dir() and not path.name.startswith("."):
            if _is_series(path):
                found.append(path)
            elif recursive:
                found.extend(_folder_inputs(path, recursive, top=False))
    return found


def refuse_overwriting_input(args) -> None:
    """`--output` must not be the input CSV (it holds the references `hf-vlm eval` needs)."""
    if not args.output or not Path(args.images).is_file():
        return
    output, source = Path(args.output), Path(args.images)
    same = output.resolve() == source.resolve() or (output.exists() and output.samefile(source))
    if same:
        raise ValueError(
            f"--output {args.output} is the input file --images {args.images}: writing the reports "
            "there would destroy it (and its reference captions). Choose another --output."
        )


def _load(row: dict, args, base_dir: str | None, settings=None):
    """The images of one row: `[Study]` with the checkpoint's study settings, else 2-D images."""
    if settings is not None:
        from ..data.studies import load_study

        return [
            load_study(row["source"], settings, image_root=args.image_root, path_map=args.path_map, base_dir=base_dir)
        ]
    from ..data.images import load_images

    return load_images(
        row["source"],
        image_root=args.image_root,
        path_map=args.path_map,
        base_dir=base_dir,
        max_slices=args.max_slices or DEFAULT_MAX_SLICES,
    )


def check_study_arguments(args, processor) -> None:
    """Study flags may only repeat the checkpoint's settings (`--max_slices` means num_slices there)."""
    from ..data.study_settings import check_study_flags

    settings = processor.study_settings
    requested = {name: getattr(args, name, None) for name in ("num_slices", "slice_sampling", "windows")}
    if settings is not None and args.max_slices is not None:
        requested["num_slices"] = requested["num_slices"] or args.max_slices
    check_study_flags(settings, requested, args.checkpoint)


class ReportWriter:
    """Appends rows as they are produced, so an interrupted run keeps what it generated."""

    def __init__(self, path: str | None):
        self.path, self.handle, self.writer = path, None, None
        if path is None:
            return
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.jsonl = Path(path).suffix.lower() in (".jsonl", ".json")
        self.handle = open(path, "w", encoding="utf-8" if self.jsonl else "utf-8-sig", newline="")
        if not self.jsonl:
            self.writer = csv.DictWriter(self.handle, fieldnames=FIELDS)
            self.writer.writeheader()

    def write(self, row: dict) -> None:
        if self.handle is None:
            return
        row = {k: row.get(k, "") for k in FIELDS}
        if self.jsonl:
            self.handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        else:
            self.writer.writerow(row)
        self.handle.flush()

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()


def run(args) -> int:
    from tqdm.auto import tqdm

    from ..inference import SettingsMismatchError, build_generate_kwargs, generate_batch, load_for_inference

    try:
        refuse_overwriting_input(args)
        rows, base_dir = list_inputs(args)
        gen_kwargs = build_generate_kwargs(
            max_new_tokens=args.max_new_tokens,
            do_sample=args.do_sample,
            temperature=args.temperature,
            top_p=args.top_p,
            num_beams=args.num_beams,
            repetition_penalty=args.repetition_penalty,
            no_repeat_ngram_size=args.no_repeat_ngram_size,
        )
        model, processor, settings = load_for_inference(
            args.checkpoint,
            max_visual_tokens=args.max_visual_tokens,
            llm_8bit=args.llm_8bit,
            llm_4bit=args.llm_4bit,
            device=args.device,
            dtype=args.dtype,
        )
        check_study_arguments(args, processor)
    except (SettingsMismatchError, ValueError, OSError) as exc:
        print(f"hf-vlm generate: error: {exc}", file=sys.stderr)
        return 2
    for note in settings["notes"]:
        print(f"hf-vlm generate: note: {note}", file=sys.stderr)
    for row in rows:  # record the prompt actually used
        row["prompt"] = row["prompt"] or processor.default_prompt
    single = len(rows) == 1 and base_dir is None
    output = args.output if (args.output or single) else "reports.csv"
    writer = ReportWriter(output)
    n_errors = 0
    try:
        bar = tqdm(total=len(rows), desc="generate", unit="image", disable=args.no_progress or single)
        for start in range(0, len(rows), max(args.batch_size, 1)):
            batch, ready, images = rows[start : start + args.batch_size], [], []
            for row in batch:
                try:
                    images.append(_load(row, args, base_dir, processor.study_settings))
                    ready.append(row)
                except Exception as exc:  # any unreadable input becomes an error row, never a lost row
                    row["report"], row["error"] = "", f"{type(exc).__name__}: {exc}"
            if ready:
                streamer = None
                if single and (args.num_beams or 1) == 1:
                    from transformers import TextStreamer

                    streamer = TextStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
                reports = generate_batch(
                    model, processor, images, [r["prompt"] for r in ready], streamer=streamer, **gen_kwargs
                )
                for row, report in zip(ready, reports):
                    row["report"], row["error"] = report, ""
                if single and streamer is None:
                    print(reports[0])
            for row in batch:
                n_errors += bool(row["error"])
                writer.write(row)
                if row["error"]:
                    print(f"hf-vlm generate: cannot read {row['image_path']}: {row['error']}", file=sys.stderr)
            bar.update(len(batch))
        bar.close()
    finally:
        writer.close()
    if output:
        print(
            f"wrote {len(rows)} rows ({len(rows) - n_errors} reports, {n_errors} unreadable images) to {output}",
            file=sys.stderr if single else sys.stdout,
        )
    return 1 if n_errors == len(rows) else 0

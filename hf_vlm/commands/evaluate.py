"""`hf-vlm eval`: score generated reports against references, offline.

    hf-vlm eval --predictions reports.csv --references test_clean.csv --output metrics.json

Predictions and references are joined on a key column (default ``image_path``), never by row
order: generation may skip, reorder or duplicate images, and a positional join would silently
score report i against the reference of image j. Any prediction without a reference is an
error that lists the keys; references without a prediction are an error too unless
``--allow_missing_predictions`` is given (then they are counted and reported, not dropped
silently). Several reference rows with the same key become several references. Failed predictions
(an `error` from `hf-vlm generate`, or an empty report) are listed and counted apart and not scored,
unless ``--include_failed``: scoring them as zero silently mixes "the model is bad" with "the image
was unreadable".
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from pathlib import Path

_SHOW = 10  # keys listed in an error message


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--predictions", required=True, help="generated reports (CSV or JSONL)")
    parser.add_argument("--references", required=True, help="reference reports, e.g. *_clean.csv (CSV or JSONL)")
    parser.add_argument("--output", default=None, help="write the metrics as JSON here")
    parser.add_argument(
        "--granularity",
        choices=("char", "word"),
        default="char",
        help="char (default, the convention for Chinese reports) or word (jieba)",
    )
    parser.add_argument(
        "--findings_table",
        default=None,
        help="YAML/JSON keyword table for findings-F1 (default: built-in Chinese chest CT)",
    )
    parser.add_argument("--prediction_column", default="report", help="text column in --predictions (default: report)")
    parser.add_argument("--reference_column", default="caption", help="text column in --references (default: caption)")
    parser.add_argument("--key", default="image_path", help="column joining the two files (default: image_path)")
    parser.add_argument(
        "--key_basename", action="store_true", help="join on the file name of the key only (absolute vs relative paths)"
    )
    parser.add_argument(
        "--allow_missing_predictions",
        action="store_true",
        help="score only the references that have a prediction (the others are counted in the output)",
    )
    parser.add_argument("--keep_punct", action="store_true", help="keep punctuation as tokens (default: removed)")
    parser.add_argument(
        "--include_failed",
        action="store_true",
        help="score failed predictions (unreadable image, empty report) as they are, i.e. as zero; "
        "by default they are listed and counted separately, not scored",
    )


class EvalInputError(ValueError):
    """A problem with the input files that the user must fix; printed without a traceback."""


def read_rows(path: str | Path) -> list[dict]:
    """CSV (encoding detected as `hf-vlm clean` does: utf-8 with or without BOM, GBK, GB18030, UTF-16)
    or JSONL/JSON rows as dicts of strings. A decoding error names the file."""
    from ..data.text_cleaning import detect_encoding

    path = Path(path)
    if not path.is_file():
        raise EvalInputError(f"{path}: no such file")
    try:
        if path.suffix.lower() in (".jsonl", ".json"):
            text = path.read_text(encoding="utf-8-sig")
            if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
                return list(json.loads(text))
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        encoding, errors = detect_encoding(path)
        with path.open(encoding=encoding, errors=errors, newline="") as handle:
            return list(csv.DictReader(handle))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EvalInputError(f"{path}: cannot be read ({type(exc).__name__}: {exc}); save it as UTF-8") from exc


def failed_prediction(row: dict, column: str) -> str | None:
    """Why a prediction row is not a report to score: the image was unreadable, or the report is empty."""
    if str(row.get("error") or "").strip():
        return f"unreadable image: {str(row['error']).strip()[:80]}"
    if not str(row.get(column) or "").strip():
        return "empty report"
    return None


def _column(rows: list[dict], column: str, path: str, flag: str) -> None:
    if rows and column not in rows[0]:
        raise EvalInputError(f"{path}: no column {column!r} (columns: {', '.join(map(str, rows[0]))}); pass {flag}")


def _keys_message(keys: list[str]) -> str:
    shown = ", ".join(repr(k) for k in keys[:_SHOW])
    return shown + (f" ... and {len(keys) - _SHOW} more" if len(keys) > _SHOW else "")


def join_rows(args: argparse.Namespace) -> tuple[list[str], list[str], list[list[str]], int]:
    """Return keys, predictions, reference lists, and the count of references left unscored."""
    pred_rows, ref_rows = read_rows(args.predictions), read_rows(args.references)
    if not pred_rows:
        raise EvalInputError(f"{args.predictions}: no rows")
    for rows, path, column, flag in (
        (pred_rows, args.predictions, args.prediction_column, "--prediction_column"),
        (ref_rows, args.references, args.reference_column, "--reference_column"),
        (pred_rows, args.predictions, args.key, "--key"),
        (ref_rows, args.references, args.key, "--key"),
    ):
        _column(rows, column, path, flag)

    def key_of(row: dict) -> str:
        key = str(row.get(args.key) or "").strip()
        return os.path.basename(key.replace("\\", "/")) if args.key_basename else key

    predictions: dict[str, str] = {}
    duplicates = []
    args.failed_predictions = {}  # key -> reason, reported separately (not scored unless --include_failed)
    for row in pred_rows:
        key = key_of(row)
        if key in predictions or key in args.failed_predictions:
            duplicates.append(key)
        reason = failed_prediction(row, args.prediction_column)
        if reason and not getattr(args, "include_failed", False):
            args.failed_predictions[key] = reason
            continue
        predictions[key] = str(row.get(args.prediction_column) or "")
    if duplicates:
        raise EvalInputError(
            f"{args.predictions}: {len(duplicates)} duplicate keys in column {args.key!r}: {_keys_message(duplicates)}"
        )
    references: dict[str, list[str]] = {}
    for row in ref_rows:
        references.setdefault(key_of(row), []).append(str(row.get(args.reference_column) or ""))

    unmatched = [k for k in [*predictions, *args.failed_predictions] if k not in references]
    if unmatched:
        hint = ""
        ref_names = {os.path.basename(k.replace("\\", "/")) for k in references}
        if not args.key_basename and any(os.path.basename(k.replace("\\", "/")) in ref_names for k in unmatched):
            hint = " (the file names do match: pass --key_basename)"
        raise EvalInputError(
            f"{len(unmatched)} of {len(predictions)} predictions have no reference with the same "
            f"{args.key!r}{hint}: {_keys_message(unmatched)}"
        )
    missing = [k for k in references if k not in predictions and k not in args.failed_predictions]
    if missing and not args.allow_missing_predictions:
        raise EvalInputError(
            f"{len(missing)} of {len(references)} references have no prediction: {_keys_message(missing)}; "
            "pass --allow_missing_predictions to score only the predicted ones"
        )
    keys = list(predictions)
    return keys, [predictions[k] for k in keys], [references[k] for k in keys], len(missing)


def run(args: argparse.Namespace) -> int:
    from hf_vlm.metrics import compute_report_metrics, format_table
    from hf_vlm.metrics.repetition import DEFAULT_THRESHOLD

    try:
        _keys, predictions, references, n_missing = join_rows(args)
        if not predictions:
            raise EvalInputError(
                f"{args.predictions}: all {len(args.failed_predictions)} predictions failed "
                "(unreadable images or empty reports): nothing to score"
            )
        metrics = compute_report_metrics(
            predictions,
            references,
            granularity=args.granularity,
            findings_table=args.findings_table,
            keep_punct=args.keep_punct,
        )
    except (EvalInputError, ValueError, OSError) as exc:
        print(f"hf-vlm eval: error: {exc}", file=sys.stderr)
        return 2
    metrics["n_references_without_prediction"] = n_missing
    failed = getattr(args, "failed_predictions", {})
    metrics["n_failed_predictions"] = len(failed)
    metrics["failed_predictions"] = [{"key": k, "reason": r} for k, r in failed.items()]
    metrics["n_multi_reference"] = sum(len(r) > 1 for r in references)
    metrics["inputs"] = {
        "predictions": str(args.predictions),
        "references": str(args.references),
        "key": args.key,
        "prediction_column": args.prediction_column,
        "reference_column": args.reference_column,
    }
    print(format_table(metrics))
    if n_missing:
        print(f"note: {n_missing} references had no prediction and were not scored", file=sys.stderr)
    if failed:
        reasons = {}
        for reason in failed.values():
            reasons[reason.split(":")[0]] = reasons.get(reason.split(":")[0], 0) + 1
        print(
            f"note: {len(failed)} failed predictions were not scored ("
            + ", ".join(f"{n} {r}" for r, n in reasons.items())
            + f"): {_keys_message(list(failed))}; "
            "pass --include_failed to score them as zero",
            file=sys.stderr,
        )
    if metrics.get("repetition_flagged"):
        print(
            f"warning: {metrics['repetition_flagged']} reports look like loops (seq-rep-4 >= {DEFAULT_THRESHOLD}, e.g. "
            "'左肺上叶左肺上叶…'); try repetition_penalty / no_repeat_ngram_size when generating",
            file=sys.stderr,
        )
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(metrics, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.output}")
    return 0

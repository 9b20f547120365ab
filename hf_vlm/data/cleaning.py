"""Caption CSV/Excel cleaning: ``datasets`` map/filter pipeline that never loses a row.

Every input row ends up exactly once in ``<stem>_clean.csv`` or ``<stem>_rejects.csv`` (with a
``reason`` and a ``detail``); ``rows_in == kept + rejected`` is checked before returning.

Steps: (1) load all columns as strings (CSV encoding detected: utf-8 / utf-8-sig / gbk /
gb18030 / utf-16; Excel via pandas); (2) one batched ``map`` of the per-row ``clean_row``
(``num_proc`` workers; top-level functions, so it works under Windows *spawn*) normalises text
and image paths and writes the first failing per-row check into ``reason``; (3) de-duplication and normal-report
balancing need the whole table, so they run afterwards on plain columns in ``row_id`` order
(deterministic whatever ``num_proc``); (4) two ``filter`` calls split kept and rejected rows
(with ``num_proc`` from ``PARALLEL_FILTER_MIN_ROWS`` rows on).
"""

from __future__ import annotations

import os
import random
import re
import tempfile
import time
from dataclasses import dataclass, field
from difflib import SequenceMatcher
from pathlib import Path

from ..tokenization import IMAGE_TOKEN
from . import text_cleaning as tc
from .caption_io import CleaningReport, load_table, write_csv
from .images import ImageLoadError, load_volume_slices, resolve_image_path, split_image_paths

# reason -> meaning, in the order the checks run (one reason per row: the first that fails).
REASONS = {
    "missing_image_path": "image path cell is empty",
    "empty_caption": "caption is empty or a placeholder (nan, -, 无)",
    "image_token_in_caption": f"caption contains the {IMAGE_TOKEN} marker (it would be read as an image slot)",
    "mojibake_unrepairable": "caption/prompt is garbled text (wrong code page) that could not be repaired",
    "boilerplate_only": "only URLs, phone numbers, e-mails or customer-service text",
    "repeated_phrases": "most of the text is one phrase repeated (a generation loop)",
    "not_a_report": "no radiology vocabulary, or too few hanzi (min_cjk_fraction)",
    "too_short": "fewer than min_answer_chars characters after cleaning",
    "too_long": "more than max_answer_chars characters after cleaning",
    "missing_keywords": "no match for require_keywords",
    "image_missing": "an image file does not exist (drop_missing_paths / check_images)",
    "image_unreadable": "an image cannot be decoded (check_images)",
    "duplicate_exact": "same image(s), prompt and caption as an earlier row",
    "duplicate_near": "same image(s) and prompt, caption equal up to punctuation or >= near_duplicate_threshold similar",  # noqa: E501
    "normal_report_over_cap": "short normal report beyond max_normal_fraction of the kept rows",
}
_ALIASES = {
    "image": ("image_path", "image", "images", "image_paths", "path", "filename", "影像路径", "图像路径", "图片路径"),
    "text": ("caption", "report", "text", "answer", "findings", "报告", "影像所见", "描述"),
    "prompt": ("prompt", "question", "instruction", "问题"),
}
# The split is a string comparison per row (~0.3 s per 100k rows); below this size a worker
# pool costs more than it saves (measured with fork; under Windows spawn each worker also
# re-imports hf_vlm), so the filters run in-process.
PARALLEL_FILTER_MIN_ROWS = 1_000_000
_OUTPUT = (
    "row_id",
    "image_path",
    "prompt",
    "caption",
    "caption_raw",
    "reason",
    "detail",
    "fixes",
    "_image_key",
    "_text_key",
    "_is_normal",
)


@dataclass
class CleaningConfig:
    """What counts as a usable caption row. The normal-report cap is on by default because a
    flood of "未见异常" reports is what teaches a model to answer every image with it; pass
    ``max_normal_fraction=1`` for validation/test sets, whose distribution must stay real."""

    image_column: str = field(
        default="image_path", metadata={"help": "Column with the image path(s); several paths separated by ';'."}
    )
    text_column: str = field(default="caption", metadata={"help": "Column with the report text."})
    prompt_column: str = field(
        default="prompt", metadata={"help": "Optional column with the prompt/question (empty if absent)."}
    )
    sheet: str | None = field(
        default=None, metadata={"help": "Excel sheet name or 0-based index (default: first sheet)."}
    )
    encoding: str | None = field(
        default=None, metadata={"help": "CSV encoding; default: detect utf-8/utf-8-sig/gbk/gb18030/utf-16."}
    )
    drop_missing_paths: bool = field(
        default=False, metadata={"help": "Reject rows whose image file does not exist (reason image_missing)."}
    )
    image_root: str | None = field(
        default=None, metadata={"help": "Folder that relative image paths are relative to (default: the CSV's folder)."}
    )
    path_map: str | None = field(
        default=None,
        metadata={"help": "Prefix rewrites SRC=DST[,SRC=DST], e.g. 'D:/=/mnt/d/' to read Windows paths on Linux/WSL."},
    )
    min_answer_chars: int = field(
        default=5, metadata={"help": "Reject captions shorter than this after cleaning (too_short)."}
    )
    max_answer_chars: int = field(
        default=1000, metadata={"help": "Reject captions longer than this after cleaning (too_long); 0 = no limit."}
    )
    require_keywords: str | None = field(
        default=None, metadata={"help": "Regex a caption must match, e.g. '结节|mm|肺叶|段|病灶' (missing_keywords)."}
    )
    min_cjk_fraction: float = field(
        default=0.3, metadata={"help": "Minimum hanzi/(hanzi+latin letters) of a caption (not_a_report); 0 disables."}
    )
    max_repeat_fraction: float = field(
        default=0.5,
        metadata={
            "help": "Reject when collapsed phrase loops were at least this share of the text (repeated_phrases)."
        },
    )
    dedup: bool = field(
        default=True, metadata={"help": "Reject exact and near duplicate reports of the same image(s)."}
    )
    near_duplicate_threshold: float = field(
        default=0.95,
        metadata={
            "help": "Character-level similarity (difflib ratio, punctuation removed) at which a report is a near duplicate."  # noqa: E501
        },
    )
    max_normal_fraction: float = field(
        default=0.25,
        metadata={"help": "Cap on the share of short normal ('未见异常') reports among kept rows; 1 disables."},
    )
    normal_max_chars: int = field(
        default=40, metadata={"help": "Only reports up to this length count as short normal reports."}
    )
    seed: int = field(default=42, metadata={"help": "Seed for choosing which normal reports stay under the cap."})
    check_images: bool = field(
        default=False, metadata={"help": "Open every image and reject unreadable ones (image_unreadable); slower."}
    )
    num_proc: int = field(default=1, metadata={"help": "Worker processes for datasets map/filter."})

    def __post_init__(self):
        if self.require_keywords:
            try:
                re.compile(self.require_keywords)
            except re.error as e:
                raise ValueError(f"require_keywords={self.require_keywords!r} is not a valid regex: {e}") from e
        if not 0 < self.max_normal_fraction <= 1 or not 0 < self.near_duplicate_threshold <= 1:
            raise ValueError("max_normal_fraction and near_duplicate_threshold must be in (0, 1]")
        if self.num_proc < 1:
            raise ValueError(f"num_proc must be >= 1, got {self.num_proc}")


def _find_column(columns: list[str], wanted: str, kind: str, required: bool) -> str | None:
    if wanted in columns:
        return wanted
    relaxed = {c.strip().lower(): c for c in columns}
    for name in (wanted,) + (_ALIASES[kind] if wanted == _ALIASES[kind][0] else ()):
        if name.strip().lower() in relaxed:
            return relaxed[name.strip().lower()]
    if required:
        raise ValueError(
            f"{kind} column {wanted!r} not found; columns are {columns}. Pass --{kind}_column with one of them."
        )
    return None


def _check_text(raw: str, cfg: CleaningConfig) -> tuple[str, str, str, list[str]]:
    """Per-row text checks in REASONS order -> (reason, detail, cleaned caption, fixes)."""
    if tc.is_placeholder(raw):
        return "empty_caption", f"caption is {raw!r}", "", []
    if IMAGE_TOKEN in raw:
        return "image_token_in_caption", f"{IMAGE_TOKEN} at position {raw.index(IMAGE_TOKEN)}: {raw[:40]!r}", raw, []
    text, status = tc.repair_mojibake(raw)
    if status == "unrepairable":
        return "mojibake_unrepairable", f"caption could not be repaired: {raw[:40]!r}", raw, []
    fixes = ["mojibake_repaired"] if status == "repaired" else []
    text = tc.normalize_text(text)
    stripped = tc.strip_garbage(text)
    if stripped != text:
        fixes.append("garbage_stripped")
        if not stripped or not tc.looks_like_report(stripped):
            return "boilerplate_only", f"left after removing URL/phone/boilerplate: {stripped[:40]!r}", stripped, fixes
    text, looped = tc.collapse_repeats(stripped)
    if looped:
        fixes.append("repeats_collapsed")
        if looped >= cfg.max_repeat_fraction:
            return "repeated_phrases", f"{looped:.0%} of the text was a repeated phrase", text, fixes
    if not tc.looks_like_report(text) or (cfg.min_cjk_fraction and tc.cjk_fraction(text) < cfg.min_cjk_fraction):
        return "not_a_report", f"no report vocabulary or hanzi fraction {tc.cjk_fraction(text):.2f}", text, fixes
    if len(text) < cfg.min_answer_chars:
        return "too_short", f"{len(text)} chars < min_answer_chars={cfg.min_answer_chars}", text, fixes
    if cfg.max_answer_chars and len(text) > cfg.max_answer_chars:
        return "too_long", f"{len(text)} chars > max_answer_chars={cfg.max_answer_chars}", text, fixes
    if cfg.require_keywords and not re.search(cfg.require_keywords, text):
        return "missing_keywords", f"no match for {cfg.require_keywords!r}", text, fixes
    return "", "", text, fixes


def _check_images(paths: list[Path], raws: list[str], cfg: CleaningConfig) -> tuple[str, str]:
    if cfg.drop_missing_paths or cfg.check_images:
        for p, raw in zip(paths, raws):
            if not p.exists():
                return "image_missing", f"not found: {p}" + ("" if str(p) == raw else f" (written {raw!r})")
    if cfg.check_images:
        for p in paths:
            try:
                load_volume_slices(p, 1)
            except (ImageLoadError, ImportError) as e:
                return "image_unreadable", str(e)
    return "", ""


def clean_row(
    example: dict,
    idx: int,
    *,
    cfg: CleaningConfig,
    image_col: str,
    text_col: str,
    prompt_col: str | None,
    base_dir: str,
) -> dict:
    """The ``datasets.map`` function: canonical columns + ``reason`` (empty when kept)."""
    raws = [] if tc.is_placeholder(example[image_col]) else split_image_paths(example[image_col])
    raw_caption = example[text_col] or ""
    out = {
        "row_id": idx,
        "image_path": ";".join(raws),
        "prompt": "",
        "caption": "",
        "caption_raw": raw_caption,
        "reason": "",
        "detail": "",
        "fixes": "",
        "_image_key": "",
        "_text_key": "",
        "_is_normal": False,
    }
    prompt, p_status = tc.repair_mojibake((example[prompt_col] or "") if prompt_col else "")
    out["prompt"] = tc.normalize_text(prompt)
    if not raws:
        out.update(reason="missing_image_path", detail=f"column {image_col!r} is empty")
        return out
    reason, detail, caption, fixes = _check_text(raw_caption, cfg)
    if not reason and p_status == "unrepairable":
        reason, detail = "mojibake_unrepairable", f"prompt could not be repaired: {prompt[:40]!r}"
    paths = [resolve_image_path(r, image_root=cfg.image_root, path_map=cfg.path_map, base_dir=base_dir) for r in raws]
    if not reason:
        reason, detail = _check_images(paths, raws, cfg)
    fixes += ["mojibake_repaired"] if p_status == "repaired" and "mojibake_repaired" not in fixes else []
    out.update(
        reason=reason,
        detail=detail,
        caption=caption,
        fixes="|".join(fixes),
        _image_key=";".join(sorted(os.path.normcase(str(p)) for p in paths)),
        _text_key=tc.dedup_key(caption),
        _is_normal=tc.is_normal_report(caption, cfg.normal_max_chars),
    )
    return out


def clean_batch(batch: dict, indices: list[int], **kwargs) -> dict:
    """Batched wrapper of ``clean_row`` (datasets' per-example overhead is larger than the row's)."""
    rows = [clean_row({k: v[n] for k, v in batch.items()}, idx, **kwargs) for n, idx in enumerate(indices)]
    return {k: [r[k] for r in rows] for k in _OUTPUT}


def apply_global_checks(cols: dict, cfg: CleaningConfig) -> tuple[list[str], list[str]]:
    """Dedup then normal-report cap over the whole table, in row order (first row of a group is
    kept). Works on plain lists so the result does not depend on ``num_proc``."""
    reasons, details = list(cols["reason"]), list(cols["detail"])
    if cfg.dedup:
        groups: dict = {}
        for i, reason in enumerate(reasons):
            if reason:
                continue
            reps = groups.setdefault((cols["_image_key"][i], cols["prompt"][i]), [])
            for j in reps:
                if cols["caption"][i] == cols["caption"][j]:
                    reasons[i], details[i] = "duplicate_exact", f"same as row {cols['row_id'][j]}"
                    break
                a, b = cols["_text_key"][i], cols["_text_key"][j]
                if a == b:
                    reasons[i], details[i] = "duplicate_near", f"same as row {cols['row_id'][j]} up to punctuation"
                    break
                sm, t = SequenceMatcher(None, a, b, autojunk=False), cfg.near_duplicate_threshold
                if sm.real_quick_ratio() >= t and sm.quick_ratio() >= t and sm.ratio() >= t:
                    reasons[i], details[i] = "duplicate_near", f"{sm.ratio():.1%} similar to row {cols['row_id'][j]}"
                    break
            else:
                reps.append(i)
    if cfg.max_normal_fraction < 1:
        normal = [i for i, r in enumerate(reasons) if not r and cols["_is_normal"][i]]
        others = sum(1 for i, r in enumerate(reasons) if not r and not cols["_is_normal"][i])
        allowed = int(cfg.max_normal_fraction * others / (1 - cfg.max_normal_fraction) + 1e-9)
        if len(normal) > allowed:
            keep = set(random.Random(cfg.seed).sample(normal, allowed))
            for i in normal:
                if i not in keep:
                    reasons[i] = "normal_report_over_cap"
                    details[i] = (
                        f"kept {allowed} of {len(normal)} short normal reports "
                        f"(max_normal_fraction={cfg.max_normal_fraction}, seed={cfg.seed})"
                    )
    return reasons, details


def _kept(reasons: list[str]) -> list[bool]:
    return [not r for r in reasons]


def _rejected(reasons: list[str]) -> list[bool]:
    return [bool(r) for r in reasons]


def clean_captions(
    input_path: str | os.PathLike,
    output_dir: str | os.PathLike | None = None,
    config: CleaningConfig | None = None,
    *,
    verbose: bool = True,
) -> CleaningReport:
    """Clean one caption CSV/Excel into ``<stem>_clean.csv`` + ``<stem>_rejects.csv``."""
    cfg, start, path = config or CleaningConfig(), time.perf_counter(), Path(input_path)
    out_dir = Path(output_dir) if output_dir else path.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="hf_vlm_clean_", ignore_cleanup_errors=True) as tmp:
        ds, encoding = load_table(path, cfg, tmp)
        columns = list(ds.column_names)
        image_col = _find_column(columns, cfg.image_column, "image", True)
        text_col = _find_column(columns, cfg.text_column, "text", True)
        prompt_col = _find_column(columns, cfg.prompt_column, "prompt", False)
        sources = [c for c in (image_col, text_col, prompt_col) if c]
        extras = [c for c in columns if c not in sources]
        for c in extras:
            if c in _OUTPUT:  # an extra input column named like an output column keeps its data
                ds = ds.rename_column(c, c + "_input")
        extras = [c + "_input" if c in _OUTPUT else c for c in extras]
        ds = ds.map(
            clean_batch,
            with_indices=True,
            batched=True,
            batch_size=1000,
            num_proc=cfg.num_proc,
            remove_columns=sources,
            load_from_cache_file=False,
            cache_file_name=os.path.join(tmp, "map.arrow"),
            fn_kwargs={
                "cfg": cfg,
                "image_col": image_col,
                "text_col": text_col,
                "prompt_col": prompt_col,
                "base_dir": str(path.parent),
            },
            desc="cleaning captions",
        )
        needed = ["row_id", "prompt", "caption", "reason", "detail", "_image_key", "_text_key", "_is_normal"]
        reasons, details = apply_global_checks(ds.select_columns(needed).to_dict(), cfg)
        ds = ds.remove_columns(["reason", "detail"]).add_column("reason", reasons).add_column("detail", details)
        filter_procs = cfg.num_proc if len(ds) >= PARALLEL_FILTER_MIN_ROWS else None
        filt = {"input_columns": "reason", "batched": True, "num_proc": filter_procs, "load_from_cache_file": False}
        kept = ds.filter(_kept, cache_file_name=os.path.join(tmp, "kept.arrow"), **filt)
        rejected = ds.filter(_rejected, cache_file_name=os.path.join(tmp, "rejected.arrow"), **filt)
        if len(kept) + len(rejected) != len(ds):
            raise RuntimeError(f"row accounting failed: {len(ds)} rows in, {len(kept)} kept + {len(rejected)} rejected")
        clean_path, rejects_path = out_dir / f"{path.stem}_clean.csv", out_dir / f"{path.stem}_rejects.csv"
        write_csv(kept, clean_path, ["row_id", "image_path", "prompt", "caption", *extras, "fixes"])
        rejected = rejected.rename_columns({"caption": "caption_cleaned", "caption_raw": "caption"})
        write_csv(
            rejected,
            rejects_path,
            ["row_id", "reason", "detail", "image_path", "prompt", "caption", "caption_cleaned", *extras],
        )
        counts = {r: 0 for r in REASONS}
        for r in reasons:
            counts[r] = counts.get(r, 0) + bool(r)
        fixes = {"mojibake_repaired": 0, "garbage_stripped": 0, "repeats_collapsed": 0}
        for f in kept["fixes"]:
            for tag in filter(None, f.split("|")):
                fixes[tag] += 1
        report = CleaningReport(
            str(path),
            encoding,
            len(ds),
            len(kept),
            len(rejected),
            counts,
            fixes,
            str(clean_path),
            str(rejects_path),
            time.perf_counter() - start,
        )
        del ds, kept, rejected  # release memory-mapped files before the temp dir goes (Windows)
    if verbose:
        print(report.table())
    return report

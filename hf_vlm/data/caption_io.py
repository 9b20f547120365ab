"""Reading and writing caption tables for `hf-vlm clean`: CSV/TSV/Excel in, CSVs and a summary out.

Kept apart from the cleaning rules (`cleaning.py`) because it is where rows could be lost
silently: the CSV is scanned with the `csv` module first so that a row with an unquoted comma
stops the run with its line number instead of shifting columns, and the count read by
`datasets` must equal that scan.
"""

from __future__ import annotations

import codecs
import csv
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .text_cleaning import detect_encoding


@dataclass
class CleaningReport:
    input_path: str
    encoding: str
    rows_in: int
    kept: int
    rejected: int
    reasons: dict = field(default_factory=dict)
    fixes: dict = field(default_factory=dict)
    clean_path: str = ""
    rejects_path: str = ""
    seconds: float = 0.0

    def table(self) -> str:
        lines = [
            f"Caption cleaning: {self.input_path} (encoding: {self.encoding}, {self.seconds:.1f} s)",
            f"  {'rows in':<28}{self.rows_in:>9}",
            f"  {'kept':<28}{self.kept:>9}",
            f"  {'rejected':<28}{self.rejected:>9}",
        ]
        lines += [f"    {r:<26}{n:>9}" for r, n in self.reasons.items() if n]
        if any(self.fixes.values()):
            lines.append("  repaired in kept rows")
            lines += [f"    {k:<26}{n:>9}" for k, n in self.fixes.items() if n]
        lines += [f"  clean   -> {self.clean_path}", f"  rejects -> {self.rejects_path}"]
        return "\n".join(lines)

    __str__ = table

    def to_dict(self) -> dict:
        return asdict(self)


def scan_csv(path: Path, encoding: str, errors: str, sep: str) -> tuple[list[str], int]:
    """Header and record count, checked independently of pandas: a row with more fields than
    the header (an unquoted comma in a caption) would otherwise shift columns or vanish."""
    csv.field_size_limit(2**31 - 1)
    with open(path, encoding=encoding, errors=errors, newline="") as f:
        reader = csv.reader(f, delimiter=sep)
        header, records = next(reader, None), 0
        if not header:
            raise ValueError(f"{path}: the file is empty (no header row)")
        for row in reader:
            if not row or (len(row) == 1 and not row[0].strip()):
                continue  # blank line: pandas skips it too
            if len(row) > len(header):
                raise ValueError(
                    f"{path}: row_id {records} (line {reader.line_num}) has {len(row)} fields but the "
                    f"header has {len(header)}: {sep.join(row)[:60]!r}. Quote captions containing {sep!r}."
                )
            records += 1
    return header, records


def load_table(path: Path, cfg, cache_dir: str):
    """All columns as strings in a `datasets.Dataset`, plus the encoding that was used."""
    import datasets
    import pandas as pd

    if path.suffix.lower() in (".xlsx", ".xlsm", ".xls"):
        sheet = cfg.sheet if cfg.sheet is not None else 0
        sheet = int(sheet) if isinstance(sheet, str) and sheet.isdigit() else sheet
        df = pd.read_excel(path, sheet_name=sheet, dtype=str, keep_default_na=False).fillna("")
        df.columns = [str(c) for c in df.columns]
        return datasets.Dataset.from_pandas(df, preserve_index=False), "excel"
    encoding, errors = (cfg.encoding, "strict") if cfg.encoding else detect_encoding(path)
    sep = "\t" if path.suffix.lower() == ".tsv" else ","
    header, records = scan_csv(path, encoding, errors, sep)
    names, seen = [], {}
    for name in header:  # pandas-style de-duplication of repeated column names: a, a.1
        names.append(f"{name}.{seen[name]}" if name in seen else name)
        seen[name] = seen.get(name, 0) + 1
    features = datasets.Features({n: datasets.Value("string") for n in names})
    try:
        ds = datasets.load_dataset(
            "csv",
            data_files=str(path),
            split="train",
            cache_dir=cache_dir,
            sep=sep,
            encoding=encoding,
            encoding_errors=errors,
            column_names=names,
            header=0,
            features=features,
            keep_default_na=False,
            na_filter=False,
        )
    except Exception as e:  # datasets wraps the pandas ParserError; show the cause, not 40 frames
        cause = e.__cause__ or e
        raise ValueError(
            f"{path}: cannot parse as CSV ({type(cause).__name__}: {cause}). A caption with "
            f"commas or line breaks must be quoted."
        ) from e
    if len(ds) != records:
        raise RuntimeError(f"{path}: pandas read {len(ds)} rows but the file has {records} records")
    return ds, encoding + (" (undecodable bytes replaced)" if errors == "replace" else "")


def write_csv(ds, path: Path, columns: list[str]) -> None:
    """utf-8 with BOM so Excel on Windows shows Chinese (datasets' to_csv writes plain utf-8)."""
    with open(path, "wb") as f:
        f.write(codecs.BOM_UTF8)
        ds.select_columns(columns).to_csv(f, index=False)

"""Cleaned caption CSV -> ``datasets.Dataset`` whose rows decode their images lazily.

``load_caption_dataset`` reads the ``*_clean.csv`` written by ``hf-vlm clean`` (any column read
as text, encoding detected) and resolves every image path once, into an ``image_files``
column, so a Windows-written CSV works on Linux through ``path_map``/``image_root``.
``with_image_transform`` then uses ``Dataset.with_transform``: images are decoded only when a
row is accessed (by the Trainer's DataLoader workers), never stored in Arrow. The transform is
a ``functools.partial`` of a top-level function so the dataset pickles under Windows *spawn*.
"""

from __future__ import annotations

import csv
import functools
import os
from pathlib import Path

from .images import (
    DEFAULT_MAX_SLICES,
    DEFAULT_WINDOW,
    ImageLoadError,
    PathMap,
    load_images,
    resolve_image_path,
    split_image_paths,
)
from .text_cleaning import detect_encoding

REQUIRED_COLUMNS = ("image_path", "caption")


def _bad_row(row_id, caption: str, problem: str, path=None) -> ValueError:
    where = f"{path} row_id {row_id}" if path else f"row_id {row_id}"
    return ValueError(f"{where} (caption {caption[:30]!r}): {problem}")


def _has_data_row(path: Path, encoding: str, errors: str) -> bool:
    with open(path, encoding=encoding, errors=errors, newline="") as f:
        reader = csv.reader(f)
        next(reader, None)
        return any(any(cell.strip() for cell in row) for row in reader)


def load_caption_dataset(
    csv_path: str | os.PathLike, *, image_root: str | None = None, path_map: PathMap = None, split: str | None = None
):
    """Load a cleaned caption CSV.

    ``split``: if the CSV has a ``split`` column and ``split`` is a plain name ("train", "val"),
    only rows with that value are kept; otherwise it is a ``datasets`` split spec such as
    ``"train[:90%]"``. A missing ``prompt`` becomes ""; a missing ``row_id`` becomes the row
    number. Empty paths/captions or non-integer row_ids raise ``ValueError`` naming the row.
    """
    import datasets

    path = Path(csv_path)
    encoding, errors = detect_encoding(path)
    with open(path, encoding=encoding, errors=errors, newline="") as f:
        header = next(csv.reader(f), None) or []
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; columns are {header}. Run `hf-vlm clean` first.")
    by_column = split is not None and "split" in header and "[" not in split
    if not _has_data_row(path, encoding, errors):
        raise ValueError(f"{path}: the CSV has a header but no data rows; nothing to train or evaluate on")
    try:
        ds = datasets.load_dataset(
            "csv",
            data_files=str(path),
            split="train" if by_column or split is None else split,
            encoding=encoding,
            encoding_errors=errors,
            keep_default_na=False,
            na_filter=False,
            features=datasets.Features({c: datasets.Value("string") for c in header}),
        )
    except ValueError as error:  # datasets' messages ("Instruction ... corresponds to no data!") name no file
        raise ValueError(f"{path}: cannot load split={split!r}: {error}") from error
    if by_column:
        ds = ds.filter(lambda s: s == split, input_columns="split")
    if "prompt" not in ds.column_names:
        ds = ds.add_column("prompt", [""] * len(ds))
    raw_ids = ds["row_id"] if "row_id" in ds.column_names else [str(i) for i in range(len(ds))]
    row_ids, files = [], []
    for rid, image_path, caption in zip(raw_ids, ds["image_path"], ds["caption"]):
        if not str(rid).strip().lstrip("-").isdigit():
            raise _bad_row(rid, caption, f"row_id {rid!r} is not an integer", path)
        paths = split_image_paths(image_path)
        if not paths or not caption.strip():
            raise _bad_row(rid, caption, "empty image_path or caption; run `hf-vlm clean` on this CSV", path)
        row_ids.append(int(rid))
        files.append(
            ";".join(
                str(resolve_image_path(p, image_root=image_root, path_map=path_map, base_dir=str(path.parent)))
                for p in paths
            )
        )
    ds = ds.remove_columns([c for c in ("row_id", "image_files") if c in ds.column_names])
    return ds.add_column("row_id", row_ids).add_column("image_files", files)


def decode_batch(
    batch: dict,
    *,
    max_slices: int,
    image_root: str | None,
    path_map: PathMap,
    window_center: float | None,
    window_width: float | None,
    study_settings=None,
) -> dict:
    """``with_transform`` function: a batch of rows -> images + text, errors naming the row.

    With ``study_settings`` (a `StudyPreprocessing`) each row's images are ``[Study]``: the whole
    study loaded by `hf_vlm.data.studies.load_study`; otherwise a list of 2-D PIL images."""
    out = {"images": [], "prompt": [], "caption": [], "image_path": [], "row_id": []}
    sources = batch.get("image_files") or batch["image_path"]
    for i, source in enumerate(sources):
        row_id, caption = batch["row_id"][i] if "row_id" in batch else i, batch["caption"][i]
        try:
            if study_settings is not None:
                from .studies import load_study

                images = [load_study(source, study_settings, image_root=image_root, path_map=path_map)]
            else:
                images = load_images(
                    source,
                    image_root=image_root,
                    path_map=path_map,
                    max_slices=max_slices,
                    window_center=window_center,
                    window_width=window_width,
                )
        except ImageLoadError as e:
            raise ImageLoadError(f"row_id {row_id} (caption {caption[:30]!r}): {e}") from e
        out["images"].append(images)
        out["prompt"].append(batch["prompt"][i] if "prompt" in batch else "")
        out["caption"].append(caption)
        out["image_path"].append(batch["image_path"][i])
        out["row_id"].append(int(row_id))
    return out


def with_image_transform(
    ds,
    max_slices: int = DEFAULT_MAX_SLICES,
    *,
    image_root: str | None = None,
    path_map: PathMap = None,
    window_center: float | None = DEFAULT_WINDOW[0],
    window_width: float | None = DEFAULT_WINDOW[1],
    study_settings=None,
):
    """Return ``ds`` whose rows are ``{"images": list[PIL.Image] (or [Study]), "prompt", "caption",
    "image_path", "row_id"}``; ``image_root``/``path_map`` only matter without ``image_files``."""
    return ds.with_transform(
        functools.partial(
            decode_batch,
            max_slices=max_slices,
            image_root=image_root,
            path_map=path_map,
            window_center=window_center,
            window_width=window_width,
            study_settings=study_settings,
        )
    )

"""Check every image a run will read before step 0, so a bad file is an error naming its row.

Why: images are decoded lazily (`with_transform`), so a missing or corrupt image at row 59 used to
crash training at step 5 (or the final evaluation, after hours) while `hf-vlm preflight`, which
collates one batch, said PASS. `validate_dataset_images` walks the resolved `image_files` of a
loaded caption CSV (train and eval) before the Trainer starts; `prepare_run` calls it, so
`hf-vlm train` and `hf-vlm preflight` check exactly what training will read.

Modes (`validate_images`): "header" (default) opens each file's header only: existence, 0-byte
files, an unidentifiable or truncated raster (PIL `verify`, no decompression), the pixel limit
of `PIL.Image.MAX_IMAGE_PIXELS`, DICOM / NIfTI headers; "decode" decodes every image as training
would; "off" skips the check. Every bad row is listed (the first few in the message) with the CSV
file, the row_id and the image file.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from .images import ImageLoadError, is_dicom, is_nifti, load_volume_slices, split_image_paths

logger = logging.getLogger(__name__)

IMAGE_CHECKS = ("header", "decode", "off")
_SHOWN = 10
_PROGRESS_FROM = 500  # rows; a progress bar below that is noise


def _header_problem(path: Path) -> str | None:
    """Why `path` cannot be read as an image, from its header only (None: looks readable)."""
    if path.is_dir():
        return None if any(p.is_file() for p in path.iterdir()) else "folder holds no files (DICOM series expected)"
    if not path.is_file():
        return "file not found"
    if path.stat().st_size == 0:
        return "file is empty (0 bytes)"
    try:
        if is_nifti(path):
            import nibabel

            nibabel.load(str(path)).header  # noqa: B018 - reading the header is the check
            return None
        if is_dicom(path):
            import pydicom

            pydicom.dcmread(str(path), stop_before_pixels=True, force=True)
            return None
        from PIL import Image

        with Image.open(path) as image:
            limit = Image.MAX_IMAGE_PIXELS
            if limit and image.width * image.height > limit:
                return (
                    f"{image.width}x{image.height} = {image.width * image.height} pixels exceeds the "
                    f"decompression-bomb limit of {limit}"
                )
            image.verify()  # chunk structure and checksums, without decompressing
    except ImportError as error:
        return str(error)
    except Exception as error:  # noqa: BLE001 - PIL / pydicom / nibabel raise many types
        return f"cannot read image ({type(error).__name__}: {error})"
    return None


def _decode_problem(path: Path) -> str | None:
    try:
        load_volume_slices(path, 1)
    except (ImageLoadError, ImportError) as error:
        return str(error)
    return None


def image_problems(field: str, mode: str = "header") -> list[str]:
    """Problems of one CSV image field (`;`-separated resolved paths), each naming the file."""
    check = _decode_problem if mode == "decode" else _header_problem
    problems = []
    for raw in split_image_paths(field):
        problem = check(Path(raw))
        if problem:
            problems.append(problem if str(raw) in problem else f"{raw}: {problem}")
    return problems or ([] if split_image_paths(field) else ["empty image path"])


def validate_dataset_images(
    dataset, csv_path: str | os.PathLike | None, mode: str = "header", progress: bool = True
) -> int:
    """Check every row's images; raise `ValueError` listing the bad rows. Returns the rows checked."""
    if mode == "off" or dataset is None:
        return 0
    if mode not in IMAGE_CHECKS:
        raise ValueError(f"validate_images must be one of {IMAGE_CHECKS}, got {mode!r}")
    from tqdm.auto import tqdm

    plain = dataset.with_format(None)  # the raw columns, without the decoding transform
    column = "image_files" if "image_files" in plain.column_names else "image_path"
    fields = list(plain[column])
    row_ids = list(plain["row_id"]) if "row_id" in plain.column_names else list(range(len(fields)))
    bad = []
    bar = tqdm(
        zip(row_ids, fields),
        total=len(fields),
        desc=f"checking images ({mode})",
        unit="row",
        disable=not progress or len(fields) < _PROGRESS_FROM,
    )
    for row_id, field in bar:
        for problem in image_problems(field, mode):
            bad.append(f"row_id {row_id}: {problem}")
    if bad:
        shown = "\n  ".join(bad[:_SHOWN]) + (f"\n  ... and {len(bad) - _SHOWN} more" if len(bad) > _SHOWN else "")
        raise ImageLoadError(
            f"{csv_path}: {len(bad)} unreadable image(s) in {len(fields)} rows (checked before step 0, "
            f"validate_images={mode}):\n  {shown}\nFix or remove these rows (`hf-vlm clean --check_images` "
            "rejects them with a reason), or set validate_images: off to skip this check."
        )
    logger.info("%s: the images of all %d rows are readable (validate_images=%s)", csv_path, len(fields), mode)
    return len(fields)


__all__ = ["IMAGE_CHECKS", "image_problems", "validate_dataset_images"]

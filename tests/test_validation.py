"""Every image training and evaluation will read is checked before step 0 (issue 13, case 2).

Before, images were only decoded when their batch came: a bad image at row 59 crashed at
step 5 (or in the final evaluation), and `hf-vlm preflight` said PASS.
"""

from __future__ import annotations

import csv
import shutil

import pytest
from PIL import Image


def _copy_with_bad_rows(csv_path, out_dir, bad: dict):
    """A copy of a caption CSV whose images at the given row positions are replaced (absolute paths)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(csv_path, encoding="utf-8-sig", newline="") as handle:
        rows = list(csv.DictReader(handle))
    for position, kind in bad.items():
        target = out_dir / f"bad_{position}.png"
        if kind == "missing":
            pass
        elif kind == "empty":
            target.write_bytes(b"")
        elif kind == "truncated":
            good = sorted((csv_path.parent if hasattr(csv_path, "parent") else out_dir).rglob("*.png"))[0]
            data = good.read_bytes()
            target.write_bytes(data[: len(data) // 2])
        rows[position]["image_path"] = str(target)
    for row in rows:  # every other path absolute, so the copy may live elsewhere
        if not row["image_path"].startswith("/"):
            row["image_path"] = str((csv_path.parent / row["image_path"]).resolve())
    path = out_dir / "captions.csv"
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path, [rows[p]["row_id"] if "row_id" in rows[p] else str(p) for p in bad]


def test_bad_images_anywhere_are_named_before_step_0(csvs, micro_processor, tmp_path):
    from pathlib import Path

    from hf_vlm.data.encoding import load_training_dataset
    from hf_vlm.data.images import ImageLoadError
    from hf_vlm.data.validation import validate_dataset_images

    train_csv = Path(csvs[0])
    path, row_ids = _copy_with_bad_rows(train_csv, tmp_path / "data", {3: "missing", 9: "empty", 14: "truncated"})
    dataset = load_training_dataset(str(path), micro_processor)
    with pytest.raises(ImageLoadError) as error:
        validate_dataset_images(dataset, str(path), progress=False)
    message = str(error.value)
    assert f"{path}: 3 unreadable image(s) in 16 rows" in message
    for row_id, problem in zip(row_ids, ("file not found", "empty (0 bytes)", "cannot read image")):
        assert f"row_id {row_id}: " in message and problem in message, message
    assert "bad_3.png" in message and "bad_14.png" in message
    assert (
        validate_dataset_images(load_training_dataset(str(train_csv), micro_processor), str(train_csv), progress=False)
        == 16
    )


def test_oversized_image_is_caught_by_the_header_check(csvs, micro_processor, tmp_path, monkeypatch):
    from pathlib import Path

    from hf_vlm.data.encoding import load_training_dataset
    from hf_vlm.data.images import ImageLoadError
    from hf_vlm.data.validation import validate_dataset_images

    path, _ = _copy_with_bad_rows(Path(csvs[1]), tmp_path / "eval", {})
    big = tmp_path / "eval" / "big.png"
    Image.new("L", (250, 250)).save(big)
    with open(path, encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    rows[5]["image_path"] = str(big)
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 200 * 200)
    with pytest.raises(ImageLoadError, match=r"row_id \d+: .*big.png.*62500 pixels exceeds"):
        validate_dataset_images(load_training_dataset(str(path), micro_processor), str(path), progress=False)
    shutil.rmtree(tmp_path / "eval")

"""load_caption_dataset + with_image_transform: lazy decoding, path resolution, row errors."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from PIL import Image

from hf_vlm.data.cleaning import CleaningConfig, clean_captions
from hf_vlm.data.dataset import load_caption_dataset, with_image_transform
from hf_vlm.data.images import ImageLoadError

REPORT = "右肺上叶见一磨玻璃结节，大小约8mm×6mm，边界清晰。"


def _write(path, text):
    path.write_text(text, encoding="utf-8-sig")
    return path


@pytest.fixture()
def cleaned(tmp_path):
    """A dirty CSV with Windows paths and a NIfTI volume, cleaned by the real pipeline."""
    import nibabel as nib

    (tmp_path / "d" / "ct").mkdir(parents=True)
    Image.new("L", (6, 5), 40).save(tmp_path / "d" / "ct" / "a.png")
    nib.save(nib.Nifti1Image(np.full((4, 4, 8), -600, np.float32), np.eye(4)), str(tmp_path / "d" / "ct" / "v.nii.gz"))
    _write(
        tmp_path / "raw.csv",
        "image_path,caption,prompt,split\n"
        f"D:\\ct\\a.png,{REPORT},描述图像,train\n"
        f'"D:\\ct\\a.png;D:\\ct\\v.nii.gz",左肺下叶见斑片影。,,val\n'
        "D:\\ct\\gone.png,右肺中叶见结节，约5mm。,,train\n",
    )
    path_map = f"D:/={tmp_path / 'd'}/"
    report = clean_captions(tmp_path / "raw.csv", config=CleaningConfig(path_map=path_map), verbose=False)
    assert report.kept == 3  # gone.png is kept: drop_missing_paths is off
    return tmp_path / "raw_clean.csv", path_map


def test_rows_decode_lazily_with_expected_keys(cleaned):
    csv_path, path_map = cleaned
    ds = load_caption_dataset(csv_path, path_map=path_map)
    assert "images" not in ds.column_names and ds.column_names.count("image_files") == 1
    lazy = with_image_transform(ds, max_slices=3)
    row = lazy[0]
    assert set(row) == {"images", "prompt", "caption", "image_path", "row_id"}
    assert row["caption"] == REPORT and row["prompt"] == "描述图像" and row["row_id"] == 0
    assert row["image_path"] == "D:\\ct\\a.png" and row["images"][0].size == (6, 5)
    assert row["images"][0].mode == "RGB" and row["images"][0].getpixel((0, 0)) == (40, 40, 40)
    second = lazy[1]
    assert len(second["images"]) == 1 + 3 and second["images"][1].getpixel((0, 0))[0] == 128
    batch = lazy[:2]
    assert [len(x) for x in batch["images"]] == [1, 4] and batch["row_id"] == [0, 1]


def test_missing_image_error_names_row(cleaned):
    csv_path, path_map = cleaned
    lazy = with_image_transform(load_caption_dataset(csv_path, path_map=path_map))
    with pytest.raises(ImageLoadError, match=r"row_id 2 \(caption '右肺中叶.*gone\.png: file not found"):
        lazy[2]


def test_split_column_and_split_spec(cleaned):
    csv_path, path_map = cleaned
    assert load_caption_dataset(csv_path, path_map=path_map, split="val")["row_id"] == [1]
    assert len(load_caption_dataset(csv_path, path_map=path_map, split="train[:2]")) == 2


def test_transformed_dataset_pickles_for_spawn_workers(cleaned):
    csv_path, path_map = cleaned
    lazy = with_image_transform(load_caption_dataset(csv_path, path_map=path_map), max_slices=2)
    again = pickle.loads(pickle.dumps(lazy))
    assert again[0]["caption"] == REPORT and len(again[1]["images"]) == 3


def test_uncleaned_csv_errors_quote_the_row(tmp_path):
    _write(tmp_path / "a.csv", "image_path,caption,row_id\na.png,,7\n")
    with pytest.raises(ValueError, match="row_id 7.*hf-vlm clean"):
        load_caption_dataset(tmp_path / "a.csv")
    _write(tmp_path / "b.csv", "image_path,caption,row_id\na.png,报告,x1\n")
    with pytest.raises(ValueError, match="row_id 'x1' is not an integer"):
        load_caption_dataset(tmp_path / "b.csv")
    _write(tmp_path / "c.csv", "path,text\na.png,报告\n")
    with pytest.raises(ValueError, match=r"missing column\(s\) \['image_path', 'caption'\]"):
        load_caption_dataset(tmp_path / "c.csv")

"""hf_vlm.data.images: path resolution, PIL/DICOM/NIfTI loading, exact CT windowing, errors."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hf_vlm.data.images import (
    ImageLoadError,
    apply_window,
    load_image,
    load_images,
    load_volume_slices,
    resolve_image_path,
    sample_indices,
)

posix_only = pytest.mark.skipif(os.name == "nt", reason="POSIX resolution of Windows paths")


def write_ct_dicom(
    path: Path, hu: np.ndarray, slope: float = 2.0, intercept: float = -1024.0, photometric: str = "MONOCHROME2"
) -> Path:
    """Minimal CT image storage file; stored = (HU - intercept) / slope as signed 16-bit."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    hu = np.asarray(hu, dtype=np.float64)
    frames = hu if hu.ndim == 3 else hu[None]
    stored = np.rint((frames - intercept) / slope).astype(np.int16)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = CTImageStorage, meta.MediaStorageSOPInstanceUID, "CT"
    ds.Rows, ds.Columns = frames.shape[1:]
    if hu.ndim == 3:
        ds.NumberOfFrames = frames.shape[0]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    ds.PixelData = stored.tobytes()
    ds.save_as(str(path), enforce_file_format=True)
    return path


# HU -> expected 8-bit value under the default lung window (L -600, W 1500).
LUNG_CASES = [(-2000, 0), (-1350, 0), (-974, 64), (-600, 128), (150, 255), (1000, 255)]


def test_apply_window_exact_values():
    hu = np.array([h for h, _ in LUNG_CASES], dtype=float)
    assert apply_window(hu, -600, 1500).tolist() == [v for _, v in LUNG_CASES]
    assert apply_window(np.array([-160.0, 40.0, 240.0]), 40, 400).tolist() == [0, 128, 255]


def test_dicom_ct_windowing(tmp_path):
    hu = np.array([[h for h, _ in LUNG_CASES]] * 2, dtype=float)
    img = load_image(write_ct_dicom(tmp_path / "ct.dcm", hu))
    assert img.mode == "RGB" and img.size == (len(LUNG_CASES), 2)
    arr = np.asarray(img)
    assert arr[0, :, 0].tolist() == [v for _, v in LUNG_CASES]
    assert (arr[..., 0] == arr[..., 2]).all()
    mediastinum = np.asarray(load_image(tmp_path / "ct.dcm", window_center=40, window_width=400))
    assert mediastinum[0, 3:, 0].tolist() == [0, 198, 255]  # -600, 150, 1000 HU under L40/W400
    import pydicom

    ds = pydicom.dcmread(tmp_path / "ct.dcm")
    ds.WindowCenter, ds.WindowWidth = [40, -600], [400, 1500]  # window=None uses the file's first window
    ds.save_as(tmp_path / "tagged.dcm")
    assert np.asarray(load_image(tmp_path / "tagged.dcm", window_center=None, window_width=None))[
        0, 3:, 0
    ].tolist() == [0, 198, 255]


def test_dicom_without_suffix_monochrome1_and_frames(tmp_path):
    write_ct_dicom(tmp_path / "IM0001", np.full((2, 2), -600.0), photometric="MONOCHROME1")
    assert np.asarray(load_image(tmp_path / "IM0001"))[0, 0, 0] == 255 - 128  # DICM magic, inverted
    frames = np.stack([np.full((2, 2), -1350.0 + 300 * k) for k in range(4)])
    slices = load_volume_slices(write_ct_dicom(tmp_path / "multi.dcm", frames), 2)
    assert [np.asarray(s)[0, 0, 0] for s in slices] == [apply_window(frames[k, 0, 0], -600, 1500) for k in (1, 3)]


@pytest.mark.parametrize("name", ["vol.nii", "vol.nii.gz"])
def test_nifti_slices_sampling_windowing_orientation(tmp_path, name):
    import nibabel as nib

    hu_per_slice = np.linspace(-1500, 300, 10)
    data = np.broadcast_to(hu_per_slice, (4, 3, 10)).astype(np.float32).copy()
    data[0, 0, :] = 1000.0  # voxel at patient's left-posterior -> bottom-right when shown radiologically
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(tmp_path / name))
    slices = load_volume_slices(tmp_path / name, 5)
    assert sample_indices(10, 5) == [1, 3, 5, 7, 9]
    assert len(slices) == 5 and slices[0].size == (4, 3)  # (width=X, height=Y)
    for img, k in zip(slices, [1, 3, 5, 7, 9]):
        arr = np.asarray(img)[..., 0]
        assert arr[0, 0] == apply_window(hu_per_slice[k], -600, 1500)
        assert arr[-1, -1] == 255
    assert len(load_volume_slices(tmp_path / name, 50)) == 10
    assert np.asarray(load_image(tmp_path / name))[0, 0, 0] == apply_window(hu_per_slice[5], -600, 1500)


def test_pil_formats_exif_and_16bit(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees
    Image.new("RGB", (4, 2), "white").save(tmp_path / "rot.jpg", exif=exif)
    assert load_image(tmp_path / "rot.jpg").size == (2, 4)
    Image.fromarray(np.array([[0, 1000, 2000]], dtype=np.uint16)).save(tmp_path / "ct16.png")
    assert np.asarray(load_image(tmp_path / "ct16.png"))[0, :, 0].tolist() == [0, 128, 255]
    for suffix in ("bmp", "tif"):
        Image.new("L", (3, 3), 7).save(tmp_path / f"g.{suffix}")
        assert load_image(tmp_path / f"g.{suffix}").getpixel((1, 1)) == (7, 7, 7)


@pytest.mark.parametrize(
    "name,payload", [("bad.png", b"not an image"), ("bad.dcm", b"\0" * 200), ("bad.nii.gz", b"garbage")]
)
def test_corrupt_file_names_the_file(tmp_path, name, payload):
    (tmp_path / name).write_bytes(payload)
    with pytest.raises(ImageLoadError, match=name.replace(".", r"\.")):
        load_image(tmp_path / name)


def test_truncated_and_missing(tmp_path):
    Image.new("RGB", (64, 64), "red").save(tmp_path / "full.png")
    (tmp_path / "trunc.png").write_bytes((tmp_path / "full.png").read_bytes()[:60])
    with pytest.raises(ImageLoadError, match="trunc.png"):
        load_image(tmp_path / "trunc.png")
    with pytest.raises(ImageLoadError, match="nope.png: file not found"):
        load_image(tmp_path / "nope.png")


def test_decompression_bomb_rejected(tmp_path, monkeypatch):
    Image.new("L", (100, 100)).save(tmp_path / "big.png")
    with pytest.raises(ImageLoadError, match="decompression-bomb limit"):
        load_image(tmp_path / "big.png", max_image_pixels=5000)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # the PIL-wide setting is honoured too
    with pytest.raises(ImageLoadError, match="big.png"):
        load_image(tmp_path / "big.png")


@posix_only
@pytest.mark.parametrize(
    "raw,kwargs,expected",
    [
        (r"D:\data\x.png", {"path_map": "D:/=/mnt/data/"}, "/mnt/data/data/x.png"),
        ("d:/data/x.png", {"path_map": "D:\\=/srv"}, "/srv/data/x.png"),
        (r"D:\data\x.png", {}, "/mnt/d/data/x.png"),
        (r"sub\x.png", {"image_root": "/root"}, "/root/sub/x.png"),
        ("x.png", {"base_dir": "/csv"}, "/csv/x.png"),
        ("x.png", {"image_root": r"D:\imgs", "path_map": "D:/=/mnt/d/", "base_dir": "/csv"}, "/mnt/d/imgs/x.png"),
        ("/abs/x.png", {"image_root": "/root"}, "/abs/x.png"),
        (' "/a b/x.png" ', {}, "/a b/x.png"),
        ("/data/x.png", {"path_map": [("/data", "/mnt/big")]}, "/mnt/big/x.png"),
    ],
)
def test_resolve_image_path(raw, kwargs, expected):
    assert resolve_image_path(raw, **kwargs).as_posix() == expected


@pytest.mark.skipif(os.name != "nt", reason="Windows keeps Windows paths as-is")
def test_resolve_windows_native():
    assert str(resolve_image_path(r"D:\data\x.png")) == r"D:\data\x.png"


def test_load_images_splits_and_expands(tmp_path):
    import nibabel as nib

    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 6), np.float32), np.eye(4)), str(tmp_path / "v.nii.gz"))
    images = load_images(" a.png ; v.nii.gz ;", base_dir=str(tmp_path), max_slices=3)
    assert len(images) == 4 and all(im.mode == "RGB" for im in images)
    with pytest.raises(ImageLoadError, match="no image path"):
        load_images(" ; ")

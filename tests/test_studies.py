"""hf_vlm.data.studies / study_settings: NIfTI and DICOM studies built in a temp dir.

Checks orientation (marker voxels land where RAS says, shown radiologically), exact HU windowing,
slice selection and relative z, the 2-D-image-as-one-slice case, the settings object, and that
every refused input raises an `ImageLoadError` naming the file.
"""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from hf_vlm.data.images import WINDOW_PRESETS, ImageLoadError, apply_window
from hf_vlm.data.studies import load_study, middle_slice_index
from hf_vlm.data.study_settings import StudyPreprocessing, parse_window

ALL = dict(slice_sampling="all", extent="full", crop="none")  # every slice, nothing cropped


def write_ct_slice(
    path,
    hu,
    *,
    position,
    orientation=(1, 0, 0, 0, 1, 0),
    pixel_spacing=(0.8, 0.7),
    slope=0.5,
    intercept=-1000.0,
    instance=None,
    series_uid="1.2.3.4",
    modality="CT",
    thickness=5.0,
    frames=None,
):
    """One CT slice (rows, cols) as DICOM; stored = (HU - intercept) / slope as signed 16-bit."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    hu = np.asarray(hu, dtype=np.float64)
    stored = np.rint((hu - intercept) / slope).astype(np.int16)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = CTImageStorage, meta.MediaStorageSOPInstanceUID, modality
    ds.SeriesInstanceUID = series_uid
    ds.Rows, ds.Columns = stored.shape[-2:]
    if frames:
        ds.NumberOfFrames = frames
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    ds.ImagePositionPatient, ds.ImageOrientationPatient = list(position), list(orientation)
    ds.PixelSpacing, ds.SliceThickness = list(pixel_spacing), thickness
    if instance is not None:
        ds.InstanceNumber = instance
    ds.PixelData = stored.tobytes()
    ds.save_as(str(path), enforce_file_format=True)
    return path


def write_series(folder, n=6, size=8, step=5.0, skip=(), **kwargs):
    """Axial series stored with a flipped orientation (columns run to the patient's right, rows run
    anterior), superior slice first, InstanceNumber missing. Slice k has its pixel (0, 0) at the
    patient's left-posterior corner; markers: -225 HU there on the top slice, 150 HU at the
    opposite corner (right-anterior) of the bottom slice. Body 40 HU, air -1000 HU."""
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(n):
        if k in skip:
            continue
        hu = np.full((size, size), -1000.0)
        hu[2:-2, 2:-2] = 40.0
        if k == 0:
            hu[0, 0] = -225.0
        if k == n - 1:
            hu[-1, -1] = 150.0
        write_ct_slice(
            folder / f"IM{n - k:04d}.dcm",
            hu,
            position=(100.0, 50.0, 200.0 - step * k),
            orientation=(-1, 0, 0, 0, -1, 0),
            **kwargs,
        )
    return folder


def test_dicom_series_orientation_rescale_and_spacing(tmp_path):
    study = load_study(str(write_series(tmp_path / "ser")), StudyPreprocessing(**ALL))
    px = study.pixels  # (S, C, H, W), slices inferior -> superior, patient right on the image left
    assert px.shape == (6, 3, 8, 8) and px.dtype == torch.float32
    assert study.spacing == pytest.approx((0.7, 0.8, 5.0))  # x = column spacing, y = row spacing
    # top slice (superior, last), patient left-posterior -> bottom-right of the image
    assert px[-1, :, -1, -1].tolist() == [0.75, 0.75, 0.75]  # -225 HU under the lung window
    # bottom slice (inferior, first), patient right-anterior -> top-left
    assert px[0, :, 0, 0].tolist() == [1.0, 1.0, 1.0]  # 150 HU
    assert px[0, 0, -1, -1] == px[-1, 0, 0, 0] == pytest.approx(350 / 1500)  # air
    assert study.z.tolist() == pytest.approx([(k + 0.5) / 6 for k in range(6)])
    # a ';' list of the same files is the same series, whatever order they are written in
    files = sorted((tmp_path / "ser").iterdir())
    listed = load_study(";".join(str(f) for f in files[::-1]), StudyPreprocessing(**ALL))
    assert torch.equal(listed.pixels, px)


def test_dicom_rescale_per_file(tmp_path):
    """Each file's own RescaleSlope / RescaleIntercept: the same HU stored two ways read the same."""
    folder = write_series(tmp_path / "a", n=2, slope=0.5, intercept=-1000.0)
    other = write_series(tmp_path / "b", n=2, slope=0.25, intercept=-1024.0)
    (other / "IM0002.dcm").replace(folder / "IM0002.dcm")  # mixed rescale in one series
    a = load_study(str(folder), StudyPreprocessing(**ALL))
    b = load_study(str(write_series(tmp_path / "c", n=2)), StudyPreprocessing(**ALL))
    assert torch.equal(a.pixels, b.pixels)


def write_nifti(path, data, affine):
    nib.save(nib.Nifti1Image(np.asarray(data, np.float32), np.asarray(affine, float)), str(path))
    return path


def test_nifti_orientation_permuted_affine(tmp_path):
    # voxel axes: i -> inferior (5 mm), j -> patient right (0.7 mm), k -> posterior (0.8 mm)
    affine = [[0, 0.7, 0, 10], [0, 0, -0.8, 20], [-5, 0, 0, 30], [0, 0, 0, 1]]
    data = np.full((6, 8, 8), -1000.0)
    data[:, 2:6, 2:6] = 40.0
    data[0, 7, 0] = -225.0  # superior, right-most, anterior-most
    data[5, 0, 7] = 150.0  # inferior, left-most, posterior-most
    study = load_study(write_nifti(tmp_path / "v.nii.gz", data, affine), StudyPreprocessing(**ALL))
    assert study.pixels.shape == (6, 3, 8, 8) and study.spacing == pytest.approx((0.7, 0.8, 5.0))
    assert study.pixels[-1, 0, 0, 0] == 0.75  # superior slice, anterior (top), patient right (left)
    assert study.pixels[0, 0, -1, -1] == 1.0  # inferior slice, posterior (bottom), patient left (right)


# HU -> exact value in [0, 1] under each preset
EXACT = {
    "lung": [(-2000, 0.0), (-1350, 0.0), (-975, 0.25), (-600, 0.5), (-225, 0.75), (150, 1.0), (900, 1.0)],
    "mediastinum": [(-600, 0.0), (-160, 0.0), (-60, 0.25), (40, 0.5), (140, 0.75), (240, 1.0)],
    "bone": [(-1000, 0.0), (-500, 0.0), (-50, 0.25), (400, 0.5), (850, 0.75), (1300, 1.0)],
}


@pytest.mark.parametrize("window", sorted(EXACT))
def test_windowing_exact_values(tmp_path, window):
    hu = [h for h, _ in EXACT[window]]
    data = np.full((len(hu), len(hu), 1), -1000.0)
    data[:, 0, 0] = hu  # along x at the most posterior row (y = 0)
    data[0, 1, 0] = 40.0  # some body
    study = load_study(write_nifti(tmp_path / "w.nii", data, np.eye(4)), StudyPreprocessing(windows=window, **ALL))
    # x runs to the patient's right, shown on the image left (column W-1-i holds voxel i); y = 0 is the bottom row
    assert study.pixels[0, 0, -1].flip(0).tolist() == [v for _, v in EXACT[window]]
    level, width = WINDOW_PRESETS[window]
    assert study.to_uint8()[0, 0, -1].flip(0).tolist() == apply_window(np.array(hu, float), level, width).tolist()


def test_several_windows_as_channels_and_custom_window(tmp_path):
    data = np.full((3, 3, 1), -1000.0)
    data[:, 0, 0] = [400.0, -50.0, 40.0]
    path = write_nifti(tmp_path / "m.nii.gz", data, np.eye(4))
    study = load_study(path, StudyPreprocessing(windows=("lung", "mediastinum", "W1800/L400"), **ALL))
    pixel = lambda i: study.pixels[0, :, 2, 2 - i].tolist()  # noqa: E731  (voxel (i, 0))
    assert pixel(0) == [1.0, 1.0, 0.5]
    assert pixel(1) == pytest.approx([1300 / 1500, 110 / 400, 0.25])
    assert study.settings.windows[2].name == "bone"  # W1800/L400 is the bone preset
    one = load_study(path, StudyPreprocessing(windows=[(-600, 1500)], channels=1, **ALL))
    assert one.pixels.shape == (1, 1, 3, 3) and one.pixels[0, 0, 2, 2] == 1.0 and type(one.pixels) is torch.Tensor


def graded_volume(tmp_path, depth=14, body=(2, 12), lung=None):
    """Slice k of the body holds 10*k HU (so a pixel tells which slice was taken); air elsewhere."""
    data = np.full((16, 16, depth), -1000.0)
    for k in range(*body):
        data[3:13, 3:13, k] = 10.0 * k
    if lung:
        data[5:11, 5:11, lung[0] : lung[1]] = -850.0
        data[7, 7, lung[0] : lung[1]] = [10.0 * k for k in range(*lung)]
    return write_nifti(tmp_path / "g.nii.gz", data, np.diag([1.0, 1.0, 5.0, 1.0]))


def taken(study):
    """Which slice (10*k HU) each output slice is, read through the window W2000/L0: v = (HU + 1000) / 2000."""
    h, w = study.pixels.shape[-2:]
    return [round((float(study.pixels[s, 0, h // 2, w // 2]) * 2000 - 1000) / 10) for s in range(study.num_slices)]


@pytest.mark.parametrize(
    "kwargs,indices,extent",
    [
        ({"num_slices": 5}, [3, 5, 7, 9, 11], (2, 12)),  # uniform over the body extent: bin centres
        ({"num_slices": 50}, list(range(2, 12)), (2, 12)),  # more asked than there are: all of them
        ({"slice_sampling": "all"}, list(range(2, 12)), (2, 12)),
        ({"slice_sampling": "stride", "slice_stride": 3}, [2, 5, 8, 11], (2, 12)),
        ({"slice_sampling": "middle"}, [7], (0, 14)),  # the volume's middle slice, whatever the extent
        ({"num_slices": 2, "extent": "full"}, [3, 10], (0, 14)),
    ],
)
def test_slice_selection_and_relative_z(tmp_path, kwargs, indices, extent):
    study = load_study(graded_volume(tmp_path), StudyPreprocessing(windows="W2000/L0", **kwargs))
    assert list(study.slice_indices) == indices and study.extent == extent
    assert taken(study) == indices
    assert study.z.tolist() == pytest.approx([(i - extent[0] + 0.5) / (extent[1] - extent[0]) for i in indices])


def test_mip_slabs_project_each_slab_and_keep_a_one_slice_nodule(tmp_path):
    """`mip`: the extent cut into num_slices equal slabs, each its maximum-intensity projection."""
    path = graded_volume(tmp_path)  # slice k of the body (2..11) holds 10*k HU: the MIP of a slab is its top slice
    study = load_study(path, StudyPreprocessing(windows="W2000/L0", slice_sampling="mip", num_slices=3))
    assert study.extent == (2, 12) and study.num_slices == 3
    assert taken(study) == [4, 7, 11]  # slabs [2,5) [5,8) [8,12): brightest (= last) slice of each
    assert list(study.slice_indices) == [3, 6, 9]  # each slab's centre slice
    assert study.z.tolist() == pytest.approx([0.15, 0.45, 0.8])  # slab centres, relative to the extent
    # a bright voxel on ONE slice survives in its slab (a uniform sample of 3 slices would miss it)
    data = np.full((16, 16, 12), -1000.0)
    data[2:14, 2:14, :] = 40.0  # body wall
    data[4:12, 4:12, :] = -850.0  # lung
    data[5, 10, 7] = 80.0  # slab [4, 8); uniform takes slices 2, 6, 10
    nodule = write_nifti(tmp_path / "n.nii.gz", data, np.diag([1.0, 1.0, 5.0, 1.0]))
    settings = {"windows": "lung", "crop": "none"}
    mip = load_study(nodule, StudyPreprocessing(slice_sampling="mip", num_slices=3, **settings))
    uniform = load_study(nodule, StudyPreprocessing(slice_sampling="uniform", num_slices=3, **settings))
    lung_v, nodule_v = (-850 + 1350) / 1500, (80 + 1350) / 1500
    assert mip.extent == (0, 12) and uniform.slice_indices == (2, 6, 10)
    lung_max = [float(x[:, 5:11, 5:11].max()) for x in mip.pixels]  # inside the lung, away from the wall
    assert lung_max == pytest.approx([lung_v, nodule_v, lung_v])
    assert float(uniform.pixels[:, :, 5:11, 5:11].max()) == pytest.approx(lung_v)
    # more slabs than slices: one slice each, the same pixels as `all`
    every = load_study(path, StudyPreprocessing(windows="W2000/L0", slice_sampling="all"))
    many = load_study(path, StudyPreprocessing(windows="W2000/L0", slice_sampling="mip", num_slices=50))
    assert torch.equal(many.pixels, every.pixels) and many.z.tolist() == pytest.approx(every.z.tolist())
    # PNG slices of one study: the same slabs over the listed slices
    files = []
    for k in range(4):
        arr = np.zeros((6, 6), np.uint8)
        arr[1, k] = 200 + k
        files.append(str(tmp_path / f"s{k}.png"))
        Image.fromarray(arr).save(files[-1])
    raster = load_study(";".join(files), StudyPreprocessing(slice_sampling="mip", num_slices=2, channels=1))
    assert raster.num_slices == 2 and raster.z.tolist() == pytest.approx([0.25, 0.75])
    assert (raster.pixels[0, 0, 1, :2] * 255).round().tolist() == [200, 201]  # slab [0,2) keeps both bright voxels
    assert (raster.pixels[1, 0, 1, 2:4] * 255).round().tolist() == [202, 203]


def test_lung_extent_and_fallback(tmp_path):
    path = graded_volume(tmp_path, lung=(5, 9))
    study = load_study(path, StudyPreprocessing(windows="W2000/L0", slice_sampling="all", extent="lung"))
    assert study.extent == (5, 9) and study.extent_used == "lung" and taken(study) == [5, 6, 7, 8]
    no_lung = load_study(graded_volume(tmp_path), StudyPreprocessing(slice_sampling="all", extent="lung"))
    assert no_lung.extent_used == "body" and no_lung.extent == (2, 12)


def test_body_crop_square_pad_resize_and_resampling(tmp_path):
    data = np.full((40, 30, 4), -1000.0)
    data[10:30, 12:20, :] = 40.0  # body box 20 x 8 voxels
    path = write_nifti(tmp_path / "c.nii.gz", data, np.diag([1.0, 1.0, 4.0, 1.0]))
    cropped = load_study(path, StudyPreprocessing(slice_sampling="all"))
    assert cropped.pixels.shape[-2:] == (24, 24)  # box + 2-voxel margin, padded square with air
    air = 350 / 1500
    assert cropped.pixels[0, 0, 0, 0] == pytest.approx(air) and cropped.pixels[0, 0, 12, 12] == pytest.approx(
        1390 / 1500
    )
    small = load_study(path, StudyPreprocessing(slice_sampling="all", image_size=12))
    assert small.pixels.shape == (4, 3, 12, 12)
    fine = load_study(path, StudyPreprocessing(slice_sampling="all", target_spacing=(None, None, 2.0), crop="none"))
    assert fine.num_volume_slices == 7 and fine.spacing == pytest.approx((1.0, 1.0, 2.0))


def test_two_d_images_are_one_slice_studies(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    study = load_study(str(tmp_path / "a.png"))
    assert study.pixels.shape == (1, 3, 5, 7) and study.z.tolist() == [0.5] and study.spacing is None
    assert torch.equal(study.to_uint8()[0].permute(1, 2, 0), torch.from_numpy(rgb))
    hu = np.full((6, 6), -1000.0)
    hu[1:5, 1:5] = 40.0
    hu[2, 2] = -600.0  # an axial slice with the standard orientation is already shown radiologically
    dicom = load_study(
        str(write_ct_slice(tmp_path / "one.dcm", hu, position=(0, 0, 0))), StudyPreprocessing(crop="none")
    )
    assert dicom.pixels.shape == (1, 3, 6, 6) and dicom.z.tolist() == [0.5] and dicom.pixels[0, 0, 2, 2] == 0.5
    for name in ("b.png", "c.png"):
        Image.fromarray(rgb).save(tmp_path / name)
    listed = load_study("a.png; b.png ;c.png", base_dir=str(tmp_path))
    assert listed.num_slices == 3 and listed.z.tolist() == pytest.approx([1 / 6, 0.5, 5 / 6])
    grey = load_study(str(tmp_path / "a.png"), StudyPreprocessing(channels=1, image_size=4))
    assert grey.pixels.shape == (1, 1, 4, 4) and len(grey.to_pil()) == 1


def test_settings_validation_round_trip_and_fingerprint():
    settings = StudyPreprocessing(
        windows=["lung", "W400/L40", (400, 1800)],
        num_slices=16,
        extent="lung",
        target_spacing=(0.7, 0.7, None),
        image_size=224,
    )
    again = StudyPreprocessing.from_dict(json.loads(json.dumps(settings.to_dict())))
    assert again == settings and again.fingerprint() == settings.fingerprint()
    assert [w.name for w in settings.windows] == ["lung", "mediastinum", "bone"]
    assert settings.fingerprint()["windows"] == [[-600.0, 1500.0], [40.0, 400.0], [400.0, 1800.0]]
    assert StudyPreprocessing(slice_stride=5).fingerprint() == StudyPreprocessing().fingerprint()  # unused field
    assert StudyPreprocessing(num_slices=8).fingerprint() != StudyPreprocessing().fingerprint()
    assert parse_window("L-600/W1500") == parse_window("w1500 / l-600") == parse_window("lung")
    assert StudyPreprocessing(windows=(-600, 1500)).windows[0].name == "lung"  # one (level, width) pair
    assert parse_window("W350/L40.5") == parse_window((40.5, 350)) and parse_window("W350/L40.5").name is None
    for kwargs, message in [
        ({"slice_sampling": "random"}, "uniform, all, stride, middle, mip"),
        ({"extent": "chest"}, "body, lung, full"),
        ({"crop": "yes"}, "body, none"),
        ({"windows": "soft"}, "lung, mediastinum, bone"),
        ({"windows": "W0/L40"}, "width must be > 0"),
        ({"num_slices": 0}, "num_slices must be an integer >= 1"),
        ({"windows": ["lung", "bone"]}, "2 windows for 3 channels"),
        ({"target_spacing": (1, 2)}, "target_spacing must be None or 3 values"),
    ]:
        with pytest.raises(ValueError, match=message):
            StudyPreprocessing(**kwargs)
    with pytest.raises(ValueError, match="allowed: windows, channels"):
        StudyPreprocessing.from_dict({"window": "lung"})
    legacy = StudyPreprocessing.legacy_middle_slice()
    assert legacy.slice_sampling == "middle" and legacy.crop == "none" and middle_slice_index(10) == 5


# --- refused input: each error names the file ------------------------------------------------------
def _raises(match, field, settings=None, **kwargs):
    with pytest.raises(ImageLoadError, match=match):
        load_study(str(field), settings, **kwargs)


def test_series_errors_name_the_file(tmp_path):
    hu = np.full((8, 8), -1000.0)
    mr = write_series(tmp_path / "mr")
    write_ct_slice(mr / "ZZ_mr.dcm", hu, position=(100, 50, 300), modality="MR")
    _raises(r"ZZ_mr\.dcm: DICOM modality MR", mr)
    sr = write_series(tmp_path / "sr")
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    report = Dataset()
    report.file_meta = FileMetaDataset()
    report.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR
    report.file_meta.MediaStorageSOPInstanceUID, report.file_meta.TransferSyntaxUID = (
        generate_uid(),
        ExplicitVRLittleEndian,
    )
    report.SOPClassUID, report.Modality = report.file_meta.MediaStorageSOPClassUID, "SR"
    report.save_as(str(sr / "report.dcm"), enforce_file_format=True)
    _raises(r"report\.dcm: DICOM modality SR", sr)
    shapes = write_series(tmp_path / "shapes")
    write_ct_slice(
        shapes / "IM0009.dcm", np.full((6, 8), 40.0), position=(100, 50, 170), orientation=(-1, 0, 0, 0, -1, 0)
    )
    _raises(
        r"shapes: mixed image sizes in one series: 8x8 \(6 files\) and 8x6 \(1 file\(s\), e.g. IM0009\.dcm\)", shapes
    )
    _raises(
        r"gap: missing slice: IM0002\.dcm and IM0004\.dcm are 10\.00 mm apart where the series' spacing is 5\.00 mm",
        write_series(tmp_path / "gap", n=7, skip=(4,)),
    )
    two = write_series(tmp_path / "two")
    write_ct_slice(two / "other.dcm", hu, position=(100, 50, 300), series_uid="9.9")
    _raises(r"two: mixed SeriesInstanceUIDs", two)
    dup = write_series(tmp_path / "dup")
    write_ct_slice(dup / "copy.dcm", hu, position=(100, 50, 200), orientation=(-1, 0, 0, 0, -1, 0))
    _raises(r"same position", dup)
    _raises(
        r"multi\.dcm: multi-frame DICOM \(2 frames\)",
        write_ct_slice(tmp_path / "multi.dcm", np.full((2, 4, 4), 40.0), position=(0, 0, 0), frames=2),
    )


def test_empty_missing_and_corrupt_inputs_name_the_file(tmp_path):
    (tmp_path / "empty").mkdir()
    _raises(r"empty: folder is empty", tmp_path / "empty")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("hello")
    _raises(r"notes: folder holds no DICOM files", tmp_path / "notes")
    _raises(
        r"air\.nii\.gz: empty volume: no voxel above -500 HU",
        write_nifti(tmp_path / "air.nii.gz", np.linspace(-1000, -900, 48).reshape(4, 4, 3), np.eye(4)),
    )
    _raises(
        r"flat\.nii\.gz: empty volume: every voxel is 0",
        write_nifti(tmp_path / "flat.nii.gz", np.zeros((4, 4, 3)), np.eye(4)),
    )
    _raises(
        r"mr\.nii\.gz: lowest value 10 is above -500 HU.*not a CT",
        write_nifti(tmp_path / "mr.nii.gz", np.linspace(10, 900, 48).reshape(4, 4, 3), np.eye(4)),
    )
    _raises(
        r"t\.nii\.gz: NIfTI of shape \(4, 4, 3, 2\)",
        write_nifti(tmp_path / "t.nii.gz", np.full((4, 4, 3, 2), -1000.0), np.eye(4)),
    )
    (tmp_path / "bad.nii.gz").write_bytes(b"garbage")
    _raises(r"bad\.nii\.gz: cannot read NIfTI", tmp_path / "bad.nii.gz")
    _raises(r"nope\.nii\.gz: file not found", tmp_path / "nope.nii.gz")
    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    Image.new("RGB", (5, 4)).save(tmp_path / "b.png")
    _raises(r"mixed image sizes in one study.*b\.png", f"{tmp_path / 'a.png'};{tmp_path / 'b.png'}")
    _raises(r"a ';' list holds the 2-D slices", f"{tmp_path / 'a.png'};{tmp_path / 'mr.nii.gz'}")
    _raises(r"no image path", " ; ")


def test_decompression_bomb_limits(tmp_path):
    Image.new("L", (100, 100)).save(tmp_path / "big.png")
    _raises(r"big\.png: .*decompression-bomb limit", tmp_path / "big.png", max_image_pixels=5000)
    hu = np.full((80, 80), -1000.0)
    hu[10:70, 10:70] = 40.0
    _raises(
        r"ct\.dcm: 80x80 = 6400 pixels exceeds the decompression-bomb limit of 5000",
        write_ct_slice(tmp_path / "ct.dcm", hu, position=(0, 0, 0)),
        max_image_pixels=5000,
    )
    _raises(
        r"v\.nii\.gz: .* voxels exceed the study limit of 100",
        write_nifti(tmp_path / "v.nii.gz", np.full((8, 8, 4), -1000.0), np.eye(4)),
        max_voxels=100,
    )
    data = np.full((8, 8, 4), -1000.0)
    data[2:6, 2:6] = 40.0
    _raises(
        r"w\.nii\.gz: resampling .* over the limit of 1000",
        write_nifti(tmp_path / "w.nii.gz", data, np.eye(4)),
        StudyPreprocessing(target_spacing=0.5),
        max_voxels=1000,
    )

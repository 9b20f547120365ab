"""One CSV row's image field -> one `Study`: the slices a model sees, their z positions, the settings.

Why: a report describes a whole CT study, so one row is one study, whatever its form: a NIfTI
volume (nnU-Net ``imagesTr/case_0000.nii.gz``), a DICOM series folder, a single DICOM or
PNG/JPG, or a ``;``-separated list of slices (DICOM files form a series and are ordered by
position; PNG/JPG files are slices in the order written). MONAI does the work: `NibabelReader`
and `PydicomReader` read the files (HU = stored x RescaleSlope + RescaleIntercept, per DICOM
file), `Orientation` turns the volume to RAS, `Spacing` resamples, `generate_spatial_bounding_box`
and `SpatialCrop` crop to the body, `SpatialPad` / `Resize` make square slices and
`ScaleIntensityRange` applies each window (HU in [L - W/2, L + W/2] -> [0, 1], clipped).

Output conventions: slices are axial planes of the RAS volume ordered inferior -> superior,
shown radiologically (patient right on the image left, anterior at the top). The relative z of
a slice is its centre as a fraction of the sampled extent (`(index - start + 0.5) / length`), so
a 2-D image, a study of one slice, has z = 0.5. PNG/JPG slices are display images: no HU, no
window, no crop (they are used as read, RGB or grey).

Refused, with an `ImageLoadError` naming the file or folder (the dataset adds the CSV row_id):
- a DICOM whose Modality is not CT (MR, PT, SR, ...), without pixel data, colour, or
  multi-frame (enhanced CT keeps its rescale and geometry in per-frame functional groups:
  convert such files with dcm2niix to NIfTI or to single-frame DICOM);
- a series with several SeriesInstanceUIDs, mixed image sizes, orientations or pixel spacings,
  two slices at one position, a missing slice (a gap in the positions), irregular spacing, or
  slices without ImagePositionPatient / ImageOrientationPatient;
- a NIfTI that is not one 2-D/3-D image (e.g. 4-D);
- an empty volume (no voxels, NaN/inf, constant, nothing above -500 HU) or one without air
  (nothing below -500 HU: not CT in Hounsfield units, e.g. an MR or a missing intercept);
- an empty folder or one without DICOM files (other files in a series folder are ignored);
- more pixels per slice than the decompression-bomb limit, or more voxels than `max_voxels`
  (also after resampling).
"""

from __future__ import annotations

import logging
import os
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .images import (
    ImageLoadError,
    PathMap,
    _require,
    is_dicom,
    is_nifti,
    load_image,
    resolve_image_path,
    sample_indices,
    split_image_paths,
)
from .study_settings import StudyPreprocessing

logger = logging.getLogger(__name__)

AIR_HU = -1000.0  # padding value, so padded borders look like the air around the patient
BODY_HU = -500.0  # above: body (fat -100, soft tissue 40, bone); below: air and lung
LUNG_HU = (-950.0, -500.0)  # lung parenchyma; outside air is below
LUNG_MIN_FRACTION = 0.01  # a slice is "lung" when eroded lung voxels fill 1% of the body box
MAX_STUDY_VOXELS = 512 * 512 * 2048  # 2 GiB as float32
ACCEPTED_MODALITIES = ("CT",)
_RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))


def _plain(tensor) -> torch.Tensor:
    """A MONAI `MetaTensor` -> plain `torch.Tensor` (a Study carries no MONAI metadata)."""
    return tensor.as_tensor() if hasattr(tensor, "as_tensor") else torch.as_tensor(tensor)


@dataclass
class Study:
    """The selected slices of one study, ready for an image processor."""

    pixels: torch.Tensor  # (S, C, H, W) float32 in [0, 1]
    z: torch.Tensor  # (S,) float32, relative z of each slice in the sampled extent
    slice_indices: tuple  # indices of the slices in the (RAS, resampled) volume
    num_volume_slices: int
    spacing: tuple | None  # (x, y, z) mm of that volume; None for PNG/JPG slices
    extent: tuple  # [start, stop) slice range sampled
    extent_used: str  # "body", "lung", "full" ("lung" falls back to "body" when no lung is found)
    source: str
    settings: StudyPreprocessing

    @property
    def num_slices(self) -> int:
        return int(self.pixels.shape[0])

    def to_uint8(self) -> torch.Tensor:
        """(S, C, H, W) uint8, value = floor(255 * v + 0.5), as `images.apply_window` rounds."""
        return torch.floor(self.pixels * 255.0 + 0.5).to(torch.uint8)

    def to_pil(self) -> list[Image.Image]:
        """One image per slice (RGB for 3 channels, else the first channel in grey), e.g. for a strip."""
        arr = self.to_uint8().permute(0, 2, 3, 1).numpy()  # (S, H, W, C)
        return [Image.fromarray(np.ascontiguousarray(a if a.shape[-1] == 3 else a[..., 0])) for a in arr]


def middle_slice_index(num_slices: int) -> int:
    """The slice `slice_sampling="middle"` takes (and the old loader took): `num_slices // 2`."""
    return sample_indices(num_slices, 1)[0]


def slab_ranges(start: int, stop: int, num_slabs: int) -> list[tuple[int, int]]:
    """`mip` sampling: the extent [start, stop) cut into `num_slabs` equal, contiguous slabs
    (one slice each when the extent has fewer slices)."""
    n = stop - start
    if num_slabs >= n:
        return [(start + i, start + i + 1) for i in range(n)]
    cuts = [start + (k * n) // num_slabs for k in range(num_slabs + 1)]
    return list(zip(cuts[:-1], cuts[1:]))


def _take_slices(
    stack: torch.Tensor, settings: StudyPreprocessing, start: int, stop: int, num_volume_slices: int
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """`(n, ...)` slices -> the sampled `(S, ...)` slices, their relative z in [start, stop) and the
    index of each one's (centre) slice.

    Every sampling is a list of slabs: one slice each, or for `mip` the `slab_ranges`, given as
    their maximum-intensity projection (of a one-slice slab: that slice). Applied to HU before
    windowing: a CT window is monotonic, so MIP then window equals window then MIP. z is each
    slab's centre."""
    if settings.slice_sampling == "mip":
        ranges = slab_ranges(start, stop, settings.num_slices)
    else:
        ranges = [(i, i + 1) for i in select_slices(settings, start, stop, num_volume_slices)]
    picked = torch.stack([stack[a:b].amax(0) for a, b in ranges])
    z = torch.tensor([((a + b) / 2 - start) / (stop - start) for a, b in ranges], dtype=torch.float32)
    return picked, z, [(a + b - 1) // 2 for a, b in ranges]


def select_slices(settings: StudyPreprocessing, start: int, stop: int, num_volume_slices: int) -> list[int]:
    """Indices the sampling takes from the extent [start, stop) of a volume of `num_volume_slices`
    (single-slice samplings; `mip` slabs are `slab_ranges`)."""
    n = stop - start
    if settings.slice_sampling == "middle":
        return [middle_slice_index(num_volume_slices)]
    if settings.slice_sampling == "uniform":
        return [start + i for i in sample_indices(n, settings.num_slices)]
    if settings.slice_sampling == "all":
        return list(range(start, stop))
    offset = ((n - 1) % settings.slice_stride) // 2  # centre the strided slices in the extent
    return list(range(start + offset, stop, settings.slice_stride))


def load_study(
    field,
    settings: StudyPreprocessing | dict | None = None,
    *,
    image_root: str | None = None,
    path_map: PathMap = None,
    base_dir: str | None = None,
    max_image_pixels: int | None = None,
    max_voxels: int = MAX_STUDY_VOXELS,
) -> Study:
    """Load the study of one image field (a path, or ``;``-separated paths) with `settings`.

    Paths resolve as in `images.resolve_image_path`; `max_image_pixels` is the per-slice
    decompression-bomb limit (default `PIL.Image.MAX_IMAGE_PIXELS`).
    """
    if not isinstance(settings, StudyPreprocessing):
        settings = StudyPreprocessing.from_dict(settings)
    raw = [os.fspath(field)] if isinstance(field, os.PathLike) else split_image_paths(field)
    if not raw:
        raise ImageLoadError(f"no image path in {field!r}")
    paths = [resolve_image_path(p, image_root=image_root, path_map=path_map, base_dir=base_dir) for p in raw]
    for path in paths:
        if not path.exists():
            raise ImageLoadError(f"{path}: file not found")
    source = ";".join(str(p) for p in paths)
    label = str(paths[0]) if len(paths) == 1 else f"{paths[0]} (+{len(paths) - 1} more slice files)"  # for errors
    if len(paths) == 1 and paths[0].is_dir():
        volume, affine = _read_dicom_series(_folder_dicom_files(paths[0]), paths[0], max_image_pixels, max_voxels)
    elif len(paths) == 1 and is_nifti(paths[0]):
        volume, affine = _read_nifti(paths[0], max_voxels)
    elif all(p.is_file() and is_dicom(p) for p in paths):
        volume, affine = _read_dicom_series(paths, label, max_image_pixels, max_voxels)
    elif all(p.is_file() and not is_nifti(p) and not is_dicom(p) for p in paths):
        return _raster_study(paths, settings, max_image_pixels, source, label)
    else:
        raise ImageLoadError(
            f"{label}: a ';' list holds the 2-D slices of one study, all DICOM or all PNG/JPG; "
            "a volume (NIfTI file, DICOM folder) must be the only path of its row"
        )
    return _volume_study(volume, affine, settings, source, label, max_voxels)


def preprocess_volume(
    volume: np.ndarray, affine: np.ndarray, settings: StudyPreprocessing | dict | None = None
) -> Study:
    """An in-memory HU volume `(X, Y, Z)` with its affine -> the `Study` `load_study` gives for it as a file."""
    if not isinstance(settings, StudyPreprocessing):
        settings = StudyPreprocessing.from_dict(settings)
    array = np.asarray(volume, dtype=np.float32)
    return _volume_study(array, np.asarray(affine, dtype=np.float64), settings, "<array>", "<array>", MAX_STUDY_VOXELS)


# --- DICOM ------------------------------------------------------------------------------------------
def _folder_dicom_files(folder: Path) -> list[Path]:
    files = sorted(f for f in folder.iterdir() if f.is_file() and not f.name.startswith("."))
    if not files:
        raise ImageLoadError(f"{folder}: folder is empty")
    dicoms = [f for f in files if is_dicom(f)]
    if not dicoms:
        raise ImageLoadError(
            f"{folder}: folder holds no DICOM files ({len(files)} other file(s), e.g. {files[0].name})"
        )
    return dicoms


def _pixel_limit(max_image_pixels: int | None) -> int | None:
    return Image.MAX_IMAGE_PIXELS if max_image_pixels is None else max_image_pixels


def _check_dicom_header(ds, path: Path, n_files: int, max_image_pixels: int | None, max_voxels: int) -> None:
    modality = str(ds.get("Modality", "") or "").upper()
    if modality not in ACCEPTED_MODALITIES:
        raise ImageLoadError(
            f"{path}: DICOM modality {modality or '(missing)'} (SOP class {ds.get('SOPClassUID', '?')}); hf_vlm reads "
            f"{'/'.join(ACCEPTED_MODALITIES)} studies only: remove other objects (MR, PET, reports, ...) from the series"  # noqa: E501
        )
    if "PixelData" not in ds:
        raise ImageLoadError(f"{path}: DICOM object without pixel data (SOP class {ds.get('SOPClassUID', '?')})")
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        raise ImageLoadError(
            f"{path}: multi-frame DICOM ({ds.NumberOfFrames} frames) is not read: enhanced CT keeps RescaleSlope/"
            "RescaleIntercept and slice positions in per-frame functional groups; convert it with dcm2niix (to "
            "NIfTI) or to single-frame DICOM files"
        )
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        raise ImageLoadError(f"{path}: colour DICOM (SamplesPerPixel {ds.SamplesPerPixel}) is not a CT image in HU")
    pixels = int(ds.get("Rows", 0) or 0) * int(ds.get("Columns", 0) or 0)
    limit = _pixel_limit(max_image_pixels)
    if limit and pixels > limit:
        raise ImageLoadError(
            f"{path}: {ds.Rows}x{ds.Columns} = {pixels} pixels exceeds the decompression-bomb limit "
            f"of {limit} (max_image_pixels / PIL.Image.MAX_IMAGE_PIXELS)"
        )
    if pixels * n_files > max_voxels:
        raise ImageLoadError(
            f"{path}: {n_files} slices of {pixels} pixels exceed the study limit of {max_voxels} voxels"
        )


def _same(slices: list, key, what: str, source) -> None:
    counts = Counter(key(s) for s in slices)
    if len(counts) > 1:
        (common, n), *rest = counts.most_common()
        odd = next(s for s in slices if key(s) == rest[0][0])
        raise ImageLoadError(
            f"{source}: mixed {what} in one series: {common} ({n} files) and {rest[0][0]} "
            f"({rest[0][1]} file(s), e.g. {odd['file'].name})"
        )


def _read_dicom_series(files: list[Path], source, max_image_pixels, max_voxels) -> tuple[np.ndarray, np.ndarray]:
    """Validated, position-ordered DICOM slices -> (X, Y, Z) HU volume and its RAS affine."""
    _require("pydicom")
    _require("monai")
    from monai.data import PydicomReader

    reader = PydicomReader()  # LPS -> RAS affine, (rows, cols) swapped to (x, y) like NibabelReader
    slices = []
    for path in files:
        try:
            ds = reader.read(str(path))
        except Exception as e:  # pydicom: InvalidDicomError, truncated files, bad headers
            raise ImageLoadError(f"{path}: cannot read DICOM ({type(e).__name__}: {e})") from e
        _check_dicom_header(ds, path, len(files), max_image_pixels, max_voxels)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # missing geometry is checked below, with the file's name
                array, meta = reader.get_data(ds)
        except Exception as e:  # codecs, missing/short pixel data
            raise ImageLoadError(f"{path}: cannot read DICOM pixel data ({type(e).__name__}: {e})") from e
        slices.append(
            {
                "file": path,
                "ds": ds,
                "array": np.asarray(array, dtype=np.float32),
                "affine": np.asarray(meta["affine"], dtype=np.float64),
                "geometry": "ImagePositionPatient" in ds and "ImageOrientationPatient" in ds,
            }
        )
    _same(slices, lambda s: str(s["ds"].get("SeriesInstanceUID", "")), "SeriesInstanceUIDs", source)
    _same(slices, lambda s: "x".join(map(str, s["array"].shape)), "image sizes", source)
    first = slices[0]
    affine = first["affine"].copy()
    normal = np.cross(affine[:3, 0], affine[:3, 1])
    normal /= np.linalg.norm(normal) or 1.0
    if len(slices) == 1:
        if first["geometry"]:
            affine[:3, 2] = normal * float(first["ds"].get("SliceThickness", 1.0) or 1.0)
        return first["array"][..., None], affine
    lacking = next((s for s in slices if not s["geometry"]), None)
    if lacking is not None:
        raise ImageLoadError(
            f"{lacking['file']}: no ImagePositionPatient / ImageOrientationPatient, so the slices "
            f"of {source} cannot be ordered"
        )
    _same(slices, lambda s: str(np.round(s["affine"][:3, :2], 4).tolist()), "orientations or pixel spacings", source)
    positions = np.array([s["affine"][:3, 3] @ normal for s in slices])
    order = np.argsort(positions, kind="stable")
    slices, positions = [slices[i] for i in order], positions[order]
    gaps = np.diff(positions)
    step = float(np.median(gaps))
    names = lambda i: f"{slices[i]['file'].name} and {slices[i + 1]['file'].name}"  # noqa: E731
    if gaps.min() < 1e-3:
        i = int(np.argmin(gaps))
        raise ImageLoadError(
            f"{source}: {names(i)} lie at the same position ({positions[i]:.2f} mm): a duplicated "
            "slice or two series in one folder"
        )
    if gaps.max() > 1.5 * step:
        i = int(np.argmax(gaps))
        raise ImageLoadError(
            f"{source}: missing slice: {names(i)} are {gaps[i]:.2f} mm apart where the series' "
            f"spacing is {step:.2f} mm (about {round(gaps[i] / step) - 1} slice(s) missing)"
        )
    if np.abs(gaps - step).max() > 0.1 * step + 0.01:
        i = int(np.argmax(np.abs(gaps - step)))
        raise ImageLoadError(
            f"{source}: irregular slice spacing: {names(i)} are {gaps[i]:.2f} mm apart, the "
            f"series' spacing is {step:.2f} mm"
        )
    affine = slices[0]["affine"].copy()
    affine[:3, 2] = (slices[-1]["affine"][:3, 3] - slices[0]["affine"][:3, 3]) / (len(slices) - 1)
    return np.stack([s["array"] for s in slices], axis=-1), affine


# --- NIfTI ------------------------------------------------------------------------------------------
def _read_nifti(path: Path, max_voxels: int) -> tuple[np.ndarray, np.ndarray]:
    _require("nibabel")
    _require("monai")
    from monai.data import NibabelReader

    reader = NibabelReader()
    try:
        image = reader.read(str(path))  # header only; the data are read by get_data
        shape = tuple(int(v) for v in image.shape)
    except Exception as e:  # nibabel: ImageFileError, gzip errors
        raise ImageLoadError(f"{path}: cannot read NIfTI volume ({type(e).__name__}: {e})") from e
    if len(shape) < 2 or any(v > 1 for v in shape[3:]):
        raise ImageLoadError(
            f"{path}: NIfTI of shape {shape} is not one 2-D/3-D image (a 4-D series?); save one volume per study"
        )
    if int(np.prod(shape)) > max_voxels:
        raise ImageLoadError(f"{path}: {shape} = {int(np.prod(shape))} voxels exceed the study limit of {max_voxels}")
    try:
        array, meta = reader.get_data(image)
    except Exception as e:  # truncated data, zlib errors
        raise ImageLoadError(f"{path}: cannot read NIfTI volume data ({type(e).__name__}: {e})") from e
    spatial = shape[:3] if len(shape) >= 3 else shape + (1,)
    return np.asarray(array, dtype=np.float32).reshape(spatial), np.asarray(meta["affine"], dtype=np.float64)


# --- preprocessing ----------------------------------------------------------------------------------
def _check_hu(volume: np.ndarray, source: str) -> None:
    if volume.size == 0:
        raise ImageLoadError(f"{source}: empty volume (shape {volume.shape})")
    if not np.isfinite(volume).all():
        raise ImageLoadError(f"{source}: volume holds NaN or infinite values")
    low, high = float(volume.min()), float(volume.max())
    if low == high:
        raise ImageLoadError(f"{source}: empty volume: every voxel is {low:g}")
    if high <= BODY_HU:
        raise ImageLoadError(f"{source}: empty volume: no voxel above {BODY_HU:g} HU (air only)")
    if low > BODY_HU:
        raise ImageLoadError(
            f"{source}: lowest value {low:g} is above {BODY_HU:g} HU, so there is no air: not a CT in "
            "Hounsfield units (an MR image, or CT stored without its RescaleIntercept?)"
        )


def _lung_extent(box: torch.Tensor) -> tuple[int, int] | None:
    """[first, last + 1) of the slices whose eroded lung-density area fills `LUNG_MIN_FRACTION` of
    `box` (1, x, y, Z), the body's in-plane bounding box; erosion drops the skin's partial-volume ring."""
    from monai.transforms import erode

    lung = ((box > LUNG_HU[0]) & (box < LUNG_HU[1])).float()[0].permute(2, 0, 1)[:, None]  # (Z, 1, x, y)
    area = erode(lung, filter_size=3).sum(dim=(1, 2, 3))
    found = torch.nonzero(area >= LUNG_MIN_FRACTION * box.shape[1] * box.shape[2]).flatten()
    return (int(found[0]), int(found[-1]) + 1) if found.numel() else None


def _square_resize(slices: torch.Tensor, image_size: int | None, pad_value: float) -> torch.Tensor:
    """(N, h, w) -> padded to a centred square, then resized to `image_size` (area when shrinking)."""
    from monai.transforms import Resize, SpatialPad

    side = max(slices.shape[1:])
    slices = _plain(SpatialPad(spatial_size=(side, side), value=pad_value)(slices))
    if image_size and image_size != side:
        mode = "area" if image_size < side else "bilinear"
        slices = _plain(Resize(spatial_size=(image_size, image_size), mode=mode)(slices))
    return slices


def _volume_study(
    volume: np.ndarray, affine: np.ndarray, settings: StudyPreprocessing, source: str, label: str, max_voxels: int
) -> Study:
    from monai.data import MetaTensor
    from monai.data.utils import affine_to_spacing
    from monai.transforms import Orientation, ScaleIntensityRange, Spacing, SpatialCrop
    from monai.transforms.utils import generate_spatial_bounding_box

    _check_hu(volume, label)
    image = MetaTensor(torch.from_numpy(volume)[None], affine=torch.as_tensor(affine))  # (1, X, Y, Z)
    image = Orientation(axcodes="RAS", labels=_RAS_LABELS)(image)
    if settings.target_spacing:
        pixdim = [-1.0 if v is None else v for v in settings.target_spacing]  # <= 0 keeps that axis
        old = affine_to_spacing(image.affine, r=3).tolist()
        voxels = int(np.prod([n * (o / p if p > 0 else 1.0) for n, o, p in zip(image.shape[1:], old, pixdim)]))
        if voxels > max_voxels:
            raise ImageLoadError(
                f"{label}: resampling {tuple(image.shape[1:])} voxels of {old} mm to "
                f"{settings.target_spacing} mm gives ~{voxels} voxels, over the limit of {max_voxels}"
            )
        image = Spacing(pixdim=pixdim, mode="bilinear", padding_mode="border")(image)
    spacing = tuple(round(float(v), 6) for v in affine_to_spacing(image.affine, r=3))
    data = image.as_tensor().float()
    depth = data.shape[-1]
    start, end = generate_spatial_bounding_box(
        data, select_fn=lambda x: x > BODY_HU, margin=(2, 2, 0), allow_smaller=True
    )
    extent, used = (
        ((0, depth), "full")
        if settings.slice_sampling == "middle" or settings.extent == "full"
        else ((start[2], end[2]), "body")
    )
    if settings.extent == "lung" and used == "body":
        lung = _lung_extent(data[:, start[0] : end[0], start[1] : end[1], :])
        if lung is None:
            logger.warning("%s: no lung-density slices found; sampling the body extent instead", label)
        else:
            extent, used = lung, "lung"
    if settings.crop == "body":
        data = _plain(SpatialCrop(roi_start=(start[0], start[1], 0), roi_end=(end[0], end[1], depth))(data))
    slices, z, indices = _take_slices(data[0].permute(2, 0, 1), settings, extent[0], extent[1], depth)  # (S, x, y)
    picked = _square_resize(slices, settings.image_size, AIR_HU)
    channels = torch.stack(
        [
            _plain(ScaleIntensityRange(a_min=w.low, a_max=w.high, b_min=0.0, b_max=1.0, clip=True)(picked))
            for w in settings.windows
        ],
        dim=1,
    )
    channels = channels.expand(-1, settings.channels, -1, -1) if len(settings.windows) == 1 else channels
    pixels = channels.transpose(-1, -2).flip(-2, -1).contiguous().float()  # (S, C, H=y, W=x), radiological
    return Study(pixels, z, tuple(indices), depth, spacing, tuple(extent), used, source, settings)


def _raster_study(paths: list[Path], settings: StudyPreprocessing, max_image_pixels, source: str, label: str) -> Study:
    images = [load_image(p, max_image_pixels=max_image_pixels) for p in paths]  # RGB, EXIF-rotated, bomb-checked
    sizes = Counter(im.size for im in images)
    if len(sizes) > 1:
        odd = next(p for p, im in zip(paths, images) if im.size != sizes.most_common(1)[0][0])
        raise ImageLoadError(f"{label}: mixed image sizes in one study: {sorted(sizes)} (e.g. {odd.name})")
    if settings.channels == 3:
        arrays = [np.asarray(im) for im in images]  # (H, W, 3)
    else:
        arrays = [np.repeat(np.asarray(im.convert("L"))[..., None], settings.channels, axis=-1) for im in images]
    stack = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0  # (n, C, H, W)
    picked, z, indices = _take_slices(stack, settings, 0, len(paths), len(paths))
    s, c, h, w = picked.shape
    if settings.image_size:
        picked = _square_resize(picked.reshape(s * c, h, w), settings.image_size, 0.0).reshape(
            s, c, settings.image_size, settings.image_size
        )
    return Study(picked.contiguous(), z, tuple(indices), len(paths), None, (0, len(paths)), "full", source, settings)

"""Image loading for training and inference: PNG/JPG/BMP/TIFF, DICOM and NIfTI -> RGB PIL images.

Why one module: cleaning (``check_images``), the training dataset and ``hf-vlm generate`` must
agree on how a path is resolved and how HU values become pixels, or a model is evaluated on
images that differ from the ones it was trained on.

CT windowing (DICOM PS3.3 C.11.2 linear window, simplified): ``HU = pixel * RescaleSlope +
RescaleIntercept``; ``value = clip((HU - (L - W/2)) / W * 255, 0, 255)`` rounded half up. The
default lung window L=-600, W=1500 maps HU <= -1350 to 0, HU -600 to 128 and HU >= 150 to 255.
pydicom and nibabel are optional (``pip install hf_vlm[medical]``).
"""

from __future__ import annotations

import importlib
import os
import re
from collections.abc import Sequence
from pathlib import Path, PureWindowsPath

import numpy as np
from PIL import Image, ImageOps

WINDOW_PRESETS = {"lung": (-600.0, 1500.0), "mediastinum": (40.0, 400.0), "bone": (400.0, 1800.0)}
DEFAULT_WINDOW = WINDOW_PRESETS["lung"]  # (center L, width W) used wherever no window is given
DEFAULT_MAX_SLICES = 1  # slices taken from a volume / series when the caller does not say
_RASTER_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp"}
# every file suffix `load_images` reads (folder scans in `hf-vlm generate`, uploads in `hf-vlm serve`)
IMAGE_SUFFIXES = (*sorted(_RASTER_SUFFIXES), ".dcm", ".dicom", ".nii", ".nii.gz")
PathMap = str | Sequence[tuple[str, str]] | dict[str, str] | None


class ImageLoadError(ValueError):
    """An image could not be read; the message names the file and the cause."""


def _require(module: str):
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"{module} is needed to read this file: pip install hf_vlm[medical]") from e


def split_image_paths(field: str | None) -> list[str]:
    """Split a ``;``-separated path field, dropping blanks and surrounding quotes."""
    return [
        p.strip().strip('"').strip("'").strip()
        for p in str(field or "").split(";")
        if p.strip().strip('"').strip("'").strip()
    ]


def parse_path_map(spec: PathMap) -> list[tuple[str, str]]:
    """``"D:/=/mnt/d/,E:/data=/data"`` (``,`` or ``;`` between entries), a dict or pairs -> pairs."""
    if not spec:
        return []
    if isinstance(spec, dict):
        return list(spec.items())
    if not isinstance(spec, str):
        return [(str(a), str(b)) for a, b in spec]
    pairs = []
    for entry in spec.replace(";", ",").split(","):
        if entry.strip():
            if "=" not in entry:
                raise ValueError(f"path_map entry {entry!r} must look like SOURCE_PREFIX=TARGET_PREFIX")
            src, dst = entry.split("=", 1)
            pairs.append((src.strip(), dst.strip()))
    return pairs


_WINDOWS_DRIVE = re.compile(r"^[A-Za-z]:[\\/]")


def _is_windows_style(path: str) -> bool:
    return bool(re.match(r"^[A-Za-z]:", path)) or "\\" in path


def resolve_image_path(
    path: str, *, image_root: str | None = None, path_map: PathMap = None, base_dir: str | None = None
) -> Path:
    """Turn one path as written in a CSV into a local ``Path`` (no file-system access).

    1. ``path_map`` prefixes are replaced (slashes unified; Windows prefixes compare
       case-insensitively), e.g. ``D:/=/mnt/d/`` maps ``D:\\data\\x.png`` to ``/mnt/d/data/x.png``.
    2. On Windows the result is used as-is. Elsewhere a Windows path is parsed with
       ``PureWindowsPath``: an unmapped drive path follows the WSL convention (``/mnt/d/...``).
    3. A relative path is joined to ``image_root``, else to ``base_dir`` (the CSV's folder).
    """
    raw = str(path).strip().strip('"').strip("'")
    if not raw:
        raise ImageLoadError("empty image path")
    unified = raw.replace("\\", "/")
    for src, dst in parse_path_map(path_map):
        src_u = src.replace("\\", "/")
        fold = _is_windows_style(src)
        if unified.lower().startswith(src_u.lower()) if fold else unified.startswith(src_u):
            rest = unified[len(src_u) :]
            raw = dst.rstrip("/\\") + "/" + rest.lstrip("/") if rest else dst
            break
    if os.name == "nt":
        resolved = Path(raw)
    elif _WINDOWS_DRIVE.match(raw):
        resolved = Path("/mnt", raw[0].lower(), *PureWindowsPath(raw).parts[1:])
    else:
        resolved = Path(raw.replace("\\", "/"))
    if not resolved.is_absolute() and (image_root or base_dir):
        root = str(image_root or base_dir)
        mapped = path_map or (os.name != "nt" and _is_windows_style(root))
        resolved = (resolve_image_path(root, path_map=path_map) if mapped else Path(root)) / resolved
    return resolved


def is_nifti(path: Path) -> bool:
    name = path.name.lower()
    return name.endswith(".nii") or name.endswith(".nii.gz")


def is_dicom(path: Path) -> bool:
    """``.dcm``/``.dicom`` suffix, or the ``DICM`` magic at byte 128 (files named ``IM0001``)."""
    suffix = path.suffix.lower()
    if suffix in (".dcm", ".dicom"):
        return True
    if suffix in _RASTER_SUFFIXES or not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(132)[128:132] == b"DICM"


def apply_window(hu: np.ndarray, center: float, width: float) -> np.ndarray:
    """Linear CT window -> uint8 (see module docstring for the exact formula)."""
    low = center - width / 2.0
    scaled = np.clip((np.asarray(hu, dtype=np.float64) - low) / width * 255.0, 0.0, 255.0)
    return np.floor(scaled + 0.5).astype(np.uint8)


def _minmax_uint8(arr: np.ndarray) -> np.ndarray:
    arr = np.asarray(arr, dtype=np.float64)
    lo, hi = float(arr.min()), float(arr.max())
    return np.zeros(arr.shape, np.uint8) if hi <= lo else np.floor((arr - lo) / (hi - lo) * 255 + 0.5).astype(np.uint8)


def _gray_to_rgb(gray: np.ndarray) -> Image.Image:
    return Image.fromarray(np.ascontiguousarray(gray), mode="L").convert("RGB")


def sample_indices(total: int, num: int) -> list[int]:
    """``num`` evenly spaced indices at the centres of equal bins (skips the often-empty ends);
    all indices when ``num >= total``. total=10, num=5 -> [1, 3, 5, 7, 9]."""
    if num <= 0 or num >= total:
        return list(range(total))
    return [int((k + 0.5) * total / num) for k in range(num)]


def _load_pil(path: Path, max_image_pixels: int | None) -> Image.Image:
    limit = Image.MAX_IMAGE_PIXELS if max_image_pixels is None else max_image_pixels
    try:
        with Image.open(path) as im:
            if limit and im.width * im.height > limit:
                raise ImageLoadError(
                    f"{path}: {im.width}x{im.height} = {im.width * im.height} pixels exceeds the "
                    f"decompression-bomb limit of {limit} (max_image_pixels / PIL.Image.MAX_IMAGE_PIXELS)"
                )
            im.seek(0)  # first frame of multi-page TIFF/GIF
            im = ImageOps.exif_transpose(im)
            if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):  # 16-bit CT PNG/TIFF
                return _gray_to_rgb(_minmax_uint8(np.asarray(im)))
            return im.convert("RGB")
    except ImageLoadError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageLoadError(f"{path}: decompression bomb rejected ({e})") from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageLoadError(f"{path}: cannot read image ({type(e).__name__}: {e})") from e


def _window_frames(hu: np.ndarray, center: float | None, width: float | None, ds=None) -> list[np.ndarray]:
    if center is None or width is None:  # fall back to the file's own window (first if several)
        tag_c, tag_w = getattr(ds, "WindowCenter", None), getattr(ds, "WindowWidth", None)
        if tag_c is not None and tag_w is not None:
            center, width = (
                float(v[0] if isinstance(v, (list, tuple)) or type(v).__name__ == "MultiValue" else v)
                for v in (tag_c, tag_w)
            )
    frames = hu if hu.ndim == 3 else hu[None]
    if center is None or width is None:
        return [_minmax_uint8(f) for f in frames]
    return [apply_window(f, center, width) for f in frames]


def _dicom_frames(path: Path, window_center, window_width, num_slices: int | None) -> list[Image.Image]:
    pydicom = _require("pydicom")
    try:
        ds = pydicom.dcmread(str(path), force=True)
        arr = ds.pixel_array
    except Exception as e:  # pydicom raises many types (missing pixel data, codecs, bad header)
        raise ImageLoadError(f"{path}: cannot read DICOM pixel data ({type(e).__name__}: {e})") from e
    if int(getattr(ds, "SamplesPerPixel", 1)) == 3:  # colour DICOM: no HU, no window
        frames = arr if arr.ndim == 4 else arr[None]
        return [
            Image.fromarray(frames[i].astype(np.uint8)).convert("RGB")
            for i in sample_indices(len(frames), num_slices or 1)
        ]
    slope = float(getattr(ds, "RescaleSlope", 1) or 1)
    intercept = float(getattr(ds, "RescaleIntercept", 0) or 0)
    hu = arr.astype(np.float64) * slope + intercept
    n_frames = hu.shape[0] if hu.ndim == 3 else 1
    picked = hu[sample_indices(n_frames, num_slices or 1)] if hu.ndim == 3 else hu
    gray = _window_frames(picked, window_center, window_width, ds)
    if str(getattr(ds, "PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        gray = [255 - g for g in gray]
    return [_gray_to_rgb(g) for g in gray]


def _dicom_series(folder: Path, num_slices: int, window_center, window_width) -> list[Image.Image]:
    """A folder of single-slice DICOM files, ordered by slice position then InstanceNumber."""
    pydicom = _require("pydicom")
    entries = []
    for f in sorted(folder.iterdir()):
        if f.is_file() and is_dicom(f):
            try:
                h = pydicom.dcmread(str(f), stop_before_pixels=True, force=True)
            except Exception as e:
                raise ImageLoadError(f"{f}: cannot read DICOM header ({type(e).__name__}: {e})") from e
            pos = getattr(h, "ImagePositionPatient", None)
            entries.append((float(pos[2]) if pos else 0.0, int(getattr(h, "InstanceNumber", 0) or 0), f))
    if not entries:
        raise ImageLoadError(f"{folder}: folder holds no DICOM files")
    entries.sort(key=lambda e: (e[0], e[1], e[2].name))
    return [
        _dicom_frames(entries[i][2], window_center, window_width, 1)[0]
        for i in sample_indices(len(entries), num_slices)
    ]


def _nifti_slices(path: Path, num_slices: int, window_center, window_width) -> list[Image.Image]:
    """Axial slices of a NIfTI volume reoriented to RAS, shown radiologically (patient right on
    the image left, anterior at the top). NIfTI CT data are HU after nibabel applies scl_slope."""
    nib = _require("nibabel")
    try:
        img = nib.as_closest_canonical(nib.load(str(path)))
        shape = img.shape
        index = (
            (lambda k: (slice(None), slice(None), k))
            if len(shape) == 3
            else (lambda k: (slice(None), slice(None), k, 0))
        )
        picked = (
            [np.asarray(img.dataobj[index(k)], dtype=np.float64) for k in sample_indices(shape[2], num_slices)]
            if len(shape) >= 3
            else [np.asarray(img.dataobj, dtype=np.float64)]
        )
    except Exception as e:  # nibabel: ImageFileError, gzip/zlib errors, truncated data
        raise ImageLoadError(f"{path}: cannot read NIfTI volume ({type(e).__name__}: {e})") from e
    return [_gray_to_rgb(_window_frames(s[::-1, ::-1].T, window_center, window_width)[0]) for s in picked]


def load_volume_slices(
    path: str | os.PathLike,
    num_slices: int,
    *,
    window_center: float | None = DEFAULT_WINDOW[0],
    window_width: float | None = DEFAULT_WINDOW[1],
    max_image_pixels: int | None = None,
) -> list[Image.Image]:
    """Evenly spaced slices of a NIfTI volume, a DICOM series folder or a multi-frame DICOM (a 2D
    file gives one image). ``window_center/width=None`` uses the DICOM tags, else min-max."""
    path = Path(path)
    if path.is_dir():
        return _dicom_series(path, num_slices, window_center, window_width)
    if not path.is_file():
        raise ImageLoadError(f"{path}: file not found")
    if is_nifti(path):
        return _nifti_slices(path, num_slices, window_center, window_width)
    if is_dicom(path):
        return _dicom_frames(path, window_center, window_width, num_slices)
    return [_load_pil(path, max_image_pixels)]


def load_image(
    path: str | os.PathLike,
    *,
    window_center: float | None = DEFAULT_WINDOW[0],
    window_width: float | None = DEFAULT_WINDOW[1],
    max_image_pixels: int | None = None,
) -> Image.Image:
    """One RGB image. PNG/JPG/BMP/TIFF via PIL (EXIF orientation applied, 16-bit scaled min-max,
    ``max_image_pixels`` guards against decompression bombs; default ``PIL.Image.MAX_IMAGE_PIXELS``);
    DICOM with CT windowing; a volume or multi-frame file gives its middle slice."""
    path = Path(path)
    if path.is_dir() or is_nifti(path) or is_dicom(path):
        return load_volume_slices(path, 1, window_center=window_center, window_width=window_width)[0]
    if not path.is_file():
        raise ImageLoadError(f"{path}: file not found")
    return _load_pil(path, max_image_pixels)


def load_images(
    path_field: str,
    *,
    image_root: str | None = None,
    path_map: PathMap = None,
    base_dir: str | None = None,
    max_slices: int = DEFAULT_MAX_SLICES,
    window_center: float | None = DEFAULT_WINDOW[0],
    window_width: float | None = DEFAULT_WINDOW[1],
    max_image_pixels: int | None = None,
) -> list[Image.Image]:
    """All images of one row: ``;``-separated paths, each resolved, volumes expanded to at most
    ``max_slices`` slices each, in the order written."""
    images: list[Image.Image] = []
    for raw in split_image_paths(path_field):
        path = resolve_image_path(raw, image_root=image_root, path_map=path_map, base_dir=base_dir)
        images.extend(
            load_volume_slices(
                path,
                max_slices,
                window_center=window_center,
                window_width=window_width,
                max_image_pixels=max_image_pixels,
            )
        )
    if not images:
        raise ImageLoadError(f"no image path in {path_field!r}")
    return images

"""Uploads of `hf-vlm serve` on a study checkpoint: one uploaded file -> one `Study`.

Why a module of its own: a browser can send a `.nii` / `.nii.gz` volume, a single DICOM or a
`.zip` of a DICOM series, and a zip from the network is untrusted. `extract_series_zip` refuses
members that would land outside the temp folder (absolute paths, `..`, drive letters, links)
and zip bombs (more than `MAX_ZIP_MEMBERS` members or `MAX_ZIP_BYTES` uncompressed, from the
headers before anything is written; `zipfile` never inflates a member past its declared size,
and the bytes written are counted as a second guard), each with an error naming the uploaded file and the
member, never the server's temp path. The study is then read by `data.studies.load_study` with
the checkpoint's `StudyPreprocessing` and the server's pixel limit, exactly as `hf-vlm
generate` reads a series folder (docs/architecture.md, section 4).
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
import zipfile
from pathlib import Path, PurePosixPath

from ..data.images import ImageLoadError, is_dicom

MAX_ZIP_MEMBERS = 4096  # a chest CT series is 100-1000 files; more is not one series
MAX_ZIP_BYTES = 2 * 1024**3  # uncompressed; ~2000 slices of 512 x 512 x 16 bit, MAX_STUDY_VOXELS' order
_SKIPPED = ("__MACOSX",)  # macOS Finder adds resource forks under this folder
_CHUNK = 1 << 20


class UploadError(ImageLoadError):
    """An upload that is refused before any image is read (unsafe or oversized zip, no series)."""


def _member_parts(name: str, upload: str) -> tuple[str, ...]:
    """The path parts of a zip member, or an `UploadError` if it would leave the extraction folder."""
    unified = name.replace("\\", "/")
    parts = PurePosixPath(unified).parts
    if unified.startswith("/") or (parts and len(parts[0]) >= 2 and parts[0][1] == ":") or ".." in parts:
        raise UploadError(f"{upload}: zip member {name!r} points outside the archive (absolute path or '..'): refused")
    return tuple(p for p in parts if p not in ("", "."))


def extract_series_zip(
    path, dest, *, upload: str | None = None, max_bytes: int = MAX_ZIP_BYTES, max_members: int = MAX_ZIP_MEMBERS
) -> Path:
    """Extract the zip at `path` into `dest` and return the one folder in it that holds DICOM files.

    `upload` is the name shown in errors (default: the zip's file name). A zip with DICOM files
    in several folders is refused (one upload is one series); DICOMDIR index files and
    `__MACOSX` entries are skipped.
    """
    upload = upload or os.path.basename(os.fspath(path))
    dest = Path(dest)
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise UploadError(f"{upload}: not a readable zip file ({exc})") from exc
    with archive:
        members = [m for m in archive.infolist() if not m.is_dir()]
        if len(members) > max_members:
            raise UploadError(
                f"{upload}: {len(members)} files in the zip, more than the limit of {max_members}: "
                "upload one DICOM series"
            )
        declared = sum(m.file_size for m in members)
        if declared > max_bytes:
            raise UploadError(
                f"{upload}: {declared} bytes uncompressed, more than the limit of {max_bytes} bytes: refused"
            )
        written = 0
        for member in members:
            parts = _member_parts(member.filename, upload)
            if stat.S_ISLNK(member.external_attr >> 16):
                raise UploadError(f"{upload}: zip member {member.filename!r} is a symbolic link: refused")
            if not parts or parts[0] in _SKIPPED or parts[-1].startswith(".") or parts[-1].upper() == "DICOMDIR":
                continue
            target = dest.joinpath(*parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(member) as source, open(target, "wb") as out:
                while chunk := source.read(_CHUNK):
                    written += len(chunk)
                    if written > max_bytes:  # second guard (zipfile stops at the declared size)
                        raise UploadError(
                            f"{upload}: more than {max_bytes} bytes uncompressed (limit reached while "
                            f"extracting {member.filename!r}): refused"
                        )
                    out.write(chunk)
    folders = sorted({f.parent for f in dest.rglob("*") if f.is_file() and is_dicom(f)})
    if not folders:
        raise UploadError(f"{upload}: the zip holds no DICOM files")
    if len(folders) > 1:
        shown = ", ".join(str(f.relative_to(dest)) or "." for f in folders[:5])
        raise UploadError(f"{upload}: DICOM files in {len(folders)} folders ({shown}): upload one series per zip")
    return folders[0]


def _public(error: Exception, temp: Path, upload: str) -> str:
    """`error`'s text with the temp extraction folder shown as the uploaded zip's name."""
    return str(error).replace(str(temp), upload)


def load_study_upload(path, settings, max_image_pixels: int | None = None):
    """The `Study` of one uploaded file (NIfTI, DICOM, PNG/JPG or a zipped DICOM series)."""
    from ..data.studies import load_study

    path = Path(path)
    if path.suffix.lower() != ".zip":
        return load_study(path, settings, max_image_pixels=max_image_pixels)
    temp = Path(tempfile.mkdtemp(prefix="hf_vlm_upload_"))
    try:
        folder = extract_series_zip(path, temp, upload=path.name)
        try:
            return load_study(folder, settings, max_image_pixels=max_image_pixels)
        except ImageLoadError as exc:
            raise ImageLoadError(_public(exc, temp, path.name)) from exc
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def slice_captions(study) -> list[str]:
    """One caption per slice the model saw: its index in the volume and its relative z."""
    return [f"slice {index} · z {float(z):.2f}" for index, z in zip(study.slice_indices, study.z.tolist())]


def study_of_pil(image, settings, max_image_pixels: int | None = None):
    """An already decoded image (API callers) as a one-slice study, through the same loader as a PNG upload."""
    temp = Path(tempfile.mkdtemp(prefix="hf_vlm_upload_"))
    try:
        image.save(temp / "image.png")
        return load_study_upload(temp / "image.png", settings, max_image_pixels)
    finally:
        shutil.rmtree(temp, ignore_errors=True)

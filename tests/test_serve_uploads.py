"""`hf-vlm serve` uploads on a study checkpoint: a zipped DICOM series is extracted safely.

A zip from the browser is untrusted: members that would land outside the temp folder and zip
bombs are refused with an error naming the upload, never the server's temp path.
"""

from __future__ import annotations

import zipfile

import pytest

from hf_vlm.commands.serve_uploads import UploadError, extract_series_zip, load_study_upload, slice_captions
from tests.test_study_pipeline import SETTINGS, _write_series


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    return _write_series(tmp_path_factory.mktemp("series") / "CT_0001", n=5)


def _zip(path, members: dict):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def test_a_zipped_series_is_one_study(series, tmp_path):
    from hf_vlm.data.studies import load_study

    files = {f"exam/series 1/{f.name}": f.read_bytes() for f in sorted(series.iterdir())}
    files.update({"exam/DICOMDIR": b"index", "__MACOSX/exam/._IM0000": b"fork", "exam/readme.txt": b"hi"})
    upload = _zip(tmp_path / "scan.zip", files)
    folder = extract_series_zip(upload, tmp_path / "out")
    assert folder == tmp_path / "out" / "exam" / "series 1" and len(list(folder.iterdir())) == 5
    study = load_study_upload(upload, SETTINGS)
    direct = load_study(series, SETTINGS)
    assert study.num_slices == direct.num_slices == 5  # num_slices 6 > the 5 slices of the series
    assert study.pixels.equal(direct.pixels) and study.z.equal(direct.z)
    assert slice_captions(study)[0] == f"slice {direct.slice_indices[0]} · z {float(direct.z[0]):.2f}"


@pytest.mark.parametrize("name", ["../evil.dcm", "a/../../evil.dcm", "/etc/evil.dcm", "C:/evil.dcm", "a\\..\\..\\e"])
def test_a_member_outside_the_archive_is_refused(series, tmp_path, name):
    upload = _zip(tmp_path / "scan.zip", {"ok/IM0000": (series / "IM0000").read_bytes(), name: b"x"})
    out = tmp_path / "out"
    with pytest.raises(UploadError, match=r"scan.zip: zip member .* points outside the archive") as error:
        extract_series_zip(upload, out)
    assert str(tmp_path) not in str(error.value)
    assert not (tmp_path / "evil.dcm").exists()


def test_zip_bombs_are_refused_by_size_and_member_count(tmp_path):
    upload = _zip(tmp_path / "bomb.zip", {"a.dcm": b"\0" * 10_000_000})  # ~10 KB compressed
    assert upload.stat().st_size < 100_000
    with pytest.raises(UploadError, match=r"bomb.zip: 10000000 bytes uncompressed, more than the limit of 1000000"):
        extract_series_zip(upload, tmp_path / "out", max_bytes=1_000_000)
    many = _zip(tmp_path / "many.zip", {f"s/{i}.dcm": b"x" for i in range(11)})
    with pytest.raises(UploadError, match=r"many.zip: 11 files in the zip, more than the limit of 10"):
        extract_series_zip(many, tmp_path / "out2", max_members=10)


def test_no_series_and_two_series_are_clear_errors(series, tmp_path):
    with pytest.raises(UploadError, match=r"empty.zip: the zip holds no DICOM files"):
        extract_series_zip(_zip(tmp_path / "empty.zip", {"notes.txt": b"hi"}), tmp_path / "o1")
    two = {f"{s}/{f.name}": f.read_bytes() for s in ("a", "b") for f in sorted(series.iterdir())[:2]}
    with pytest.raises(UploadError, match=r"two.zip: DICOM files in 2 folders \(a, b\): upload one series"):
        extract_series_zip(_zip(tmp_path / "two.zip", two), tmp_path / "o2")
    (tmp_path / "bad.zip").write_bytes(b"PK not really")
    with pytest.raises(UploadError, match=r"bad.zip: not a readable zip file"):
        load_study_upload(tmp_path / "bad.zip", SETTINGS)


def test_a_load_error_inside_the_zip_names_the_upload_not_the_temp_folder(series, tmp_path):
    from hf_vlm.data.images import ImageLoadError

    files = {f"s/{f.name}": f.read_bytes() for f in sorted(series.iterdir()) if f.name != "IM0002"}  # a gap
    with pytest.raises(ImageLoadError) as error:
        load_study_upload(_zip(tmp_path / "gap.zip", files), SETTINGS)
    assert "gap.zip" in str(error.value) and "hf_vlm_upload_" not in str(error.value), str(error.value)

"""hf_vlm.synthetic_volumes: CT-like studies whose reports state side, lobe, size and level."""

from __future__ import annotations

import csv
from collections import Counter

import nibabel as nib
import numpy as np
import pytest

from hf_vlm.synthetic_volumes import (
    CSV_COLUMNS,
    LEVELS,
    LOBES_AT,
    SLICE_RANGE,
    StudyFacts,
    draw_study,
    draw_study_facts,
    make_synthetic_studies,
    parse_study_facts,
    read_study_facts,
    restrict_to_middle_slice,
    score_study_reports,
    study_chance_accuracy,
    write_study_report,
)


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("synth"))
    return make_synthetic_studies(out, 6, seed=3, split="eval")


def test_files_csv_and_reproducibility(studies, tmp_path):
    with open(studies, encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert tuple(rows[0]) == CSV_COLUMNS and len(rows) == 6
    for row, facts in zip(rows, read_study_facts(studies)):
        image = nib.load(row["image_path"])
        assert image.get_data_dtype() == np.int16 and image.shape[:2] == (64, 64)
        assert SLICE_RANGE[0] <= image.shape[2] == int(row["num_slices"]) <= SLICE_RANGE[1]
        assert np.allclose(image.header.get_zooms(), (1.5, 1.5, 5.0)) and nib.aff2axcodes(image.affine) == (
            "R",
            "A",
            "S",
        )
        assert parse_study_facts(row["caption"]) == StudyFacts(facts.side, facts.lobe, facts.size_mm, facts.level)
    again = make_synthetic_studies(str(tmp_path), 2, seed=3, split="eval")  # study i depends on (seed, i) only
    first = [r["image_path"] for r in csv.DictReader(open(again, encoding="utf-8"))]
    assert np.array_equal(nib.load(first[1]).get_fdata(), nib.load(rows[1]["image_path"]).get_fdata())


def test_hounsfield_values_and_anatomy():
    volume, affine, facts = draw_study(np.random.default_rng([0, 7]))
    i, j, k = np.indices(volume.shape)
    assert np.median(volume[:3, :3, :]) == pytest.approx(-1000, abs=15)  # air in the corners
    lung = volume[(volume > -950) & (volume < -500)]
    assert -880 < np.median(lung) < -810
    assert 25 < np.median(volume[(volume > 0) & (volume < 120)]) < 70  # soft tissue and blood
    a, b = facts.lung_extent
    assert not ((volume[:, :, :a] > -950) & (volume[:, :, :a] < -700)).sum(axis=(0, 1)).any()  # abdomen: no lung
    # the nodule centre: brighter than lung (partial volume dims small ones), in the stated lung
    x, y = facts.nodule_xy
    assert volume[x, y, facts.nodule_slice] > -600 and (x > 32 if facts.side == "右" else x < 31)  # RAS: +x = right
    ring = volume[max(x - 8, 0) : x + 9, max(y - 8, 0) : y + 9, facts.nodule_slice]
    assert ((ring > -950) & (ring < -700)).any()  # lung around it
    t = (facts.nodule_slice - a + 0.5) / (b - a)
    low, high = LEVELS[facts.level]
    assert low - 0.05 < t < high + 0.05


@pytest.mark.parametrize("seed", range(12))
def test_lobe_and_level_match_the_nodule_position(seed):
    from hf_vlm.synthetic_volumes import _LUNG_AY, _LUNG_Y, HORIZONTAL_FISSURE_T, _fissure_q, _lung_scale

    volume, _, facts = draw_study(np.random.default_rng([2, seed]))
    a, b = facts.lung_extent
    t = (facts.nodule_slice - a + 0.5) / (b - a)
    low, high = LEVELS[facts.level]
    assert low - 0.5 / (b - a) <= t <= high + 0.5 / (b - a)  # nodule_slice is the rounded centre
    q = ((facts.nodule_xy[1] + 0.5) / 32 - 1 - _LUNG_Y) / (_LUNG_AY * float(_lung_scale(t)))  # -1 posterior, 1 anterior
    behind_fissure = q < _fissure_q(t)
    assert behind_fissure == (facts.lobe == "下叶") or abs(q - _fissure_q(t)) < 0.15  # rounding near the fissure
    if facts.side == "右" and facts.lobe != "下叶":
        assert (facts.lobe == "中叶") == (t < HORIZONTAL_FISSURE_T)


def test_facts_follow_the_anatomy_and_chance():
    rng = np.random.default_rng(0)
    draws = [draw_study_facts(rng) for _ in range(20000)]
    for side, lobe, size, level in draws[:500]:
        assert lobe in LOBES_AT[(side, level)] and 4 <= size <= 20
        assert level != "肺尖" or lobe == "上叶"  # only upper lobes reach the apex
        assert not (side == "左" and lobe == "中叶")
    chance = study_chance_accuracy()
    empirical = {
        "side": max(Counter(d[0] for d in draws).values()),
        "lobe": max(Counter(d[:2] for d in draws).values()),
        "level": max(Counter(d[3] for d in draws).values()),
    }
    for key, count in empirical.items():
        assert count / len(draws) == pytest.approx(chance[key], abs=0.015)
    assert chance == pytest.approx({"side": 0.5, "lobe": 0.3125, "level": 0.25, "size_within_2mm": 5 / 17})


def test_middle_slice_is_rarely_the_nodule_slice_and_the_restriction():
    from hf_vlm.data.studies import middle_slice_index
    from hf_vlm.data.study_settings import StudyPreprocessing

    on_middle, far = 0, 0
    for i in range(60):
        volume, _, facts = draw_study(np.random.default_rng([1, i]))
        middle = middle_slice_index(volume.shape[2])
        on_middle += facts.on_middle_slice
        far += abs(facts.nodule_slice - middle) * 5.0 > facts.size_mm / 2 + 2.5  # the middle slice cannot show it
    assert on_middle <= 4 and far >= 50
    settings = restrict_to_middle_slice(StudyPreprocessing(num_slices=32, extent="lung"))
    assert settings.slice_sampling == "middle" and settings.extent == "lung" and settings.num_slices == 32


def test_loader_finds_lung_extent_spacing_and_middle_slice(studies):
    from hf_vlm.data.studies import load_study
    from hf_vlm.data.study_settings import StudyPreprocessing

    rows = list(csv.DictReader(open(studies, encoding="utf-8")))
    for row, facts in zip(rows, read_study_facts(studies)):
        study = load_study(row["image_path"], StudyPreprocessing(slice_sampling="all", extent="lung", image_size=64))
        assert study.extent == facts.lung_extent and study.spacing == pytest.approx((1.5, 1.5, 5.0))
        assert study.pixels.shape[1:] == (3, 64, 64)
        middle = load_study(row["image_path"], restrict_to_middle_slice(study.settings))
        assert middle.num_slices == 1 and middle.z.tolist() == pytest.approx([0.5], abs=0.02)


def test_scores():
    rng = np.random.default_rng(0)
    truths = [
        StudyFacts(*draw_study_facts(rng)[:3], level=lv, on_middle_slice=i == 0)
        for i, lv in enumerate(["肺门", "肺尖", "膈顶", "主动脉弓"])
    ]
    reports = [write_study_report(t, rng) for t in truths]
    assert score_study_reports(reports, truths) == {
        "side": 1.0,
        "lobe": 1.0,
        "level": 1.0,
        "size_within_2mm": 1.0,
        "all": 1.0,
        "n": 4,
    }
    wrong_level = [
        r.replace(t.level + "层面", ("肺尖" if t.level != "肺尖" else "肺门") + "层面") for r, t in zip(reports, truths)
    ]
    scores = score_study_reports(wrong_level, truths)
    assert scores["level"] == 0.0 and scores["lobe"] == 1.0 and scores["all"] == 0.0
    assert score_study_reports(["未见结节。"] + reports[1:], truths, off_middle_only=True)["n"] == 3
    assert parse_study_facts("双肺未见异常。") is None

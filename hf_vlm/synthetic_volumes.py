"""Synthetic CT-like studies (NIfTI volumes) for the 3-D demo and the tests.

Why: a report describes a whole study, and a nodule in the upper lobe is usually not on the
middle slice. Each study here is a chest cartoon in Hounsfield units (air -1000, lung about
-850, fat -100, soft tissue 40, bone 500, nodule 60-100, Gaussian noise) whose lungs grow from
apex to base, with a heart, aorta, trachea and spine, and one nodule whose side, lobe, size AND
level are random. The Chinese report states the four facts ("右肺下叶肺门层面见一直径约12mm结节…"),
so a model is scored against ground truth (`score_study_reports`), and one that sees only the
middle slice (`restrict_to_middle_slice`) is near chance on the off-middle nodules.

Geometry. Volumes are stored in RAS (patient right = +x, anterior = +y, superior = +z) with a
diagonal affine (default 1.5 x 1.5 x 5 mm; the in-plane spacing is coarser than a real CT's so
that a 4-20 mm nodule spans 3-13 pixels of a 64-pixel slice). Above the lungs is the neck,
below them the upper abdomen. Lung height t runs from 0 at the lowest lung slice to 1 at the
apex. Level is one of four named axial levels (bands of t with gaps between them, so each is
unambiguous); the lobe follows the anatomy: the oblique fissure runs from posterior-superior to
anterior-inferior (lower lobe behind it), the right horizontal fissure at t = 0.53 separates
upper from middle lobe, and only the upper lobes reach the apex. Touching the volume's middle
slice is redrawn (kept with probability `MIDDLE_KEEP`), so it is rare.
"""

from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass, replace

import numpy as np

from .data.studies import middle_slice_index
from .synthetic import DEFAULT_PROMPT, SIZE_RANGE_MM

LEVELS = {"膈顶": (0.08, 0.24), "肺门": (0.34, 0.48), "主动脉弓": (0.58, 0.70), "肺尖": (0.80, 0.93)}  # band of t
LOBES_AT = {  # (side, level) -> lobes a nodule centre can lie in at that level
    ("右", "膈顶"): ("中叶", "下叶"),
    ("右", "肺门"): ("中叶", "下叶"),
    ("右", "主动脉弓"): ("上叶", "下叶"),
    ("右", "肺尖"): ("上叶",),
    ("左", "膈顶"): ("上叶", "下叶"),
    ("左", "肺门"): ("上叶", "下叶"),
    ("左", "主动脉弓"): ("上叶", "下叶"),
    ("左", "肺尖"): ("上叶",),
}
HORIZONTAL_FISSURE_T = 0.53
SLICE_RANGE = (32, 48)
MIDDLE_KEEP = 0.1
_TEMPLATES = (
    "{side}肺{lobe}{level}层面见一直径约{size}mm结节，边界清楚。",
    "{level}层面{side}肺{lobe}可见一约{size}mm结节影，边缘光整。",
    "{side}肺{lobe}见结节，直径约{size}mm，位于{level}层面，建议随访。",
)
_TAILS = ("余肺野清晰。", "纵隔未见肿大淋巴结。", "双侧胸腔未见积液。", "")
_LUNG_X, _LUNG_Y, _LUNG_AX, _LUNG_AY = 0.42, -0.02, 0.30, 0.50  # lung centre / semi-axes, units of half-width


@dataclass(frozen=True)
class StudyFacts:
    """What a report must state (side, lobe, size, level) plus where the nodule really is."""

    side: str
    lobe: str
    size_mm: int
    level: str
    nodule_slice: int = -1  # slice index (RAS) of the nodule centre; -1 when parsed from text
    on_middle_slice: bool = False  # the nodule shows on the volume's middle slice
    lung_extent: tuple = ()  # [first, last + 1) slices holding lung
    nodule_xy: tuple = ()  # (x, y) voxel indices (RAS) of the nodule centre


def _fissure_q(t: float) -> float:
    """Oblique fissure as the AP lung coordinate q (-1 posterior .. 1 anterior): lower lobe below it."""
    return 0.6 - 1.8 * t


def _lobe_q_range(lobe: str, t: float, margin: float = 0.08) -> tuple[float, float]:
    q_f = _fissure_q(t)
    if lobe == "下叶":
        return -0.92, q_f - margin
    return max(q_f + margin, -0.92), 0.92


def _lung_scale(t):
    """Lung size along t (apex small, widest near the base, closing at the diaphragm)."""
    t = np.clip(t, 1e-3, 1.0)
    return (0.45 + 0.55 * np.sqrt(1.0 - t)) * np.minimum(1.0, np.sqrt(t / 0.12))


def _anatomy(size: int, depth: int, base: int, lung_slices: int, rng) -> np.ndarray:
    """HU volume (X, Y, Z) without nodule or noise, vectorised over slices."""
    half = size / 2.0
    coord = (np.arange(size) + 0.5 - half) / half
    u, w = coord[:, None, None], coord[None, :, None]  # u: patient right +, w: anterior +
    k = np.arange(depth)[None, None, :]
    t = (k - base + 0.5) / lung_slices
    in_lung_range = (t > 0) & (t < 1)
    neck = t >= 1.0 + 1.0 / lung_slices
    ell = lambda cu, cw, au, aw: ((u - cu) / au) ** 2 + ((w - cw) / aw) ** 2 <= 1  # noqa: E731
    vol = np.full((size, size, depth), -1000.0, dtype=np.float32)
    body_u, body_w = np.where(neck, 0.45, 0.92), np.where(neck, 0.42, 0.70)
    vol[ell(0, 0, body_u, body_w)] = -100.0  # subcutaneous fat
    vol[ell(0, 0, body_u * 0.88, body_w * 0.86)] = 40.0  # muscle / soft tissue
    vol[np.broadcast_to(ell(0, -0.52, 0.1, 0.1), vol.shape)] = 500.0  # vertebra
    s = _lung_scale(t) * in_lung_range
    lung_hu = rng.uniform(-870, -820)
    for side in (1, -1):
        vol[ell(side * _LUNG_X, _LUNG_Y, _LUNG_AX * s + 1e-6, _LUNG_AY * s + 1e-6) & in_lung_range] = lung_hu
    vol[ell(-0.12, 0.18, 0.30, 0.26) & (t > 0.05) & (t < 0.42)] = 40.0  # heart
    vol[ell(-0.14, -0.36, 0.08, 0.08) & (t > 0) & (t < 0.6)] = 45.0  # descending aorta
    vol[ell(-0.06, 0.0, 0.10, 0.34) & (t >= 0.58) & (t < 0.7)] = 45.0  # aortic arch
    vol[ell(0, 0.22, 0.07, 0.07) & (t >= 0.6)] = -1000.0  # trachea
    abdomen = t <= 0
    vol[ell(0.3, 0.0, 0.55, 0.5) & abdomen] = 60.0  # liver
    vol[ell(-0.4, 0.2, 0.12, 0.12) & abdomen] = -1000.0  # gastric air
    return vol


def draw_study_facts(rng: np.random.Generator) -> tuple[str, str, int, str]:
    """(side, lobe, size_mm, level): uniform side, level and size, then a lobe allowed at that level."""
    side = ("右", "左")[int(rng.integers(2))]
    level = tuple(LEVELS)[int(rng.integers(len(LEVELS)))]
    lobes = LOBES_AT[(side, level)]
    return side, lobes[int(rng.integers(len(lobes)))], int(rng.integers(SIZE_RANGE_MM[0], SIZE_RANGE_MM[1] + 1)), level


def draw_study(
    rng: np.random.Generator,
    size: int = 64,
    pixel_mm: float = 1.5,
    slice_mm: float = 5.0,
    noise_hu: float = 12.0,
    with_nodule: bool = True,
):
    """One study: (HU volume (X, Y, Z) int16, RAS affine, `StudyFacts`). The noise is most of the
    file size (gzip): about 180 KB a study at 12 HU, 17 KB without noise. `with_nodule=False` draws
    the same study (same rng stream, same noise) without its nodule: the difference is the lesion
    (`hf_vlm.synthetic_tower`)."""
    depth = int(rng.integers(SLICE_RANGE[0], SLICE_RANGE[1] + 1))
    below, above = int(rng.integers(2, 7)), int(rng.integers(2, 6))
    lung_slices = depth - below - above
    vol = _anatomy(size, depth, below, lung_slices, rng)
    side, lobe, size_mm, level = draw_study_facts(rng)
    radius_mm, middle = size_mm / 2.0, middle_slice_index(depth)
    for _ in range(200):  # position inside the lobe, in lung tissue; rarely on the middle slice
        t = rng.uniform(*LEVELS[level])
        q_lo, q_hi = _lobe_q_range(lobe, t)
        if q_hi - q_lo < 0.05:
            continue
        q = rng.uniform(q_lo, q_hi)
        p = rng.uniform(-1, 1) * np.sqrt(max(0.0, 1 - q * q)) * 0.75
        scale = float(_lung_scale(t))
        cu = (1 if side == "右" else -1) * _LUNG_X + p * _LUNG_AX * scale
        cw = _LUNG_Y + q * _LUNG_AY * scale
        ci, cj = (cu + 1) * size / 2 - 0.5, (cw + 1) * size / 2 - 0.5  # voxel coordinates
        ck = below + t * lung_slices - 0.5
        centre = vol[int(round(ci)), int(round(cj)), int(round(ck))]
        touched = range(
            int(np.ceil(ck - (radius_mm / slice_mm + 0.5))), int(np.floor(ck + radius_mm / slice_mm + 0.5)) + 1
        )
        on_middle = middle in touched
        if -950 < centre < -500 and (not on_middle or rng.random() < MIDDLE_KEEP):
            break
    else:
        raise RuntimeError("could not place a nodule")  # not reached with these geometry constants
    nodule_hu = float(rng.uniform(60, 100))
    if with_nodule:
        _add_nodule(vol, (ci, cj, ck), radius_mm, pixel_mm, slice_mm, nodule_hu)
    vol += rng.normal(0.0, noise_hu, vol.shape).astype(np.float32)
    affine = np.diag([pixel_mm, pixel_mm, slice_mm, 1.0])
    affine[:3, 3] = [-(size - 1) / 2 * pixel_mm, -(size - 1) / 2 * pixel_mm, -(depth - 1) / 2 * slice_mm]
    facts = StudyFacts(
        side,
        lobe,
        size_mm,
        level,
        int(round(ck)),
        bool(on_middle),
        (below, below + lung_slices),
        (int(round(ci)), int(round(cj))),
    )
    return np.clip(np.rint(vol), -1024, 3071).astype(np.int16), affine, facts


def _add_nodule(vol, centre, radius_mm, pixel_mm, slice_mm, hu):
    """A sphere with exact partial volume along z (the part of each 5 mm slab it fills)."""
    ci, cj, ck = centre
    i, j = np.arange(vol.shape[0])[:, None], np.arange(vol.shape[1])[None, :]
    rho2 = ((i - ci) ** 2 + (j - cj) ** 2) * pixel_mm**2
    half_chord = np.sqrt(np.clip(radius_mm**2 - rho2, 0, None))  # (X, Y) mm
    for k in range(vol.shape[2]):
        lo, hi = (k - 0.5 - ck) * slice_mm, (k + 0.5 - ck) * slice_mm
        frac = np.clip(np.minimum(hi, half_chord) - np.maximum(lo, -half_chord), 0, None) / slice_mm
        if frac.any():
            vol[:, :, k] = (1 - frac) * vol[:, :, k] + frac * hu


def write_study_report(facts: StudyFacts, rng: np.random.Generator) -> str:
    body = _TEMPLATES[int(rng.integers(len(_TEMPLATES)))].format(
        side=facts.side, lobe=facts.lobe, size=facts.size_mm, level=facts.level
    )
    return body + _TAILS[int(rng.integers(len(_TAILS)))]


CSV_COLUMNS = (
    "image_path",
    "prompt",
    "caption",
    "side",
    "lobe",
    "size_mm",
    "level",
    "nodule_slice",
    "num_slices",
    "on_middle_slice",
    "lung_start",
    "lung_stop",
    "nodule_x",
    "nodule_y",
)


def make_synthetic_studies(
    out_dir: str, n: int, seed: int = 0, image_size: int = 64, split: str = "train", noise_hu: float = 12.0
) -> str:
    """Write `n` studies as `.nii.gz` and `<split>.csv` (`CSV_COLUMNS`); study i depends only on (seed, i)."""
    import nibabel as nib

    image_dir = os.path.join(out_dir, "studies", split)
    os.makedirs(image_dir, exist_ok=True)
    csv_path = os.path.join(out_dir, f"{split}.csv")
    with open(csv_path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(CSV_COLUMNS)
        for i in range(n):
            rng = np.random.default_rng([seed, i])
            volume, affine, facts = draw_study(rng, size=image_size, noise_hu=noise_hu)
            path = os.path.abspath(os.path.join(image_dir, f"{split}_{i:05d}.nii.gz"))
            image = nib.Nifti1Image(volume, affine)
            image.header.set_xyzt_units("mm")
            nib.save(image, path)
            writer.writerow(
                [
                    path,
                    DEFAULT_PROMPT,
                    write_study_report(facts, rng),
                    facts.side,
                    facts.lobe,
                    facts.size_mm,
                    facts.level,
                    facts.nodule_slice,
                    volume.shape[2],
                    int(facts.on_middle_slice),
                    *facts.lung_extent,
                    *facts.nodule_xy,
                ]
            )
    return csv_path


def read_study_facts(csv_path: str) -> list[StudyFacts]:
    """The true facts of each row of a CSV written by `make_synthetic_studies`."""
    with open(csv_path, encoding="utf-8", newline="") as handle:
        return [
            StudyFacts(
                r["side"],
                r["lobe"],
                int(r["size_mm"]),
                r["level"],
                int(r["nodule_slice"]),
                r["on_middle_slice"] == "1",
                (int(r["lung_start"]), int(r["lung_stop"])),
                (int(r["nodule_x"]), int(r["nodule_y"])),
            )
            for r in csv.DictReader(handle)
        ]


def restrict_to_middle_slice(settings):
    """The baseline "same recipe restricted to the middle slice": only the sampling changes."""
    return replace(settings, slice_sampling="middle")


_LEVEL_RE = re.compile("(" + "|".join(LEVELS) + ")层面")


def parse_study_facts(report: str) -> StudyFacts | None:
    """(side, lobe, size, level) read back from a report; None when side/lobe or size is absent."""
    where, size = re.search(r"([左右])肺([上中下]叶)", report), re.search(r"(\d+)\s*mm", report)
    if not where or not size:
        return None
    level = _LEVEL_RE.search(report)
    return StudyFacts(where.group(1), where.group(2), int(size.group(1)), level.group(1) if level else "")


def _joint_distribution() -> dict[tuple[str, str, str], float]:
    """P(side, lobe, level) of `draw_study`: uniform side and level, then a uniform allowed lobe."""
    return {
        (side, lobe, level): 0.5 / len(LEVELS) / len(lobes)
        for (side, level), lobes in LOBES_AT.items()
        for lobe in lobes
    }


def study_chance_accuracy() -> dict[str, float]:
    """Accuracy of a blind guesser that always answers the most frequent value of each score."""
    joint, marginal = _joint_distribution(), {}
    for key, index in (("side", (0,)), ("lobe", (0, 1)), ("level", (2,))):
        sums: dict = {}
        for facts, prob in joint.items():
            value = tuple(facts[i] for i in index)
            sums[value] = sums.get(value, 0.0) + prob
        marginal[key] = max(sums.values())
    span = SIZE_RANGE_MM[1] - SIZE_RANGE_MM[0] + 1
    return {**marginal, "size_within_2mm": min(5, span) / span}


def score_study_reports(reports: list[str], truths: list[StudyFacts], *, off_middle_only: bool = False) -> dict:
    """Share of reports stating the true side, side+lobe ("lobe"), level, size within 2 mm, and
    side+lobe+level ("all"); `off_middle_only` scores the studies whose nodule is off the middle slice."""
    pairs = [(r, t) for r, t in zip(reports, truths) if not (off_middle_only and t.on_middle_slice)]
    hits = {"side": 0, "lobe": 0, "level": 0, "size_within_2mm": 0, "all": 0}
    for report, truth in pairs:
        facts = parse_study_facts(report)
        if facts is None:
            continue
        side_lobe = facts.side == truth.side and facts.lobe == truth.lobe
        hits["side"] += facts.side == truth.side
        hits["lobe"] += side_lobe
        hits["level"] += facts.level == truth.level
        hits["size_within_2mm"] += abs(facts.size_mm - truth.size_mm) <= 2
        hits["all"] += side_lobe and facts.level == truth.level
    return {**{k: v / max(len(pairs), 1) for k, v in hits.items()}, "n": len(pairs)}

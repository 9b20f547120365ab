"""Synthetic CT-like data for the embedded demo and the tests.

Each sample is a grey axial "chest" slice with two dark lungs and one bright nodule. The
nodule's side, lobe and diameter are drawn at random and the Chinese report states exactly
those facts ("右肺下叶见一直径约12mm结节…"), so a model that reads the image can be scored
against ground truth, and one that ignores it cannot beat chance.

Radiological convention: the patient's left lung is on the image's right-hand side. The
left lung has no middle lobe.
"""

from __future__ import annotations

import csv
import os
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image

LOBES = {"右": ("上叶", "中叶", "下叶"), "左": ("上叶", "下叶")}
SIZE_RANGE_MM = (4, 20)
# vertical band (fraction of lung height) occupied by each lobe on an axial-projection cartoon
_LOBE_BANDS = {"上叶": (0.12, 0.38), "中叶": (0.42, 0.58), "下叶": (0.62, 0.88)}
_LEFT_LOBE_BANDS = {"上叶": (0.12, 0.45), "下叶": (0.55, 0.88)}
_TEMPLATES = (
    "{side}肺{lobe}见一直径约{size}mm结节，边界清楚。",
    "{side}肺{lobe}可见一约{size}mm结节影，边缘光整。",
    "{side}肺{lobe}见结节，直径约{size}mm，建议随访。",
)
_TAILS = ("余肺野清晰。", "纵隔未见肿大淋巴结。", "双侧胸腔未见积液。", "")
DEFAULT_PROMPT = "请根据CT图像写出影像所见。"


@dataclass(frozen=True)
class NoduleFacts:
    side: str
    lobe: str
    size_mm: int

    def as_tuple(self) -> tuple[str, str, int]:
        return (self.side, self.lobe, self.size_mm)


def draw_facts(rng: random.Random) -> NoduleFacts:
    side = rng.choice(("左", "右"))
    return NoduleFacts(side, rng.choice(LOBES[side]), rng.randint(*SIZE_RANGE_MM))


def render_slice(facts: NoduleFacts, size: int = 64, rng: random.Random | None = None) -> Image.Image:
    """Draw one slice: body disc, two dark lungs, a bright nodule whose radius tracks size_mm."""
    rng = rng or random.Random(0)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    img = np.full((size, size), 20.0, dtype=np.float32)  # air outside the body
    img[((xx - 0.5) / 0.47) ** 2 + ((yy - 0.5) / 0.45) ** 2 <= 1] = 150.0  # soft tissue
    lungs = {"右": 0.29, "左": 0.71}  # image-left = patient-right
    for cx in lungs.values():
        img[((xx - cx) / 0.17) ** 2 + ((yy - 0.5) / 0.36) ** 2 <= 1] = 45.0
    band = (_LOBE_BANDS if facts.side == "右" else _LEFT_LOBE_BANDS)[facts.lobe]
    cy = 0.14 + 0.72 * rng.uniform(*band)
    cx = lungs[facts.side] + rng.uniform(-0.06, 0.06)
    radius = 0.012 + 0.0042 * facts.size_mm  # 4 mm -> ~0.029, 20 mm -> ~0.096 of the width
    img[(xx - cx) ** 2 + (yy - cy) ** 2 <= radius**2] = 235.0
    img += np.asarray([rng.gauss(0, 6) for _ in range(size * size)], dtype=np.float32).reshape(size, size)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), mode="L").convert("RGB")


def write_report(facts: NoduleFacts, rng: random.Random) -> str:
    body = rng.choice(_TEMPLATES).format(side=facts.side, lobe=facts.lobe, size=facts.size_mm)
    return body + rng.choice(_TAILS)


def make_synthetic_dataset(out_dir: str, n: int, seed: int = 0, image_size: int = 64, split: str = "train") -> str:
    """Write `n` PNG slices and `<split>.csv` (image_path, prompt, caption, side, lobe, size_mm)."""
    rng = random.Random(seed)
    image_dir = os.path.join(out_dir, "images", split)
    os.makedirs(image_dir, exist_ok=True)
    csv_path = os.path.join(out_dir, f"{split}.csv")
    with open(csv_path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image_path", "prompt", "caption", "side", "lobe", "size_mm"])
        for i in range(n):
            facts = draw_facts(rng)
            path = os.path.abspath(os.path.join(image_dir, f"{split}_{i:05d}.png"))
            render_slice(facts, image_size, rng).save(path)
            writer.writerow([path, DEFAULT_PROMPT, write_report(facts, rng), *facts.as_tuple()])
    return csv_path


def parse_facts(report: str) -> NoduleFacts | None:
    """Read (side, lobe, size) back out of a generated report; None when absent."""
    import re

    match = re.search(r"([左右])肺([上中下]叶)", report)
    size = re.search(r"(\d+)\s*mm", report)
    if not match or not size:
        return None
    return NoduleFacts(match.group(1), match.group(2), int(size.group(1)))


def chance_accuracy() -> dict[str, float]:
    """Accuracy of a blind guesser that always answers the most frequent value."""
    # side: 1/2; lobe: P(upper)=P(lower)=1/2*1/3+1/2*1/2=5/12; size within +-2 mm: at most 5/17
    return {"side": 0.5, "lobe": 5 / 12, "size_within_2mm": 5 / 17}


def score_reports(reports: list[str], truths: list[NoduleFacts]) -> dict[str, float]:
    """Share of reports stating the true side, side+lobe, and size within 2 mm."""
    hits = {"side": 0, "lobe": 0, "size_within_2mm": 0}
    for report, truth in zip(reports, truths):
        facts = parse_facts(report)
        if facts is None:
            continue
        hits["side"] += facts.side == truth.side
        hits["lobe"] += facts.side == truth.side and facts.lobe == truth.lobe
        hits["size_within_2mm"] += abs(facts.size_mm - truth.size_mm) <= 2
    return {k: v / max(len(reports), 1) for k, v in hits.items()}

"""Caption cleaning throughput: synthetic dirty rows, num_proc=1 vs num_proc=2.

    python benchmarks/bench_cleaning.py            # 100,000 rows
    python benchmarks/bench_cleaning.py --rows 20000 --num_proc 1 2 4

The rows mix the defects users hit (boilerplate, URLs, phones, mojibake of three kinds, loops,
exact/near duplicates, a flood of short normal reports, empty and short captions, several
images per row). Image existence is not checked (no 100k files on disk). Checks that
rows in == kept + rejected and that every num_proc gives byte-identical outputs.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hf_vlm.data.cleaning import CleaningConfig, clean_captions  # noqa: E402

LOBES = [
    "右肺上叶尖段",
    "右肺上叶后段",
    "右肺中叶外侧段",
    "右肺下叶背段",
    "左肺上叶尖后段",
    "左肺上叶舌段",
    "左肺下叶前内基底段",
]
FINDINGS = ["磨玻璃结节", "实性结节", "部分实性结节", "钙化灶", "斑片影", "索条影", "肺大疱"]
EDGES = ["边界清晰", "边缘见毛刺", "可见分叶", "邻近胸膜牵拉", "其内见空泡"]
EXTRA = ["纵隔内未见肿大淋巴结。", "双侧胸腔未见积液。", "心影大小正常。", "气管及主支气管通畅。", "建议随访复查。"]
NORMALS = ["双肺未见明显异常。", "双肺未见异常，纵隔未见肿大淋巴结。", "胸部CT平扫未见明显异常。"]


def report(rng: random.Random) -> str:
    parts = [
        f"{rng.choice(LOBES)}见一{rng.choice(FINDINGS)}，大小约{rng.randint(2, 30)}mm×{rng.randint(2, 30)}mm，"
        f"{rng.choice(EDGES)}。"
        for _ in range(rng.randint(1, 3))
    ]
    return "".join(parts) + "".join(rng.sample(EXTRA, rng.randint(0, 3)))


def dirty_row(i: int, rng: random.Random, previous: tuple[str, str]) -> tuple[str, str]:
    image, text, r = f"D:\\ct\\{i:06d}.png", report(rng), rng.random()
    if r < 0.35:  # the flood of short normal reports
        return image, rng.choice(NORMALS)
    if r < 0.40:
        return image, text + "如有疑问请拨打客服电话400-800-1234，或关注公众号。"
    if r < 0.43:
        return image, "扫码添加微信客服，获取电子报告！详见 www.example.com"
    if r < 0.46:
        return image, text.encode("utf-8").decode("latin-1") if r < 0.45 else text.encode("gbk").decode("latin-1")
    if r < 0.47:
        return image, text.encode("utf-8").decode("cp1252", "replace")
    if r < 0.50:
        return previous
    if r < 0.52:
        return previous[0], previous[1].replace("。", "，", 1)
    if r < 0.54:
        return image, "左肺上叶" * rng.randint(4, 9)
    if r < 0.56:
        return image, rng.choice(["", "nan", "见结节", "-"])
    if r < 0.58:
        return f"{image};D:\\ct\\{i:06d}_b.png", text
    return image, text


def write_dirty_csv(path: Path, rows: int, seed: int = 0) -> None:
    import csv

    rng, previous = random.Random(seed), ("D:\\ct\\start.png", report(random.Random(-1)))
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image_path", "caption", "patient_id"])
        for i in range(rows):
            previous = dirty_row(i, rng, previous)
            writer.writerow([*previous, f"P{i:07d}"])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--num_proc", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench_clean_") as tmp:
        csv_path = Path(tmp) / "dirty.csv"
        write_dirty_csv(csv_path, args.rows)
        results, outputs = [], []
        for n in args.num_proc:
            report = clean_captions(csv_path, Path(tmp) / f"out{n}", CleaningConfig(num_proc=n), verbose=False)
            assert report.rows_in == report.kept + report.rejected == args.rows, report
            outputs.append((Path(report.clean_path).read_bytes(), Path(report.rejects_path).read_bytes()))
            results.append((n, report))
        same = all(o == outputs[0] for o in outputs)
        base = results[0][1].seconds
        print("\n| num_proc | rows | kept | rejected | seconds | rows/s | speed-up |")
        print("|---:|---:|---:|---:|---:|---:|---:|")
        for n, r in results:
            print(
                f"| {n} | {r.rows_in} | {r.kept} | {r.rejected} | {r.seconds:.1f} | {r.rows_in / r.seconds:,.0f} "
                f"| {base / r.seconds:.2f}x |"
            )
        print(f"\nrows in == kept + rejected: yes; identical outputs across num_proc: {'yes' if same else 'NO'}")
        print(results[0][1].table())
        return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())

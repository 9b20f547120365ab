"""Caption cleaning: every row accounted for, each defect rejected with its reason or repaired."""

from __future__ import annotations

import collections
import csv
import functools
import pickle
import runpy
import sys
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from hf_vlm.data import cleaning
from hf_vlm.data import text_cleaning as tc
from hf_vlm.data.cleaning import REASONS, CleaningConfig, clean_captions, clean_row

GOOD = "右肺上叶见一磨玻璃结节，大小约8mm×6mm，边界清晰。"
LONG = "右肺下叶背段见分叶状实性结节，边缘可见毛刺及胸膜牵拉，大小约18mm×15mm，增强扫描不均匀强化，纵隔内见多发肿大淋巴结，较大者短径约12mm。"  # noqa: E501
NORMAL = "双肺未见明显异常。"
KEEP, NORMAL_CAPPED = "", "normal?"  # NORMAL_CAPPED: kept or normal_report_over_cap

# (image_path, caption, expected reason, expected clean caption or None). Image names starting
# with "ok" exist; "win\\..." exists through path_map; anything else is missing.
CASES = [
    ("ok0.png", GOOD, KEEP, GOOD),
    (
        "ok1.png",
        "左肺下叶背段见实性结节，直径约5mm。如有疑问请拨打客服电话400-800-1234。",
        KEEP,
        "左肺下叶背段见实性结节，直径约5mm。",
    ),
    ("ok2.png", "右肺中叶见索条影。详情请访问 www.example.com 查看。", KEEP, "右肺中叶见索条影。"),
    (
        "ok3.png",
        "左肺上叶尖后段见钙化灶，联系邮箱 report@hospital.cn，手机13812345678。",
        KEEP,
        "左肺上叶尖后段见钙化灶。",
    ),
    (
        "ok4.png",
        "右肺下叶(外基底段)见结节,大小约３.５ｍｍ;边界清.",
        KEEP,
        "右肺下叶（外基底段）见结节，大小约3.5mm；边界清。",
    ),
    ("ok5.png", "扫码关注公众号，添加微信客服获取完整报告！", "boilerplate_only", None),
    ("ok6.png", "电话：010-12345678  https://x.cn/a", "boilerplate_only", None),
    ("ok7.png", "胸膜增厚粘连。".encode().decode("cp1252"), KEEP, "胸膜增厚粘连。"),
    ("ok8.png", "右肺上叶见小结节，边界清晰。".encode().decode("latin-1"), KEEP, "右肺上叶见小结节，边界清晰。"),
    ("ok9.png", "左肺下叶见斑片影，边缘模糊。".encode("gbk").decode("latin-1"), KEEP, "左肺下叶见斑片影，边缘模糊。"),
    ("ok10.png", "纵隔内未见肿大淋巴结".encode().decode("gbk"), KEEP, "纵隔内未见肿大淋巴结"),
    ("ok11.png", GOOD.encode().decode("cp1252", "replace"), "mojibake_unrepairable", None),
    (
        "ok12.png",
        "右肺上叶见一磨玻璃结节，大小约8mm。".encode().decode("gbk", "replace"),
        "mojibake_unrepairable",
        None,
    ),
    ("ok13.png", "锟斤拷锟斤拷右肺结节", "mojibake_unrepairable", None),
    ("missing1.png", "左肺上叶舌段见小结节，约3mm。", "image_missing", None),
    ("win\\ct\\w1.png", "右肺中叶内侧段见结节，约6mm。", KEEP, "右肺中叶内侧段见结节，约6mm。"),
    ("E:\\nowhere\\x.png", "右肺中叶外侧段见结节，约7mm。", "image_missing", None),
    ("ok0.png", GOOD, "duplicate_exact", None),
    ("ok0.png", "右肺上叶见一磨玻璃结节 大小约8mm×6mm 边界清晰", "duplicate_near", None),
    ("ok14.png", LONG, KEEP, LONG),
    ("ok14.png", LONG.replace("18mm", "19mm"), "duplicate_near", None),
    ("ok14.png", "左肺上叶见斑片状磨玻璃影，考虑炎性病变。", KEEP, "左肺上叶见斑片状磨玻璃影，考虑炎性病变。"),
    ("ok15.png", GOOD, KEEP, GOOD),  # same report, other image: not a duplicate
    ("ok16.png", "见结节", "too_short", None),
    ("ok17.png", "".join(f"第{i}层面见{i}mm结节。" for i in range(30)), "too_long", None),
    ("ok18.png", "肝脏形态正常，胆囊未见增大。", "missing_keywords", None),
    ("ok19.png", "左肺上叶左肺上叶左肺上叶左肺上叶左肺上叶左肺上叶", "repeated_phrases", None),
    ("ok20.png", "右肺下叶见结节。左肺上叶左肺上叶左肺上叶见斑片影。", KEEP, "右肺下叶见结节。左肺上叶见斑片影。"),
    ("ok21.png", "", "empty_caption", None),
    ("ok22.png", "nan", "empty_caption", None),
    ("", GOOD, "missing_image_path", None),
    ("ok23.png", "今天天气很好，我们去公园散步吧。", "not_a_report", None),
    ("ok24.png", "lorem ipsum dolor sit amet", "not_a_report", None),
    (
        "ok25.png; ok26.png",
        "两肺多发结节，较大者位于右肺下叶，约9mm。",
        KEEP,
        "两肺多发结节，较大者位于右肺下叶，约9mm。",
    ),
    ("ok27.png;missing2.png", "右肺上叶前段见结节，约4mm。", "image_missing", None),
] + [(f"okn{i}.png", NORMAL if i % 2 else "双肺未见异常，纵隔未见肿大淋巴结。", NORMAL_CAPPED, None) for i in range(12)]

CONFIG = dict(
    drop_missing_paths=True,
    max_answer_chars=200,
    require_keywords="结节|mm|肺|段|病灶|纵隔|胸膜",
    max_normal_fraction=0.25,
    seed=7,
)


def write_csv(path: Path, rows, encoding="utf-8", header=("image_path", "caption", "hospital")):
    with open(path, "w", encoding=encoding, newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def make_images(folder: Path) -> None:
    for case in CASES:
        for p in case[0].split(";"):
            if p.strip().startswith("ok"):
                Image.new("L", (4, 4)).save(folder / p.strip())
    (folder / "d_drive" / "win" / "ct").mkdir(parents=True)
    Image.new("L", (4, 4)).save(folder / "d_drive" / "win" / "ct" / "w1.png")


def read(path) -> pd.DataFrame:
    return pd.read_csv(path, encoding="utf-8-sig", dtype=str, keep_default_na=False)


@pytest.fixture(scope="module")
def dirty(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dirty")
    make_images(folder)
    rows = [
        (("D:\\" + img) if img.startswith("win") else img, cap, f"h{i % 3}") for i, (img, cap, *_) in enumerate(CASES)
    ]
    csv_path = write_csv(folder / "captions.csv", rows)
    config = CleaningConfig(**CONFIG, path_map=f"D:/={folder / 'd_drive'}/")
    report = clean_captions(csv_path, folder / "out1", config, verbose=False)
    return folder, csv_path, config, report


def test_every_row_exactly_once_with_expected_reason(dirty):
    folder, _, _, report = dirty
    clean, rejects = read(report.clean_path), read(report.rejects_path)
    ids = [int(i) for i in clean.row_id] + [int(i) for i in rejects.row_id]
    assert sorted(ids) == list(range(len(CASES)))  # nothing lost, nothing twice
    got = {int(r): "" for r in clean.row_id} | dict(zip(map(int, rejects.row_id), rejects.reason))
    for i, (_img, cap, expected, _) in enumerate(CASES):
        if expected == NORMAL_CAPPED:
            assert got[i] in ("", "normal_report_over_cap"), (i, cap)
        else:
            assert got[i] == expected, f"row {i} {cap[:20]!r}: got {got[i]!r}, expected {expected!r}"
    assert set(rejects.reason) <= set(REASONS) and all(rejects.detail)


def test_clean_captions_repaired_and_normalised(dirty):
    clean = read(dirty[3].clean_path).set_index("row_id")
    for i, (_, _, expected, caption) in enumerate(CASES):
        if expected == KEEP:
            assert clean.loc[str(i), "caption"] == caption, i
    assert clean.loc["33", "image_path"] == "ok25.png;ok26.png"
    assert clean.loc["7", "fixes"] == "mojibake_repaired" and "garbage_stripped" in clean.loc["1", "fixes"]
    assert list(clean.columns[:3]) == ["image_path", "prompt", "caption"] and "hospital" in clean.columns


def test_normal_reports_capped_deterministically(dirty):
    folder, csv_path, config, report = dirty
    clean = read(report.clean_path)
    normal = clean.caption.map(tc.is_normal_report)
    assert normal.sum() == int(0.25 * (~normal).sum() / 0.75 + 1e-9) > 0
    assert report.reasons["normal_report_over_cap"] == 12 - normal.sum()
    again = clean_captions(csv_path, folder / "again", config, verbose=False)
    assert read(again.clean_path).row_id.tolist() == clean.row_id.tolist()


def test_summary_counts_add_up(dirty):
    report = dirty[3]
    expected = collections.Counter(c[2] for c in CASES if c[2] not in (KEEP, NORMAL_CAPPED))
    counted = {k: v for k, v in report.reasons.items() if v and k != "normal_report_over_cap"}
    assert counted == dict(expected)
    assert report.rows_in == len(CASES) == report.kept + report.rejected
    assert sum(report.reasons.values()) == report.rejected and report.encoding == "utf-8"
    assert "rows in" in report.table() and Path(report.clean_path).read_bytes()[:3] == b"\xef\xbb\xbf"


def test_num_proc_2_matches_num_proc_1(dirty, monkeypatch):
    folder, csv_path, config, report = dirty
    monkeypatch.setattr(cleaning, "PARALLEL_FILTER_MIN_ROWS", 0)  # parallel filters too
    config2 = CleaningConfig(**{**config.__dict__, "num_proc": 2})
    report2 = clean_captions(csv_path, folder / "out2", config2, verbose=False)
    assert Path(report2.clean_path).read_bytes() == Path(report.clean_path).read_bytes()
    assert Path(report2.rejects_path).read_bytes() == Path(report.rejects_path).read_bytes()


def test_map_function_pickles_for_spawn():
    fn = functools.partial(
        clean_row, cfg=CleaningConfig(), image_col="image_path", text_col="caption", prompt_col=None, base_dir="."
    )
    out = pickle.loads(pickle.dumps(fn))({"image_path": "a.png", "caption": GOOD}, 0)
    assert out["caption"] == GOOD and out["reason"] == ""


def test_gbk_and_bom_csv_and_prompt_column(tmp_path):
    Image.new("L", (4, 4)).save(tmp_path / "a.png")
    rows = [("a.png", GOOD, "请描述这张CT图像"), ("a.png", "", "x"), ("b.png", LONG, "")]
    header = ("image_path", "caption", "prompt")
    for enc, label in (("gbk", "gbk"), ("utf-8-sig", "utf-8-sig")):
        path = write_csv(tmp_path / f"{label}.csv", rows, encoding=enc, header=header)
        report = clean_captions(path, config=CleaningConfig(max_normal_fraction=1), verbose=False)
        clean = read(report.clean_path)
        assert report.encoding == label and (report.kept, report.rejected) == (2, 1)
        assert clean.caption.tolist() == [GOOD, LONG] and clean.prompt.tolist() == ["请描述这张CT图像", ""]
    mixed = tmp_path / "mixed.csv"  # a GBK row pasted into a UTF-8 file: that row is rejected, not lost
    mixed.write_bytes(f"image_path,caption\na.png,{GOOD}\n".encode() + f"a.png,{LONG}\n".encode("gbk"))
    report = clean_captions(mixed, verbose=False)
    assert report.encoding == "utf-8 (undecodable bytes replaced)"
    assert (report.kept, report.reasons["mojibake_unrepairable"]) == (1, 1)


def test_excel_with_sheet_and_column_mapping(tmp_path):
    Image.new("L", (4, 4)).save(tmp_path / "a.png")
    df = pd.DataFrame(
        {"影像路径": ["a.png", "a.png", None], "影像所见": [GOOD, "客服热线", LONG], "reason": ["x", "y", "z"]}
    )
    with pd.ExcelWriter(tmp_path / "total.xlsx") as writer:
        pd.DataFrame({"a": [1]}).to_excel(writer, sheet_name="其他", index=False)
        df.to_excel(writer, sheet_name="报告", index=False)
    report = clean_captions(
        tmp_path / "total.xlsx",
        config=CleaningConfig(sheet="报告", text_column="影像所见", image_column="影像路径"),
        verbose=False,
    )
    rejects = read(report.rejects_path)
    assert (report.rows_in, report.kept, report.encoding) == (3, 1, "excel")
    assert rejects.reason.tolist() == ["boilerplate_only", "missing_image_path"]
    assert rejects.reason_input.tolist() == ["y", "z"]  # an input column named "reason" is kept


def test_cli_and_old_script(tmp_path, monkeypatch, capsys):
    from hf_vlm.cli import main

    Image.new("L", (4, 4)).save(tmp_path / "a.png")
    path = write_csv(tmp_path / "c.csv", [("a.png", GOOD, "h"), ("gone.png", LONG, "h"), ("a.png", GOOD, "h")])
    assert main(["clean", str(path), "--drop_missing_paths", "--no_dedup", "--output_dir", str(tmp_path / "o")]) == 0
    assert "rows in" in capsys.readouterr().out and read(tmp_path / "o" / "c_clean.csv").shape[0] == 2
    bad = tmp_path / "bad.csv"  # unquoted comma: refuse loudly instead of shifting columns
    bad.write_text("image_path,caption\na.png,右肺结节,约5mm\n", encoding="utf-8")
    assert main(["clean", str(bad)]) == 2 and "row_id 0 (line 2) has 3 fields" in capsys.readouterr().err
    script = Path(__file__).resolve().parents[1] / "scripts" / "clean_caption_csv.py"
    monkeypatch.setattr(
        sys,
        "argv",
        [str(script), str(path), "--min_answer_chars", "50", "--require_keywords", "结节|mm|肺叶|段|病灶", "--quiet"],
    )
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(script), run_name="__main__")
    assert exit_info.value.code == 0
    rejects = read(tmp_path / "c_rejects.csv")
    assert rejects.reason.tolist() == ["too_short", "too_short"]  # GOOD has 28 chars < 50


@pytest.mark.parametrize(
    "text,expected",
    [
        ("左肺上叶左肺上叶左肺上叶见结节", "左肺上叶见结节"),
        ("双肺纹理增多。" + "右肺上叶见结节，大小约8mm×6mm。" * 3, "双肺纹理增多。右肺上叶见结节，大小约8mm×6mm。"),
        ("结节大小0.000.000.00mm", "结节大小0.000.000.00mm"),
        ("请访问 http://a.com/x 。右肺结节3.5mm，10:30复查", "右肺结节3.5mm，10:30复查"),
    ],
)
def test_text_transforms(text, expected):
    assert tc.collapse_repeats(tc.strip_garbage(tc.normalize_text(text)))[0] == expected


@pytest.mark.parametrize(
    "text,normal",
    [
        (NORMAL, True),
        ("双肺未见异常，纵隔未见肿大淋巴结。", True),
        ("右肺上叶见2mm结节，余未见异常。", False),
        (GOOD, False),
    ],
)
def test_is_normal_report(text, normal):
    assert tc.is_normal_report(text) is normal

"""Tests for hf_vlm.metrics: reference parity, Chinese pitfalls, findings, repetition, CLI, offline load.

Parity: our BLEU-1..4 / ROUGE-L / CIDEr-D are compared with pycocoevalcap (test extra) and
sacrebleu on the same space-joined character tokens, to 1e-6.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from hf_vlm.cli import main as cli_main
from hf_vlm.metrics import (
    Fact,
    FindingsTable,
    cider_d,
    compute_report_metrics,
    corpus_bleu,
    corpus_rouge_l,
    extract_facts,
    findings_scores,
    load_findings_table,
    text_repetition,
    tokenize,
    tokenize_joined,
)

REPO = Path(__file__).resolve().parents[1]

# (prediction, reference or list of references): identical, partial overlap, empty prediction,
# very short, loop, multi-reference, paraphrase, wrong-lobe template, longer than reference.
PAIRS = [
    ("右肺下叶见一直径约12mm结节，边界清楚。", "右肺下叶见一直径约12mm结节，边界清楚。"),
    ("右肺上叶见磨玻璃结节，大小约8×6mm。", "右肺上叶尖段见磨玻璃密度结节，大小约8×5mm，边缘模糊。"),
    ("", "双肺纹理清晰，未见明显异常。"),
    ("结节", "左肺下叶见小结节。"),
    ("左肺上叶左肺上叶左肺上叶左肺上叶左肺上叶", "左肺上叶见钙化灶。"),
    ("双肺多发结节，较大者约1.2cm。", ["双肺见多发结节，较大者位于右肺下叶，约1.2cm。", "两肺多发小结节。"]),
    ("纵隔内未见肿大淋巴结，双侧胸腔未见积液。", "双侧胸腔无积液，纵隔未见肿大淋巴结。"),
    ("右肺上叶见一结节，约5mm。", "左肺下叶见一结节，约5mm。"),
    ("CT示右肺中叶实变影，伴支气管充气征。", "右肺中叶实变，可见支气管充气征。"),
    ("心影不大，主动脉壁钙化。", ["心影不大，主动脉壁见钙化。", "主动脉钙化。", "心脏大小正常"]),
    ("右侧少量胸腔积液，右肺下叶部分不张，左肺未见异常，纵隔居中。", "右侧胸腔积液。"),
]
PREDS = [p for p, _ in PAIRS]
REFS = [[r] if isinstance(r, str) else r for _, r in PAIRS]
HYP_TOK = [tokenize(p) for p in PREDS]
REF_TOK = [[tokenize(r) for r in rs] for rs in REFS]


# ---------------------------------------------------------------- tokenisation
@pytest.mark.parametrize(
    "text, tokens",
    [
        ("右肺下叶见一直径约12mm结节。", ["右", "肺", "下", "叶", "见", "一", "直", "径", "约", "12mm", "结", "节"]),
        ("大小约8×6mm，1.2cm", ["大", "小", "约", "8×6mm", "1.2cm"]),
        ("约8*6MM", ["约", "8×6mm"]),
        ("ＣＴ示１２ｍｍ", ["ct", "示", "12mm"]),
        ("", []),
    ],
)
def test_char_tokenize(text, tokens):
    assert tokenize(text) == tokens


def test_keep_punct_and_word_granularity():
    assert tokenize("结节，钙化。", keep_punct=True) == ["结", "节", ",", "钙", "化", "。"]
    words = tokenize("右肺下叶见一结节，边界清楚。", granularity="word")
    assert "结节" in words and "，" not in words
    with pytest.raises(ValueError):
        tokenize("结节", granularity="bpe")


# ---------------------------------------------------------------- parity with pycocoevalcap / sacrebleu
def _coco_inputs():
    gts = {i: [" ".join(r) for r in refs] for i, refs in enumerate(REF_TOK)}
    res = {i: [" ".join(h)] for i, h in enumerate(HYP_TOK)}
    return gts, res


def test_bleu_matches_pycocoevalcap():
    bleu_mod = pytest.importorskip("pycocoevalcap.bleu.bleu", reason="pip install pycocoevalcap (test extra)")
    gts, res = _coco_inputs()
    theirs, _ = bleu_mod.Bleu(4).compute_score(gts, res, verbose=0)
    assert corpus_bleu(HYP_TOK, REF_TOK) == pytest.approx(theirs, abs=1e-6)


def test_rouge_matches_pycocoevalcap():
    rouge_mod = pytest.importorskip("pycocoevalcap.rouge.rouge", reason="pip install pycocoevalcap (test extra)")
    gts, res = _coco_inputs()
    theirs, per_theirs = rouge_mod.Rouge().compute_score(gts, res)
    ours, per_ours = corpus_rouge_l(HYP_TOK, REF_TOK)
    assert ours == pytest.approx(theirs, abs=1e-6)
    assert per_ours == pytest.approx(list(per_theirs), abs=1e-6)


def test_cider_d_matches_pycocoevalcap():
    # pycocoevalcap 1.2 ships only `Cider`, but its scorer is CIDEr-D (sigma=6 length penalty,
    # clipping, x10, IDF over the references): that is what we compare against.
    cider_mod = pytest.importorskip("pycocoevalcap.cider.cider", reason="pip install pycocoevalcap (test extra)")
    gts, res = _coco_inputs()
    theirs, per_theirs = cider_mod.Cider().compute_score(gts, res)
    ours, per_ours = cider_d(HYP_TOK, REF_TOK)
    assert ours == pytest.approx(theirs, abs=1e-6)
    assert per_ours == pytest.approx(list(per_theirs), abs=1e-6)
    assert cider_d([["结", "节"]], [[["结", "节"]]])[0] == 0.0  # one report: every IDF is log(1) = 0


def _sacrebleu_refs(refs: list[list[str]]) -> list[list[str | None]]:
    width = max(len(r) for r in refs)
    return [[r[j] if j < len(r) else None for r in refs] for j in range(width)]


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_bleu_matches_sacrebleu_on_char_tokens(order):
    from sacrebleu.metrics import BLEU

    hyps = [" ".join(h) for h in HYP_TOK]
    refs = _sacrebleu_refs([[" ".join(r) for r in rs] for rs in REF_TOK])
    theirs = BLEU(tokenize="none", smooth_method="none", max_ngram_order=order, force=True).corpus_score(hyps, refs)
    assert corpus_bleu(HYP_TOK, REF_TOK)[order - 1] == pytest.approx(theirs.score / 100, abs=1e-6)


def test_bleu_matches_sacrebleu_zh_tokenizer_with_punctuation_kept():
    # sacrebleu's "zh" tokenizer also splits CJK characters, keeps "12mm"/"8×6mm" whole and keeps
    # punctuation: on raw text it equals our char tokens with keep_punct=True.
    from sacrebleu.metrics import BLEU

    ours = compute_report_metrics(PREDS, REFS, granularity="char", keep_punct=True)["bleu_4"]
    theirs = BLEU(tokenize="zh", smooth_method="none").corpus_score(PREDS, _sacrebleu_refs(REFS))
    assert ours == pytest.approx(theirs.score / 100, abs=1e-6)


# ---------------------------------------------------------------- Chinese pitfalls
@pytest.mark.parametrize(
    "pred, ref", [("右肺下叶结节", "右肺下叶见一结节"), ("结节", "左肺下叶见小结节。"), ("左肺", "左侧")]
)
def test_chinese_rouge_is_never_zero_for_overlapping_text(pred, ref):
    # regression: rouge-score's default tokenizer deletes CJK characters and returns 0 here
    assert compute_report_metrics([pred], [ref])["rouge_l"] > 0


def test_report_metrics_keys_and_granularity():
    m = compute_report_metrics(PREDS, [r if len(r) > 1 else r[0] for r in REFS])
    for key in (
        "bleu_1",
        "bleu_2",
        "bleu_3",
        "bleu_4",
        "rouge_l",
        "cider_d",
        "findings_precision",
        "findings_recall",
        "findings_f1",
        "repetition",
    ):
        assert isinstance(m[key], float), key
    assert m["granularity"] == "char" and "CJK character" in m["tokenization"]
    assert m["n_reports"] == len(PAIRS)
    assert compute_report_metrics(PREDS[:2], REFS[:2], granularity="word")["granularity"] == "word"
    with pytest.raises(ValueError):
        compute_report_metrics(["a"], ["a", "b"])


# ---------------------------------------------------------------- findings
F = Fact
FACT_CASES = [
    ("右肺下叶见一直径约12mm结节。", {F("右", "下叶", None, "结节", 12.0)}),
    ("左肺上叶见1.2cm肿块", {F("左", "上叶", None, "肿块", 12.0)}),
    ("右肺上叶尖段磨玻璃结节，大小约8×6mm", {F("右", "上叶", "尖段", "磨玻璃结节", 8.0)}),
    ("双肺未见结节。", set()),
    ("双肺纹理清晰，未见明显异常。", set()),
    ("双肺多发结节", {F("双", None, None, "结节", None)}),
    ("右肺上叶、中叶见结节，未见钙化", {F("右", "上叶", None, "结节", None), F("右", "中叶", None, "结节", None)}),
    (
        "右肺上叶见一约8mm结节，左肺下叶见约3mm钙化灶；右侧胸腔积液。",
        {F("右", "上叶", None, "结节", 8.0), F("左", "下叶", None, "钙化", 3.0), F("右", None, None, "胸腔积液", None)},
    ),
    ("结节位于右肺下叶背段，约5mm", {F("右", "下叶", "背段", "结节", 5.0)}),
    ("中叶见小结节", {F("右", "中叶", None, "结节", None)}),
]


@pytest.mark.parametrize("text, facts", FACT_CASES)
def test_extract_facts(text, facts):
    assert extract_facts(text) == facts


def test_findings_paraphrase_high_template_wrong_lobe_low():
    refs = ["右肺上叶见一结节，大小约8mm，边界清楚。", "左肺下叶见磨玻璃结节，约6mm。", "右侧胸腔积液。"] * 2
    paraphrase = [
        "右肺上叶可见结节影，直径约0.8cm。",
        "左肺下叶磨玻璃结节，大小约6mm。",
        "右侧胸腔少量积液，胸腔积液。",
    ] * 2
    template = ["左肺下叶见一结节，大小约8mm，边界清楚。", "右肺上叶见磨玻璃结节，约6mm。", "左侧胸腔积液。"] * 2
    para, tmpl = compute_report_metrics(paraphrase, refs), compute_report_metrics(template, refs)
    assert para["findings_f1"] == 1.0 and tmpl["findings_f1"] == 0.0
    assert tmpl["bleu_4"] > 0.5 and tmpl["bleu_4"] > para["bleu_4"]  # n-grams reward the wrong template


def test_findings_scores_micro_macro_and_empty_sets():
    s = findings_scores(
        ["右肺下叶结节", "未见异常", "左肺上叶钙化"], ["右肺下叶结节，左肺上叶钙化", "未见异常", "双肺未见结节"]
    )
    assert s["findings_n_pred"] == 2 and s["findings_n_ref"] == 2 and s["findings_n_match"] == 1
    assert s["findings_precision"] == 0.5 and s["findings_recall"] == 0.5
    # per report F1: 2/3, 1 (both empty), 0 (fact where the reference has none)
    assert s["findings_macro_f1"] == pytest.approx((2 / 3 + 1 + 0) / 3)


def test_findings_table_from_yaml_and_tolerance(tmp_path):
    path = tmp_path / "table.yaml"
    path.write_text(
        "extend_default: true\nfindings:\n  树芽征: [树芽征, 树芽]\nsize_tolerance_mm: 1\n", encoding="utf-8"
    )
    table = load_findings_table(path)
    assert "结节" in table.findings and extract_facts("右肺下叶见树芽征", table) == {
        F("右", "下叶", None, "树芽征", None)
    }
    assert findings_scores(["右肺下叶结节约8mm"], ["右肺下叶结节约9mm"], table)["findings_f1"] == 1.0
    assert findings_scores(["右肺下叶结节约8mm"], ["右肺下叶结节约9mm"])["findings_f1"] == 0.0
    (tmp_path / "t.json").write_text(json.dumps({"match_fields": ["side", "finding"]}), encoding="utf-8")
    assert findings_scores(["右肺上叶结节"], ["右肺下叶结节"], tmp_path / "t.json")["findings_f1"] == 1.0
    with pytest.raises(ValueError):
        FindingsTable.from_dict({"lobbes": {}})


# ---------------------------------------------------------------- repetition
def test_repetition_flags_loops():
    assert text_repetition("左肺上叶左肺上叶左肺上叶左肺上叶左肺上叶") > 0.7
    assert text_repetition("右肺下叶见一直径约12mm结节，边界清楚，纵隔未见肿大淋巴结。") < 0.1
    m = compute_report_metrics(PREDS, REFS)
    assert m["repetition_flagged"] == 1 and m["repetition_max"] > 0.7


# ---------------------------------------------------------------- hf-vlm eval
def _write(path: Path, header: str, rows: list[tuple]) -> Path:
    import csv

    with path.open("w", encoding="utf-8-sig", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header.split(","))
        writer.writerows(rows)
    return path


def test_cli_eval_end_to_end(tmp_path, capsys):
    preds = _write(
        tmp_path / "reports.csv", "image_path,report", [("a.png", PREDS[0]), ("b.png", PREDS[1]), ("c.png", PREDS[5])]
    )
    refs = _write(
        tmp_path / "clean.csv",
        "image_path,caption",
        [("c.png", REFS[5][0]), ("a.png", REFS[0][0]), ("b.png", REFS[1][0]), ("c.png", REFS[5][1])],
    )
    out = tmp_path / "m" / "metrics.json"
    assert cli_main(["eval", "--predictions", str(preds), "--references", str(refs), "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Granularity: char" in printed and "BLEU-4" in printed
    metrics = json.loads(out.read_text(encoding="utf-8"))
    expected = compute_report_metrics([PREDS[0], PREDS[1], PREDS[5]], [REFS[0], REFS[1], REFS[5]])
    assert metrics["bleu_4"] == pytest.approx(expected["bleu_4"]) and metrics["n_multi_reference"] == 1

    jsonl = tmp_path / "reports.jsonl"
    jsonl.write_text(
        "\n".join(
            json.dumps({"image_path": k, "text": v}, ensure_ascii=False)
            for k, v in [("a.png", PREDS[0]), ("b.png", PREDS[1]), ("c.png", PREDS[5])]
        ),
        encoding="utf-8",
    )
    assert (
        cli_main(
            [
                "eval",
                "--predictions",
                str(jsonl),
                "--references",
                str(refs),
                "--prediction_column",
                "text",
                "--granularity",
                "word",
            ]
        )
        == 0
    )
    assert "Granularity: word" in capsys.readouterr().out


def test_cli_eval_unmatched_keys_are_errors(tmp_path, capsys):
    preds = _write(tmp_path / "p.csv", "image_path,report", [("/abs/a.png", "结节"), ("x.png", "结节")])
    refs = _write(tmp_path / "r.csv", "image_path,caption", [("a.png", "结节"), ("b.png", "钙化")])
    assert cli_main(["eval", "--predictions", str(preds), "--references", str(refs)]) == 2
    err = capsys.readouterr().err
    assert "'x.png'" in err and "'/abs/a.png'" in err and "--key_basename" in err
    preds = _write(tmp_path / "p2.csv", "image_path,report", [("a.png", "结节")])
    assert cli_main(["eval", "--predictions", str(preds), "--references", str(refs)]) == 2
    assert "'b.png'" in capsys.readouterr().err
    assert (
        cli_main(["eval", "--predictions", str(preds), "--references", str(refs), "--allow_missing_predictions"]) == 0
    )
    assert cli_main(["eval", "--predictions", str(preds), "--references", str(refs), "--reference_column", "text"]) == 2
    assert "no column 'text'" in capsys.readouterr().err


# ---------------------------------------------------------------- offline evaluate modules
def test_load_metric_offline(tmp_path):
    """Run in a fresh interpreter: HF_*_OFFLINE are read at import time, and sockets are disabled."""
    code = textwrap.dedent("""
        import json, socket
        def _no_network(*a, **k):
            raise OSError("network disabled in test")
        socket.socket.connect = _no_network
        socket.create_connection = _no_network
        from hf_vlm.metrics import load_metric
        preds = ["右肺下叶见结节，约8mm", "左肺上叶见钙化"]
        refs = [["右肺下叶见一结节，约8mm", "右肺下叶小结节"], ["左肺上叶钙化灶"]]
        out = {}
        for name in ("bleu", "rouge", "cider", "findings"):
            out.update(load_metric(name, keep_in_memory=True).compute(predictions=preds, references=refs))
        out["single_ref"] = load_metric("rouge", keep_in_memory=True).compute(predictions=preds, references=["右肺下叶结节", "左肺上叶钙化灶"])["rouge_l"]
        print(json.dumps(out))
    """)
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf"),
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    expected = compute_report_metrics(
        ["右肺下叶见结节，约8mm", "左肺上叶见钙化"], [["右肺下叶见一结节，约8mm", "右肺下叶小结节"], ["左肺上叶钙化灶"]]
    )
    for key in ("bleu_1", "bleu_4", "rouge_l", "cider_d", "findings_f1"):
        assert got[key] == pytest.approx(expected[key]), key
    assert got["granularity"] == "char" and got["single_ref"] > 0
    assert tokenize_joined("右肺12mm") == "右 肺 12mm"

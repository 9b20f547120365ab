"""`hf-vlm generate` / `hf-vlm eval` inputs that used to lose or skew results (issue 13, case 7)."""

from __future__ import annotations

import csv
import json


def _write_csv(path, rows, encoding="utf-8"):
    with open(path, "w", encoding=encoding, newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_generate_refuses_to_overwrite_its_input_csv(tmp_path, capsys):
    from hf_vlm.cli import main

    refs = _write_csv(tmp_path / "test_clean.csv", [{"image_path": "a.png", "caption": "右肺上叶见结节。"}])
    before = refs.read_bytes()
    for output in (str(refs), str(tmp_path / "." / "test_clean.csv")):
        code = main(["generate", "--checkpoint", str(tmp_path / "no_model"), "--images", str(refs), "--output", output])
        assert code == 2 and "is the input file" in capsys.readouterr().err
    assert refs.read_bytes() == before


def test_eval_reports_failed_predictions_apart_and_reads_gbk_references(tmp_path, capsys):
    from hf_vlm.cli import main

    reference = "右肺上叶见一直径约8mm结节，边界清楚。纵隔未见肿大淋巴结。"
    refs = _write_csv(
        tmp_path / "refs.csv", [{"image_path": f"{i}.png", "caption": reference} for i in range(4)], encoding="gbk"
    )  # written by Excel on a Chinese Windows
    preds = _write_csv(
        tmp_path / "reports.csv",
        [
            {"image_path": "0.png", "prompt": "", "report": reference, "error": ""},
            {"image_path": "1.png", "prompt": "", "report": reference, "error": ""},
            {"image_path": "2.png", "prompt": "", "report": "", "error": "ImageLoadError: 2.png: file not found"},
            {"image_path": "3.png", "prompt": "", "report": "", "error": ""},
        ],
    )
    out = tmp_path / "metrics.json"
    assert main(["eval", "--predictions", str(preds), "--references", str(refs), "--output", str(out)]) == 0
    err = capsys.readouterr().err
    assert "2 failed predictions were not scored (1 unreadable image, 1 empty report)" in err
    metrics = json.loads(out.read_text(encoding="utf-8"))
    assert metrics["n_failed_predictions"] == 2 and metrics["n_reports"] == 2
    assert {f["key"] for f in metrics["failed_predictions"]} == {"2.png", "3.png"}
    assert metrics["bleu_4"] > 0.99  # the two real reports are perfect: not dragged to 0.5 by the failures

    out_all = tmp_path / "metrics_all.json"
    assert (
        main(
            [
                "eval",
                "--predictions",
                str(preds),
                "--references",
                str(refs),
                "--output",
                str(out_all),
                "--include_failed",
            ]
        )
        == 0
    )
    included = json.loads(out_all.read_text(encoding="utf-8"))
    assert included["n_reports"] == 4 and included["n_failed_predictions"] == 0 and included["bleu_4"] < 0.6


def test_eval_names_an_unreadable_file(tmp_path, capsys):
    from hf_vlm.cli import main

    preds = tmp_path / "reports.jsonl"
    preds.write_bytes(b'{"image_path": "0.png", "report": "\xb7\xce"}\n')  # GBK bytes in a JSONL file
    refs = _write_csv(tmp_path / "refs.csv", [{"image_path": "0.png", "caption": "右肺"}])
    assert main(["eval", "--predictions", str(preds), "--references", str(refs)]) == 2
    assert f"{preds}: cannot be read" in capsys.readouterr().err

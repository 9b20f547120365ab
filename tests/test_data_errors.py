"""Every data error names the CSV file and the row_id (issue 13, case 8).

Before: the collator said "Row 2" (the position in the batch) for row_id 7, a prompt with two
<image> markers named no row, a header-only CSV failed with datasets' `Instruction "train"
corresponds to no data!`, and `clean` kept captions containing <image>.
"""

from __future__ import annotations

import csv

import pytest


def _csv(path, rows):
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["row_id", "image_path", "prompt", "caption"])
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture
def rows(ct_images, tmp_path):
    for i, image in enumerate(ct_images):
        image.save(tmp_path / f"{i}.png")
    caption = "右肺上叶见一直径约8mm结节，边界清楚。"
    return [
        {"row_id": str(7 + i), "image_path": f"{i % len(ct_images)}.png", "prompt": "", "caption": caption}
        for i in range(3)
    ]


def test_collator_errors_name_the_file_and_row_id(rows, micro_processor, tmp_path):
    from hf_vlm.data.collator import DataCollatorForMambaVLM, PromptTooLongError
    from hf_vlm.data.encoding import load_training_dataset

    rows[2]["caption"] = "见<image>结节，直径约8mm。"  # the marker lands in the answer
    path = _csv(tmp_path / "train.csv", rows)
    dataset = load_training_dataset(str(path), micro_processor)
    collator = DataCollatorForMambaVLM(
        micro_processor.tokenizer.pad_token_id, image_token_id=micro_processor.image_token_id
    )
    with pytest.raises(ValueError, match=rf"{path} row_id 9: an <image> placeholder lies in the answer"):
        collator([dataset[0], dataset[2]])  # batch position 1 is row_id 9
    short = DataCollatorForMambaVLM(micro_processor.tokenizer.pad_token_id, max_length=3)
    with pytest.raises(PromptTooLongError, match=rf"{path} row_id 8: visual \+ prompt tokens"):
        short([dataset[1]])


def test_two_image_markers_name_the_row(rows, micro_processor, tmp_path):
    from hf_vlm.data.encoding import load_training_dataset

    rows[1]["prompt"] = "<image><image>请写出影像所见。"
    path = _csv(tmp_path / "train.csv", rows)
    dataset = load_training_dataset(str(path), micro_processor)
    with pytest.raises(ValueError, match=rf"{path} row_id 8: Prompt has 2 <image> marker\(s\) but 1 image"):
        dataset[1]


def test_header_only_csv_names_the_file(tmp_path, micro_processor):
    from hf_vlm.data.encoding import load_training_dataset

    path = tmp_path / "empty.csv"
    path.write_text("row_id,image_path,prompt,caption\n", encoding="utf-8")
    with pytest.raises(ValueError, match=rf"{path}: the CSV has a header but no data rows"):
        load_training_dataset(str(path), micro_processor)


def test_clean_rejects_captions_with_an_image_marker(rows, tmp_path):
    from hf_vlm.data.cleaning import CleaningConfig, clean_captions

    rows[1]["caption"] = "右肺上叶<image>见一直径约8mm结节，边界清楚。"
    path = _csv(tmp_path / "raw.csv", rows)
    report = clean_captions(path, tmp_path / "out", CleaningConfig(dedup=False, max_normal_fraction=1), verbose=False)
    assert report.kept == 2 and report.reasons["image_token_in_caption"] == 1
    with open(report.rejects_path, encoding="utf-8-sig", newline="") as handle:
        rejected = list(csv.DictReader(handle))
    assert [r["reason"] for r in rejected] == ["image_token_in_caption"] and rejected[0]["row_id"] == "1"

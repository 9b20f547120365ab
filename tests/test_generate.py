"""`hf-vlm generate` on a tiny saved checkpoint: inputs, outputs, errors, settings, beams, streaming."""

from __future__ import annotations

import csv
import json
import shutil

import pytest
import torch
from PIL import Image

from hf_vlm.cli import main

GEN = ["--max_new_tokens", "8", "--no_progress"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_checkpoint):
    root = tmp_path_factory.mktemp("generate")
    checkpoint, assets = tiny_checkpoint(root)
    folder = root / "images"
    folder.mkdir()
    eval_images = sorted((root / "assets" / "data" / "images" / "eval").glob("*.png"))
    for path in eval_images:
        shutil.copy(path, folder / path.name)
    Image.new("RGB", (40, 40), "white").save(folder / "white.png")
    return {"checkpoint": str(checkpoint), "folder": folder, "eval_images": eval_images, "root": root}


def read_csv(path):
    with open(path, encoding="utf-8-sig", newline="") as handle:
        return list(csv.DictReader(handle))


def test_folder_gives_one_row_per_image_and_error_rows(tiny, tmp_path):
    folder = tmp_path / "in"
    shutil.copytree(tiny["folder"], folder)
    (folder / "corrupt.png").write_bytes(b"not a png")
    (folder / "notes.txt").write_text("ignored: not an image")
    out = tmp_path / "reports.csv"
    assert (
        main(
            [
                "generate",
                "--checkpoint",
                tiny["checkpoint"],
                "--images",
                str(folder),
                "--output",
                str(out),
                "--batch_size",
                "3",
                *GEN,
            ]
        )
        == 0
    )
    assert out.read_bytes().startswith(b"\xef\xbb\xbf")  # utf-8-sig: Excel shows the Chinese text
    rows = read_csv(out)
    expected = sorted(p for p in folder.iterdir() if p.suffix == ".png")
    assert [r["image_path"] for r in rows] == [str(p) for p in expected]
    assert list(rows[0]) == ["image_path", "prompt", "report", "error"]
    bad = [r for r in rows if r["image_path"].endswith("corrupt.png")]
    assert len(bad) == 1 and bad[0]["report"] == "" and "corrupt.png" in bad[0]["error"]
    good = [r for r in rows if not r["error"]]
    assert len(good) == 5 and all(r["report"] for r in good)
    assert all(r["prompt"] == "请根据CT图像写出影像所见。" for r in rows)


def test_csv_input_jsonl_output_batched_equals_one_by_one(tiny, tmp_path):
    prompts = ["请描述。", "请根据CT图像写出影像所见，注意结节位置。", "", "影像所见？"]
    csv_path = tmp_path / "test.csv"
    for image in tiny["eval_images"]:
        shutil.copy(image, tmp_path / image.name)
    with open(csv_path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image_path", "prompt", "caption"])
        for image, prompt in zip(tiny["eval_images"], prompts):
            writer.writerow([image.name, prompt, "右肺上叶见结节。"])  # relative to the CSV's folder
        writer.writerow(["missing.png", "", "右肺上叶见结节。"])
    outputs = {}
    for batch_size in ("4", "1"):
        out = tmp_path / f"reports_{batch_size}.jsonl"
        assert (
            main(
                [
                    "generate",
                    "--checkpoint",
                    tiny["checkpoint"],
                    "--images",
                    str(csv_path),
                    "--output",
                    str(out),
                    "--batch_size",
                    batch_size,
                    *GEN,
                ]
            )
            == 0
        )
        text = out.read_text(encoding="utf-8")
        assert "注意结节位置" in text and "\\u" not in text  # ensure_ascii=False
        outputs[batch_size] = [json.loads(line) for line in text.splitlines()]
    batched, single = outputs["4"], outputs["1"]
    assert [r["image_path"] for r in batched] == [p.name for p in tiny["eval_images"]] + ["missing.png"]
    assert [r["report"] for r in batched] == [r["report"] for r in single]  # left padding: same greedy tokens
    assert len({r["report"] for r in batched[:4]}) > 1 and all(r["report"] for r in batched[:4])
    assert batched[-1]["report"] == "" and "file not found" in batched[-1]["error"]
    assert batched[2]["prompt"] == "请根据CT图像写出影像所见。"  # empty CSV prompt -> the training prompt


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--max_visual_tokens", "64"], ["--max_visual_tokens 64", "max_visual_tokens=4"]),
        (["--llm_8bit"], ["--llm_8bit True", "llm_8bit=False"]),
    ],
)
def test_settings_that_contradict_training_are_errors(tiny, tmp_path, capsys, flags, expected):
    image = str(tiny["eval_images"][0])
    assert main(["generate", "--checkpoint", tiny["checkpoint"], "--images", image, *flags, *GEN]) == 2
    err = capsys.readouterr().err
    assert all(text in err for text in expected), err


def test_matching_settings_are_accepted(tiny, capsys):
    image = str(tiny["eval_images"][0])
    args = [
        "generate",
        "--checkpoint",
        tiny["checkpoint"],
        "--images",
        image,
        "--max_visual_tokens",
        "4",
        "--no-llm_8bit",
        *GEN,
    ]
    assert main(args) == 0


def test_single_image_streams_token_by_token(tiny, capsys, monkeypatch):
    import transformers

    from hf_vlm.inference import generate_batch, load_for_inference

    # the streamer is fed once per decode step (not once at the end); what it prints of each step
    # depends on the text (it holds back incomplete UTF-8 / words), so the feed is what is counted
    fed = []
    original = transformers.TextStreamer.put
    monkeypatch.setattr(
        transformers.TextStreamer, "put", lambda self, value: (fed.append(value.numel()), original(self, value))[1]
    )
    image = tiny["eval_images"][0]
    assert main(["generate", "--checkpoint", tiny["checkpoint"], "--images", str(image), *GEN]) == 0
    printed = capsys.readouterr().out
    model, processor, _ = load_for_inference(tiny["checkpoint"])
    expected = generate_batch(model, processor, [[Image.open(image).convert("RGB")]], [None], max_new_tokens=8)[0]
    assert expected and printed.strip() == expected
    assert len(fed) >= 3 and fed[1:] == [1] * (len(fed) - 1), fed  # the prompt, then one token per step


def test_beam_search_reorders_the_recurrent_cache(tiny, tmp_path, monkeypatch):
    """Beam search with the cache equals beam search that recomputes every prefix (no cache)."""
    from transformers.cache_utils import Cache

    from hf_vlm.inference import generate_batch, load_for_inference

    reorders = []
    original = Cache.reorder_cache
    monkeypatch.setattr(
        Cache, "reorder_cache", lambda self, idx: (reorders.append(idx.tolist()), original(self, idx))[1]
    )
    out = tmp_path / "beams.csv"
    assert (
        main(
            [
                "generate",
                "--checkpoint",
                tiny["checkpoint"],
                "--images",
                str(tiny["folder"]),
                "--output",
                str(out),
                "--num_beams",
                "3",
                *GEN,
            ]
        )
        == 0
    )
    assert any(r != sorted(r) for r in reorders), "beams never swapped: the check would prove nothing"
    model, processor, _ = load_for_inference(tiny["checkpoint"])
    images = [[Image.open(p).convert("RGB")] for p in sorted(tiny["folder"].iterdir())]
    reference = generate_batch(
        model, processor, images, [None] * len(images), num_beams=3, max_new_tokens=8, use_cache=False
    )
    assert [r["report"] for r in read_csv(out)] == reference


def test_beams_of_a_multi_image_study_see_its_own_images(tiny):
    """generate() repeats pixel_values image by image; generate_batch must pair each beam with its study."""
    from hf_vlm.inference import generate_batch, load_for_inference

    model, processor, _ = load_for_inference(tiny["checkpoint"])
    a, b, c = (Image.open(p).convert("RGB") for p in tiny["eval_images"][:3])
    studies = [[a, b], [c, Image.new("RGB", (32, 32), "white")]]
    prefill = []
    handle = model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: prefill.append(kwargs["inputs_embeds"]) if not prefill else None, with_kwargs=True
    )
    generate_batch(model, processor, studies, [None, None], num_beams=2, max_new_tokens=4)
    handle.remove()
    inputs = processor(images=studies, text=[None, None])
    expected, _ = model.embed_inputs(inputs["input_ids"], inputs["pixel_values"])
    assert torch.allclose(prefill[0], expected.repeat_interleave(2, dim=0))


def test_8bit_checkpoint_loads_in_8bit_and_runs_in_full_precision_on_request(tiny_checkpoint, tmp_path, capsys):
    """A checkpoint stored with int8 weights: 8-bit by default; --no-llm_8bit de-quantises it, with a note."""
    checkpoint, assets = tiny_checkpoint(tmp_path, llm_8bit=True)
    image = sorted((tmp_path / "assets" / "data" / "images" / "eval").glob("*.png"))[0]
    out, full = tmp_path / "r.csv", tmp_path / "full.csv"
    assert main(["generate", "--checkpoint", str(checkpoint), "--images", str(image), "--output", str(out), *GEN]) == 0
    assert read_csv(out)[0]["error"] == ""
    capsys.readouterr()
    args = ["generate", "--checkpoint", str(checkpoint), "--images", str(image), "--output", str(full), "--no-llm_8bit"]
    assert main([*args, *GEN]) == 0
    err = capsys.readouterr().err
    assert "note:" in err and "trained with an 8-bit LLM" in err and "full precision" in err
    assert read_csv(full)[0]["error"] == ""


def test_8bit_and_lora_checkpoints_trained_by_the_cli_generate(tmp_path, capsys):
    """Issue 17: `hf-vlm train --llm_8bit true` (and + LoRA) exports a de-quantised fp32 checkpoint; loading
    it with a bitsandbytes config in the model config made transformers take the fp32 weights as already
    quantised, and every generate failed with "'Parameter' object has no attribute 'CB'"."""
    assets = tmp_path / "assets"
    micro = [
        "--tiny_preset",
        "micro",
        "--max_visual_tokens",
        "4",
        "--synthetic_train_rows",
        "8",
        "--synthetic_eval_rows",
        "0",
        "--synthetic_lm_steps",
        "2",
        "--synthetic_dir",
        str(assets),
        "--per_device_train_batch_size",
        "2",
        "--max_steps",
        "1",
        "--save_strategy",
        "no",
        "--plot_loss",
        "false",
        "--unfreeze_llm_layers",
        "0",
        "--llm_8bit",
        "true",
    ]
    image = str(sorted((assets / "data" / "images" / "train").glob("*.png"))[0]) if assets.exists() else None
    for name, extra in (("int8", ["--stage", "align"]), ("qlora", ["--stage", "finetune", "--use_lora", "true"])):
        out = tmp_path / name
        assert main(["train", "tiny_demo", *micro, *extra, "--output_dir", str(out)]) == 0
        image = image or str(sorted((assets / "data" / "images" / "train").glob("*.png"))[0])
        reports = tmp_path / f"{name}.csv"
        assert main(["generate", "--checkpoint", str(out), "--images", image, "--output", str(reports), *GEN]) == 0
        assert read_csv(reports)[0]["error"] == ""
        from hf_vlm.inference import load_for_inference

        model, _, settings = load_for_inference(str(out), device="cpu")
        assert (
            settings["llm_8bit"]
            and type(model.language_model.backbone.layers[0].mixer.in_proj).__name__ == "Linear8bitLt"
        )
        assert main(["generate", "--checkpoint", str(out), "--images", image, "--no-llm_8bit", *GEN]) == 0
        assert "trained with an 8-bit LLM" in capsys.readouterr().err

"""Every shipped recipe, end to end as a user runs it (issue 17): `hf-vlm train` -> `hf-vlm generate` on a
folder and on a CSV -> `hf-vlm eval` -> the serve page's callback on one image -> resume from the last
checkpoint for one more step. Only the public CLI (`hf_vlm.cli.main`); add every new recipe here.

CPU substitutes, named in each test id:
- `tiny`: the recipe's hub models are replaced by the micro parts of one shared synthetic asset folder
  (built once by `hf-vlm train tiny_demo`), with its data; steps, batch sizes and eval sizes shrunk.
- `fp32`: `bf16: null` resolves to fp32 without a bf16 GPU (the recipe's bf16 autocast is a GPU path).
- `torch-scan`: without mamba-ssm the fused CUDA kernels are replaced by hf_vlm's chunked scan.
- `bnb-cpu`: bitsandbytes' CPU int8 kernels stand in for the CUDA ones (8-bit rows).
- `workers0`: dataloader_num_workers 0 (a worker pool for 3 steps costs more than the steps).
- `studies-4`: study recipes (`studies: true`, not synthetic) train on 8 synthetic NIfTI studies
  (`hf_vlm.synthetic_volumes`) with 4 slices of 32 px, 4 z bins x 1 token, the feature cache in the
  session folder; generate / serve get NIfTI studies.
Stage 2 recipes start from the Stage 1 row of the same bridge (their `init_from`).
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ROOT / "recipes"
BRIDGES = ("mlp", "qformer")
SUBSTITUTES = "tiny,fp32,torch-scan,workers0"
# Stage 2 recipe -> the Stage 1 recipe whose output is its init_from
STAGE1_OF = {
    "stage2_finetune": "stage1_align",
    "stage2_finetune_study": "stage1_align_study",
    "families/stage2_finetune_falcon_h1": "families/stage1_align_falcon_h1",
}
# recipe -> extra overrides of a row variant (id suffix, overrides)
# (8-bit + Q-Former is the low_vram qformer row: one int8 variant is enough)
VARIANTS = {("stage1_align", "mlp"): [("int8", {"llm_8bit": True})]}
# Falcon-H1 family recipes: the LLM is substituted by a tiny falcon_h1 config (hf_vlm.backbones.example_config)
FAMILY_LM = {"families/stage1_align_falcon_h1": "falcon_h1", "families/stage2_finetune_falcon_h1": "falcon_h1"}
ASSET_SETTINGS = {
    "tiny_preset": "micro",
    "synthetic_train_rows": 8,
    "synthetic_eval_rows": 4,
    "synthetic_lm_steps": 60,
    "seed": 0,
}
GEN = ["--max_new_tokens", "12", "--no_progress", "--batch_size", "4"]


FIRST = ("low_vram", "stage1_align", "stage2_finetune")  # the low-VRAM path first; the rest by name


def _recipe_names() -> list[str]:
    names = sorted(str(p.relative_to(RECIPES).with_suffix("")) for p in RECIPES.rglob("*.yaml"))
    return sorted(names, key=lambda n: (FIRST.index(n) if n in FIRST else len(FIRST), "/" in n, n))


def _flags(overrides: dict) -> list[str]:
    return [part for key, value in overrides.items() for part in (f"--{key}", str(value))]


def _read_recipe(name: str) -> dict:
    import yaml

    return yaml.safe_load((RECIPES / f"{name}.yaml").read_text(encoding="utf-8"))


def _rows():
    rows = []
    for name in _recipe_names():
        recipe = _read_recipe(name)
        for bridge in BRIDGES:
            variants = [("", {})] + VARIANTS.get((name, bridge), [])
            for suffix, extra in variants:
                quant = recipe.get("llm_8bit") or extra.get("llm_8bit")
                family = f",tiny-{FAMILY_LM[name]}" if name in FAMILY_LM else ""
                subs = SUBSTITUTES + (",bnb-cpu" if quant else "") + family + (",studies-4" if _studies(recipe) else "")
                tag = "-".join(filter(None, [name.replace("/", "."), bridge, suffix]))
                rows.append(pytest.param(name, bridge, extra, id=f"{tag}[{subs}]"))
    return rows


@pytest.fixture(scope="session")
def matrix(tmp_path_factory):
    """One synthetic asset folder for the whole matrix (built through `hf-vlm train tiny_demo`), a folder
    and a CSV of two held-out images, and a cache of finished training runs (Stage 1 -> Stage 2)."""
    from hf_vlm.cli import main

    root = tmp_path_factory.mktemp("matrix")
    assets = root / "assets"
    seed_run = [
        "train",
        "tiny_demo",
        *_flags(
            {
                **ASSET_SETTINGS,
                "max_visual_tokens": 4,
                "synthetic_dir": assets,
                "max_steps": 1,
                "save_strategy": "no",
                "plot_loss": False,
                "per_device_train_batch_size": 2,
                "output_dir": root / "seed",
            }
        ),
    ]
    assert main(seed_run) == 0
    folder, refs = _held_out_inputs(assets / "data" / "eval.csv", root / "images", root / "refs.csv")
    return {"root": root, "assets": assets, "folder": folder, "refs": refs, "runs": {}, "lms": {}}


def _held_out_inputs(eval_csv, folder, refs):
    """The first two rows of `eval_csv` as generate's inputs: their images copied into `folder`
    and the rows themselves written to the CSV `refs`."""
    with open(eval_csv, encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))[:2]
    folder.mkdir()
    for row in rows:
        shutil.copy(row["image_path"], folder)
    with open(refs, "w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return folder, refs


def _studies(recipe: dict) -> bool:
    """A study recipe on real data (tiny_demo_3d brings its own synthetic studies)."""
    return bool(recipe.get("studies")) and not recipe.get("synthetic_data")


def _study_data(matrix) -> dict:
    """8 train / 4 eval synthetic NIfTI studies (micro image size), a folder and a CSV of two, once."""
    if "studies" not in matrix:
        from hf_vlm.presets import tiny_vision_config
        from hf_vlm.synthetic_volumes import make_synthetic_studies

        root, size = matrix["root"] / "study_data", tiny_vision_config(ASSET_SETTINGS["tiny_preset"]).image_size
        train = make_synthetic_studies(str(root), 8, seed=0, image_size=size, split="train")
        evals = make_synthetic_studies(str(root), 4, seed=1, image_size=size, split="eval")
        folder, refs = _held_out_inputs(evals, root / "held_out", root / "refs.csv")
        matrix["studies"] = {"train": train, "eval": evals, "folder": folder, "refs": refs, "size": size}
    return matrix["studies"]


def _family_lm(matrix, model_type: str) -> str:
    """A tiny language model of `model_type` saved once (the family recipe's backbone, substituted)."""
    if model_type not in matrix["lms"]:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from hf_vlm.backbones import example_config

        tokenizer = AutoTokenizer.from_pretrained(matrix["assets"] / "processor")
        path = matrix["root"] / f"lm_{model_type}"
        config = example_config(model_type, vocab_size=len(tokenizer) + 8)
        AutoModelForCausalLM.from_config(config).save_pretrained(path)
        matrix["lms"][model_type] = str(path)
    return matrix["lms"][model_type]


def _overrides(matrix, name: str, bridge: str, extra: dict, out: Path) -> dict:
    recipe, assets = _read_recipe(name), matrix["assets"]
    overrides = {
        "output_dir": out,
        "max_steps": 2,
        "save_steps": 2,
        "logging_steps": 1,
        "warmup_steps": 0,
        "per_device_train_batch_size": 2,
        "per_device_eval_batch_size": 2,
        "gradient_accumulation_steps": 1,
        "eval_samples": 2,
        "dataloader_num_workers": 0,
        "plot_loss": False,
        "max_visual_tokens": 4,
        "train_file": assets / "data" / "train.csv",
        "eval_file": assets / "data" / "eval.csv",
    }
    if recipe.get("eval_strategy", "no") != "no":
        overrides["eval_steps"] = 2  # an evaluation (and the report-eval callback) inside the 2 steps
    if recipe.get("synthetic_data"):
        overrides.update({k: v for k, v in ASSET_SETTINGS.items()}, synthetic_dir=assets)
    if name in STAGE1_OF:  # init_from = the Stage 1 output of the same bridge
        overrides["init_from"] = _trained(matrix, STAGE1_OF[name], bridge)
        overrides["vision_model_name_or_path"] = assets / "vision_tower"
    elif not recipe.get("synthetic_data"):
        overrides.update(
            vision_model_name_or_path=assets / "vision_tower",
            processor_name_or_path=assets / "processor",
            language_model_name_or_path=assets / "mamba_lm",
            bridge_type=bridge,
        )
    else:
        overrides["bridge_type"] = bridge
    if name in FAMILY_LM:
        overrides["language_model_name_or_path"] = _family_lm(matrix, FAMILY_LM[name])
    if _studies(recipe):  # Stage 1 and Stage 2 rows get the same study settings (init_from's processor)
        data = _study_data(matrix)
        overrides.update(
            train_file=data["train"],
            eval_file=data["eval"],
            study_num_slices=4,
            study_image_size=data["size"],
            study_depth_tokens=4,
            vision_feature_cache=matrix["root"] / "feature_cache",
        )
    return {**overrides, **extra}


def _trained(matrix, name: str, bridge: str, extra: dict | None = None) -> str:
    """`hf-vlm train` for one row, once per session (Stage 2 rows reuse the Stage 1 row's output)."""
    from hf_vlm.cli import main

    key = (name, bridge, json.dumps(extra or {}, sort_keys=True))
    if key not in matrix["runs"]:
        out = matrix["root"] / "runs" / "-".join([name.replace("/", "."), bridge, *map(str, (extra or {}).values())])
        argv = ["train", str(RECIPES / f"{name}.yaml"), *_flags(_overrides(matrix, name, bridge, extra or {}, out))]
        code = main(argv)
        assert code == 0, f"hf-vlm train {name} ({bridge}) exited {code}"
        matrix["runs"][key] = (str(out), argv)
    return matrix["runs"][key][0]


def _serve_callback(checkpoint: str, monkeypatch):
    """`hf-vlm serve --checkpoint ...` up to the page (launch replaced): the page's generate callback."""
    import gradio

    from hf_vlm.cli import main

    apps = []
    monkeypatch.setattr(gradio.Blocks, "launch", lambda self, *a, **k: apps.append(self))
    assert main(["serve", "--checkpoint", checkpoint]) == 0
    (fn,) = [f.fn for f in apps[0].fns.values() if f.api_name == "generate"]
    return fn


def _step(row: str, step: str) -> None:
    print(f"MATRIX {row} {step} ok", flush=True)  # per-step record in the log (pytest -s)


def _reports(path: Path) -> list[dict]:
    with open(path, encoding="utf-8-sig", newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.parametrize("name, bridge, extra", _rows())
def test_recipe_end_to_end(matrix, name, bridge, extra, monkeypatch, tmp_path):
    from hf_vlm.cli import main

    row = f"{name}-{bridge}" + ("-int8" if extra else "")
    studies = _studies(_read_recipe(name))
    inputs = _study_data(matrix) if studies else matrix
    checkpoint = _trained(matrix, name, bridge, extra)
    _step(row, "train")
    record = json.loads((Path(checkpoint) / "hf_vlm_checkpoint.json").read_text(encoding="utf-8"))
    if extra.get("llm_8bit") or _read_recipe(name).get("llm_8bit"):
        assert record["trained_llm_quantization"] == "8bit"

    folder_out, csv_out = tmp_path / "folder.csv", tmp_path / "csv.csv"
    assert (
        main(
            [
                "generate",
                "--checkpoint",
                checkpoint,
                "--images",
                str(inputs["folder"]),
                "--output",
                str(folder_out),
                *GEN,
            ]
        )
        == 0
    )
    assert (
        main(["generate", "--checkpoint", checkpoint, "--images", str(inputs["refs"]), "--output", str(csv_out), *GEN])
        == 0
    )
    for path in (folder_out, csv_out):
        rows = _reports(path)
        assert len(rows) == 2 and all(r["error"] == "" and r["report"].strip() for r in rows), rows
        _step(row, f"generate-{path.stem}")

    metrics = tmp_path / "metrics.json"
    assert (
        main(["eval", "--predictions", str(csv_out), "--references", str(inputs["refs"]), "--output", str(metrics)])
        == 0
    )
    scores = json.loads(metrics.read_text(encoding="utf-8"))
    assert scores["n_failed_predictions"] == 0
    _step(row, "eval")

    fn = _serve_callback(checkpoint, monkeypatch)
    image = sorted(inputs["folder"].iterdir())[0]
    if studies:  # a NIfTI through the file widget: (report, slice strip) with the 4 slices the model saw
        steps = list(fn(None, str(image), "", 12, 1.0, 0, 1, False, 1.0, 1.0))
        assert len(steps[0][1]) == 4 and steps[-1][0].strip()
    else:
        steps = list(fn(str(image), None, "", 12, 1.0, 0, 1, False, 1.0, 1.0))
        report = steps[-1][0] if isinstance(steps[-1], tuple) else steps[-1]  # study checkpoints: + the strip
        assert steps and report.strip()
    _step(row, "serve")

    _, argv = matrix["runs"][(name, bridge, json.dumps(extra, sort_keys=True))]
    # one more step, no evaluation inside it (the row's evaluation ran in the first 2 steps)
    resumed = [
        *argv,
        "--max_steps",
        "3",
        "--resume_from_checkpoint",
        "last",
        "--eval_strategy",
        "no",
        "--load_best_model_at_end",
        "false",
        "--save_strategy",
        "no",
    ]
    assert main(resumed) == 0
    state = json.loads((Path(checkpoint) / "trainer_state.json").read_text(encoding="utf-8"))
    assert state["global_step"] == 3
    _step(row, "resume")

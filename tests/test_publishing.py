"""push_to_hub gives a checkpoint that loads elsewhere (issue 13, case 6).

Before: with `save_frozen_vision_weights: false` the pushed folder had no tower (re-attach is
skipped for hub ids, so a random tower was used) and no remote code (a machine without hf_vlm
could not load it). The hub is a local stand-in: `HfApi.create_repo` / `upload_folder` copy into a
folder, nothing touches the network; the pushed folder is loaded in a subprocess where
`import hf_vlm` is impossible, through the Auto classes with trust_remote_code.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import types
from fnmatch import fnmatch

import torch


def local_hub(monkeypatch, root):
    """`HfApi` whose create_repo/upload_folder write into `root/<repo_id>` (ignore_patterns honoured)."""
    import huggingface_hub

    def create_repo(self, repo_id, **kwargs):
        (root / repo_id).mkdir(parents=True, exist_ok=True)
        return types.SimpleNamespace(repo_id=repo_id)

    def upload_folder(self, *, repo_id, folder_path, ignore_patterns=(), **kwargs):
        for base, _dirs, files in os.walk(folder_path):
            for name in files:
                rel = os.path.relpath(os.path.join(base, name), folder_path).replace(os.sep, "/")
                if any(fnmatch(rel, pattern) for pattern in ignore_patterns or ()):
                    continue
                target = root / repo_id / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(os.path.join(base, name), target)

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)


def test_pushed_checkpoint_loads_without_hf_vlm_with_its_tower(tiny_checkpoint, tmp_path, monkeypatch):
    from PIL import Image
    from safetensors import safe_open

    from hf_vlm import MambaVLMForConditionalGeneration, MambaVLMProcessor
    from hf_vlm.checkpoints import push_output_dir, save_vlm_checkpoint

    checkpoint, assets = tiny_checkpoint(tmp_path)
    model = MambaVLMForConditionalGeneration.from_pretrained(checkpoint).eval()
    model.vision_tower.requires_grad_(False)
    processor = MambaVLMProcessor.from_pretrained(checkpoint)
    final = tmp_path / "final"  # what a recipe with save_frozen_vision_weights: false leaves
    save_vlm_checkpoint(
        model, str(final), save_frozen_vision_weights=False, vision_model_name_or_path=assets.vision_path
    )
    processor.save_pretrained(final)
    (final / "README.md").write_text("# card\n", encoding="utf-8")
    (final / "checkpoint-2").mkdir()
    (final / "checkpoint-2" / "optimizer.pt").write_bytes(b"x")
    with safe_open(str(final / "model.safetensors"), "pt") as handle:
        assert not any(k.startswith("vision_tower.") for k in handle.keys())  # noqa: SIM118

    hub = tmp_path / "hub"
    local_hub(monkeypatch, hub)
    args = types.SimpleNamespace(hub_model_id="someone/ct-reports", hub_token=None, hub_private_repo=False)
    assert push_output_dir(str(final), args) == "someone/ct-reports"
    pushed = hub / "someone" / "ct-reports"
    with safe_open(str(pushed / "model.safetensors"), "pt") as handle:
        assert any(k.startswith("vision_tower.") for k in handle.keys())  # noqa: SIM118 (the tower travels with it)
    assert json.loads((pushed / "hf_vlm_checkpoint.json").read_text())["vision_tower_weights"] == "included"
    assert "AutoModelForImageTextToText" in json.loads((pushed / "config.json").read_text())["auto_map"]
    assert "AutoProcessor" in json.loads((pushed / "processor_config.json").read_text())["auto_map"]
    assert (pushed / "modeling_mamba_vlm.py").exists() and (pushed / "processing_mamba_vlm.py").exists()
    assert (pushed / "README.md").exists() and not (pushed / "checkpoint-2").exists()

    shutil.rmtree(assets.vision_path)  # elsewhere, the local tower folder does not exist
    image = sorted((tmp_path / "assets" / "data" / "images" / "eval").glob("*.png"))[0]
    inputs = processor(images=[[Image.open(image).convert("RGB")]], text=[None])
    with torch.no_grad():
        expected = model(**inputs).logits
    script = (
        "import sys, torch; sys.modules['hf_vlm'] = None\n"  # make `import hf_vlm` impossible
        "from PIL import Image\n"
        "from transformers import AutoModelForImageTextToText, AutoProcessor\n"
        f"path = {str(pushed)!r}\n"
        "m = AutoModelForImageTextToText.from_pretrained(path, trust_remote_code=True).eval()\n"
        "p = AutoProcessor.from_pretrained(path, trust_remote_code=True)\n"
        f"inputs = p(images=[[Image.open({str(image)!r}).convert('RGB')]], text=[None])\n"
        "with torch.no_grad():\n"
        f"    torch.save({{'logits': m(**inputs).logits, 'ids': inputs['input_ids']}}, {str(tmp_path / 'out.pt')!r})\n"
    )
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1")
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path, env=env)
    out = torch.load(tmp_path / "out.pt")
    assert torch.equal(out["ids"], inputs["input_ids"])
    # the same weights; only the scan differs (transformers' own without hf_vlm, docs/architecture.md)
    assert torch.allclose(out["logits"], expected, atol=1e-5, rtol=0), (out["logits"] - expected).abs().max()
    assert torch.equal(out["logits"].argmax(-1), expected.argmax(-1))

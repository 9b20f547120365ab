"""`hf-vlm serve`: the page callback, the HTTP API (gradio_client) and a real browser (Chromium).

The browser test needs Debian's `chromium` and `chromium-driver` and is skipped, with that
reason, where they are missing; the API test covers the same logic without a browser.
Only 127.0.0.1 is contacted: the browser is told to resolve no other host.
"""

from __future__ import annotations

import os
import shutil
import socket
import time

import pytest
from PIL import Image

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # gradio is a test dependency: no skip

SETTINGS = dict(
    max_new_tokens=8,
    repetition_penalty=1.0,
    no_repeat_ngram_size=0,
    num_beams=1,
    do_sample=False,
    temperature=1.0,
    top_p=1.0,
)
CHROMIUM, CHROMEDRIVER = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_checkpoint):
    root = tmp_path_factory.mktemp("serve")
    checkpoint, _ = tiny_checkpoint(root)
    image = sorted((root / "assets" / "data" / "images" / "eval").glob("*.png"))[0]
    return {"checkpoint": str(checkpoint), "image": image, "root": root}


@pytest.fixture(scope="module")
def study_served(tmp_path_factory, micro_processor, micro_config):
    """A micro STUDY checkpoint (processor with study settings, slice z-embedding) and a NIfTI study.
    Random, loud weights as in `tiny_checkpoint`, so greedy reports are not empty."""
    import copy

    import torch

    from hf_vlm import MambaVLMForConditionalGeneration
    from hf_vlm.synthetic_volumes import make_synthetic_studies
    from tests.test_study_pipeline import SETTINGS as STUDY

    root = tmp_path_factory.mktemp("serve_study")
    processor = copy.deepcopy(micro_processor)
    processor.study_settings = STUDY
    torch.manual_seed(0)
    model = MambaVLMForConditionalGeneration(micro_config(slice_position_embedding=True, study_depth_tokens=2))
    with torch.no_grad():
        model.get_input_embeddings().weight.normal_(0, 1.0)
        for param in model.bridge.parameters():
            param.normal_(0, 2.0)
    for config in (model.config, model.config.text_config, model.language_model.config):
        config.tie_word_embeddings = False
    model.language_model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.language_model.lm_head.weight))
    model.save_pretrained(root / "ckpt")
    processor.save_pretrained(root / "ckpt")
    make_synthetic_studies(str(root / "data"), 1, seed=0)
    nifti = next((root / "data" / "studies" / "train").glob("*.nii.gz"))
    return {"checkpoint": str(root / "ckpt"), "nifti": nifti, "slices": STUDY["num_slices"], "root": root}


def expected_study_report(study_served, max_new_tokens=8):
    from hf_vlm.data.studies import load_study
    from hf_vlm.inference import generate_batch, load_for_inference

    model, processor, _ = load_for_inference(study_served["checkpoint"])
    study = load_study(study_served["nifti"], processor.study_settings)
    return generate_batch(model, processor, [[study]], [None], max_new_tokens=max_new_tokens)[0]


def expected_report(served, **overrides):
    from hf_vlm.inference import build_generate_kwargs, generate_batch, load_for_inference

    model, processor, _ = load_for_inference(served["checkpoint"])
    kwargs = build_generate_kwargs(
        max_new_tokens=overrides.get("max_new_tokens", 8), num_beams=overrides.get("num_beams", 1)
    )
    return generate_batch(model, processor, [[Image.open(served["image"]).convert("RGB")]], [None], **kwargs)[0]


def test_callback_streams_and_matches_generate(served):
    import gradio as gr

    from hf_vlm.commands.serve import make_generate_fn
    from hf_vlm.inference import load_for_inference

    model, processor, _ = load_for_inference(served["checkpoint"])
    fn = make_generate_fn(model, processor)
    expected = expected_report(served)
    image = Image.open(served["image"])
    steps = list(fn(image, None, "", *SETTINGS.values()))
    assert steps[-1] == expected and len(steps) >= 2  # partial text first, then the report
    assert list(fn(None, str(served["image"]), None, *{**SETTINGS, "num_beams": 2}.values()))[-1] == expected_report(
        served, num_beams=2
    )
    with pytest.raises(gr.Error, match="Upload a CT image"):
        list(fn(None, None, "", *SETTINGS.values()))
    bad = served["root"] / "bad.dcm"
    bad.write_bytes(b"not dicom")
    with pytest.raises(gr.Error, match="Cannot read the uploaded file"):
        list(fn(None, str(bad), "", *SETTINGS.values()))


def test_study_checkpoint_callback_shows_the_slices_and_streams_the_report(study_served):
    """On a study checkpoint the upload is one Study with the checkpoint's settings: the strip
    holds its S slices (captioned with index and z) and the report is `generate`'s on that study."""
    import gradio as gr

    from hf_vlm.commands.serve import make_generate_fn
    from hf_vlm.data.studies import load_study
    from hf_vlm.inference import load_for_inference

    model, processor, _ = load_for_inference(study_served["checkpoint"])
    fn = make_generate_fn(model, processor)
    steps = list(fn(None, str(study_served["nifti"]), "", *SETTINGS.values()))
    (first, strip), (report, last) = steps[0], steps[-1]
    assert first == "" and len(strip) == study_served["slices"] == 6
    study = load_study(study_served["nifti"], processor.study_settings)
    assert [caption for _, caption in strip] == [f"slice {i} · z {z:.2f}" for i, z in zip(study.slice_indices, study.z)]
    assert all(isinstance(image, Image.Image) and image.size == (32, 32) for image, _ in strip)
    assert report and report == expected_study_report(study_served)
    assert isinstance(last, type(gr.skip())) and len(steps) >= 3  # the strip is sent once, the text streams
    beams = list(fn(None, str(study_served["nifti"]), "", *{**SETTINGS, "num_beams": 2}.values()))
    assert len(beams) == 1 and len(beams[0][1]) == 6 and beams[0][0]
    png = sorted(study_served["root"].rglob("*.nii.gz"))[0]  # a PNG on the image widget is a 1-slice study
    Image.fromarray(study.to_uint8()[0].permute(1, 2, 0).numpy()).save(png.with_suffix(".png"))
    assert len(list(fn(str(png.with_suffix(".png")), None, "", *SETTINGS.values()))[0][1]) == 1
    with pytest.raises(gr.Error, match="zipped DICOM series"):
        list(fn(None, None, "", *SETTINGS.values()))
    bad = study_served["root"] / "upload_7d1e" / "scan.zip"
    bad.parent.mkdir()
    bad.write_bytes(b"not a zip")
    with pytest.raises(gr.Error, match=r"Cannot read the uploaded file: scan.zip: not a readable zip") as error:
        list(fn(None, str(bad), "", *SETTINGS.values()))
    assert "upload_7d1e" not in str(error.value)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(checkpoint):
    from hf_vlm.commands.serve import build_app

    app = build_app(checkpoint)
    port = _free_port()
    app.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    return app, f"http://127.0.0.1:{port}/"


@pytest.fixture(scope="module")
def server(served):
    app, url = _launch(served["checkpoint"])
    yield url
    app.close()


@pytest.fixture(scope="module")
def study_server(study_served):
    app, url = _launch(study_served["checkpoint"])
    yield url
    app.close()


@pytest.mark.slow
def test_http_api_returns_the_report(served, server):
    from gradio_client import Client, handle_file

    client = Client(server, verbose=False)
    report = client.predict(handle_file(str(served["image"])), None, "", *SETTINGS.values(), api_name="/generate")
    assert report == expected_report(served)


needs_chromium = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="Chromium not installed: apt-get install -y chromium chromium-driver (Debian packages)",
)


def _chromium(tmp_path):
    """Headless Chromium that may only reach 127.0.0.1."""
    from selenium import webdriver

    os.environ.setdefault("SE_AVOID_STATS", "true")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--window-size=1280,1300",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
    ):
        options.add_argument(flag)
    return webdriver.Chrome(service=webdriver.ChromeService(executable_path=CHROMEDRIVER), options=options)


def _wait_for_value(element, expected, seconds=60):
    deadline = time.time() + seconds
    while element.get_attribute("value") != expected and time.time() < deadline:
        time.sleep(0.5)
    time.sleep(0.5)


def _screenshot(driver, tmp_path, name):
    shot = tmp_path / name
    driver.save_screenshot(str(shot))
    if os.environ.get("HF_VLM_SCREENSHOT"):
        target = os.environ["HF_VLM_SCREENSHOT"]  # the 2-D page there, the study page next to it
        shutil.copy(shot, target if name == "serve.png" else f"{os.path.splitext(target)[0]}_{name}")


def _upload_and_generate(driver, server, widget, path, uploaded_css, expected):
    """Open the page, upload `path` through `widget`'s file input, wait until `uploaded_css` shows
    it, click generate and wait for the report to reach `expected`; returns the report element."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(server)
    wait = WebDriverWait(driver, 60)
    upload = wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, f"{widget} input[type=file]")))
    upload.send_keys(str(path))
    wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, uploaded_css)))
    wait.until(EC.element_to_be_clickable((By.ID, "generate"))).click()
    report = driver.find_element(By.CSS_SELECTOR, "#report textarea")
    _wait_for_value(report, expected)
    return report


@pytest.mark.slow
@needs_chromium
def test_browser_upload_generate_and_read(served, server, tmp_path):
    from selenium.webdriver.common.by import By

    driver = _chromium(tmp_path)
    try:
        expected = expected_report(served, max_new_tokens=128)  # the page's default
        report = _upload_and_generate(driver, server, "#image", served["image"], "#image img", expected)
        _screenshot(driver, tmp_path, "serve.png")
        assert report.get_attribute("value") == expected
        assert not driver.find_elements(By.ID, "slices")  # 2-D checkpoints: no slice strip
    finally:
        driver.quit()


@pytest.mark.slow
@needs_chromium
def test_browser_study_upload_shows_the_slices_and_the_report(study_served, study_server, tmp_path):
    """A .nii.gz through the file widget: the report streams in and the strip shows the S slices."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver = _chromium(tmp_path)
    try:
        nifti = study_served["nifti"]
        expected = expected_study_report(study_served, max_new_tokens=128)  # the page's default
        uploaded = f'#file td.filename[aria-label="{nifti.name}"]'
        report = _upload_and_generate(driver, study_server, "#file", nifti, uploaded, expected)
        wait = WebDriverWait(driver, 60)
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#slices img")) >= study_served["slices"])
        _screenshot(driver, tmp_path, "serve_study.png")
        assert report.get_attribute("value") == expected and expected
        assert len(driver.find_elements(By.CSS_SELECTOR, "#slices img")) == study_served["slices"]
    finally:
        driver.quit()


def test_every_input_path_has_the_pixel_limit_and_no_temp_path_leaks(served, tmp_path):
    """Issue 13, case 9: the Image widget used to hand over a decoded PIL image of any size (a
    169-megapixel PNG was accepted), while the File widget enforced the limit; errors showed the
    server's temp paths."""
    import gradio as gr

    from hf_vlm.commands.serve import build_app, make_generate_fn
    from hf_vlm.inference import load_for_inference

    model, processor, _ = load_for_inference(served["checkpoint"])
    fn = make_generate_fn(model, processor, max_image_pixels=48 * 48)
    upload_dir = tmp_path / "gradio" / "0f3a9c"
    upload_dir.mkdir(parents=True)
    big = upload_dir / "scan.png"
    Image.new("RGB", (64, 64)).save(big)
    for image, file in ((str(big), None), (None, str(big)), (Image.open(big), None)):
        with pytest.raises(gr.Error) as error:
            list(fn(image, file, "", *SETTINGS.values()))
        message = str(error.value)
        assert "4096 pixels exceeds" in message, message
        assert str(upload_dir) not in message and "0f3a9c" not in message, message
    bad = upload_dir / "bad.dcm"
    bad.write_bytes(b"not dicom")
    with pytest.raises(gr.Error) as error:
        list(fn(None, str(bad), "", *SETTINGS.values()))
    assert "bad.dcm" in str(error.value) and str(upload_dir) not in str(error.value)
    small = make_generate_fn(model, processor)(str(served["image"]), None, "", *SETTINGS.values())  # a path works
    assert list(small)[-1] == expected_report(served)

    app = build_app(served["checkpoint"], max_image_pixels=48 * 48)
    widget = next(block for block in app.blocks.values() if getattr(block, "elem_id", None) == "image")
    assert widget.type == "filepath" and widget.image_mode is None  # gradio then passes the path, undecoded

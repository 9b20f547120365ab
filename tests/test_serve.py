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


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(served):
    from hf_vlm.commands.serve import build_app

    app = build_app(served["checkpoint"])
    port = _free_port()
    app.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}/"
    app.close()


@pytest.mark.slow
def test_http_api_returns_the_report(served, server):
    from gradio_client import Client, handle_file

    client = Client(server, verbose=False)
    report = client.predict(handle_file(str(served["image"])), None, "", *SETTINGS.values(), api_name="/generate")
    assert report == expected_report(served)


@pytest.mark.slow
@pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="Chromium not installed: apt-get install -y chromium chromium-driver (Debian packages)",
)
def test_browser_upload_generate_and_read(served, server, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

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
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=CHROMEDRIVER), options=options)
    try:
        driver.get(server)
        wait = WebDriverWait(driver, 60)
        upload = wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "#image input[type=file]")))
        upload.send_keys(str(served["image"]))
        wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "#image img")))
        wait.until(EC.element_to_be_clickable((By.ID, "generate"))).click()
        expected = expected_report(served, max_new_tokens=128)  # the page's default
        report = driver.find_element(By.CSS_SELECTOR, "#report textarea")
        deadline = time.time() + 60
        while report.get_attribute("value") != expected and time.time() < deadline:
            time.sleep(0.5)
        time.sleep(0.5)
        shot = tmp_path / "serve.png"
        driver.save_screenshot(str(shot))
        if os.environ.get("HF_VLM_SCREENSHOT"):
            shutil.copy(shot, os.environ["HF_VLM_SCREENSHOT"])
        assert report.get_attribute("value") == expected
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

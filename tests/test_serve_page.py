"""limner serve's web page in headless Chromium (Debian's chromium, which `make test` installs;
driven by Playwright with its executable path set): type a prompt, generate, watch the progress
bar move, see the image, and redraw it through the API from the seed the page shows."""
import base64
import io
import shutil
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
playwright = pytest.importorskip("playwright.sync_api")

from limner.serve import Engine, served_models  # noqa: E402
from limner.server import create_app  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(),
                                reason="Debian's chromium is not installed (`make test` installs it as root)")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-quic",
         "--no-first-run", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def server():
    engine = Engine(served_models([str(ROOT / "checkpoints" / "shapes-unet"), str(ROOT / "checkpoints" /
                                                                                   "shapes-gan")]))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app_server = uvicorn.Server(uvicorn.Config(create_app(engine), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=app_server.run, daemon=True)
    thread.start()
    for _ in range(200):
        if app_server.started:
            break
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    app_server.should_exit = True
    thread.join(30)


@pytest.fixture(scope="module")
def page(server, tmp_path_factory):
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page()
        page.goto(server + "/")
        page.wait_for_function("document.querySelectorAll('#sampler option').length > 1")
        yield page
        browser.close()


def image_bytes(page, selector) -> bytes:
    """The bytes the page shows in an <img> (its blob: URL, read in the page)."""
    data = page.eval_on_selector(selector, """async (img) => {
        const buf = await (await fetch(img.src)).arrayBuffer();
        return btoa(String.fromCharCode(...new Uint8Array(buf))); }""")
    return base64.b64decode(data)


def test_generate_on_the_page_shows_progress_then_the_image_which_its_seed_redraws(page, server):
    assert page.eval_on_selector_all("#model option", "els => els.map(e => e.value)") == ["shapes-unet",
                                                                                          "shapes-gan"]
    page.fill("#prompt", "a blue square at the bottom right")
    page.fill("#steps", "48")
    page.evaluate("""() => { window.seen = [];
        new MutationObserver(() => window.seen.push(document.getElementById('progress').value))
            .observe(document.getElementById('progress'), {attributes: true}); }""")
    page.click("#generate")
    page.wait_for_selector("#gallery figure img", timeout=120_000)
    seen = page.evaluate("window.seen")
    assert any(0 < v < 100 for v in seen) and seen[-1] == 100 and seen == sorted(seen), seen
    assert page.text_content("#error") == ""
    seed = int(page.eval_on_selector("#gallery figure img", "img => img.dataset.seed"))
    caption = page.text_content("#gallery figcaption")
    assert f"seed {seed}" in caption and "steps 48" in caption and "sampler dpmpp_2m" in caption
    shown = np.asarray(Image.open(io.BytesIO(image_bytes(page, "#gallery figure img"))), dtype=np.int16)

    import httpx

    job = httpx.post(server + "/v1/images", json={"prompt": "a blue square at the bottom right", "seed": seed,
                                                  "steps": 48}).json()
    for _ in range(600):
        view = httpx.get(server + f"/v1/jobs/{job['id']}").json()
        if view["status"] == "done":
            break
        time.sleep(0.05)
    api = np.asarray(Image.open(io.BytesIO(httpx.get(server + view["images"][0]["url"]).content)), dtype=np.int16)
    assert shown.shape == (32, 32, 3) and np.abs(shown - api).max() <= 1

    page.click("#gallery figure .reuse")  # one click puts its settings back, its seed fixed
    assert page.input_value("#seed") == str(seed) and not page.is_checked("#random")
    assert page.input_value("#steps") == "48" and page.input_value("#sampler") == "dpmpp_2m"


def test_errors_show_on_the_page(page):
    page.fill("#prompt", "a red circle")
    page.fill("#steps", "100000")
    page.click("#generate")
    page.wait_for_function("document.getElementById('error').textContent.length > 0")
    assert page.text_content("#error") == "steps 100000 is out of range: it must be from 1 to 500"
    page.fill("#steps", "")
    page.select_option("#model", "shapes-gan")  # a GAN: the sampler settings reused above do not apply
    page.click("#generate")
    page.wait_for_function("document.getElementById('error').textContent.startsWith('job failed')")
    assert page.text_content("#error").startswith("job failed: guidance, sampler, schedule, size do not apply here: a "
                                                  "DCGANGenerator draws in one step")

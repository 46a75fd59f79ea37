"""The Space in a real headless browser: Debian's Chromium driven by Playwright.

    apt-get install -y chromium          # Playwright's own browser download does not work offline
    pytest -m browser tests/test_space_browser.py

Uploads an image, waits for the maps and checks that they appear; keeps a screenshot in tests/artifacts/
(and at $HF_DINO_SCREENSHOT when set). With HF_DINO_SCREENSHOT_MODEL=<folder or repo> the page runs that
checkpoint instead of a tiny random one, e.g. to make the README's screenshot with a trained model.
"""

from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import io
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hf_dino import attention
from test_space import free_port, load_space_app, save_tiny_dino_model

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]
# Generous: the first request loads the checkpoint, and CI machines are shared.
TIMEOUT_MS = 120_000


@pytest.fixture(scope="module")
def space_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    torch.set_num_threads(1)
    model = os.environ.get("HF_DINO_SCREENSHOT_MODEL") or str(
        save_tiny_dino_model(tmp_path_factory.mktemp("tiny_dino"))
    )
    app = load_space_app()
    demo = app.build_demo([model], download_dir=tmp_path_factory.mktemp("downloads"))
    _, url, _ = demo.launch(
        prevent_thread_lock=True,
        server_name="127.0.0.1",
        server_port=free_port(),
        quiet=True,
        **app.launch_options(),
    )
    try:
        yield url
    finally:
        demo.close()


@pytest.fixture(scope="module")
def page(space_url: str, tmp_path_factory: pytest.TempPathFactory):
    if not CHROMIUM.exists():
        pytest.fail("Chromium is missing: apt-get install -y chromium (see README, browser tests)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium_profile")),  # a new, empty user data dir
            executable_path=str(CHROMIUM),
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1360, "height": 1000},
            device_scale_factor=1,
        )
        try:
            browser_page = context.new_page()
            browser_page.set_default_timeout(TIMEOUT_MS)
            browser_page.goto(space_url, wait_until="domcontentloaded")
            yield browser_page
        finally:
            context.close()


def _loaded_image_sizes(page, element_id: str) -> list[tuple[int, int]]:
    """Natural sizes of the fully loaded <img> elements inside a component."""
    return page.eval_on_selector_all(
        f"#{element_id} img",
        "images => images.filter(image => image.complete && image.naturalWidth > 0)"
        ".map(image => [image.naturalWidth, image.naturalHeight])",
    )


def test_upload_shows_attention_maps(page) -> None:
    page.wait_for_selector("#run-button")
    assert "DINO attention maps" in page.inner_text("#header")
    example = attention.example_images()[1]  # chelsea.jpg
    page.locator("#input-image input[type=file]").set_input_files(str(example))
    page.wait_for_selector("#input-image img")  # the upload preview
    page.click("#run-button")
    page.wait_for_function(
        "() => { const timing = document.querySelector('#timing');"
        " return timing !== null && timing.innerText.includes('heads'); }"
    )
    for element_id in ("heads-output", "masks-output", "mean-output", "pca-output"):
        page.wait_for_function(
            f"() => [...document.querySelectorAll('#{element_id} img')]"
            ".some(image => image.complete && image.naturalWidth > 0)"
        )
        sizes = _loaded_image_sizes(page, element_id)
        assert sizes and all(width > 100 and height > 50 for width, height in sizes), (element_id, sizes)
    timing = page.inner_text("#timing")
    assert " s (model " in timing and "patches" in timing
    # The download link for the zip is there.
    page.wait_for_selector("a[href*='.zip']", state="attached")

    ARTIFACTS.mkdir(exist_ok=True)
    screenshot = ARTIFACTS / "space.png"
    page.screenshot(path=str(screenshot), full_page=True)
    width, height = Image.open(screenshot).size
    assert width >= 1000 and height >= 600
    if os.environ.get("HF_DINO_SCREENSHOT"):
        target = Path(os.environ["HF_DINO_SCREENSHOT"])
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(screenshot, target)


def test_bad_upload_shows_an_error_and_the_page_keeps_working(page, tmp_path: Path) -> None:
    # The page's own upload filter refuses files that are not images...
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    page.locator("#input-image input[type=file]").set_input_files(str(text))
    page.get_by_text("Invalid file type: notes.txt").first.wait_for(state="visible")
    # ...and a damaged image that passes it gets the server's message.
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(
        buffer, "PNG"
    )
    corrupt = tmp_path / "broken.png"
    corrupt.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    page.locator("#input-image input[type=file]").set_input_files(str(corrupt))
    page.click("#run-button")
    page.get_by_text("broken.png is corrupt or truncated").first.wait_for(state="visible")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "space_error.png"), full_page=False)

    # A good image afterwards still works: the timing line is replaced by a new one.
    previous = page.inner_text("#timing")
    page.locator("#input-image input[type=file]").set_input_files(str(attention.example_images()[2]))
    page.wait_for_selector("#input-image img")
    page.click("#run-button")
    page.wait_for_function(
        "previous => { const text = document.querySelector('#timing').innerText;"
        " return text !== previous && text.includes('heads'); }",
        arg=previous,
    )

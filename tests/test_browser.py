"""End to end in a real browser: upload an image and ask; pick an example, move the slider, run; check what a user sees.

Uses Debian's Chromium through Playwright for Python (`executable_path`, never a downloaded browser; install it with
`.ci/install-browser.sh`). Runs the embedded model when its checkpoint is present (the screenshots then show real
answers), otherwise the tiny random model. Saves screenshots (docs/screenshots/ with PAR_UPDATE_SCREENSHOTS=1).
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
# The committed screenshots are refreshed on request only (PAR_UPDATE_SCREENSHOTS=1), so a test run leaves the
# working tree clean; otherwise they go to a temporary folder.
SCREENSHOTS = (Path(__file__).resolve().parent.parent / "docs" / "screenshots"
               if os.environ.get("PAR_UPDATE_SCREENSHOTS") == "1"
               else Path(tempfile.gettempdir()) / "par-demo-screenshots")

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(),
                                reason="Debian's chromium is not installed at /usr/bin/chromium "
                                       "(run .ci/install-browser.sh)")
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (Python) is not installed")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def model_spec() -> str:
    from par_demo.models import DEFAULT_MODEL

    return DEFAULT_MODEL if (Path(DEFAULT_MODEL) / "config.json").is_file() else "random:llava-tiny"


@pytest.fixture(scope="module")
def server_url():
    import app as app_module
    from par_demo.demo import DemoApp, DemoService

    service = DemoService.from_model(model_spec())
    service.warm_up()
    blocks = app_module.build_demo(DemoApp(service))
    port = free_port()
    blocks.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                  **app_module.launch_options())
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        blocks.close()


@pytest.fixture(scope="module")
def page(server_url):
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(server_url)
        page.wait_for_selector("#run", timeout=30_000)
        page.page_errors = errors  # checked by the test: a broken component shows up here
        yield page
        browser.close()


def wait_until_idle(page, timeout_ms: int = 30_000) -> None:
    """Until no event is running (Gradio marks running outputs' status trackers `generating`)."""
    page.wait_for_function("!document.querySelector('[data-testid=status-tracker].generating')",
                           timeout=timeout_ms)


def test_upload_and_ask(page):
    from par_demo.demo import EXAMPLES_DIR

    page.locator("#image-input input[type=file]").set_input_files(str(EXAMPLES_DIR / "shapes_color.png"))
    sync_api.expect(page.locator("#image-input img").first).to_be_visible()
    page.locator("#question textarea").fill("Where is the green triangle?")
    page.locator("#question textarea").press("Enter")  # Enter runs, like the button
    sync_api.expect(page.locator("#stats")).to_contain_text("FLOPs", timeout=30_000)
    wait_until_idle(page)
    assert page.locator("#full-answer textarea").input_value().strip()
    assert not page.page_errors, page.page_errors


def test_example_slider_run_and_figures(page):
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.locator("[data-testid=dataset-cell-0-1]").first.click()  # the first example: image + question
    question = page.locator("#question textarea")
    sync_api.expect(question).to_have_value("Where is the blue square?")
    sync_api.expect(page.locator("#image-input img").first).to_be_visible()

    # Move the slider (to a budget every method reaches on the embedded model: its vision tower is a big share).
    page.locator("#budget input[type=range]").fill("0.6")
    sync_api.expect(page.locator("#budget input[type=number]")).to_have_value("0.6")
    page.click("#run")

    pruned_label = page.locator("#pruned-answer").get_by_text("budget 0.60")
    sync_api.expect(pruned_label).to_be_visible(timeout=30_000)
    wait_until_idle(page)
    sync_api.expect(page.locator("#stats")).to_contain_text("FLOPs")
    for answer in ("#full-answer textarea", "#pruned-answer textarea"):
        assert page.locator(answer).input_value().strip(), f"{answer} is empty"
    sync_api.expect(page.locator("#pruned-timing")).to_contain_text("×")

    # Both figures rendered by plotly, with their titles.
    sync_api.expect(page.locator("#patch-plot .js-plotly-plot .gtitle")).to_contain_text("Visual tokens: kept")
    sync_api.expect(page.locator("#layer-plot .js-plotly-plot .gtitle")).to_contain_text("Decoder layers: ran")
    sync_api.expect(page.locator("#latency-plot .js-plotly-plot .gtitle")).to_contain_text("Latency")
    assert page.locator("#patch-plot .js-plotly-plot image").count() >= 1  # the model-view image is drawn

    # The score view: a heatmap over the image (or a clear note for methods without scores), and back.
    page.locator("#patch-view").get_by_text("per-patch scores").click()
    sync_api.expect(page.locator("#patch-plot .js-plotly-plot .gtitle")).to_contain_text("score")
    time.sleep(0.5)  # let plotly finish drawing before the picture
    page.locator("#patch-plot").screenshot(path=str(SCREENSHOTS / "patch-scores.png"))
    page.locator("#patch-view").get_by_text("kept / dropped").click()
    sync_api.expect(page.locator("#patch-plot .js-plotly-plot .gtitle")).to_contain_text("dimmed")

    # The sweep streams its points into a figure and a table.
    page.click("#sweep")
    sync_api.expect(page.locator("#sweep-table")).to_contain_text("10/10 budgets", timeout=45_000)
    wait_until_idle(page)
    sync_api.expect(page.locator("#sweep-plot .js-plotly-plot .gtitle")).to_contain_text("Budget sweep")
    time.sleep(0.5)
    page.locator("#sweep-plot").screenshot(path=str(SCREENSHOTS / "sweep.png"))
    page.screenshot(path=str(SCREENSHOTS / "app.png"), full_page=True)
    assert not page.page_errors, page.page_errors

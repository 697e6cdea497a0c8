"""The app with other model families in a real browser: Qwen2.5-VL (random weights, exact CPU-sized architecture)
given a tall photo must draw a tall patch grid, as many cells as the image gave visual tokens; SmolVLM given a wide
photo must draw every tile at its place and the global view beside them.

Debian's Chromium through Playwright (`executable_path`, never a downloaded browser). The screenshot goes to
docs/screenshots/ with PAR_UPDATE_SCREENSHOTS=1, else to a temporary folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOTS = (Path(__file__).resolve().parent.parent / "docs" / "screenshots"
               if os.environ.get("PAR_UPDATE_SCREENSHOTS") == "1"
               else Path(tempfile.gettempdir()) / "par-demo-screenshots")
TALL = (336, 560)  # width x height in px: one token per 28 x 28 px -> a 20 x 12 grid, 240 visual tokens

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(),
                                reason="Debian's chromium is not installed at /usr/bin/chromium "
                                       "(run .ci/install-browser.sh)")
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (Python) is not installed")


def scene_file(tmp_path_factory, name: str, size: tuple[int, int], seed: int):
    """A shapes scene stretched to `size` (width, height), saved as a PNG the page can upload."""
    from par_demo.shapes import render_scene

    image, _ = render_scene(np.random.default_rng(seed))
    path = tmp_path_factory.mktemp(name) / f"{name}.png"
    image.resize(size).save(path)
    return path


@pytest.fixture(scope="module")
def tall_image(tmp_path_factory):
    return scene_file(tmp_path_factory, "tall", TALL, seed=11)


@pytest.fixture(scope="module")
def browser():
    """One Chromium for the module: Playwright's sync API runs once per thread."""
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        yield browser
        browser.close()


@contextlib.contextmanager
def served_page(browser, model: str):
    """The app serving `model` in this process, and a desktop-sized page open on it."""
    import app as app_module
    from par_demo.demo import DemoApp
    from par_demo.service import DemoService

    service = DemoService.from_model(model, max_new_tokens=4)
    with app_module.served_locally(DemoApp(service)) as url:
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(url)
        page.wait_for_selector("#run", timeout=30_000)
        page.page_errors = errors
        yield page
        page.close()


def ask(page, image, method: str, budget: str | None = None) -> None:
    """Upload `image`, choose `method` (its label) and, if given, the budget, ask about the circle and press Run."""
    page.locator("#image-input input[type=file]").set_input_files(str(image))
    sync_api.expect(page.locator("#image-input img").first).to_be_visible()
    page.locator("#method").get_by_text(method, exact=True).click()
    if budget is not None:
        page.locator("#budget input[type=range]").fill(budget)
        sync_api.expect(page.locator("#budget input[type=number]")).to_have_value(budget)
    page.locator("#question textarea").fill("What color is the circle?")
    page.click("#run")


@pytest.fixture(scope="module")
def page(browser):
    with served_page(browser, "random:qwen2.5-vl-mid") as page:
        yield page


def test_a_tall_photo_gives_a_tall_patch_grid_on_qwen2_5_vl(page, tall_image):
    ask(page, tall_image, "FastV")
    title = page.locator("#patch-plot .js-plotly-plot .gtitle")
    sync_api.expect(title).to_contain_text("/240", timeout=60_000)  # 20 x 12 cells, one per visual token
    page.wait_for_function("!document.querySelector('[data-testid=status-tracker].generating')", timeout=60_000)

    # The figure's axes span the image as the model saw it: 336 x 560 px, taller than wide.
    ranges = page.evaluate("""() => {
        const plot = document.querySelector('#patch-plot .js-plotly-plot');
        return [plot.layout.xaxis.range, plot.layout.yaxis.range];
    }""")
    (x0, x1), (y0, y1) = ranges
    assert (abs(x1 - x0), abs(y1 - y0)) == TALL
    # The patch heatmap (it carries each cell's hover text) has 20 rows of 12 cells.
    cells = page.evaluate("""() => {
        const plot = document.querySelector('#patch-plot .js-plotly-plot');
        const z = plot.data.find(trace => trace.type === 'heatmap').z;
        // plotly sends large arrays typed: {dtype, bdata, shape: "rows, cols"}
        const [rows, cols] = z.shape ? String(z.shape).split(',').map(Number) : [z.length, z[0].length];
        return {rows, cols};
    }""")
    assert cells == {"rows": 20, "cols": 12}, json.dumps(cells)
    layers = page.locator("#layer-plot .js-plotly-plot .gtitle")
    sync_api.expect(layers).to_contain_text("/12")  # the mid preset's 12 decoder layers
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    time.sleep(0.5)  # let plotly finish drawing before the picture
    page.screenshot(path=str(SCREENSHOTS / "qwen2.5-vl-tall.png"), full_page=True)
    assert not page.page_errors, page.page_errors


WIDE = (600, 300)  # width x height in px: SmolVLM-mid cuts it into 2 x 3 tiles of 256 px + the global view


@pytest.fixture(scope="module")
def wide_image(tmp_path_factory):
    return scene_file(tmp_path_factory, "wide", WIDE, seed=12)


@pytest.fixture(scope="module")
def smolvlm_page(browser):
    with served_page(browser, "random:smolvlm-mid") as page:
        yield page


def test_a_wide_photo_on_smolvlm_shows_every_tile_at_its_place_and_the_global_view(smolvlm_page, wide_image):
    page = smolvlm_page
    ask(page, wide_image, "FastV")
    title = page.locator("#patch-plot .js-plotly-plot .gtitle")
    sync_api.expect(title).to_contain_text("/448", timeout=120_000)  # (6 tiles + the global view) x 64 tokens
    page.wait_for_function("!document.querySelector('[data-testid=status-tracker].generating')", timeout=120_000)

    # 2 x 3 tiles of 8 x 8 tokens, an empty column, the 8 x 8 global view: a 16 x 33 grid of cells.
    cells = page.evaluate("""() => {
        const plot = document.querySelector('#patch-plot .js-plotly-plot');
        const z = plot.data.find(trace => trace.type === 'heatmap').z;
        const [rows, cols] = z.shape ? String(z.shape).split(',').map(Number) : [z.length, z[0].length];
        return {rows, cols};
    }""")
    assert cells == {"rows": 16, "cols": 33}, json.dumps(cells)
    layers = page.locator("#layer-plot .js-plotly-plot .gtitle")
    sync_api.expect(layers).to_contain_text("/12")  # the mid preset's 12 decoder layers
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    time.sleep(0.5)  # let plotly finish drawing before the picture
    page.screenshot(path=str(SCREENSHOTS / "smolvlm-tiles.png"), full_page=True)
    assert not page.page_errors, page.page_errors


def test_par_on_smolvlm_leaves_tiles_out_before_the_tower_and_the_page_says_how_many(smolvlm_page, wide_image):
    page = smolvlm_page
    ask(page, wide_image, "PAR", budget="0.25")
    stats = page.locator("#stats")
    sync_api.expect(stats).to_contain_text("the vision tower ran on", timeout=120_000)
    page.wait_for_function("!document.querySelector('[data-testid=status-tracker].generating')", timeout=120_000)
    words = stats.inner_text().split("the vision tower ran on ")[1].split()
    encoded, views = int(words[0]), int(words[2])
    assert views == 7 and 1 <= encoded < views, words  # the global view and some of the 6 tiles
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    time.sleep(0.5)
    page.screenshot(path=str(SCREENSHOTS / "smolvlm-par-tiles.png"), full_page=True)
    assert not page.page_errors, page.page_errors

"""End to end in a real browser, on a desktop and on a 390 px phone screen: what a visitor sees and can do.

Uses Debian's Chromium through Playwright for Python (`executable_path`, never a downloaded browser; install it with
`.ci/install-browser.sh`). Runs the embedded model when its checkpoint is present (the screenshots then show real
answers), otherwise the tiny random model. Screenshots go to a temporary folder, or, with PAR_UPDATE_SCREENSHOTS=1,
to docs/screenshots/ (the committed ones).
"""

from __future__ import annotations

import os
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
PHONE = {"width": 390, "height": 844}  # an iPhone 12-14 screen in CSS pixels
SLOW = 120_000  # ms: the sweep and the all-methods grid time every setting in turns; a busy CPU is slow

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(),
                                reason="Debian's chromium is not installed at /usr/bin/chromium "
                                       "(run .ci/install-browser.sh)")
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (Python) is not installed")


def model_spec() -> str:
    from par_demo.models import DEFAULT_MODEL

    return DEFAULT_MODEL if (Path(DEFAULT_MODEL) / "config.json").is_file() else "random:llava-tiny"


@pytest.fixture(scope="module")
def server():
    import app as app_module
    from par_demo.demo import DemoApp
    from par_demo.service import DemoService

    service = DemoService.from_model(model_spec())
    service.warm_up()
    with app_module.served_locally(DemoApp(service)) as url:
        yield url, service


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        yield browser
        browser.close()


def open_page(browser, url: str, viewport: dict):
    page = browser.new_page(viewport=viewport)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(url)
    page.wait_for_selector("#run", timeout=30_000)
    page.page_errors = errors  # checked by the tests: a broken component shows up here
    return page


@pytest.fixture(scope="module")
def page(browser, server):
    page = open_page(browser, server[0], {"width": 1400, "height": 1000})
    yield page
    page.close()


@pytest.fixture()
def phone(browser, server):
    page = open_page(browser, server[0], PHONE)
    yield page
    page.close()


def wait_until_idle(page, timeout_ms: int = 30_000) -> None:
    """Until no event is running (Gradio marks running outputs' status trackers `generating`)."""
    page.wait_for_function("!document.querySelector('[data-testid=status-tracker].generating')",
                           timeout=timeout_ms)


def pick_first_example(page) -> None:
    page.locator("[data-testid=dataset-cell-0-1]").first.click()  # the first example: image + question
    sync_api.expect(page.locator("#question textarea")).to_have_value("Where is the blue square?")
    sync_api.expect(page.locator("#image-input img").first).to_be_visible()


def run_and_wait(page) -> None:
    page.click("#run")
    sync_api.expect(page.locator("#pruned-timing")).to_contain_text("×", timeout=SLOW)
    wait_until_idle(page, SLOW)


CUT_TITLES = """() => {
  // Every plot title, axis title and legend entry must lie inside its plot: text past the edge is cut off.
  const cut = [];
  for (const plot of document.querySelectorAll('.js-plotly-plot')) {
    if (!plot.offsetParent) continue;
    const box = plot.getBoundingClientRect();
    for (const text of plot.querySelectorAll('.gtitle, .xtitle, .ytitle, .legendtext, .annotation-text')) {
      const r = text.getBoundingClientRect();
      if (r.width > 0 && (r.left < box.left - 1 || r.right > box.right + 1)) {
        cut.push(`${text.textContent} [${Math.round(r.left)}-${Math.round(r.right)} in ` +
                 `${Math.round(box.left)}-${Math.round(box.right)}]`);
      }
    }
  }
  return cut;
}"""


def test_upload_and_ask(page):
    from par_demo.service import EXAMPLES_DIR

    page.locator("#image-input input[type=file]").set_input_files(str(EXAMPLES_DIR / "shapes_color.png"))
    sync_api.expect(page.locator("#image-input img").first).to_be_visible()
    page.locator("#question textarea").fill("Where is the green triangle?")
    page.locator("#question textarea").press("Enter")  # Enter runs, like the button
    sync_api.expect(page.locator("#stats")).to_contain_text("FLOPs", timeout=SLOW)
    wait_until_idle(page, SLOW)
    assert page.locator("#full-answer textarea").input_value().strip()
    assert not page.page_errors, page.page_errors


def test_example_slider_run_and_figures(page):
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    pick_first_example(page)
    # Move the slider (to a budget every method reaches on the embedded model: its vision tower is a big share).
    page.locator("#budget input[type=range]").fill("0.6")
    sync_api.expect(page.locator("#budget input[type=number]")).to_have_value("0.6")
    page.click("#run")
    sync_api.expect(page.locator("#pruned-answer").get_by_text("budget 0.60")).to_be_visible(timeout=SLOW)
    wait_until_idle(page, SLOW)
    sync_api.expect(page.locator("#stats")).to_contain_text("FLOPs")
    for answer in ("#full-answer textarea", "#pruned-answer textarea"):
        assert page.locator(answer).input_value().strip(), f"{answer} is empty"
    # Both times with their spread, measured in turns in this request.
    sync_api.expect(page.locator("#full-timing")).to_contain_text("rounds, in turns")
    sync_api.expect(page.locator("#pruned-timing")).to_contain_text("FLOPs allow")

    # The figures rendered by plotly, with their titles.
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

    # The sweep streams its points into two figures and a table.
    page.click("#sweep")
    sync_api.expect(page.locator("#sweep-table")).to_contain_text("10/10 budgets", timeout=SLOW)
    wait_until_idle(page, SLOW)
    sync_api.expect(page.locator("#sweep-plot .js-plotly-plot .gtitle")).to_contain_text("latency vs FLOPs")
    sync_api.expect(page.locator("#agreement-plot .js-plotly-plot .gtitle")).to_contain_text("same answer")
    time.sleep(0.5)
    page.locator("#sweep-plot").screenshot(path=str(SCREENSHOTS / "sweep.png"))
    page.screenshot(path=str(SCREENSHOTS / "app.png"), full_page=True)
    assert not page.page_errors, page.page_errors


def compare_all_and_wait(page, n_cells: int) -> dict:
    page.click("#compare-all-button")
    # The grid takes its new size with the request's first update (grid and summary change together), so the
    # summary waited for next is this request's, not the last one's.
    sync_api.expect(page.locator("#compare-grid .pg-cell")).to_have_count(n_cells, timeout=SLOW)
    sync_api.expect(page.locator("#compare-summary")).to_contain_text("medians of", timeout=SLOW)
    wait_until_idle(page, SLOW)
    cells = page.locator("#compare-grid .pg-cell")
    return {cells.nth(i).get_attribute("data-method"): cells.nth(i) for i in range(cells.count())}


def test_compare_all_methods_fills_a_grid_with_every_method(page, server):
    from par_demo.inputs import EXTRA_GROUPS, METHOD_CHOICES

    _, service = server
    reasons = service.available_methods()
    extras = [name for names in EXTRA_GROUPS.values() for name in names]
    pick_first_example(page)
    page.locator("#budget input[type=range]").fill("0.5")
    # By default the methods of the field; the summary names the baselines and ablations left out.
    of_the_field = [name for _, name in METHOD_CHOICES if name not in extras]
    by_method = compare_all_and_wait(page, 1 + len(of_the_field))
    assert set(by_method) == {"full", *of_the_field}
    assert "Not run this time" in page.locator("#compare-summary").inner_text()
    sync_api.expect(page.locator("#compare-download")).to_be_visible()
    time.sleep(0.5)
    page.locator("#compare-all").screenshot(path=str(SCREENSHOTS / "compare-all.png"))
    # Ticking both extra groups under Advanced adds every other method.
    page.get_by_role("button", name="Advanced").click()
    for label in ("simple baselines", "PAR's ablations"):
        page.locator("#compare-extras label", has_text=label).click()
    by_method = compare_all_and_wait(page, 1 + len(METHOD_CHOICES))
    available = [name for _, name in METHOD_CHOICES if not reasons[name]]
    assert list(by_method)[:1 + len(available)] == ["full", *available]  # the full model, then every method
    for name in ["full", *available]:
        cell = by_method[name]
        assert cell.locator("img").count() == 1, cell.inner_text()  # its patch view
        assert cell.locator(".pg-answer").inner_text().strip()
        assert cell.locator(".pg-layers span").count() == service.n_layers
        assert "prefill" in cell.locator(".pg-time").inner_text()
    for name in set(by_method) - {"full", *available}:  # an unavailable method says why, in its cell
        assert reasons[name][:40] in by_method[name].inner_text()
    assert "Not run this time" not in page.locator("#compare-summary").inner_text()
    sync_api.expect(page.locator("#compare-download")).to_be_visible()
    time.sleep(0.5)
    page.locator("#compare-all").screenshot(path=str(SCREENSHOTS / "compare-all-extras.png"))
    assert not page.page_errors, page.page_errors


def test_phone_answers_sit_under_run_and_every_title_fits(phone):
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    pick_first_example(phone)
    phone.locator("#run").scroll_into_view_if_needed()
    run_and_wait(phone)
    run_box = phone.locator("#run").bounding_box()
    answers = [phone.locator(f"#{name}-answer").bounding_box() for name in ("full", "pruned")]
    examples = phone.get_by_text("Examples (click one)").bounding_box()
    # Both answers come right after Run, before the examples, and fit on one screen with it.
    assert all(run_box["y"] < box["y"] < examples["y"] for box in answers)
    assert max(box["y"] + box["height"] for box in answers) - run_box["y"] < PHONE["height"]
    phone.evaluate("window.scrollTo(0, 0)")
    phone.locator("#run").evaluate("el => el.scrollIntoView({block: 'start'})")
    time.sleep(0.5)
    phone.screenshot(path=str(SCREENSHOTS / "phone-answers.png"))

    phone.click("#compare-all-button")
    sync_api.expect(phone.locator("#compare-summary")).to_contain_text("medians of", timeout=SLOW)
    phone.click("#sweep")
    sync_api.expect(phone.locator("#sweep-table")).to_contain_text("10/10 budgets", timeout=SLOW)
    wait_until_idle(phone, SLOW)
    time.sleep(1.0)  # plotly lays the figures out for the narrow screen
    assert phone.evaluate(CUT_TITLES) == []
    phone.locator("#compare-all").screenshot(path=str(SCREENSHOTS / "phone-compare-all.png"))
    phone.screenshot(path=str(SCREENSHOTS / "phone.png"), full_page=True)
    assert not phone.page_errors, phone.page_errors


def test_a_photo_gets_the_notice_that_the_model_knows_only_shape_scenes(phone, server):
    import gradio.media

    _, service = server
    if service.card is None or not service.card.synthetic_only:
        pytest.skip("the notice is for the embedded ShapesVQA model, whose checkpoint is not here")
    phone.locator("#image-input input[type=file]").set_input_files(gradio.media.get_image("lion.jpg"))
    sync_api.expect(phone.locator("#image-input img").first).to_be_visible()
    phone.locator("#question textarea").fill("What is in this picture?")
    phone.locator("#run").scroll_into_view_if_needed()
    run_and_wait(phone)
    notice = phone.locator("#image-notice")
    sync_api.expect(notice).to_contain_text("trained on synthetic shape scenes only")
    assert notice.bounding_box()["y"] < phone.get_by_text("Examples (click one)").bounding_box()["y"]
    # The picture: from the photo down to the notice under the answers (taller than one phone screen).
    top = phone.locator("#image-input").bounding_box()["y"] + phone.evaluate("window.scrollY")
    bottom = notice.bounding_box()["y"] + notice.bounding_box()["height"] + phone.evaluate("window.scrollY")
    time.sleep(0.5)
    phone.screenshot(path=str(SCREENSHOTS / "phone-photo.png"), full_page=True,
                     clip={"x": 0, "y": top - 8, "width": PHONE["width"], "height": bottom - top + 16})
    assert not phone.page_errors, phone.page_errors

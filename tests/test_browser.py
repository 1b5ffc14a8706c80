"""The reports in a real browser: a capacity review, a plan and a run report opened in headless Chromium.

Every figure must load (natural width > 0), the page must log no error, and the answer box (and, for the
capacity review, the capacity table) must be visible. Screenshots are kept under the test run's temp folder
(its `screenshots/`) for a person to look at. Needs Playwright for Python (the test extra) and Debian's
chromium package (.ci/run installs it when missing); skips with the reason without them.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from sim.cli import main

ROOT = Path(__file__).resolve().parent.parent
BROWSERS = ("chromium", "chromium-browser", "google-chrome")


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright for Python is not installed")
    executable = next((shutil.which(name) for name in BROWSERS if shutil.which(name)), None)
    if executable is None:
        pytest.skip("no Chromium here (Debian: apt-get install chromium; .ci/run does it)")
    with sync_api.sync_playwright() as playwright:
        # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start.
        browser = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        yield browser
        browser.close()


def open_report(browser, page_path: Path, shot: Path):
    """The page loaded (images included), its console errors, and a full-page screenshot saved to `shot`."""
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors: list[str] = []
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(page_path.as_uri(), wait_until="load")
    shot.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(shot), full_page=True)
    return page, errors


def check_figures_loaded(page) -> int:
    widths = page.eval_on_selector_all("img", "images => images.map(image => image.complete ? image.naturalWidth : 0)")
    assert widths and all(width > 0 for width in widths), widths
    return len(widths)


def test_the_capacity_review_reads_in_a_browser(browser, tmp_path, tmp_path_factory, capsys):
    out = tmp_path / "review"
    assert main(["sweep", str(ROOT / "experiments" / "capacity-review.yaml"), "--out", str(out), "--report",
                 "--quiet"]) == 0
    capsys.readouterr()
    shots = tmp_path_factory.getbasetemp() / "screenshots"
    page, errors = open_report(browser, out / "report.html", shots / "capacity-review.png")
    assert check_figures_loaded(page) >= 5 and errors == []
    assert page.locator("p.answer").first.is_visible()
    assert "Highest load meeting the SLO" in page.locator("p.answer").first.inner_text()
    capacity = page.locator("table").first
    assert capacity.is_visible() and "Max load meeting SLO" in capacity.inner_text()
    page.close()


def test_a_run_report_reads_in_a_browser(browser, tmp_path, tmp_path_factory, capsys):
    out = tmp_path / "run"
    assert main(["run", str(ROOT / "workloads" / "chat-selfhosted.yaml"), "--replications", "2", "--quiet",
                 "--set", "simulation.duration_s=600", "--out", str(out)]) == 0
    assert main(["report", str(out)]) == 0
    capsys.readouterr()
    page, errors = open_report(browser, out / "report.html", tmp_path_factory.getbasetemp() / "screenshots" / "run.png")
    assert check_figures_loaded(page) >= 4 and errors == []
    answer = page.locator("p.answer").first
    assert answer.is_visible() and "SLO:" in answer.inner_text() and "±" in answer.inner_text()
    page.close()


def test_a_plan_reads_in_a_browser(browser, tmp_path, tmp_path_factory, capsys):
    out = tmp_path / "plan"
    assert main(["plan", str(ROOT / "experiments" / "plan-chat.yaml"), "--out", str(out), "--report", "--quiet"]) == 0
    capsys.readouterr()
    shot = tmp_path_factory.getbasetemp() / "screenshots" / "plan.png"
    page, errors = open_report(browser, out / "report.html", shot)
    assert check_figures_loaded(page) >= 1 and errors == []
    answer = page.locator("p.answer").first
    assert answer.is_visible() and answer.inner_text().startswith("The cheapest deployment meeting the SLO")
    box, heading = answer.bounding_box(), page.locator("h2").first.bounding_box()
    assert box["y"] < heading["y"] and box["y"] < 300  # the answer is the first thing read, above the fold
    ranking = page.locator("table").first
    assert ranking.is_visible() and "headroom" in ranking.inner_text()
    page.close()

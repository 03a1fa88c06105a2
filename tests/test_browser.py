"""JupyterLab in headless Chromium: notebooks run top to bottom and their widgets and plots draw.

Skips (with the reason) where ``/usr/bin/chromium`` or playwright is missing. Each
notebook in ``NOTEBOOKS`` is run with Run → Run All Cells; the test asserts the
expected ipywidgets and plotly elements are in the page, that no output shows an
error, and (where a probe is given) that the widgets are live: a click in the page
reaches the kernel and its reply redraws the page (in notebook 04 also: Stop ends a
running workload and says so). Screenshots land in ``build/browser/``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING

import browser
import pytest

if TYPE_CHECKING:
    from playwright.sync_api import Page

pytestmark = pytest.mark.browser

NOTEBOOKS_DIR = Path(__file__).resolve().parents[1] / "notebooks"
FIGURE_WIDGET_BARS = ".jp-OutputArea .js-plotly-plot:not(.jp-RenderedPlotly) .trace.bars .point"


def click_add_a_bar(page: Page) -> dict:
    """Press the smoke notebook's button: the kernel bumps the slider, which relabels and redraws."""
    page.locator(browser.BUTTON, has_text="add a bar").click()
    page.wait_for_function(
        "(sel) => document.querySelectorAll(sel).length === 6", arg=FIGURE_WIDGET_BARS, timeout=30_000
    )
    return {
        "label": page.locator(browser.HTML).inner_text(),
        "bars": page.locator(FIGURE_WIDGET_BARS).count(),
    }


# bars of the first trace of the dashboard's first figure (tokens per request)
FIRST_TRACE_BARS_JS = ("document.querySelector('.ds4wb-dashboard-plots .js-plotly-plot .trace.bars')"
                       "?.querySelectorAll('.point').length")


def run_one_more_request(page: Page) -> dict:
    """In notebook 04, set the dashboard's turns to 1 and press Run workload: the kernel
    serves the agent's first request again (a disk hit on its continued checkpoint) and the
    summary line and the tokens-per-request figure redraw with one more request."""
    dash = page.locator(".ds4wb-panel", has_text="KV cache dashboard")
    turns = dash.locator(".widget-inline-hbox", has_text="turns").locator("input")
    turns.fill("1")
    turns.press("Enter")
    dash.locator(".widget-button", has_text="Run workload").click()
    summary = dash.locator(".widget-html", has_text=re.compile(r"^\s*12 requests"))
    summary.wait_for(timeout=120_000)
    last = dash.locator(".widget-html", has_text="last:").inner_text()
    page.wait_for_function(f"() => ({FIRST_TRACE_BARS_JS}) === 12", timeout=30_000)
    return {"summary": summary.inner_text().split(" · ")[0].strip(), "source": re.search(r"source (\w+)", last).group(1),
            "bars": page.evaluate(f"() => {FIRST_TRACE_BARS_JS}")}


def stop_a_long_workload(page: Page) -> dict:
    """In notebook 04, start a 64-turn workload and press Stop as soon as it is enabled:
    the run ends at the next chunk, token or request with "stopped: ..." in the error box,
    and Stop is disabled again."""
    dash = page.locator(".ds4wb-panel", has_text="KV cache dashboard")
    turns = dash.locator(".widget-inline-hbox", has_text="turns").locator("input")
    turns.fill("64")
    turns.press("Enter")
    dash.locator(".widget-button", has_text="Run workload").click()
    stop = dash.locator(".widget-button", has_text="Stop")
    stop.click(timeout=120_000)  # waits until the running workload enables it
    dash.locator(".widget-html", has_text="stopped:").wait_for(timeout=120_000)
    page.wait_for_function("(b) => b.disabled", arg=stop.element_handle(), timeout=60_000)
    return {"stopped": True}


def request_then_stop(page: Page) -> dict:
    """Notebook 04's probe: one more request (``run_one_more_request``), then a stopped run."""
    return run_one_more_request(page) | stop_a_long_workload(page)


# notebook -> (the least of each element the page must show after Run All, probe, what it returns)
NOTEBOOKS = {
    "00_smoke.ipynb": (
        {
            browser.WIDGET: 4,  # VBox, IntSlider, Button, HTML
            browser.SLIDER: 1,
            browser.BUTTON: 1,
            browser.HTML: 1,
            browser.PLOTLY: 2,  # the FigureWidget and the fig.show() figure
            browser.PLOTLY_MIME: 1,
            browser.PLOTLY_SVG: 2,
        },
        click_add_a_bar,
        {"label": "6 bars", "bars": 6},  # the last cell left the slider at 5
    ),
    "04_cache_hits.ipynb": (
        {
            browser.WIDGET: 30,  # the dashboard and the checkpoint manager, with their controls
            browser.BUTTON: 8,  # Run workload, Redraw; Refresh, Verify all, Inspect, Restore, Delete, Save session
            browser.HTML: 10,
            ".jp-OutputArea .ds4wb-panel": 2,
            ".jp-OutputArea .ds4wb-dashboard-plots .js-plotly-plot": 4,  # the dashboard's live FigureWidgets
            browser.PLOTLY_MIME: 4,  # the static viz figures (fig.show())
            browser.PLOTLY_SVG: 8,
            FIGURE_WIDGET_BARS: 11 * 4,  # tokens per request: 11 requests x 4 stacked traces
        },
        request_then_stop,
        {"summary": "12 requests", "source": "disk", "bars": 12, "stopped": True},
    ),
}


@pytest.fixture(scope="module", autouse=True)
def _browser_available():
    reason = browser.unavailable()
    if reason:
        pytest.skip(reason)


@pytest.mark.parametrize("name", sorted(NOTEBOOKS))
def test_notebook_runs_and_renders_in_jupyterlab(name, tmp_path):
    notebook = NOTEBOOKS_DIR / name
    if not notebook.is_file():
        pytest.skip(f"{notebook} not written yet")
    expect, probe, probed = NOTEBOOKS[name]
    run = browser.run_notebook_in_lab(notebook, expect, tmp_path, probe=probe, run_timeout_s=600)
    report = f"{run}\nserver log tail:\n{run.lab_log}"
    assert run.errors == [], report
    for selector, least in expect.items():
        assert run.counts[selector] >= least, f"{selector}: {run.counts[selector]} < {least}\n{report}"
    assert run.probe == probed, report
    assert run.screenshot.is_file() and run.screenshot.stat().st_size > 10_000


@pytest.mark.slow
def test_a_failing_cell_is_reported_not_waited_for(tmp_path):
    """Run All stops at a raising cell: the harness returns promptly with its traceback."""
    cells = [
        ("import ipywidgets as widgets\nwidgets.IntSlider(value=1)"),
        ("raise ValueError('deliberate failure for the harness')"),
        ("print('never runs')"),
    ]
    notebook = tmp_path / "broken.ipynb"
    notebook.write_text(json.dumps({
        "nbformat": 4, "nbformat_minor": 5, "metadata": {},
        "cells": [
            {"cell_type": "code", "id": f"c{i}", "metadata": {}, "execution_count": None, "outputs": [], "source": src}
            for i, src in enumerate(cells)
        ],
    }))
    run = browser.run_notebook_in_lab(
        notebook, {browser.SLIDER: 1}, tmp_path / "lab", run_timeout_s=60, render_timeout_s=10,
        screenshot=tmp_path / "broken.png",
    )
    assert len(run.errors) == 1 and "deliberate failure for the harness" in run.errors[0], run
    assert run.counts[browser.SLIDER] == 1
    assert run.run_seconds < 60

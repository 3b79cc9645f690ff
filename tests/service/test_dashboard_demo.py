"""The dashboard after the demo, in headless Chromium with no network: the loop's week, each
promotion a step in the reward drawn over time, complete when the page has loaded."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import pytest

from .conftest import ARTIFACTS, LiveServer
from .offline_browser import leaving, offline_chrome, requested_urls

pytestmark = [pytest.mark.chromium, pytest.mark.slow]
__all__ = ["offline_chrome"]
DAY = 86_400


def mean(buckets: list[dict], lo: float, hi: float) -> float:
    """The mean of the bucket values between ``lo`` and ``hi``, weighted by what they count."""
    inside = [b for b in buckets if lo <= b["t"] < hi and b["value"] is not None]
    return sum(b["value"] * b["n"] for b in inside) / sum(b["n"] for b in inside)


def test_the_dashboard_after_the_demo_shows_each_promotion_as_a_step(demo_week, offline_chrome):
    from selenium.webdriver.common.by import By

    from flywheel_middleware.service.app import create_app

    result = demo_week  # the suite's one run of the demo (tests/conftest.py)
    cycles = len(result.cycles)
    # the first experiment is decided on the third or fourth day: a day or more follows it
    assert result.promotions and result.promotions[0]["cycle"] < cycles, result.cycles
    offline_chrome.set_window_size(1400, 1000)
    with LiveServer(create_app()) as live:  # as `flywheel serve` runs it after the demo
        offline_chrome.get(f"{live.url}/")  # returns once the page has loaded
        body = offline_chrome.find_element(By.TAG_NAME, "body")
        assert body.get_attribute("data-ready") == "support_qa"  # complete at load
        assert "loading" not in body.text.lower()
        view = json.loads(
            offline_chrome.find_element(By.ID, "dashboard-data").get_attribute("textContent")
        )["view"]
        canvases = {
            chart: len(offline_chrome.find_elements(By.CSS_SELECTOR, f"#{chart} canvas"))
            for chart in ("sec-rating", "sec-reward", "sec-volume")
        }
        drawn_markers = offline_chrome.find_element(By.ID, "sec-reward").get_attribute(
            "data-markers"
        )
        legend = offline_chrome.find_element(By.CSS_SELECTOR, "#sec-reward .u-legend").text
        page_text = offline_chrome.find_element(By.TAG_NAME, "main").text
        ARTIFACTS.mkdir(exist_ok=True)
        height = offline_chrome.execute_script("return document.body.scrollHeight")
        offline_chrome.set_window_size(1400, height)
        offline_chrome.save_screenshot(str(ARTIFACTS / "dashboard-after-demo.png"))
        urls = requested_urls(offline_chrome)

    # the page drew what it was given, uPlot's script included, and nothing left the machine
    assert all(canvases.values()), canvases
    assert f"{live.url}/static/vendor/uplot/uPlot.iife.min.js" in urls
    assert leaving(urls, live.url) == []
    # the week: each cycle's traffic on a day of its own, the buckets over the data's range
    series = view["series"]
    days = {
        datetime.fromtimestamp(b["t"] // DAY * DAY, timezone.utc).date()
        for b in series["volume"]
        if b["n"]
    }
    assert len(days) >= cycles and series["end"] - series["start"] >= (cycles - 1) * DAY
    assert sum(b["n"] for b in series["volume"]) == sum(c["requests"] for c in result.cycles) > 0
    # every promotion is marked, and the reward steps up at each
    promotions = [m for m in view["markers"] if m["kind"] == "promote"]
    assert len(promotions) == len(result.promotions) and drawn_markers == str(len(view["markers"]))
    assert [m["label"] for m in promotions] == [f"promoted v{m['to_version']}" for m in promotions]
    edges = [series["start"], *(m["at"] for m in view["markers"]), series["end"]]
    steps = []
    for i, marker in enumerate(view["markers"]):
        if edges[i + 2] - marker["at"] < DAY / 2:  # decided on the last day: nothing after yet
            continue
        before = mean(series["reward"], edges[i], marker["at"])
        after = mean(series["reward"], marker["at"], edges[i + 2])
        steps.append((marker["label"], round(before, 3), round(after, 3)))
    assert steps and all(after > before + 0.03 for _, before, after in steps), steps
    assert "reward between version changes" in legend
    # counts say what they count; questions and answers are the customers' text
    assert "served" in page_text and "rated" in page_text
    assert "–→–" not in page_text
    case = view["bad_cases"]["cases"][0]
    assert case["question"] and not case["question"].startswith(("{", "["))

"""Headless Chromium that cannot reach past this machine and records every request it makes."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest

from .conftest import CHROMEDRIVER, CHROMIUM

# Host names resolve to nothing but loopback, and whatever is not loopback goes to a proxy on
# a port nothing listens on: a page that needs the internet cannot get it.
BLOCK_NETWORK = (
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1, EXCLUDE localhost",
    "--proxy-server=http://127.0.0.1:9",
)


@pytest.fixture
def offline_chrome() -> Iterator[Any]:
    """A fresh headless Chromium with the network blocked and performance logging on (see
    ``requested_urls``); skips, saying why, when Chromium is not installed."""
    if not CHROMIUM or not CHROMEDRIVER:
        pytest.skip(
            "headless Chromium is not installed: apt-get install chromium chromium-driver (make browser)"
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="fw-chrome-offline-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--window-size=1400,1000",
        f"--user-data-dir={profile}",
        *BLOCK_NETWORK,
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        try:
            driver.quit()
        finally:
            shutil.rmtree(profile, ignore_errors=True)


def requested_urls(driver: Any) -> list[str]:
    """Every URL the browser asked for since the last call (from its DevTools network log)."""
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return urls


def leaving(urls: list[str], base: str) -> list[str]:
    """The network URLs (http, https, ws, wss) not on ``base``: what would leave the machine.
    (The browser's own ``chrome://`` pages and inline ``data:`` and ``blob:`` URLs stay inside.)"""
    network = ("http:", "https:", "ws:", "wss:")
    return [u for u in urls if u.startswith(network) and not u.startswith(base + "/")]

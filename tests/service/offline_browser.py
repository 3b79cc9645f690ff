"""Headless Chromium that cannot reach past this machine and records every request it makes."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from .conftest import launch_chromium

# Host names resolve to nothing but loopback, and whatever is not loopback goes to a proxy on
# a port nothing listens on: a page that needs the internet cannot get it.
BLOCK_NETWORK = (
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1, EXCLUDE localhost",
    "--proxy-server=http://127.0.0.1:9",
)


@pytest.fixture
def offline_chrome() -> Iterator[Any]:
    """A fresh headless Chromium with the network blocked and its DevTools network log kept
    (see ``requested_urls``)."""
    logging = {"goog:loggingPrefs": {"performance": "ALL"}}
    with launch_chromium(*BLOCK_NETWORK, capabilities=logging) as driver:
        yield driver


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

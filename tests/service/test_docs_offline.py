"""The API docs render from assets in the package: /docs in Chromium with no network."""

from __future__ import annotations

import pytest

from .conftest import LiveServer
from .offline_browser import leaving, offline_chrome, requested_urls

pytestmark = [pytest.mark.chromium]
__all__ = ["offline_chrome"]


def operations(app) -> set[str]:
    return {
        f"{method.upper()} {path}"
        for path, item in app.openapi()["paths"].items()
        for method in item
    }


def test_swagger_ui_shows_every_operation_offline(fw, app, offline_chrome):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    expected = operations(app)
    with LiveServer(app) as live:
        offline_chrome.get(f"{live.url}/docs")
        WebDriverWait(offline_chrome, 20).until(
            lambda d: len(d.find_elements(By.CSS_SELECTOR, ".opblock-summary")) >= len(expected)
        )
        shown = {
            " ".join(
                [
                    op.find_element(By.CSS_SELECTOR, ".opblock-summary-method").text,
                    op.find_element(By.CSS_SELECTOR, ".opblock-summary-path").text.replace(
                        "\u200b", ""
                    ),
                ]
            )
            for op in offline_chrome.find_elements(By.CSS_SELECTOR, ".opblock-summary")
        }
        assert shown == expected
        assert "flywheel-middleware" in offline_chrome.find_element(By.CSS_SELECTOR, ".title").text
        urls = requested_urls(offline_chrome)
    assert f"{live.url}/openapi.json" in urls
    assert leaving(urls, live.url) == []

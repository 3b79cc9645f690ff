"""flywheel.js in real headless Chromium: the right events for the right rollout, sent by sendBeacon on close."""

from __future__ import annotations

import time

import pytest
from fastapi.responses import HTMLResponse
from sqlmodel import select

from flywheel_middleware.store.models import TelemetryEvent

from .conftest import API_KEY

pytestmark = [pytest.mark.chromium, pytest.mark.slow]

ROLLOUT_A = "0000aaaa0000aaaa0000aaaa0000aaaa"
ROLLOUT_B = "0000bbbb0000bbbb0000bbbb0000bbbb"

PAGE = f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>support chat</title></head>
<body style="margin:0;font:16px sans-serif">
  <div style="height:120px">Your question: where is my order?</div>
  <div id="answer-a" data-flywheel-rollout="{ROLLOUT_A}" style="height:320px;background:#eef">
    <p id="answer-text">Your parcel left the depot this morning and should arrive within two days.</p>
    <button id="more" data-flywheel="more-info">Show tracking details</button>
    <button id="copy" data-flywheel="copy" onclick="copyAnswer()">Copy</button>
  </div>
  <div style="height:1600px">other content</div>
  <div id="answer-b" data-flywheel-rollout="{ROLLOUT_B}" style="height:200px;background:#efe">
    <p>A second answer, further down.</p>
    <button id="regen" data-flywheel="regenerate">Try again</button>
  </div>
  <div style="height:1400px">footer</div>
  <script>
    function copyAnswer() {{
      var range = document.createRange();
      range.selectNodeContents(document.getElementById("answer-text"));
      var sel = window.getSelection(); sel.removeAllRanges(); sel.addRange(range);
      document.execCommand("copy");
    }}
  </script>
  <script src="/flywheel.js" data-key="{API_KEY}" data-flush-ms="0"></script>
</body></html>"""


def _events(fw) -> list[TelemetryEvent]:
    fw.flush()
    with fw.get_store().session() as s:
        return list(s.exec(select(TelemetryEvent).order_by(TelemetryEvent.id)))


def test_snippet_events_arrive_by_beacon_on_close(fw, app, chrome):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    from .conftest import LiveServer

    requests: list[dict] = []

    @app.middleware("http")
    async def record(request, call_next):
        if request.url.path == "/v1/telemetry":
            requests.append(
                {
                    "content_type": request.headers.get("content-type"),
                    "fetch_mode": request.headers.get("sec-fetch-mode"),
                }
            )
        return await call_next(request)

    app.add_api_route("/test/page", lambda: HTMLResponse(PAGE), methods=["GET"])

    with LiveServer(app) as live:
        chrome.get("about:blank")
        home = chrome.current_window_handle
        chrome.switch_to.new_window("tab")
        chrome.get(f"{live.url}/test/page")
        assert chrome.execute_script("return window.Flywheel && window.Flywheel.version") == "1"
        assert chrome.execute_script("return document.visibilityState") == "visible"
        time.sleep(1.3)  # answer A is on screen: dwell accumulates
        chrome.find_element(By.ID, "more").click()
        chrome.find_element(By.ID, "copy").click()
        actions = ActionChains(chrome)
        for dx in (40, -30, 60, -50, 25):
            actions.move_to_element_with_offset(
                chrome.find_element(By.ID, "answer-a"), dx, dx // 2
            ).pause(0.12)
        actions.perform()
        chrome.execute_script("document.getElementById('answer-b').scrollIntoView()")
        time.sleep(0.3)
        chrome.find_element(By.ID, "regen").click()
        chrome.execute_script("window.scrollTo(0, document.documentElement.scrollHeight)")
        time.sleep(0.3)
        queued = chrome.execute_script("return window.Flywheel.stats()")
        assert queued["sent"] == 0 and queued["queued"] >= 4, queued
        assert requests == [], "nothing is sent before the page goes away (periodic flush is off)"
        assert _events(fw) == []

        chrome.close()  # pagehide → the snippet sends everything with sendBeacon
        chrome.switch_to.window(home)

        deadline = time.monotonic() + 10
        events = _events(fw)
        while time.monotonic() < deadline and not {"dwell", "click", "copy", "scroll", "mouse"} <= {
            e.event_type for e in events
        }:
            time.sleep(0.2)
            events = _events(fw)

    assert requests, "the beacon never reached the server"
    for req in requests:  # what navigator.sendBeacon sends: text/plain, no-cors
        assert req["content_type"].startswith("text/plain"), req
        assert req["fetch_mode"] == "no-cors", req

    by_type: dict[str, list[TelemetryEvent]] = {}
    for e in events:
        by_type.setdefault(e.event_type, []).append(e)
    assert {"dwell", "click", "copy", "scroll", "mouse"} <= set(by_type), sorted(by_type)
    session_ids = {e.session_id for e in events}
    assert len(session_ids) == 1 and None not in session_ids

    dwell_a = [e for e in by_type["dwell"] if e.rollout_id == ROLLOUT_A]
    assert dwell_a and sum(e.payload["ms"] for e in dwell_a) >= 1000
    clicks = {(e.payload["kind"], e.rollout_id) for e in by_type["click"]}
    assert ("more-info", ROLLOUT_A) in clicks
    assert ("copy", ROLLOUT_A) in clicks
    assert ("regenerate", ROLLOUT_B) in clicks
    copy = by_type["copy"]
    assert [e.rollout_id for e in copy] == [ROLLOUT_A]
    assert copy[0].payload["chars"] == len(
        "Your parcel left the depot this morning and should arrive within two days."
    )
    assert max(e.payload["depth"] for e in by_type["scroll"]) > 0.95
    assert sum(e.payload["moves"] for e in by_type["mouse"]) >= 3
    assert all(e.rollout_id in (ROLLOUT_A, ROLLOUT_B) for e in events)

    # The features the model reads come out of these rows.
    from flywheel_middleware.learn.implicit import features_by

    feats = features_by(events)
    a = feats[ROLLOUT_A].values
    assert a["dwell_total_s"] >= 1.0 and a["copies"] >= 1 and a["clicks_more_info"] == 1
    assert feats[ROLLOUT_B].values["regenerates"] == 1


def test_cross_origin_page_flushes_periodically_within_the_cors_allow_list(fw, chrome):
    """A shop page on another origin loads flywheel.js from the service; allowed origins get in, others don't."""
    from fastapi import FastAPI
    from selenium.webdriver.common.by import By

    from flywheel_middleware.service.app import create_app

    from .conftest import LiveServer, free_port

    shop_port = free_port()
    shop_origin = f"http://127.0.0.1:{shop_port}"
    service = create_app(api_keys=[API_KEY], cors_origins=[shop_origin])
    with LiveServer(service) as svc:
        page = PAGE.replace('src="/flywheel.js"', f'src="{svc.url}/flywheel.js"').replace(
            'data-flush-ms="0"', 'data-flush-ms="300"'
        )
        shop = FastAPI()
        shop.add_api_route("/", lambda: HTMLResponse(page), methods=["GET"])
        shop_server = LiveServer(shop, port=shop_port)
        with shop_server:
            chrome.get(shop_origin + "/")
            chrome.find_element(By.ID, "more").click()
            deadline = time.monotonic() + 10
            events = _events(fw)
            while time.monotonic() < deadline and not any(e.event_type == "click" for e in events):
                time.sleep(0.2)
                events = _events(fw)
            # the page is still open: these came from the periodic flush
            assert chrome.execute_script("return window.Flywheel.stats().sent") >= 1
            clicks = [e for e in events if e.event_type == "click"]
            assert [(e.rollout_id, e.payload["kind"]) for e in clicks] == [(ROLLOUT_A, "more-info")]

    # The same page from an origin that is not on the list: the service refuses it (403), stores nothing.
    before = len(_events(fw))
    strict = create_app(api_keys=[API_KEY], cors_origins=["https://elsewhere.example"])
    with LiveServer(strict) as svc2:
        page = PAGE.replace('src="/flywheel.js"', f'src="{svc2.url}/flywheel.js"').replace(
            'data-flush-ms="0"', 'data-flush-ms="200"'
        )
        shop2 = FastAPI()
        shop2.add_api_route("/", lambda: HTMLResponse(page), methods=["GET"])
        with LiveServer(shop2) as other:
            chrome.get(other.url + "/")
            chrome.find_element(By.ID, "more").click()
            time.sleep(1.5)
            assert chrome.execute_script("return window.Flywheel.stats().sent") >= 1
    assert len(_events(fw)) == before


def test_a_hidden_tab_stops_the_dwell_clock(fw, app, chrome):
    """visibilitychange: switching to another tab ends the stretch (and flushes); coming back starts a new one."""
    from .conftest import LiveServer

    app.add_api_route("/test/page", lambda: HTMLResponse(PAGE), methods=["GET"])
    with LiveServer(app) as live:
        chrome.get(f"{live.url}/test/page")
        page = chrome.current_window_handle
        time.sleep(1.0)
        chrome.switch_to.new_window("tab")  # the answer's tab is now hidden
        chrome.get("about:blank")
        time.sleep(1.5)  # had the clock kept running, the first stretch would be over 2.5 s
        chrome.switch_to.window(page)
        assert chrome.execute_script("return document.visibilityState") == "visible"
        hidden_flush = [e for e in _events(fw) if e.event_type == "dwell"]
        time.sleep(1.8)  # visible again: a second stretch
        chrome.execute_script("window.scrollTo(0, document.documentElement.scrollHeight)")
        time.sleep(0.2)
        chrome.execute_script("window.Flywheel.flush()")
        deadline = time.monotonic() + 5
        dwell = [e for e in _events(fw) if e.event_type == "dwell"]
        while time.monotonic() < deadline and len(dwell) < 2:
            time.sleep(0.2)
            dwell = [e for e in _events(fw) if e.event_type == "dwell"]
    assert len(hidden_flush) == 1, "going hidden sends the finished stretch at once"
    assert 0.9 <= hidden_flush[0].payload["ms"] / 1000 < 2.0
    assert [e.rollout_id for e in dwell] == [ROLLOUT_A, ROLLOUT_A]
    assert 1.7 <= dwell[1].payload["ms"] / 1000 < 3.0


def test_thumbs_and_ratings_reach_the_feedback_api(fw, app, chrome):
    from selenium.webdriver.common.by import By

    from .conftest import LiveServer

    with fw.rollout("support", user_id="u1") as r:
        r.set_output("Your parcel arrives tomorrow.")
    fw.flush()
    page = f"""<!DOCTYPE html><html><body>
      <div data-flywheel-rollout="{r.id}"><p>Your parcel arrives tomorrow.</p>
        <button id="up" data-flywheel="thumbs-up">👍</button>
        <button id="four" data-flywheel="rate" data-flywheel-rating="4">★★★★</button>
      </div>
      <script src="/flywheel.js" data-key="{API_KEY}" data-flush-ms="0"></script></body></html>"""
    app.add_api_route("/test/rate", lambda: HTMLResponse(page), methods=["GET"])
    with LiveServer(app) as live:
        chrome.get(f"{live.url}/test/rate")
        chrome.find_element(By.ID, "up").click()
        chrome.find_element(By.ID, "four").click()
        chrome.execute_script(f"window.Flywheel.feedback('{r.id}', {{comment: 'quick and right'}})")
        deadline = time.monotonic() + 10
        rows: list = []
        while time.monotonic() < deadline and len(rows) < 3:
            time.sleep(0.2)
            fw.flush()
            rows = fw.get_store().execute(
                "SELECT key, value, comment, source FROM feedback WHERE rollout_id = :r ORDER BY id",
                {"r": r.id},
            )
    assert sorted(tuple(x) for x in rows) == sorted(
        [
            ("thumbs", 1.0, None, "explicit"),
            ("rating", 4.0, None, "explicit"),
            ("comment", None, "quick and right", "explicit"),
        ]
    )

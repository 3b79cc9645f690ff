/*
 * flywheel.js — implicit feedback from the page that shows your agent's answers.
 *
 *   <div data-flywheel-rollout="ROLLOUT_ID"> ...the answer... 
 *     <button data-flywheel="copy">Copy</button>
 *     <button data-flywheel="regenerate">Try again</button>
 *     <button data-flywheel="escalate">Talk to a person</button>
 *   </div>
 *   <script src="https://flywheel.example/flywheel.js" data-key="BROWSER_KEY" defer></script>
 *
 * Events (each carries the rollout id of its answer and the session id of the tab):
 *   dwell  {ms}            the answer was at least half visible, in one stretch, for ms
 *                          (IntersectionObserver; a hidden tab stops the clock)
 *   click  {kind, label}   a click on an element marked data-flywheel="kind"
 *   copy   {chars}         text copied out of an answer
 *   scroll {depth}         the deepest fraction of the page seen (sent when it grows)
 *   mouse  {moves, ms}     mouse movements (at most one per 100 ms) over ms of visible time
 * Explicit feedback goes straight to /v1/feedback: a click on data-flywheel="thumbs-up" or
 * "thumbs-down" sends a thumb, one with data-flywheel="rate" data-flywheel-rating="1..5" a rating, and
 * Flywheel.feedback(rolloutId, {rating: 4, comment: "..."}) anything the API accepts.
 * They are batched and sent with navigator.sendBeacon as text/plain JSON — every
 * data-flush-ms (default 15000), and on pagehide / when the tab is hidden, so closing the
 * page loses nothing. Options on the script tag: data-endpoint, data-key, data-session,
 * data-flush-ms, data-max-batch.
 */
(function () {
  "use strict";
  if (window.Flywheel && window.Flywheel.version) return;

  var script = document.currentScript || document.querySelector("script[src*='flywheel.js']");
  var opt = function (name, dflt) {
    var v = script && script.getAttribute("data-" + name);
    return v === null || v === undefined || v === "" ? dflt : v;
  };
  var origin = script && script.src ? new URL(script.src, location.href).origin : location.origin;
  var endpoint = opt("endpoint", origin + "/v1/telemetry");
  var key = opt("key", "");
  var flushMs = parseInt(opt("flush-ms", "15000"), 10);
  var maxBatch = parseInt(opt("max-batch", "50"), 10);
  var withKey = function (u) { return key ? u + (u.indexOf("?") < 0 ? "?" : "&") + "key=" + encodeURIComponent(key) : u; };
  var url = withKey(endpoint);
  var feedbackUrl = withKey(opt("feedback-endpoint", endpoint.replace(/\/v1\/telemetry(\?.*)?$/, "/v1/feedback")));

  var sessionId = opt("session", null);
  if (!sessionId) {
    try {
      sessionId = sessionStorage.getItem("flywheel.session");
      if (!sessionId) {
        sessionId = "s_" + Math.random().toString(36).slice(2, 12) + Date.now().toString(36);
        sessionStorage.setItem("flywheel.session", sessionId);
      }
    } catch (e) {
      sessionId = "s_" + Math.random().toString(36).slice(2, 12) + Date.now().toString(36);
    }
  }

  var queue = [];
  var sent = 0;
  var now = function () { return Date.now(); };

  function rolloutOf(el) {
    var node = el && el.nodeType === 1 ? el : el && el.parentElement;
    while (node) {
      var id = node.getAttribute && node.getAttribute("data-flywheel-rollout");
      if (id) return id;
      node = node.parentElement;
    }
    return null;
  }

  function track(type, rolloutId, payload) {
    var ev = { event_type: type, session_id: sessionId, client_ts: now(), payload: payload || {} };
    if (rolloutId) ev.rollout_id = rolloutId;
    queue.push(ev);
    if (queue.length >= maxBatch * 4) flush("size");
  }

  function send(body, target) {
    target = target || url;
    try {
      if (navigator.sendBeacon && navigator.sendBeacon(target, body)) return "beacon";
    } catch (e) { /* fall through */ }
    try {
      fetch(target, { method: "POST", body: body, keepalive: true, mode: "cors",
                      headers: { "Content-Type": "text/plain;charset=UTF-8" } });
      return "fetch";
    } catch (e) {
      return null;
    }
  }

  function flush(reason) {
    if (reason === "final" || reason === "hidden") { closeAllDwell(); }
    pageEvents();
    while (queue.length) {
      var events = queue.splice(0, maxBatch);
      send(JSON.stringify({ session_id: sessionId, sent_at: now(), events: events }));
      sent += events.length;
    }
  }

  // -- dwell on answers ---------------------------------------------------------------
  var visibleSince = new Map();   // element -> start time while at least half visible
  var inView = new Set();         // elements intersecting enough, whatever the tab state
  var lastAnswer = null;          // the answer most recently seen (page-level events go there)

  function startDwell(el) {
    if (document.visibilityState === "visible" && !visibleSince.has(el)) visibleSince.set(el, now());
    lastAnswer = el;
  }
  function stopDwell(el) {
    var t0 = visibleSince.get(el);
    if (t0 === undefined) return;
    visibleSince.delete(el);
    var ms = now() - t0;
    if (ms >= 50) track("dwell", el.getAttribute("data-flywheel-rollout"), { ms: ms });
  }
  function closeAllDwell() { Array.from(visibleSince.keys()).forEach(stopDwell); }

  var observer = "IntersectionObserver" in window ? new IntersectionObserver(function (entries) {
    entries.forEach(function (e) {
      var vh = window.innerHeight || 1;
      var enough = e.isIntersecting && (e.intersectionRatio >= 0.5 || e.intersectionRect.height >= 0.5 * vh);
      if (enough) { inView.add(e.target); startDwell(e.target); }
      else { inView.delete(e.target); stopDwell(e.target); }
    });
  }, { threshold: [0, 0.25, 0.5, 0.75, 1] }) : null;

  var watched = new WeakSet();
  function watchAnswers(root) {
    if (!observer) return;
    var nodes = (root.querySelectorAll ? root.querySelectorAll("[data-flywheel-rollout]") : []);
    if (root.getAttribute && root.getAttribute("data-flywheel-rollout")) nodes = [root].concat(Array.from(nodes));
    Array.prototype.forEach.call(nodes, function (el) {
      if (!watched.has(el) && !el.hasAttribute("data-flywheel")) { watched.add(el); observer.observe(el); }
    });
  }

  // -- page-level signals: scroll depth and mouse activity ------------------------------
  var maxDepth = 0, sentDepth = 0, moves = 0, lastMove = 0, mouseFrom = now(), hiddenMs = 0, hiddenAt = null;

  function depthNow() {
    var doc = document.documentElement;
    var total = Math.max(doc.scrollHeight, document.body ? document.body.scrollHeight : 0, 1);
    return Math.min(1, (window.scrollY + window.innerHeight) / total);
  }
  function pageRollout() {
    if (lastAnswer) return lastAnswer.getAttribute("data-flywheel-rollout");
    var one = document.querySelectorAll("[data-flywheel-rollout]:not([data-flywheel])");
    return one.length === 1 ? one[0].getAttribute("data-flywheel-rollout") : null;
  }
  function pageEvents() {
    var rid = pageRollout();
    maxDepth = Math.max(maxDepth, depthNow());
    if (maxDepth > sentDepth + 0.005) {
      track("scroll", rid, { depth: Math.round(maxDepth * 1000) / 1000 });
      sentDepth = maxDepth;
    }
    var t = now();
    var visibleMs = t - mouseFrom - hiddenMs - (hiddenAt !== null ? t - hiddenAt : 0);
    if (moves > 0) track("mouse", rid, { moves: moves, ms: Math.max(1, visibleMs) });
    moves = 0; mouseFrom = t; hiddenMs = 0; if (hiddenAt !== null) hiddenAt = t;
  }

  var ticking = false;
  window.addEventListener("scroll", function () {
    if (ticking) return;
    ticking = true;
    requestAnimationFrame(function () { ticking = false; maxDepth = Math.max(maxDepth, depthNow()); });
  }, { passive: true });

  document.addEventListener("mousemove", function () {
    var t = now();
    if (t - lastMove >= 100) { moves++; lastMove = t; }
  }, { passive: true });

  // -- clicks on marked elements, and copies --------------------------------------------
  document.addEventListener("click", function (e) {
    var el = e.target && e.target.closest ? e.target.closest("[data-flywheel]") : null;
    if (!el) return;
    var kind = el.getAttribute("data-flywheel");
    var label = (el.innerText || el.getAttribute("aria-label") || "").trim().slice(0, 40);
    var rid = rolloutOf(el);
    track("click", rid, { kind: kind, label: label });
    if (rid && (kind === "thumbs-up" || kind === "thumbs-down")) feedback(rid, { thumbs: kind === "thumbs-up" ? "up" : "down" });
    var rating = el.getAttribute("data-flywheel-rating");
    if (rid && rating) feedback(rid, { rating: Number(rating) });
  }, true);

  // Explicit feedback about an answer, sent at once (POST /v1/feedback): thumbs, a 1-5 rating, a comment.
  function feedback(rolloutId, fields) {
    var body = { rollout_id: rolloutId };
    for (var k in fields) body[k] = fields[k];
    return send(JSON.stringify(body), feedbackUrl);
  }

  document.addEventListener("copy", function () {
    var sel = window.getSelection ? window.getSelection() : null;
    if (!sel || sel.isCollapsed) return;
    var rid = rolloutOf(sel.anchorNode) || rolloutOf(sel.focusNode);
    if (rid) track("copy", rid, { chars: String(sel).length });
  }, true);

  // -- lifecycle -----------------------------------------------------------------------
  document.addEventListener("visibilitychange", function () {
    if (document.visibilityState === "hidden") {
      hiddenAt = now();
      flush("hidden");
    } else {
      if (hiddenAt !== null) { hiddenMs += now() - hiddenAt; hiddenAt = null; }
      inView.forEach(startDwell);
    }
  });
  window.addEventListener("pagehide", function () { flush("final"); });
  if (flushMs > 0) setInterval(function () { if (queue.length || moves) flush("timer"); }, flushMs);

  function init() {
    watchAnswers(document);
    if ("MutationObserver" in window) {
      new MutationObserver(function (muts) {
        muts.forEach(function (m) { m.addedNodes.forEach(function (n) { if (n.nodeType === 1) watchAnswers(n); }); });
      }).observe(document.documentElement, { childList: true, subtree: true });
    }
  }
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init); else init();

  window.Flywheel = {
    version: "1",
    sessionId: sessionId,
    track: track,
    flush: function () { flush("manual"); },
    feedback: feedback,
    stats: function () { return { queued: queue.length, sent: sent }; }
  };
})();

// The flywheel dashboard: draws one workflow's view (GET /v1/dashboard/workflows/{workflow}).
// The server embeds the view in #dashboard-data when the reader may read it, so the page is
// complete when it loads; otherwise (a key is needed) it is fetched with the key. Either way
// <body data-ready="WORKFLOW"> says the page is drawn. Charts are uPlot (vendored, no CDN).
(function () {
  "use strict";
  var SVGNS = "http://www.w3.org/2000/svg";
  var COLORS = { rating: "#2563eb", reward: "#16a34a", positive: "#0891b2", implicit: "#7c3aed", volume: "#94a3b8", errors: "#dc2626" };
  var charts = [];

  function h(tag, attrs, children) {
    var e = document.createElement(tag);
    for (var k in (attrs || {})) { if (k === "class") e.className = attrs[k]; else e.setAttribute(k, attrs[k]); }
    (children || []).forEach(function (c) { if (c !== null && c !== undefined) e.appendChild(typeof c === "string" ? document.createTextNode(c) : c); });
    return e;
  }
  function svg(tag, attrs, text) {
    var e = document.createElementNS(SVGNS, tag);
    for (var k in attrs) e.setAttribute(k, attrs[k]);
    if (text !== undefined) e.textContent = text;
    return e;
  }
  function section(id) { return document.getElementById(id); }
  function body(id) { var b = section(id).querySelector(".body"); b.innerHTML = ""; return b; }
  function sub(id, text) { section(id).querySelector(".sub").textContent = text; }
  function note(target, text) { target.appendChild(h("p", { "class": "note" }, [text])); }
  function fmt(v, d) { return v === null || v === undefined ? "–" : Number(v).toFixed(d === undefined ? 2 : d); }
  function pct(v) { return v === null || v === undefined ? "–" : (100 * v).toFixed(1) + "%"; }
  function count(n, what) { return Number(n || 0).toLocaleString("en") + " " + what; }
  function pad(n) { return (n < 10 ? "0" : "") + n; }
  function when(ts) {
    if (!ts) return "–";
    var d = new Date(ts * 1000);
    return d.getFullYear() + "-" + pad(d.getMonth() + 1) + "-" + pad(d.getDate()) + " " + pad(d.getHours()) + ":" + pad(d.getMinutes());
  }
  function duration(seconds) {
    var units = [[86400, "day"], [3600, "h"], [60, "min"], [1, "s"]];
    for (var i = 0; i < units.length; i++) {
      if (seconds >= units[i][0]) {
        var n = Math.round(seconds / units[i][0]);
        return n + " " + units[i][1] + (units[i][1] === "day" && n > 1 ? "s" : "");
      }
    }
    return seconds + " s";
  }

  // -- time charts (uPlot) ----------------------------------------------------------------

  // Promotions and rollbacks as vertical lines with their label, on every time chart.
  function markerPlugin(markers) {
    return {
      hooks: {
        draw: [function (u) {
          var ctx = u.ctx, top = u.bbox.top, bottom = u.bbox.top + u.bbox.height;
          ctx.save();
          ctx.font = Math.round(11 * devicePixelRatio) + "px system-ui, sans-serif";
          markers.forEach(function (m) {
            var x = Math.round(u.valToPos(m.at, "x", true));
            if (x < u.bbox.left || x > u.bbox.left + u.bbox.width) return;
            ctx.strokeStyle = m.kind === "rollback" ? "#dc2626" : "#059669";
            ctx.lineWidth = 2 * devicePixelRatio;
            ctx.setLineDash([6 * devicePixelRatio, 4 * devicePixelRatio]);
            ctx.beginPath(); ctx.moveTo(x, top); ctx.lineTo(x, bottom); ctx.stroke();
            ctx.fillStyle = ctx.strokeStyle;
            ctx.fillText(m.label, x + 4 * devicePixelRatio, top + 12 * devicePixelRatio);
          });
          ctx.restore();
        }]
      }
    };
  }

  // lines: [{key, label, color, points: [{t, value, n}], scale, bars}]; scales: {name: {range, label, side, fmt}}
  function timeChart(id, s, markers, lines, scales) {
    var target = body(id);
    var drawn = lines.filter(function (l) { return l.points.some(function (p) { return p.value !== null; }); });
    section(id).setAttribute("data-markers", String(markers.length));
    if (!drawn.length) { note(target, "no data yet"); return; }
    var xs = s.volume.map(function (p) { return p.t; });
    var data = [xs].concat(drawn.map(function (l) { return l.points.map(function (p) { return p.value; }); }));
    var series = [{ value: function (u, v) { return v === null ? "–" : when(v - s.width / 2) + " + " + duration(s.width); } }];
    drawn.forEach(function (l) {
      var sc = scales[l.scale];
      series.push({
        label: l.label, scale: l.scale, stroke: l.color, width: l.level ? 2.5 : 2, spanGaps: !l.bars, dash: l.level ? [8, 4] : undefined,
        fill: l.bars ? l.color + "66" : undefined,
        paths: l.bars ? uPlot.paths.bars({ size: [0.8, 40] }) : (l.level ? uPlot.paths.stepped({ align: 1 }) : undefined),
        points: { show: !l.bars && !l.level, size: 4 },
        value: function (u, v, si, idx) {
          if (v === null || v === undefined) return "–";
          var n = idx === null || idx === undefined ? null : l.points[idx].n;
          return sc.fmt(v) + (n !== null && !l.bars ? " (n=" + n + " " + l.counts + ")" : "");
        }
      });
    });
    var axes = [{ stroke: "#6b7280", grid: { stroke: "#eef0f3" } }];
    Object.keys(scales).forEach(function (name) {
      if (!drawn.some(function (l) { return l.scale === name; })) return;
      var sc = scales[name];
      axes.push({ scale: name, side: sc.side || 3, label: sc.label, stroke: "#6b7280", size: 56,
                  grid: { show: !sc.side, stroke: "#eef0f3" }, values: function (u, vals) { return vals.map(sc.fmt); } });
    });
    var scaleOpts = { x: { time: true, range: [s.start, s.end] } };
    Object.keys(scales).forEach(function (name) { scaleOpts[name] = { range: scales[name].range }; });
    // Until the cursor points at a bucket, the legend reads the latest one that has data.
    var latest = xs.length - 1;
    while (latest > 0 && drawn.every(function (l) { return l.points[latest].value === null; })) latest--;
    function showLatest(u) { if (u.cursor.idx === null || u.cursor.idx === undefined) u.setLegend({ idx: latest }); }
    var width = Math.max(320, target.clientWidth || 520);
    var u = new uPlot({
      width: width, height: 230, series: series, axes: axes, scales: scaleOpts,
      cursor: { sync: { key: "flywheel-time" } }, legend: { live: true },
      hooks: { ready: [showLatest], setCursor: [showLatest] },
      plugins: [markerPlugin(markers)]
    }, data, target);
    charts.push(u);
  }

  // A series' mean between version changes (series.levels), per bucket: the step each change makes.
  function levelLine(s, name, label, color, scale) {
    var levels = (s.levels || {})[name] || [];
    var points = s.volume.map(function (b) {
      var hit = levels.filter(function (l) { return b.t >= l.start && b.t < l.end; })[0];
      return { t: b.t, value: hit ? hit.value : null, n: hit ? hit.n : 0 };
    });
    return { key: name + "-level", label: label, color: color, points: points, scale: scale, level: true, counts: "over the whole stretch" };
  }

  function rate(v) { return pct(v).replace(".0%", "%"); }

  function drawCharts(d) {
    var s = d.series, m = d.markers || [];
    charts.forEach(function (u) { u.destroy(); });
    charts = [];
    if (!s.start) {
      ["sec-rating", "sec-reward", "sec-volume"].forEach(function (id) { note(body(id), "no rollouts yet"); sub(id, ""); });
      return;
    }
    var per = "per " + duration(s.width) + " of rollout start times";
    var promos = m.length ? "; dashed lines: " + m.map(function (x) { return x.label + " (" + when(x.at) + ")"; }).join(", ") : "";
    sub("sec-rating", "1 = worst, 5 = best; the mean of the rated rollouts' ratings " + per + ", and (dashed) over each stretch between version changes" + promos);
    sub("sec-reward", "0–1, " + per + ": mean reward (dashed: over each stretch between version changes), share of rollouts with positive feedback, mean implicit satisfaction" + promos);
    sub("sec-volume", "rollouts started " + per + " (left axis) and the share that failed (right axis)" + promos);
    var c = s.counts;
    timeChart("sec-rating", s, m, [
      { key: "rating", label: "mean rating", color: COLORS.rating, points: s.rating, scale: "stars", counts: c.rating },
      levelLine(s, "rating", "mean between version changes", "#1e3a8a", "stars")
    ], { stars: { range: [1, 5], label: "rating (1–5)", fmt: function (v) { return fmt(v, 1); } } });
    timeChart("sec-reward", s, m, [
      { key: "reward", label: "reward", color: COLORS.reward, points: s.reward, scale: "unit", counts: c.reward },
      levelLine(s, "reward", "reward between version changes", "#14532d", "unit"),
      { key: "positive", label: "positive feedback", color: COLORS.positive, points: s.positive, scale: "unit", counts: "rollouts with a verdict" },
      { key: "implicit", label: "implicit satisfaction", color: COLORS.implicit, points: s.implicit || [], scale: "unit", counts: "scores" }
    ], { unit: { range: [0, 1], label: "0–1", fmt: function (v) { return fmt(v, 2); } } });
    var maxVol = Math.max.apply(null, [1].concat(s.volume.map(function (p) { return p.value || 0; })));
    timeChart("sec-volume", s, m, [
      { key: "volume", label: "rollouts started", color: COLORS.volume, points: s.volume, scale: "count", bars: true, counts: c.volume },
      { key: "errors", label: "failed", color: COLORS.errors, points: s.error_rate, scale: "share", counts: c.error_rate }
    ], {
      count: { range: [0, Math.ceil(maxVol * 1.1)], label: "rollouts", fmt: function (v) { return String(Math.round(v)); } },
      share: { range: [0, Math.max(0.05, Math.max.apply(null, s.error_rate.map(function (p) { return p.value || 0; })) * 1.2)], label: "failed", side: 1, fmt: rate }
    });
  }

  // -- bars with intervals (SVG) ----------------------------------------------------------

  function intervalBars(target, rows, opts) {
    if (!rows.length) { note(target, opts.empty || "no data"); return; }
    var W = 620, rowH = 26, L = 150, R = 210, T = 8;
    var H = T + rows.length * rowH + 22;
    var max = opts.max || 1;
    var root = svg("svg", { viewBox: "0 0 " + W + " " + H, width: "100%", role: "img", "aria-label": opts.label });
    var x = function (v) { return L + (W - L - R) * Math.max(0, Math.min(1, v / max)); };
    for (var i = 0; i <= 4; i++) {
      var v = max * i / 4;
      root.appendChild(svg("line", { x1: x(v), x2: x(v), y1: T, y2: H - 20, stroke: "#eef0f3" }));
      root.appendChild(svg("text", { x: x(v), y: H - 6, "text-anchor": "middle" }, opts.fmt(v)));
    }
    rows.forEach(function (r, k) {
      var yy = T + k * rowH;
      root.appendChild(svg("text", { x: L - 8, y: yy + 16, "text-anchor": "end", "class": "title" }, r.label));
      if (r.value === null || r.value === undefined) {
        root.appendChild(svg("text", { x: L + 4, y: yy + 16 }, "no data · " + r.sub));
        return;
      }
      var bar = svg("rect", { x: L, y: yy + 5, width: Math.max(1, x(r.value) - L), height: rowH - 10, fill: r.color || "#93c5fd", "class": "bar" });
      bar.appendChild(svg("title", {}, r.label + ": " + opts.fmt(r.value) + (r.low !== null && r.low !== undefined ? " [" + opts.fmt(r.low) + ", " + opts.fmt(r.high) + "]" : "") + " · " + r.sub));
      root.appendChild(bar);
      if (r.low !== null && r.low !== undefined && r.high !== null && r.high !== undefined) {
        var cy = yy + rowH / 2;
        [[x(r.low), x(r.high), cy, cy], [x(r.low), x(r.low), cy - 5, cy + 5], [x(r.high), x(r.high), cy - 5, cy + 5]].forEach(function (l) {
          root.appendChild(svg("line", { x1: l[0], x2: l[1], y1: l[2], y2: l[3], stroke: "#1e3a8a", "stroke-width": 2 }));
        });
      }
      root.appendChild(svg("text", { x: W - R + 6, y: yy + 16 }, opts.fmt(r.value) + " · " + r.sub));
    });
    target.appendChild(root);
  }

  function table(target, headers, rows) {
    var t = h("table", {}, [h("thead", {}, [h("tr", {}, headers.map(function (x) { return h("th", {}, [x]); }))])]);
    var tb = h("tbody");
    rows.forEach(function (r) {
      tb.appendChild(h("tr", {}, r.map(function (c) {
        if (c && c.nodeType) return h("td", {}, [c]);
        if (c && typeof c === "object" && "num" in c) return h("td", { "class": "num" }, [c.num]);
        if (c && typeof c === "object" && "text" in c) return h("td", { "class": "text" }, [c.text || "–"]);
        return h("td", {}, [c === null || c === undefined ? "–" : String(c)]);
      })));
    });
    t.appendChild(tb);
    target.appendChild(t);
  }

  // -- panels -----------------------------------------------------------------------------

  var METRICS = {
    positive_feedback_rate: { label: "positive-feedback rate", fmt: rate, counted: "rated" },
    mean_reward: { label: "mean reward", fmt: function (v) { return fmt(v, 2); }, counted: "with a reward" },
    success_rate: { label: "success rate", fmt: rate, counted: "served" }
  };

  function drawExperiments(d) {
    var ex = body("sec-exp");
    if (!d.experiments.available) { note(ex, d.experiments.reason); return; }
    if (!d.experiments.experiments.length) { note(ex, "no experiments for this workflow yet"); return; }
    d.experiments.experiments.forEach(function (e) {
      var metric = METRICS[e.metric] ? e.metric : "positive_feedback_rate", spec = METRICS[metric];
      var decided = e.decision && e.decision.action ? " · decision: " + e.decision.action + (e.decision.variant ? " " + e.decision.variant : "") : "";
      ex.appendChild(h("p", { "class": "exp-title" }, ["experiment #" + e.experiment_id + " · " + e.status + " · " + spec.label + " · started " + when(e.started_at) + decided]));
      var rows = Object.keys(e.variants).map(function (name) {
        var v = e.variants[name], est = v[metric] || {};
        var counted = metric === "positive_feedback_rate" ? "rated " + (v.rated || 0) : "n " + (est.n || 0);
        return { label: name + (v.version_id ? " (v" + (v.version || v.version_id) + ")" : ""), value: est.value, low: est.low, high: est.high,
                 sub: "served " + (v.rollouts || 0) + " · " + counted, color: name === e.baseline ? "#cbd5e1" : "#93c5fd" };
      });
      intervalBars(ex, rows, { max: 1, fmt: spec.fmt, label: "experiment " + e.experiment_id });
    });
  }

  function drawNodes(d) {
    var nb = body("sec-nodes");
    if (!d.nodes.available) { note(nb, d.nodes.reason); sub("sec-nodes", ""); return; }
    sub("sec-nodes", d.nodes.since ? "since " + when(d.nodes.since) + " (the charts' range); calls = spans of the node (rollouts for the whole workflow); low-rated = share of the rated ones rated ≤ 2" : "");
    if (!d.nodes.nodes.length) { note(nb, "no calls in this range"); return; }
    table(nb, ["node", "calls", "avg ms", "p95 ms", "failed", "low-rated", "thresholds over this range"], d.nodes.nodes.map(function (n) {
      return [n.node === null ? "(whole workflow)" : n.node, { num: count(n.calls, "") }, { num: fmt(n.avg_latency_ms, 0) }, { num: fmt(n.p95_latency_ms, 0) },
              { num: pct(n.error_rate) }, { num: n.low_rating_rate === null ? "– (0 rated)" : pct(n.low_rating_rate) + " of " + n.rated + " rated" },
              n.breaches ? h("span", { "class": "kind hot" }, [n.breaches]) : h("span", { "class": "kind ok" }, ["within"])];
    }));
  }

  function drawHot(d) {
    var hot = body("sec-hot");
    if (!d.hot_problems.available) { note(hot, d.hot_problems.reason); return; }
    sub("sec-hot", "groups past a threshold in the last " + duration(60 * d.hot_problems.since_minutes) + " (analysis.since_minutes): what the controller acts on");
    if (!d.hot_problems.problems.length) { note(hot, "no hot problems: every node is within its thresholds"); return; }
    table(hot, ["node", "calls", "p95 ms", "failed", "low-rated", "why it is hot"], d.hot_problems.problems.map(function (p) {
      return [p.node === null ? "(whole workflow)" : p.node, { num: count(p.calls, "") }, { num: fmt(p.p95_latency_ms, 0) }, { num: pct(p.error_rate) },
              { num: p.low_rating_rate === null ? "–" : pct(p.low_rating_rate) + " of " + p.rated + " rated" }, { text: p.breaches }];
    }));
  }

  function drawBad(d) {
    var bb = body("sec-bad");
    if (!d.bad_cases.available) { note(bb, d.bad_cases.reason); return; }
    sub("sec-bad", "rated ≤ " + d.bad_cases.max_rating + " (triggers.low_rating.max_rating), newest first: what the flywheel learns from");
    if (!d.bad_cases.cases.length) { note(bb, "no low-rated answers"); return; }
    table(bb, ["when", "version", "question", "answer", "rating", "comment"], d.bad_cases.cases.map(function (c) {
      return [when(c.at), c.version ? "v" + c.version : "–", { text: c.question }, { text: c.answer }, { num: fmt(c.rating, 0) }, { text: c.comment }];
    }));
  }

  function drawChanges(d) {
    var ch = body("sec-changes");
    if (!d.changes.length) { note(ch, "no change events yet"); return; }
    table(ch, ["when", "kind", "version", "by", "what"], d.changes.map(function (c) {
      var from = c.from_version === null ? null : "v" + c.from_version, to = c.to_version === null ? null : "v" + c.to_version;
      var version = from && to ? from + " → " + to : (to ? "→ " + to : (from ? "on " + from : ""));
      var what = c.count > 1 ? "fired " + c.count + "× since " + when(c.first_at) + "; latest: " + (c.reason || "") : (c.reason || "");
      return [when(c.at), h("span", { "class": "kind " + c.kind }, [c.kind]), version, c.actor, { text: what }];
    }));
  }

  function drawRouting(d) {
    var ro = body("sec-routing");
    var overall = d.routing.filter(function (r) { return r.skill === "*"; });
    var perSkill = d.routing.filter(function (r) { return r.skill !== "*"; });
    if (!d.routing.length) { note(ro, "no routing weights yet (they appear once routed rollouts have outcomes)"); return; }
    intervalBars(ro, overall.map(function (r) { return { label: r.agent, value: r.mean, low: r.low, high: r.high, sub: "weight " + fmt(r.weight) + " · n " + r.n, color: "#a7f3d0" }; }),
                 { max: 1, fmt: function (v) { return fmt(v, 2); }, label: "routing weights" });
    if (perSkill.length) table(ro, ["agent", "skill", "weight", "success (mean)", "routed rollouts"], perSkill.map(function (r) { return [r.agent, r.skill, { num: fmt(r.weight) }, { num: fmt(r.mean) }, { num: String(r.n) }]; }));
  }

  function render(d) {
    drawCharts(d);
    drawExperiments(d);
    drawNodes(d);
    drawHot(d);
    drawBad(d);
    drawChanges(d);
    drawRouting(d);
    var s = d.series;
    document.getElementById("meta").textContent = (s.start ? "rollouts from " + when(s.start) + " to " + when(s.end) + " · " : "") + "updated " + when(d.generated_at);
    document.body.setAttribute("data-ready", d.workflow);
  }

  // -- data: embedded by the server, else fetched with a key ----------------------------

  // The JSON needs a read (or write) key once the service has keys: taken from /#key=KEY (or
  // ?key=KEY) once, then kept for this tab in sessionStorage and sent as X-API-Key.
  var KEY_ITEM = "flywheel.dashboard.key";
  function takeKey() {
    var query = new URLSearchParams(location.search), frag = new URLSearchParams(location.hash.slice(1));
    var given = frag.get("key") || query.get("key");
    if (!given) { try { return sessionStorage.getItem(KEY_ITEM) || ""; } catch (e) { return ""; } }
    try { sessionStorage.setItem(KEY_ITEM, given); } catch (e) { /* private mode: this page only */ }
    query.delete("key");
    history.replaceState(null, "", location.pathname + (query.toString() ? "?" + query : ""));
    return given;
  }
  var apiKey = takeKey();
  var keyForm = document.getElementById("key-form");
  keyForm.addEventListener("submit", function (ev) {
    ev.preventDefault();
    try { sessionStorage.setItem(KEY_ITEM, document.getElementById("key").value); } catch (e) { /* ignore */ }
    location.reload();
  });
  function getJSON(url) {
    return fetch(url, { headers: apiKey ? { "X-API-Key": apiKey } : {} }).then(function (r) {
      if (r.status === 401) {
        keyForm.hidden = false;
        document.body.setAttribute("data-needs-key", "true");
        throw new Error(apiKey ? "the API key was refused" : "this dashboard needs an API key");
      }
      return r.json().then(function (b) { if (!r.ok) throw new Error(b.error || r.status); return b; });
    });
  }
  function fail(e) { document.getElementById("meta").textContent = "error: " + e.message; document.body.setAttribute("data-ready", ""); }

  var select = document.getElementById("workflow");
  function load(wf) { return getJSON("/v1/dashboard/workflows/" + encodeURIComponent(wf)).then(render).catch(fail); }
  function start(list, view) {
    if (!list.length) { document.getElementById("meta").textContent = "no rollouts recorded yet"; document.body.setAttribute("data-ready", ""); return; }
    list.forEach(function (w) { select.appendChild(h("option", { value: w.workflow }, [w.workflow + " (" + count(w.rollouts, "rollouts") + ")"])); });
    var want = new URLSearchParams(location.search).get("workflow");
    if (view) select.value = view.workflow;
    else if (want && list.some(function (w) { return w.workflow === want; })) select.value = want;
    if (view) render(view); else load(select.value);
    select.addEventListener("change", function () { history.replaceState(null, "", "?workflow=" + encodeURIComponent(select.value)); load(select.value); });
    setInterval(function () { load(select.value); }, 60000);
  }

  var island = JSON.parse(document.getElementById("dashboard-data").textContent || "null");
  if (island) start(island.workflows, island.view);
  else getJSON("/v1/dashboard/workflows").then(function (list) { start(list, null); }).catch(fail);
})();

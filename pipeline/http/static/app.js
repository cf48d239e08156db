/* edgepipe dashboard. Reads the documented /v1 API (overview, pipeline, quality) or, in a
 * report written by `edgepipe report`, the JSON embedded in the page (#edgepipe-data).
 * Times are UTC throughout, like the rest of edgepipe. */
(function () {
  "use strict";

  const REFRESH_MS = 10000;
  const TOKEN_KEY = "edgepipe.token";
  const COLORS = {
    s1: "#94a3b8", s2: "#22a06b", s3: "#3b82f6", s4: "#f59e0b", s5: "#dc2626",
    p50: "#2563eb", p95: "#9333ea", p99: "#334155", grid: "#e5e7eb", axis: "#475569",
  };
  const CLASSES = [ // drawn top of the stack first
    { key: "status_5xx", label: "5xx", color: COLORS.s5 },
    { key: "status_4xx", label: "4xx", color: COLORS.s4 },
    { key: "status_3xx", label: "3xx", color: COLORS.s3 },
    { key: "status_2xx", label: "2xx", color: COLORS.s2 },
    { key: "status_1xx", label: "1xx", color: COLORS.s1 },
  ];

  const embedded = document.getElementById("edgepipe-data");
  const REPORT = embedded ? JSON.parse(embedded.textContent) : null;

  // ---------------------------------------------------------------- formatting
  const intFmt = new Intl.NumberFormat("en-US");
  const fmt = {
    int: (n) => (n == null ? "—" : intFmt.format(n)),
    compact: (n) => {
      if (n == null) return "—";
      const a = Math.abs(n);
      if (a >= 1e9) return +(n / 1e9).toFixed(1) + "G";
      if (a >= 1e6) return +(n / 1e6).toFixed(1) + "M";
      if (a >= 1e3) return +(n / 1e3).toFixed(1) + "k";
      return String(a >= 10 ? Math.round(n) : +n.toFixed(1));
    },
    pct: (r) => (r == null ? "—" : (r * 100 >= 10 ? (r * 100).toFixed(1) : (r * 100).toFixed(2)) + " %"),
    bytes: (n) => {
      if (n == null) return "—";
      const units = ["B", "kB", "MB", "GB", "TB", "PB"];
      let i = 0;
      let v = n;
      while (Math.abs(v) >= 1000 && i < units.length - 1) { v /= 1000; i++; }
      return (i === 0 ? String(v) : v.toFixed(v >= 100 ? 0 : 1)) + " " + units[i];
    },
    ms: (v) => {
      if (v == null) return "—";
      if (v >= 1000) return +(v / 1000).toFixed(v >= 10000 ? 1 : 2) + " s";
      if (v >= 100) return Math.round(v) + " ms";
      if (v >= 1) return +v.toFixed(1) + " ms";
      return +v.toFixed(2) + " ms";
    },
    duration: (s) => {
      if (s == null) return "—";
      s = Math.abs(s);
      if (s < 90) return Math.round(s) + " s";
      if (s < 5400) return Math.round(s / 60) + " min";
      if (s < 172800) return +(s / 3600).toFixed(1) + " h";
      return +(s / 86400).toFixed(1) + " d";
    },
    time: (iso) => (iso ? iso.replace("T", " ").replace(/(\.\d+)?Z$/, " UTC") : "—"),
    hour: (ts, day) => {
      const d = new Date(ts * 1000).toISOString();
      return day ? d.slice(0, 10) : d.slice(0, 10) + " " + d.slice(11, 16);
    },
  };
  const epoch = (iso) => Date.parse(iso) / 1000;
  function ago(iso, now) {
    if (!iso) return "—";
    const s = epoch(now) - epoch(iso);
    return s >= 0 ? fmt.duration(s) + " ago" : "in " + fmt.duration(-s);
  }

  // ---------------------------------------------------------------- DOM helpers
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v == null || v === false) continue;
      if (k === "class") node.className = v;
      else if (k === "data") Object.assign(node.dataset, v);
      else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
      else node.setAttribute(k, v === true ? "" : v);
    }
    for (const c of children.flat()) if (c != null && c !== false) node.append(c instanceof Node ? c : String(c));
    return node;
  }
  const $ = (sel) => document.querySelector(sel);
  function show(node, visible) { node.hidden = !visible; }

  function banner(message, kind) {
    const b = $("#banner");
    b.textContent = message || "";
    b.className = "banner " + (kind || "error");
    show(b, !!message);
  }

  // ---------------------------------------------------------------- data sources
  class ApiError extends Error {
    constructor(status, code, detail) {
      super(detail);
      this.status = status;
      this.code = code;
    }
  }

  let tokenPrompt = null; // one prompt shared by every request waiting for a token
  function askToken(status, body, hadToken) {
    if (tokenPrompt) return tokenPrompt;
    const dialog = $("#token-dialog");
    const detail = body && body.detail ? body.detail : "HTTP " + status;
    let message;
    if (status === 403) message = `This token may not read the API (HTTP 403: ${detail}). Enter a token with the read scope.`;
    else if (hadToken) message = `The token was not accepted (HTTP 401: ${detail}). Check it and try again.`;
    else message = "This server requires an API token. Enter a token with the read (or admin) scope.";
    $("#token-message").textContent = message;
    $("#token-message").className = hadToken || status === 403 ? "error" : "";
    $("#token-input").value = "";
    tokenPrompt = new Promise((resolve) => {
      dialog.addEventListener("close", function onClose() {
        dialog.removeEventListener("close", onClose);
        const token = $("#token-input").value.trim();
        if (token) sessionStorage.setItem(TOKEN_KEY, token);
        tokenPrompt = null;
        resolve();
      });
    });
    dialog.showModal();
    $("#token-input").focus();
    return tokenPrompt;
  }

  async function api(path, params, optional) {
    const query = new URLSearchParams();
    for (const [k, v] of Object.entries(params || {})) if (v != null) query.set(k, v);
    const url = path + (query.toString() ? "?" + query : "");
    for (;;) {
      const token = sessionStorage.getItem(TOKEN_KEY);
      const headers = { Accept: "application/json" };
      if (token) headers.Authorization = "Bearer " + token;
      const r = await fetch(url, { headers, cache: "no-store" });
      if (r.ok) return r.json();
      const body = await r.json().catch(() => ({}));
      if (r.status === 401 || r.status === 403) {
        await askToken(r.status, body, !!token);
        continue;
      }
      if (optional && (r.status === 404 || r.status === 503)) return null;
      throw new ApiError(r.status, body.error || "http_" + r.status, `${path}: ${body.detail || r.statusText} (HTTP ${r.status})`);
    }
  }

  const source = REPORT
    ? {
        overview: async (q) => (q.path == null ? REPORT.overview : REPORT.paths[q.path] || null),
        pipeline: async () => REPORT.pipeline,
        quality: async () => REPORT.quality || null,
      }
    : {
        overview: (q) => api("/v1/overview", q),
        pipeline: () => api("/v1/pipeline", null, true),
        quality: () => api("/v1/quality", { hours: 24 }, true),
      };

  // ---------------------------------------------------------------- state and routing
  const params = new URLSearchParams(REPORT ? "" : location.search);
  const state = {
    range: params.get("range") || "24h",
    from: params.get("from"),
    to: params.get("to"),
    host: params.get("host"), // null: every host
    sort: { key: "requests", desc: true },
    last: null, // the last overview document shown
  };

  function rangeQuery() {
    const now = Date.now();
    const back = { "7d": 7 * 86400e3, "30d": 30 * 86400e3 }[state.range];
    if (state.range === "custom") return { from: state.from, to: state.to };
    if (back) return { from: new Date(now - back).toISOString().replace(/\.\d+Z$/, "Z") };
    return {};
  }

  function saveUrl() {
    if (REPORT) return;
    const p = new URLSearchParams();
    if (state.range !== "24h") p.set("range", state.range);
    if (state.range === "custom") { p.set("from", state.from); p.set("to", state.to); }
    if (state.host != null) p.set("host", state.host);
    history.replaceState(null, "", (p.toString() ? "?" + p : location.pathname) + location.hash);
  }

  function route() {
    const h = location.hash || "#/traffic";
    if (h.startsWith("#/path/")) return { view: "path", path: decodeURIComponent(h.slice(7)) };
    if (h === "#/pipeline") return { view: "pipeline" };
    return { view: "traffic" };
  }
  const pathHref = (p) => "#/path/" + encodeURIComponent(p);

  // ---------------------------------------------------------------- tiles
  const TILES = [
    { key: "requests", label: "Requests", f: (t) => fmt.int(t.requests), sub: (t, d) => perBucket(t, d) },
    { key: "rate_4xx", label: "4xx rate", f: (t) => fmt.pct(t.rate_4xx), sub: (t) => fmt.int(t.status_4xx) + " client errors", tone: "warn" },
    { key: "rate_5xx", label: "5xx rate", f: (t) => fmt.pct(t.rate_5xx), sub: (t) => fmt.int(t.status_5xx) + " server errors", tone: "bad" },
    { key: "bytes", label: "Bytes sent", f: (t) => fmt.bytes(t.bytes), sub: (t) => fmt.int(t.bytes) + " B" },
    { key: "p50_ms", label: "Latency p50", f: (t) => fmt.ms(t.p50_ms), sub: () => "median" },
    { key: "p95_ms", label: "Latency p95", f: (t) => fmt.ms(t.p95_ms), sub: () => "95th percentile" },
    { key: "p99_ms", label: "Latency p99", f: (t) => fmt.ms(t.p99_ms), sub: () => "99th percentile" },
    { key: "distinct_paths", label: "Distinct paths", f: (t) => fmt.int(t.distinct_paths), sub: () => "normalised" },
  ];
  function perBucket(t, doc) {
    const n = doc.series.length;
    const word = doc.bucket_s === 86400 ? "day" : "hour";
    return n ? `≈ ${fmt.compact(t.requests / n)} / ${word} with traffic` : "no traffic";
  }

  function renderTiles(container, doc, skip) {
    const t = doc.totals;
    container.replaceChildren(
      ...TILES.filter((d) => !(skip || []).includes(d.key)).map((d) => {
        const v = t[d.key];
        const alarming = d.tone && v > (d.tone === "bad" ? 0.01 : 0.05);
        return el("div", { class: "tile" + (alarming ? " " + d.tone : ""), data: { key: d.key, value: v == null ? "" : String(v) } },
          el("div", { class: "label" }, d.label),
          el("div", { class: "value" }, d.f(t)),
          el("div", { class: "sub" }, d.sub(t, doc)));
      }),
    );
  }

  // ---------------------------------------------------------------- charts
  const charts = new Map();
  function chartWidth(container) { return Math.max(280, container.clientWidth - 4); }

  const MONTHS = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
  function timeAxis(doc) {
    // 24-hour UTC labels; the date under midnight (and under the first label)
    const label = (ts, i, incr) => {
      const d = new Date(ts * 1000);
      const date = `${MONTHS[d.getUTCMonth()]} ${d.getUTCDate()}`;
      if (incr >= 86400 || doc.bucket_s === 86400) return date;
      const hm = d.toISOString().slice(11, 16);
      return hm === "00:00" || i === 0 ? `${hm}\n${date}` : hm;
    };
    return {
      stroke: COLORS.axis,
      grid: { stroke: COLORS.grid, width: 1 },
      ticks: { stroke: COLORS.grid },
      space: 60,
      values: (u, splits, ai, space, incr) => splits.map((ts, i) => label(ts, i, incr)),
    };
  }

  function decades(u, ai, min, max) {
    // log-scale ticks: 1, 10, 100… (and 2, 5 between them over a short span)
    const out = [];
    const steps = max / min < 200 ? [1, 2, 5] : [1];
    for (let e = Math.floor(Math.log10(min)); e <= Math.ceil(Math.log10(max)); e++) {
      for (const m of steps) {
        const v = m * 10 ** e;
        if (v >= min * 0.999 && v <= max * 1.001) out.push(v);
      }
    }
    return out;
  }

  function xRange(doc) {
    const half = doc.bucket_s / 2;
    return () => [epoch(doc.from) - half, epoch(doc.to) - half];
  }

  function draw(id, opts, data) {
    const container = document.getElementById(id);
    const old = charts.get(id);
    if (old) old.destroy();
    container.replaceChildren();
    const u = new uPlot({ ...opts, width: chartWidth(container), height: 260 }, data, container);
    charts.set(id, u);
    container.dataset.points = String(data[0].length);
    return u;
  }

  function requestsChart(id, doc) {
    const xs = doc.series.map((r) => epoch(r.t));
    const raw = CLASSES.map((c) => doc.series.map((r) => r[c.key]));
    // Stacked bars: each class drawn from 0 up to the sum of itself and the classes below it.
    const stacked = CLASSES.map((_, i) => doc.series.map((r) => CLASSES.slice(i).reduce((s, c) => s + r[c.key], 0)));
    const day = doc.bucket_s === 86400;
    const bars = uPlot.paths.bars({ size: [0.85, 40], align: 0 });
    const opts = {
      tzDate: (ts) => uPlot.tzDate(new Date(ts * 1000), "Etc/UTC"),
      scales: { x: { time: true, range: xRange(doc) }, y: { range: (u, lo, hi) => [0, Math.max(1, hi * 1.08)] } },
      axes: [timeAxis(doc), {
        stroke: COLORS.axis, grid: { stroke: COLORS.grid, width: 1 }, ticks: { stroke: COLORS.grid },
        label: day ? "requests / day" : "requests / hour", labelSize: 18, size: 56,
        values: (u, vals) => vals.map(fmt.compact),
      }],
      legend: { live: true },
      cursor: { points: { show: false } },
      series: [
        { label: day ? "Day (UTC)" : "Hour (UTC)", value: (u, ts) => (ts == null ? "—" : fmt.hour(ts, day)) },
        ...CLASSES.map((c, i) => ({
          label: c.label,
          stroke: c.color,
          fill: c.color,
          width: 0,
          paths: bars,
          points: { show: false },
          value: (u, v, si, di) => (di == null ? "—" : fmt.int(raw[i][di])),
        })),
      ],
    };
    return draw(id, opts, [xs, ...stacked]);
  }

  function latencyChart(id, doc) {
    const xs = doc.series.map((r) => epoch(r.t));
    const pos = (v) => (v == null || v <= 0 ? null : v); // a log scale has no 0
    const day = doc.bucket_s === 86400;
    const line = (label, key, color, dash) => ({
      label, stroke: color, width: 2, dash, value: (u, v) => fmt.ms(v),
      points: { size: 4, fill: color },
    });
    const opts = {
      tzDate: (ts) => uPlot.tzDate(new Date(ts * 1000), "Etc/UTC"),
      scales: { x: { time: true, range: xRange(doc) }, y: { distr: 3, log: 10 } },
      axes: [timeAxis(doc), {
        stroke: COLORS.axis, grid: { stroke: COLORS.grid, width: 1 }, ticks: { stroke: COLORS.grid },
        label: "latency", labelSize: 18, size: 64, splits: decades,
        values: (u, vals) => vals.map((v) => (v == null ? "" : fmt.ms(v))),
      }],
      legend: { live: true },
      series: [
        { label: day ? "Day (UTC)" : "Hour (UTC)", value: (u, ts) => (ts == null ? "—" : fmt.hour(ts, day)) },
        line("p50", "p50_ms", COLORS.p50),
        line("p95", "p95_ms", COLORS.p95),
        line("p99", "p99_ms", COLORS.p99, [6, 4]),
      ],
    };
    return draw(id, opts, [xs, ...["p50_ms", "p95_ms", "p99_ms"].map((k) => doc.series.map((r) => pos(r[k])))]);
  }

  window.addEventListener("resize", () => {
    for (const [id, u] of charts) u.setSize({ width: chartWidth(document.getElementById(id)), height: 260 });
  });

  function sparkline(values) {
    const w = 140, h = 28, n = values.length;
    const max = Math.max(1, ...values);
    const x = (i) => (n <= 1 ? w / 2 : (i * (w - 2)) / (n - 1) + 1);
    const y = (v) => h - 2 - (v / max) * (h - 4);
    const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
    svg.setAttribute("width", w);
    svg.setAttribute("height", h);
    svg.setAttribute("viewBox", `0 0 ${w} ${h}`);
    svg.setAttribute("class", "spark");
    svg.setAttribute("role", "img");
    svg.setAttribute("aria-label", `requests per bucket, peak ${max}`);
    const pts = values.map((v, i) => `${x(i).toFixed(1)},${y(v).toFixed(1)}`);
    const area = document.createElementNS(svg.namespaceURI, "polygon");
    area.setAttribute("points", `${x(0).toFixed(1)},${h - 2} ${pts.join(" ")} ${x(n - 1).toFixed(1)},${h - 2}`);
    area.setAttribute("class", "spark-area");
    const lineEl = document.createElementNS(svg.namespaceURI, "polyline");
    lineEl.setAttribute("points", pts.join(" "));
    lineEl.setAttribute("class", "spark-line");
    svg.append(area, lineEl);
    return svg;
  }

  // ---------------------------------------------------------------- views
  function rangeLabel(doc) {
    const unit = doc.source === "daily" ? "days (daily rows)" : "hours";
    return `${fmt.time(doc.from)} → ${fmt.time(doc.to)} · ${doc.series.length} ${unit} with traffic` +
      (doc.host != null ? ` · host ${doc.host || "(none)"}` : "");
  }

  function setBucketWords(doc) {
    for (const n of document.querySelectorAll(".bucket-word")) n.textContent = doc.bucket_s === 86400 ? "day" : "hour";
  }

  function renderHosts(doc) {
    const select = $("#host-select");
    const hosts = new Set(doc.hosts);
    if (state.host != null) hosts.add(state.host);
    const want = state.host == null ? "*" : "=" + state.host;
    select.replaceChildren(
      el("option", { value: "*" }, "All hosts"),
      ...[...hosts].sort().map((h) => el("option", { value: "=" + h }, h || "(no host)")),
    );
    select.value = want;
  }

  function sortedPaths(rows) {
    const { key, desc } = state.sort;
    const out = [...rows].sort((a, b) => {
      const x = a[key], y = b[key];
      const c = typeof x === "string" ? x.localeCompare(y) : (x ?? -1) - (y ?? -1);
      return desc ? -c : c;
    });
    return out;
  }

  function renderPaths(doc) {
    const tbody = $("#paths-table tbody");
    for (const th of document.querySelectorAll("#paths-table th[data-sort]")) {
      const on = th.dataset.sort === state.sort.key;
      th.setAttribute("aria-sort", on ? (state.sort.desc ? "descending" : "ascending") : "none");
    }
    tbody.replaceChildren(
      ...sortedPaths(doc.paths).map((p) => {
        const errTone = p.rate_5xx > 0.01 ? "bad" : p.error_rate > 0.05 ? "warn" : "";
        return el("tr", { data: { path: p.path }, onclick: () => { location.hash = pathHref(p.path); } },
          el("td", { class: "text" }, el("a", { href: pathHref(p.path), class: "path" }, p.path)),
          el("td", {}, fmt.int(p.requests)),
          el("td", { class: errTone, title: `4xx ${fmt.pct(p.rate_4xx)} · 5xx ${fmt.pct(p.rate_5xx)}` }, fmt.pct(p.error_rate),
            el("span", { class: "split" }, ` (4xx ${fmt.pct(p.rate_4xx)} · 5xx ${fmt.pct(p.rate_5xx)})`)),
          el("td", {}, fmt.ms(p.p95_ms)),
          el("td", {}, fmt.bytes(p.bytes)),
          el("td", { class: "text" }, sparkline(p.spark)));
      }),
    );
    show($("#paths-empty"), doc.paths.length === 0);
  }

  async function loadTraffic() {
    const doc = await source.overview({ ...rangeQuery(), host: state.host });
    state.last = doc;
    renderHosts(doc);
    setBucketWords(doc);
    $("#traffic-range").textContent = rangeLabel(doc);
    renderTiles($("#traffic-tiles"), doc);
    requestsChart("chart-requests", doc);
    latencyChart("chart-latency", doc);
    renderPaths(doc);
  }

  async function loadPath(path) {
    $("#path-name").textContent = path;
    const doc = await source.overview({ ...rangeQuery(), host: state.host, path, limit: 1 });
    const missing = $("#path-missing");
    if (doc == null) {
      missing.textContent = "This report holds the views of its top paths only; this path is not among them.";
      show(missing, true);
      for (const id of ["path-tiles"]) $("#" + id).replaceChildren();
      return;
    }
    show(missing, doc.series.length === 0);
    missing.textContent = doc.series.length === 0 ? "No traffic for this path in this range." : "";
    renderHosts(doc);
    setBucketWords(doc);
    $("#path-range").textContent = rangeLabel(doc);
    renderTiles($("#path-tiles"), doc, ["distinct_paths"]);
    requestsChart("chart-path-requests", doc);
    latencyChart("chart-path-latency", doc);
  }

  // ---------------------------------------------------------------- pipeline health
  function kv(rows) {
    return el("dl", { class: "kv" }, ...rows.filter(Boolean).map(([k, v, tone]) => [el("dt", {}, k), el("dd", { class: tone || "" }, v)]));
  }
  function card(title, ...body) {
    return el("div", { class: "card", data: { card: title } }, el("h2", {}, title), ...body);
  }
  function wide(node, cls) { node.classList.add(cls || "wide"); return node; }
  function table(columns, rows, empty) {
    if (!rows.length) return el("p", { class: "empty" }, empty);
    return el("table", { class: "list" },
      el("thead", {}, el("tr", {}, ...columns.map((c) => el("th", { class: c.text ? "text" : "" }, c.label)))),
      el("tbody", {}, ...rows.map((r) => el("tr", {}, ...columns.map((c) => {
        const v = c.f(r);
        return el("td", { class: (c.text ? "text " : "") + (c.tone ? c.tone(r) || "" : "") }, v);
      })))));
  }
  const badge = (text, tone) => el("span", { class: "badge " + (tone || "") }, text);
  const VERDICT_TONE = { ok: "good", degraded: "warn", stuck: "bad", dead: "bad", stopped: "" };
  const RUN_TONE = { succeeded: "good", running: "", failed: "bad", abandoned: "bad", missed: "bad", pending: "" };

  function renderAlerts(m) {
    const box = $("#alerts");
    if (!m) {
      box.replaceChildren(el("p", { class: "empty" }, "The monitor report is not available from this server."));
      return;
    }
    box.className = "card alerts " + (m.raised.length ? "bad" : "good");
    box.replaceChildren(
      el("h2", {}, m.raised.length ? `${m.raised.length} alert${m.raised.length > 1 ? "s" : ""} raised` : "No alerts raised"),
      m.raised.length
        ? el("ul", {}, ...m.raised.map((a) => el("li", {}, el("strong", {}, a.name), " — ", a.message)))
        : el("p", { class: "hint" }, "Capacity, archive and clean lag, queue, DLQ, workers and jobs are within their limits."),
    );
  }

  function qualityCard(q) {
    if (!q || !q.totals || !q.rows || q.totals.received === 0) {
      return card("Data quality", el("p", { class: "empty" }, q ? "No data: no events were received in this window." : "No data: this server does not report data quality."));
    }
    const t = q.totals;
    const reasons = Object.entries(t.invalid_by_reason || {}).sort((a, b) => b[1] - a[1]);
    return card("Data quality",
      el("p", { class: "hint" }, `Events the consumer handled ${fmt.time(q.from)} → ${fmt.time(q.to)}`),
      kv([
        ["Received", fmt.int(t.received)],
        ["Inserted (new)", fmt.int(t.inserted)],
        ["Duplicates", `${fmt.int(t.duplicates)} (${fmt.pct(t.duplicate_rate)})`],
        ["Invalid", `${fmt.int(t.invalid)} (${fmt.pct(t.invalid_rate)})`, t.invalid ? "warn" : ""],
        ["Too late", `${fmt.int(t.too_late)} (${fmt.pct(t.too_late_rate)})`, t.too_late ? "warn" : ""],
        ["Overflow (→ __other__)", fmt.int(t.overflow), t.overflow ? "warn" : ""],
      ]),
      el("div", { class: "spark-row" }, el("span", { class: "hint" }, "received per hour"), sparkline(q.rows.map((r) => r.received))),
      reasons.length
        ? table([{ label: "Invalid field", text: true, f: (r) => r[0] }, { label: "Events", f: (r) => fmt.int(r[1]) }], reasons, "")
        : el("p", { class: "hint" }, "No invalid events."));
  }

  function renderPipeline(doc, quality) {
    const grid = $("#pipeline-grid");
    if (!doc) {
      renderAlerts(null);
      grid.replaceChildren(qualityCard(quality));
      return;
    }
    const m = doc.monitor;
    const now = doc.generated_at;
    $("#pipeline-at").textContent = "at " + fmt.time(now);
    renderAlerts(m);
    const reasons = [...new Set([...Object.keys(doc.dlq_by_reason), ...Object.keys(doc.rejected)])]
      .filter((r) => doc.dlq_by_reason[r] || doc.rejected[r]).sort();
    const usedPct = Math.min(100, m.used_ratio * 100);
    const workers = doc.status.workers;
    const slots = m.jobs || {};
    const queueCard = card("Queue", kv([
      ["Messages waiting", fmt.int(m.queue_depth), m.queue_depth > 0 ? "" : "good"],
      ["Oldest message", m.queue_depth ? fmt.duration(m.queue_oldest_age_s) + " old" : "—"],
    ]));
    const deadCard = card("Dead letters", kv([
      ["Held in the DLQ", fmt.int(m.dlq_depth), m.dlq_depth ? "warn" : "good"],
      ["Rejected for good", fmt.int(m.rejected_total)],
      ["Growth per day", m.dlq_growth_per_day == null ? "— (needs a day of monitor runs)" : fmt.int(m.dlq_growth_per_day)],
    ]), table([
      { label: "Reason", text: true, f: (r) => r },
      { label: "Held now", f: (r) => fmt.int(doc.dlq_by_reason[r] || 0) },
      { label: "For good", f: (r) => fmt.int(doc.rejected[r] || 0) },
    ], reasons, "No dead letters."));
    const workersCard = card("Workers", kv([
      ["Verdict", doc.status.healthy ? badge("healthy", "good") : badge(workers.length ? "unhealthy" : "no worker seen", "bad")],
      ["Alive / seen", `${m.workers_alive} / ${m.workers_seen}`],
    ]), table([
      { label: "Worker", text: true, f: (w) => w.holder },
      { label: "Verdict", text: true, f: (w) => badge(w.verdict, VERDICT_TONE[w.verdict]) },
      { label: "Last heartbeat", f: (w) => ago(w.last_seen_at, now) },
      { label: "Last batch", f: (w) => ago(w.last_batch_at, now) },
      { label: "Batches", f: (w) => fmt.int(w.batches) },
    ], workers, "No worker has sent a heartbeat (start one with `edgepipe worker`)."));
    const tone = m.used_ratio >= 0.8 ? "bad" : m.used_ratio >= 0.5 ? "warn" : "good";
    const capacityCard = card("Capacity",
      el("div", { class: "meter", title: fmt.pct(m.used_ratio) }, el("div", { class: "fill " + tone, style: `width:${usedPct.toFixed(2)}%` })),
      kv([
        ["Database size", `${fmt.bytes(m.db_bytes)} of ${fmt.bytes(m.capacity_bytes)} (${fmt.pct(m.used_ratio)})`],
        ["Growth per day", m.growth_bytes_per_day == null ? "— (needs earlier monitor runs)" : fmt.bytes(m.growth_bytes_per_day)],
        ["Days until full", m.days_until_full == null ? "— (not growing, or unknown)" : String(m.days_until_full),
          m.days_until_full != null && m.days_until_full < 30 ? "bad" : ""],
        ["Detail rows", fmt.int((m.rows || {}).traffic_events)],
        ["Hourly rows", fmt.int((m.rows || {}).path_stats_hourly)],
      ]));
    const available = m.archive && m.archive.available;
    const archiveCard = card("Archive", kv([
      ["Objects", available ? fmt.int(m.archive.objects) : "— (no archive binding)"],
      ["Rows archived", available ? fmt.int(m.archive.rows) : "—"],
      ["Bytes stored", available ? fmt.bytes(m.archive.bytes) : "—"],
      ["Oldest unarchived row", m.oldest_unarchived_at ? `${fmt.time(m.oldest_unarchived_at)} (${(+m.oldest_unarchived_age_days).toFixed(1)} d old)` : "—"],
      ["Archive lag (rows)", fmt.int(m.archive_lag_rows), m.archive_lag_rows ? "bad" : "good"],
      ["Clean lag (rows)", fmt.int(m.clean_lag_rows), m.clean_lag_rows ? "bad" : "good"],
      ["Flagged objects", m.archive_flagged.length ? m.archive_flagged.join(", ") : "none", m.archive_flagged.length ? "bad" : ""],
    ]));
    const jobsCard = card("Scheduled jobs", table([
      { label: "Job", text: true, f: (j) => j.job },
      { label: "Cron (" + ((doc.jobs[0] || {}).timezone || "UTC") + ")", text: true, f: (j) => el("code", {}, j.cron) },
      { label: "Next run", f: (j) => (j.next_run ? ago(j.next_run, now) : "off") },
      { label: "Last run", text: true, f: (j) => (j.last_status ? badge(j.last_status, RUN_TONE[j.last_status]) : "never") },
      { label: "Finished", f: (j) => ago(j.last_finished_at, now) },
      { label: "Latest slot", text: true, f: (j) => (slots[j.job] ? badge(slots[j.job].status, RUN_TONE[slots[j.job].status]) : "—") },
    ], doc.jobs, "No scheduled jobs."), ...doc.jobs.filter((j) => j.last_error).map((j) => el("p", { class: "error" }, `${j.job}: ${j.last_error}`)));
    grid.replaceChildren(queueCard, deadCard, capacityCard, wide(workersCard, "span2"), archiveCard,
      wide(jobsCard, "span2"), qualityCard(quality));
  }

  async function loadPipeline() {
    const [doc, quality] = await Promise.all([source.pipeline(), source.quality()]);
    renderPipeline(doc, quality);
  }

  // ---------------------------------------------------------------- main loop
  let loading = null;
  let again = false;
  async function refresh() {
    if (loading) { again = true; return loading; }
    const r = route();
    for (const v of ["traffic", "path", "pipeline"]) show(document.getElementById("view-" + v), v === r.view);
    $("#tab-traffic").classList.toggle("active", r.view !== "pipeline");
    $("#tab-pipeline").classList.toggle("active", r.view === "pipeline");
    show($("#controls"), r.view !== "pipeline");
    document.title = (r.view === "pipeline" ? "Pipeline health" : r.view === "path" ? r.path : "Traffic") + " · edgepipe";
    loading = (async () => {
      try {
        if (r.view === "pipeline") await loadPipeline();
        else if (r.view === "path") await loadPath(r.path);
        else await loadTraffic();
        if (!REPORT) {
          banner("");
          const t = new Date().toISOString().slice(11, 19);
          $("#status").textContent = `Updated ${t} UTC · refreshes every ${REFRESH_MS / 1000} s`;
        }
        document.body.dataset.loaded = r.view + (r.view === "path" ? ":" + r.path : "");
      } catch (e) {
        banner(e instanceof ApiError ? e.message : "Could not load the data: " + e.message);
        document.body.dataset.loaded = "error";
      } finally {
        loading = null;
      }
      if (again) { again = false; await refresh(); }
    })();
    return loading;
  }

  function toLocalInput(iso) { return iso ? new Date(Date.parse(iso)).toISOString().slice(0, 16) : ""; }

  function markRange() {
    for (const b of document.querySelectorAll("[data-range]")) b.classList.toggle("active", b.dataset.range === state.range);
    const custom = state.range === "custom";
    show($("#custom-range"), custom);
    if (custom) { // the inputs are UTC: show the range in force, else the one on screen
      const doc = state.last;
      $("#custom-from").value = toLocalInput(state.from || (doc && doc.from));
      $("#custom-to").value = toLocalInput(state.to || (doc && doc.to));
    }
  }

  function setup() {
    for (const b of document.querySelectorAll("[data-range]")) {
      b.addEventListener("click", () => {
        if (b.dataset.range === "custom") {
          state.range = "custom";
          markRange();
          return;
        }
        state.range = b.dataset.range;
        markRange();
        saveUrl();
        refresh();
      });
    }
    $("#custom-range").addEventListener("submit", (ev) => {
      ev.preventDefault();
      state.from = $("#custom-from").value + ":00Z";
      state.to = $("#custom-to").value + ":00Z";
      saveUrl();
      refresh();
    });
    $("#host-select").addEventListener("change", (ev) => {
      const v = ev.target.value;
      state.host = v === "*" ? null : v.slice(1);
      saveUrl();
      refresh();
    });
    for (const th of document.querySelectorAll("#paths-table th[data-sort]")) {
      th.tabIndex = 0;
      const sortBy = () => {
        const key = th.dataset.sort;
        state.sort = { key, desc: state.sort.key === key ? !state.sort.desc : key !== "path" };
        if (state.last) renderPaths(state.last);
      };
      th.addEventListener("click", sortBy);
      th.addEventListener("keydown", (ev) => { if (ev.key === "Enter") sortBy(); });
    }
    window.addEventListener("hashchange", refresh);
    markRange();
    if (REPORT) {
      const r = REPORT.report;
      for (const b of document.querySelectorAll(".ranges, .host")) b.hidden = true;
      $("#status").textContent = `Static report · generated ${fmt.time(r.generated_at)}`;
      banner(`Report of ${fmt.time(r.from)} → ${fmt.time(r.to)}${r.host != null ? " for host " + r.host : ""}, ` +
        "written by `edgepipe report`: the data is embedded in this file; pipeline health is as of its generation.", "info");
    } else {
      setInterval(() => { if (!document.hidden && !tokenPrompt) refresh(); }, REFRESH_MS);
    }
    refresh();
  }

  setup();
})();

// batchpunk status page: polls /stats once a second and /status every two, draws with uPlot.
// Everything it loads comes from the worker itself; text from the worker is set with
// textContent only (never innerHTML), so a message payload cannot inject markup.
"use strict";

(function () {
  const POLL_MS = 1000;
  const STATUS_MS = 2000;
  const KEEP = 900; // samples kept client-side: 15 minutes at one a second
  const COLORS = ["#58a6ff", "#3fb950", "#f85149", "#d2a8ff", "#d29922", "#39c5cf", "#ff7b72", "#a5d6ff"];
  const CIRCUIT_LEVEL = { closed: 0, half_open: 1, open: 2 };
  let windowSeconds = 300;
  let token = sessionStorage.getItem("batchpunk-token") || "";

  const $ = (id) => document.getElementById(id);

  // -- formatting ----------------------------------------------------------------------------
  function num(v) {
    if (v === null || v === undefined || Number.isNaN(v)) return "-";
    const a = Math.abs(v);
    if (a >= 1e9) return (v / 1e9).toFixed(2) + "G";
    if (a >= 1e6) return (v / 1e6).toFixed(2) + "M";
    if (a >= 1e4) return (v / 1e3).toFixed(1) + "k";
    if (a >= 100 || Number.isInteger(v)) return Math.round(v).toLocaleString("en-US");
    return v.toFixed(1);
  }
  function dur(s) {
    if (s === null || s === undefined) return "-";
    if (s < 1e-3) return (s * 1e6).toFixed(0) + " µs";
    if (s < 1) return (s * 1e3).toFixed(1) + " ms";
    if (s < 60) return s.toFixed(2) + " s";
    const m = Math.floor(s / 60);
    if (m < 60) return m + "m" + String(Math.floor(s % 60)).padStart(2, "0") + "s";
    return Math.floor(m / 60) + "h" + String(m % 60).padStart(2, "0") + "m";
  }
  function uptime(s) {
    const d = Math.floor(s / 86400), h = Math.floor(s / 3600) % 24, m = Math.floor(s / 60) % 60;
    if (d) return d + "d " + h + "h";
    if (h) return h + "h " + m + "m";
    return m ? m + "m " + Math.floor(s % 60) + "s" : Math.floor(s) + "s";
  }
  function clock(t) {
    const d = new Date(t * 1000);
    return d.toLocaleTimeString("en-GB", { hour12: false });
  }
  function counts(map) {
    const parts = Object.entries(map || {}).filter(([, n]) => n > 0).sort((a, b) => b[1] - a[1]);
    return parts.length ? parts.map(([k, n]) => k + " " + num(n)).join(" · ") : "none";
  }
  function setText(id, text) { const el = $(id); if (el.textContent !== text) el.textContent = text; }
  function pill(id, text, level) {
    const el = $(id);
    el.textContent = text;
    el.className = "pill" + (level ? " " + level : "");
  }

  // -- state ---------------------------------------------------------------------------------
  // History records from the worker's ring (one per interval), and samples this page takes of
  // the counters and gauges the ring does not keep (pending, retries, reasons, acks, states).
  const hist = { t: [], received: [], processed: [], dead: [], mean: [], p50: [], p90: [], p99: [] };
  const live = { t: [], pending: [], inflight: [], retries: [], splits: [], circuit: [], downstream: [],
    acked: [], nacked: [], flush: {}, dead: {} };
  let last = null; // the previous stats snapshot, for rates
  let lastHist = null; // time of the newest history record received
  let flushSeen = ["size"];
  let deadSeen = ["failed"];

  // -- charts --------------------------------------------------------------------------------
  const axisStyle = { stroke: "#8b949e", grid: { stroke: "rgba(240,246,252,.07)", width: 1 },
    ticks: { stroke: "rgba(240,246,252,.12)", width: 1 }, font: "11px system-ui, sans-serif" };

  // Seconds when the circuit was not closed or the downstream was unavailable, shaded red on
  // every chart so that what happened to throughput and backlog lines up with the cause.
  function outageSpans() {
    const spans = [];
    let start = null;
    for (let i = 0; i < live.t.length; i++) {
      const bad = live.circuit[i] > 0 || live.downstream[i] === 2;
      if (bad && start === null) start = live.t[i];
      if (!bad && start !== null) { spans.push([start, live.t[i]]); start = null; }
    }
    if (start !== null) spans.push([start, live.t[live.t.length - 1]]);
    return spans;
  }

  function shadeOutages(u) {
    const ctx = u.ctx;
    ctx.save();
    ctx.fillStyle = "rgba(248,81,73,0.12)";
    for (const [a, b] of outageSpans()) {
      const x0 = u.valToPos(a, "x", true);
      const x1 = Math.max(u.valToPos(b, "x", true), x0 + 2);
      ctx.fillRect(x0, u.bbox.top, x1 - x0, u.bbox.height);
    }
    ctx.restore();
  }

  function showLast(u) {
    const n = u.data[0].length;
    if (n) u.setLegend({ idx: n - 1 }, false);
  }

  class Chart {
    // defs: [{label, color, fill?, step?}]; yfmt formats axis values; the legend shows the last.
    constructor(id, defs, yfmt, extra) {
      this.el = $(id);
      this.yfmt = yfmt || num;
      this.extra = extra || {};
      this.plot = null;
      this.build(defs);
    }
    build(defs) {
      if (this.plot) this.plot.destroy();
      this.defs = defs;
      const yfmt = this.yfmt;
      const series = [{ label: "time", value: (u, v) => (v == null ? "-" : clock(v)) }].concat(defs.map((d) => ({
        label: d.label, stroke: d.color, width: 1.6, fill: d.fill ? d.color + "26" : undefined,
        points: { show: false }, spanGaps: false,
        paths: d.step ? uPlot.paths.stepped({ align: 1 }) : undefined,
        dash: d.dash,
        value: (u, v) => (v == null ? "-" : yfmt(v)),
      })));
      const opts = {
        width: Math.max(200, this.el.clientWidth), height: 180, series,
        scales: { x: { time: true, range: () => xrange() },
                  y: this.extra.yrange ? { range: this.extra.yrange } : { range: (u, min, max) => [0, max > 0 ? max * 1.1 : 1] } },
        axes: [Object.assign({}, axisStyle, { values: (u, splits) => splits.map(clock) }),
               Object.assign({}, axisStyle, { size: 54, values: (u, splits) => splits.map(this.extra.ylabels || yfmt) })],
        legend: { live: true }, cursor: { drag: { x: false, y: false } },
        // Off the chart, the legend shows the newest values rather than dashes.
        hooks: { setCursor: [(u) => { if (u.cursor.idx == null) showLast(u); }], drawClear: [shadeOutages] },
      };
      this.plot = new uPlot(opts, [[]].concat(defs.map(() => [])), this.el);
    }
    set(data) {
      // data: [xs, ys...]. The data-* attributes say what is drawn, for tests and scrapers.
      this.plot.setData(data);
      const n = data[0].length;
      if (this.plot.cursor.idx == null) showLast(this.plot);
      this.el.dataset.points = String(n);
      this.el.dataset.last = JSON.stringify(data.slice(1).map((ys) => (n ? ys[n - 1] : null)));
      this.el.dataset.peak = JSON.stringify(data.slice(1).map((ys) => Math.max(0, ...ys.filter((v) => v != null))));
    }
    resize() { this.plot.setSize({ width: Math.max(200, this.el.clientWidth), height: 180 }); }
  }

  // Every chart shows the same span, so that a spike lines up across them: the last
  // windowSeconds, or since the first sample when the page knows less than that.
  function xrange() {
    const ends = [hist.t, live.t].filter((a) => a.length);
    if (!ends.length) { const n = Date.now() / 1000; return [n - 60, n]; }
    const hi = Math.max(...ends.map((a) => a[a.length - 1]));
    const lo = Math.min(...ends.map((a) => a[0]));
    return [Math.max(lo, hi - windowSeconds), Math.max(hi, lo + 10)];
  }

  const charts = {
    throughput: new Chart("c-throughput", [
      { label: "received", color: COLORS[0] }, { label: "processed", color: COLORS[1], fill: true },
      { label: "dead-lettered", color: COLORS[2] }]),
    backlog: new Chart("c-backlog", [
      { label: "pending", color: COLORS[4], fill: true }, { label: "in flight", color: COLORS[0], fill: true }]),
    latency: new Chart("c-latency", [
      { label: "p50", color: COLORS[1] }, { label: "p90", color: COLORS[4] }, { label: "p99", color: COLORS[2] }],
      (v) => num(v)),
    size: new Chart("c-size", [{ label: "mean batch size", color: COLORS[3], fill: true }]),
    flush: new Chart("c-flush", [{ label: "size", color: COLORS[0] }]),
    retries: new Chart("c-retries", [{ label: "retries", color: COLORS[4] }, { label: "splits", color: COLORS[3] }]),
    dead: new Chart("c-dead", [{ label: "failed", color: COLORS[2] }]),
    health: new Chart("c-health", [
      { label: "downstream", color: COLORS[2], step: true, fill: true },
      { label: "circuit", color: COLORS[4], step: true, dash: [6, 4] }],
      (v) => ["ok", "half open", "open / down"][Math.round(v)] || "", { yrange: [0, 2.2],
        ylabels: (v) => ({ 0: "ok", 1: "half", 2: "open" })[v] || "" }),
    source: new Chart("c-source", [{ label: "acknowledged", color: COLORS[1], fill: true }, { label: "nacked", color: COLORS[2] }]),
  };
  window.addEventListener("resize", () => Object.values(charts).forEach((c) => c.resize()));

  function trim(obj) {
    for (const v of Object.values(obj)) {
      if (Array.isArray(v)) { if (v.length > KEEP) v.splice(0, v.length - KEEP); }
      else trim(v);
    }
  }

  function addHistory(records) {
    for (const r of records) {
      if (lastHist !== null && r.time <= lastHist) continue;
      const prev = hist.t.length ? hist.t[hist.t.length - 1] : null;
      const span = prev !== null && r.time - prev > 0 && r.time - prev < 60 ? r.time - prev : 1;
      hist.t.push(r.time);
      hist.received.push(r.received / span);
      hist.processed.push(r.processed / span);
      hist.dead.push(r.dead_lettered / span);
      hist.mean.push(r.mean_batch_size);
      hist.p50.push(r.latency_p50 == null ? null : r.latency_p50 * 1e3);
      hist.p90.push(r.latency_p90 == null ? null : r.latency_p90 * 1e3);
      hist.p99.push(r.latency_p99 == null ? null : r.latency_p99 * 1e3);
      lastHist = r.time;
    }
    trim(hist);
  }

  function delta(now, before, dt) {
    const d = (now || 0) - (before || 0);
    return d > 0 && dt > 0 ? d / dt : 0;
  }

  function addSample(s) {
    const t = s.time;
    const p = s.pipeline || {};
    const ds = s.downstream;
    live.t.push(t);
    live.pending.push(s.pending || 0);
    live.inflight.push(s.in_flight || 0);
    live.circuit.push(CIRCUIT_LEVEL[s.circuit] ?? 0);
    live.downstream.push(ds ? (ds.state === "unavailable" ? 2 : 0) : null);
    const dt = last ? t - last.time : 0;
    const lp = last ? last.pipeline || {} : {};
    live.retries.push(last ? delta(s.retries, last.retries, dt) : 0);
    live.splits.push(last ? delta(s.splits, last.splits, dt) : 0);
    live.acked.push(last ? delta(p.acked, lp.acked, dt) : 0);
    live.nacked.push(last ? delta(p.nacked, lp.nacked, dt) : 0);
    // A reason gets its own series from the first second it is seen.
    for (const [key, seen] of [["flush", flushSeen], ["dead", deadSeen]]) {
      const nowMap = key === "flush" ? s.flush_reasons || {} : s.dead_letter_reasons || {};
      const lastMap = last ? (key === "flush" ? last.flush_reasons || {} : last.dead_letter_reasons || {}) : {};
      for (const reason of Object.keys(nowMap)) if (!seen.includes(reason)) seen.push(reason);
      for (const reason of seen) {
        const arr = live[key][reason] || (live[key][reason] = new Array(live.t.length - 1).fill(0));
        arr.push(last ? delta(nowMap[reason], lastMap[reason], dt) : 0);
      }
    }
    trim(live);
    last = s;
  }

  function reasonDefs(seen, palette) {
    return seen.map((r, i) => ({ label: r, color: palette[i % palette.length] }));
  }

  function draw() {
    charts.throughput.set([hist.t, hist.received, hist.processed, hist.dead]);
    charts.latency.set([hist.t, hist.p50, hist.p90, hist.p99]);
    charts.size.set([hist.t, hist.mean]);
    charts.backlog.set([live.t, live.pending, live.inflight]);
    charts.retries.set([live.t, live.retries, live.splits]);
    charts.health.set([live.t, live.downstream, live.circuit]); // circuit drawn on top, dashed
    charts.source.set([live.t, live.acked, live.nacked]);
    if (charts.flush.defs.length !== flushSeen.length) charts.flush.build(reasonDefs(flushSeen, COLORS));
    charts.flush.set([live.t].concat(flushSeen.map((r) => live.flush[r])));
    const deadPalette = [COLORS[2], COLORS[4], COLORS[6], COLORS[3], COLORS[5], COLORS[0]];
    if (charts.dead.defs.length !== deadSeen.length) charts.dead.build(reasonDefs(deadSeen, deadPalette));
    charts.dead.set([live.t].concat(deadSeen.map((r) => live.dead[r])));
  }

  // -- header and tiles ----------------------------------------------------------------------
  function ready(s) {
    // The same rule as /readyz (metrics/_health.py), computed here to save a request a second.
    const reasons = [];
    if (s.downstream && s.downstream.state === "unavailable") reasons.push("downstream unavailable");
    if (s.circuit === "open") reasons.push("circuit open");
    if (s.pipeline && s.pipeline.source_connected === false) reasons.push("source disconnected");
    return reasons;
  }

  function header(s, rate) {
    pill("pill-state", s.state || "-", s.state === "running" ? "ok" : s.state === "closing" ? "warn" : "");
    const notReady = ready(s);
    pill("pill-ready", notReady.length ? "not ready: " + notReady.join(", ") : "ready", notReady.length ? "bad" : "ok");
    const c = s.circuit || "closed";
    pill("pill-circuit", "circuit " + c.replace("_", " "), c === "closed" ? "ok" : c === "open" ? "bad" : "warn");
    const ds = s.downstream;
    if (ds) {
      const down = ds.state === "unavailable";
      const since = down && ds.since ? " for " + dur(Math.max(0, s.time - ds.since)) : "";
      const held = down && ds.held ? ", " + num(ds.held) + " held" : "";
      pill("pill-downstream", "downstream " + ds.state + since + held, down ? "bad" : "ok");
    } else {
      pill("pill-downstream", "downstream n/a", "hidden"); // an engine that reports no "downstream" stats
    }
    const p = s.pipeline || {};
    setText("uptime", p.elapsed ? "up " + uptime(p.elapsed) : "");
    setText("updated", "updated " + clock(s.time));
    const tp = s.throughput || {};
    setText("k-rate", rate === null ? "-" : num(rate));
    setText("k-rate-sub", "1m " + num(tp["1m"]) + " · 15m " + num(tp["15m"]));
    setText("k-processed", num(s.processed));
    setText("k-received", "received " + num(s.received));
    setText("k-pending", num(s.pending));
    const limit = (s.config || {}).max_pending;
    setText("k-pending-sub", (limit ? "of max " + num(limit) + " · " : "") + "in lanes " + num(s.current_batch_size));
    setText("k-inflight", num(s.in_flight));
    setText("k-inflight-sub", "running " + num(s.batches_running) + " · waiting " + num(s.batches_waiting));
    const lat = s.latency || {};
    setText("k-p99", dur(lat.p99));
    setText("k-p50", "p50 " + dur(lat.p50) + " · max " + dur(lat.max));
    setText("k-dead", num(s.dead_lettered));
    setText("k-dead-sub", counts(s.dead_letter_reasons));
    $("k-dead").parentElement.className = "tile" + (s.dead_lettered ? " bad" : "");
    setText("k-acked", p.acked === undefined ? "-" : num(p.acked));
    setText("k-acked-sub", p.acked === undefined ? "no source" : "nacked " + num(p.nacked) + " · ack errors " + num(p.ack_errors));
  }

  // -- status: configuration and dead letters ------------------------------------------------
  let configShown = null;
  function showConfig(config) {
    const text = JSON.stringify(config);
    if (text === configShown) return;
    configShown = text;
    const root = $("config");
    root.replaceChildren();
    const sections = config && typeof config === "object" ? Object.entries(config) : [];
    for (const [name, body] of sections) {
      const section = document.createElement("div");
      section.className = "section";
      const h = document.createElement("h3");
      h.textContent = name;
      section.appendChild(h);
      const dl = document.createElement("dl");
      const entries = body && typeof body === "object" && !Array.isArray(body) ? Object.entries(body) : [["value", body]];
      for (const [k, v] of entries) {
        const dt = document.createElement("dt");
        dt.textContent = k;
        const dd = document.createElement("dd");
        dd.textContent = v !== null && typeof v === "object" ? JSON.stringify(v) : String(v);
        dl.append(dt, dd);
      }
      section.appendChild(dl);
      root.appendChild(section);
    }
  }

  function showLetters(letters, kept) {
    const body = $("letters");
    const rows = [];
    for (const l of letters.slice(0, 12)) {
      const tr = document.createElement("tr");
      const cells = [[clock(l.stored), "when"], [l.reason, "reason"], [String(l.attempts), ""],
        [(l.error_type ? l.error_type + ": " : "") + l.error, ""], [l.message, ""]];
      for (const [text, cls] of cells) {
        const td = document.createElement("td");
        td.textContent = text;
        if (cls) td.className = cls;
        tr.appendChild(td);
      }
      rows.push(tr);
    }
    if (!rows.length) {
      const tr = document.createElement("tr");
      const td = document.createElement("td");
      td.colSpan = 5;
      td.className = "empty";
      td.textContent = kept ? "none yet" : "not kept by this worker";
      tr.appendChild(td);
      rows.push(tr);
    }
    body.replaceChildren(...rows);
  }

  // -- polling -------------------------------------------------------------------------------
  async function get(path) {
    const headers = token ? { Authorization: "Bearer " + token } : {};
    const response = await fetch(path, { headers, cache: "no-store" });
    if (response.status === 401) {
      $("auth").classList.remove("hidden");
      throw new Error("unauthorized");
    }
    if (!response.ok) throw new Error(path + ": HTTP " + response.status);
    return response.json();
  }

  async function pollStats() {
    try {
      const s = await get(lastHist === null ? "/stats" : "/stats?since=" + lastHist);
      $("auth").classList.add("hidden");
      const rate = last && s.time > last.time ? delta(s.processed, last.processed, s.time - last.time) : null;
      addHistory(s.history || []);
      addSample(s);
      header(s, rate);
      draw();
      pill("pill-link", "live", "ok");
    } catch (err) {
      pill("pill-link", err.message === "unauthorized" ? "token needed" : "disconnected", "bad");
    }
  }

  async function pollStatus() {
    try {
      const st = await get("/status");
      if (st.title) { setText("title", st.title); document.title = st.title + " · batchpunk"; }
      showConfig(st.config);
      showLetters(st.dead_letters || [], st.dead_letters_kept);
    } catch (err) {
      // pollStats reports the connection; the lower panels keep their last content
    }
  }

  for (const button of document.querySelectorAll("#window button")) {
    button.addEventListener("click", () => {
      windowSeconds = Number(button.dataset.seconds);
      for (const other of document.querySelectorAll("#window button")) {
        other.classList.toggle("active", other === button);
      }
      draw();
    });
  }

  $("auth").addEventListener("submit", (event) => {
    event.preventDefault();
    token = $("token").value.trim();
    sessionStorage.setItem("batchpunk-token", token);
    pollStats();
    pollStatus();
  });

  function every(ms, fn) {
    fn();
    setInterval(fn, ms);
  }
  every(POLL_MS, pollStats);
  every(STATUS_MS, pollStatus);
})();

// Lakehouse status page: reads GET /v1/status with a bearer token and draws it.
// Data is only ever inserted as text (textContent / SVG text nodes), never as HTML.
"use strict";

(function () {
  const TOKEN_KEY = "lakehouse.token";
  const REFRESH_MS = 15000;
  const SVG_NS = "http://www.w3.org/2000/svg";
  let timer = null;

  const $ = (id) => document.getElementById(id);

  function setState(state) {
    document.body.dataset.state = state;
  }

  // --- token: URL fragment (#token=...) first, then sessionStorage -------------------------
  function tokenFromFragment() {
    const hash = window.location.hash.replace(/^#/, "");
    if (!hash) return null;
    const token = new URLSearchParams(hash).get("token");
    if (token) {
      // Keep the secret out of the address bar and the history once read.
      history.replaceState(null, "", window.location.pathname + window.location.search);
    }
    return token;
  }

  function currentToken() {
    const fromFragment = tokenFromFragment();
    if (fromFragment) sessionStorage.setItem(TOKEN_KEY, fromFragment);
    return sessionStorage.getItem(TOKEN_KEY);
  }

  function showLogin(message) {
    if (timer) clearTimeout(timer);
    sessionStorage.removeItem(TOKEN_KEY);
    $("status").hidden = true;
    clearData();
    $("forget").hidden = true;
    $("login").hidden = false;
    $("login-error").textContent = message || "";
    $("updated").textContent = "";
    setState("login");
  }

  function clearData() {
    for (const id of ["pipeline", "ingestion"]) $(id).replaceChildren();
    for (const id of ["tables", "quality", "dead-letters"]) {
      $(id).querySelector("tbody").replaceChildren();
    }
  }

  // --- formatting -------------------------------------------------------------------------
  function fmtInt(n) {
    return n === null || n === undefined ? "?" : Number(n).toLocaleString("en-US");
  }

  function fmtBytes(n) {
    if (n === null || n === undefined) return "?";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let value = n;
    let unit = 0;
    while (value >= 1024 && unit < units.length - 1) {
      value /= 1024;
      unit += 1;
    }
    return (unit ? value.toFixed(1) : String(value)) + " " + units[unit];
  }

  function fmtAge(seconds) {
    if (seconds === null || seconds === undefined) return "never";
    if (seconds < 90) return Math.round(seconds) + " s";
    if (seconds < 5400) return Math.round(seconds / 60) + " min";
    if (seconds < 172800) return Math.round(seconds / 3600) + " h";
    return Math.round(seconds / 86400) + " d";
  }

  function fmtTime(iso) {
    if (!iso) return "";
    return String(iso).replace("T", " ").replace(/(\.\d+)?(Z|\+00:00)$/, "");
  }

  function freshnessClass(seconds) {
    if (seconds === null || seconds === undefined) return "old";
    if (seconds < 600) return "fresh";
    if (seconds < 86400) return "stale";
    return "old";
  }

  // --- DOM helpers --------------------------------------------------------------------------
  function svg(name, attrs, parent) {
    const el = document.createElementNS(SVG_NS, name);
    for (const [key, value] of Object.entries(attrs || {})) el.setAttribute(key, String(value));
    if (parent) parent.appendChild(el);
    return el;
  }

  function svgText(parent, x, y, text, cls) {
    const el = svg("text", { x: x, y: y }, parent);
    if (cls) el.setAttribute("class", cls);
    el.textContent = text;
    return el;
  }

  function cell(row, text, cls) {
    const td = document.createElement("td");
    td.textContent = text === null || text === undefined ? "" : String(text);
    if (cls) td.className = cls;
    row.appendChild(td);
    return td;
  }

  // --- pipeline picture: sources -> bronze -> silver -> gold --------------------------------
  const BOX_W = 190;
  const BOX_H = 54;
  const COL_GAP = 60;
  const ROW_GAP = 14;
  const TOP = 28;

  function drawPipeline(status) {
    const byRef = new Map(status.tables.map((t) => [t.layer + "/" + t.name, t]));
    const columns = ["source", "bronze", "silver", "gold"];
    let rows = 0;
    const placed = [];
    for (const src of status.pipeline) {
      const height = Math.max(1, src.gold.length);
      placed.push({ src: src, row: rows, height: height });
      rows += height;
    }
    const width = columns.length * BOX_W + (columns.length - 1) * COL_GAP + 20;
    const height = TOP + Math.max(rows, 1) * (BOX_H + ROW_GAP) + 10;
    const root = svg("svg", {
      width: width, height: height, viewBox: "0 0 " + width + " " + height,
      role: "img", "aria-label": "pipeline: sources to bronze, silver and gold tables",
    });
    columns.forEach((name, i) => svgText(root, 10 + i * (BOX_W + COL_GAP), 16,
      name === "source" ? "sources" : name, "layer-label"));
    const edges = svg("g", { class: "edges" }, root);
    const nodes = svg("g", { class: "nodes" }, root);
    const x = (col) => 10 + col * (BOX_W + COL_GAP);
    const y = (row) => TOP + row * (BOX_H + ROW_GAP);

    function node(col, row, kind, title, ref) {
      const table = ref ? byRef.get(ref) : null;
      const g = svg("g", {
        class: "node " + kind + (ref && !table ? " missing" : ""),
        transform: "translate(" + x(col) + "," + y(row) + ")",
      }, nodes);
      if (ref) g.setAttribute("data-table", ref);
      svg("rect", { width: BOX_W, height: BOX_H, rx: 6 }, g);
      svgText(g, 10, 19, title, "title");
      if (!ref) {
        svgText(g, 10, 38, "declared source", "detail");
      } else if (!table) {
        svgText(g, 10, 38, "not created yet", "detail");
      } else {
        svgText(g, 10, 36, fmtInt(table.row_count) + " rows · v" + table.version, "detail");
        const age = svgText(g, 10, 49, "updated " + fmtAge(table.freshness_s) + " ago", "detail");
        svg("circle", { cx: BOX_W - 14, cy: 16, r: 5,
          class: freshnessClass(table.freshness_s) }, g);
        age.setAttribute("data-freshness", String(table.freshness_s));
      }
      return { x: x(col), y: y(row) };
    }

    function edge(from, to) {
      const x1 = from.x + BOX_W;
      const y1 = from.y + BOX_H / 2;
      const x2 = to.x;
      const y2 = to.y + BOX_H / 2;
      const mid = (x1 + x2) / 2;
      svg("path", { class: "edge",
        d: "M" + x1 + "," + y1 + " C" + mid + "," + y1 + " " + mid + "," + y2 + " " + x2 + "," + y2,
      }, edges);
    }

    for (const { src, row, height } of placed) {
      const center = row + (height - 1) / 2;
      const s = node(0, center, "source", src.source + (src.declared ? "" : " (undeclared)"), null);
      const b = node(1, center, "bronze", "bronze/" + src.source, "bronze/" + src.source);
      edge(s, b);
      const sv = node(2, center, "silver", "silver/" + src.source, "silver/" + src.source);
      edge(b, sv);
      src.gold.forEach((ref, i) => edge(sv, node(3, row + i, "gold", ref, ref)));
    }
    $("pipeline").replaceChildren(root);
  }

  // --- ingestion chart: bronze rows per minute ----------------------------------------------
  function drawIngestion(status) {
    const buckets = status.ingestion;
    const W = 760;
    const H = 180;
    const left = 48;
    const bottom = 22;
    const plotW = W - left - 10;
    const plotH = H - bottom - 10;
    const max = Math.max(1, ...buckets.map((b) => b.rows));
    const root = svg("svg", { id: "ingestion-chart", width: W, height: H,
      viewBox: "0 0 " + W + " " + H, role: "img",
      "aria-label": "rows ingested into bronze per minute" });
    svg("line", { class: "axis", x1: left, y1: 10 + plotH, x2: W - 10, y2: 10 + plotH }, root);
    svg("line", { class: "axis", x1: left, y1: 10, x2: left, y2: 10 + plotH }, root);
    svgText(root, 4, 16, fmtInt(max), "tick");
    svgText(root, 4, 10 + plotH, "0", "tick");
    const step = plotW / Math.max(buckets.length, 1);
    const points = [];
    let total = 0;
    buckets.forEach((b, i) => {
      const h = (b.rows / max) * plotH;
      const bx = left + i * step;
      total += b.rows;
      if (b.rows > 0) {
        const bar = svg("rect", { class: "bar", x: bx + 1, y: 10 + plotH - h,
          width: Math.max(step - 2, 1), height: h, "data-rows": b.rows,
          "data-minute": b.minute }, root);
        const title = svg("title", {}, bar);
        title.textContent = fmtTime(b.minute) + ": " + fmtInt(b.rows) + " rows in " +
          b.commits + " commit(s)";
      }
      points.push((bx + step / 2).toFixed(1) + "," + (10 + plotH - h).toFixed(1));
    });
    if (points.length) {
      svg("path", { class: "rate-line", id: "ingestion-line", d: "M" + points.join(" L") }, root);
    }
    if (buckets.length) {
      svgText(root, left, H - 6, fmtTime(buckets[0].minute).slice(11, 16), "tick");
      svgText(root, W - 44, H - 6, fmtTime(buckets[buckets.length - 1].minute).slice(11, 16),
        "tick");
    }
    $("ingestion").replaceChildren(root);
    $("ingestion-total").textContent = "(" + fmtInt(total) + " rows in the last " +
      status.ingestion_window_minutes + " min)";
  }

  // --- tables -------------------------------------------------------------------------------
  function fillTables(status) {
    const body = $("tables").querySelector("tbody");
    body.replaceChildren(...status.tables.map((t) => {
      const tr = document.createElement("tr");
      tr.dataset.table = t.layer + "/" + t.name;
      cell(tr, t.layer + "/" + t.name);
      cell(tr, t.version, "num");
      cell(tr, fmtInt(t.row_count), "num rows");
      cell(tr, fmtInt(t.file_count), "num");
      cell(tr, fmtBytes(t.total_bytes), "num");
      cell(tr, fmtTime(t.last_commit_at));
      cell(tr, t.last_operation || "");
      cell(tr, fmtAge(t.freshness_s), "num " + freshnessClass(t.freshness_s));
      cell(tr, fmtTime(t.newest_data_at));
      return tr;
    }));
  }

  function fillQuality(status) {
    const rows = status.quality_failures.map((q) => {
      const tr = document.createElement("tr");
      cell(tr, fmtTime(q.evaluated_at));
      cell(tr, q.source);
      cell(tr, q.bronze_version, "num");
      cell(tr, fmtInt(q.rows_in), "num");
      cell(tr, fmtInt(q.rows_warned), "num");
      cell(tr, fmtInt(q.rows_dropped), "num");
      cell(tr, fmtInt(q.rows_quarantined), "num");
      cell(tr, q.failed.map((f) => f.name + " (" + f.action + "): " + f.rows).join(", "), "wrap");
      return tr;
    });
    $("quality").querySelector("tbody").replaceChildren(...rows);
    $("quality-empty").hidden = rows.length > 0;
  }

  function fillDeadLetters(status) {
    const rows = status.dead_letters.map((d) => {
      const tr = document.createElement("tr");
      cell(tr, fmtTime(d._ingested_at || d.received_at));
      cell(tr, d.origin);
      cell(tr, d.topic);
      cell(tr, d.error, "wrap");
      return tr;
    });
    $("dead-letters").querySelector("tbody").replaceChildren(...rows);
    $("dead-letters-empty").hidden = rows.length > 0;
    $("dead-letter-count").textContent = status.dead_letter_count === null ? "" :
      "(" + fmtInt(status.dead_letter_count) + " in total)";
  }

  // --- loading ------------------------------------------------------------------------------
  async function errorMessage(response) {
    try {
      const body = await response.json();
      if (body && body.error && body.error.message) return body.error.message;
    } catch (e) { /* not JSON */ }
    return "HTTP " + response.status;
  }

  async function load() {
    const token = sessionStorage.getItem(TOKEN_KEY);
    if (!token) {
      showLogin("");
      return;
    }
    let response;
    try {
      response = await fetch("/v1/status", {
        headers: { Authorization: "Bearer " + token }, cache: "no-store",
      });
    } catch (e) {
      showProblem("cannot reach the API: " + e);
      return schedule();
    }
    if (response.status === 401 || response.status === 403) {
      showLogin(await errorMessage(response));
      return;
    }
    if (!response.ok) {
      showProblem(await errorMessage(response));
      return schedule();
    }
    const status = await response.json();
    $("login").hidden = true;
    $("status").hidden = false;
    $("forget").hidden = false;
    $("problem").hidden = true;
    $("warnings").hidden = !status.warnings.length;
    $("warnings").textContent = status.warnings.join("; ");
    drawPipeline(status);
    drawIngestion(status);
    fillTables(status);
    fillQuality(status);
    fillDeadLetters(status);
    $("updated").textContent = "as of " + fmtTime(status.generated_at) + " UTC";
    setState("ready");
    schedule();
  }

  function showProblem(message) {
    $("problem").textContent = message;
    $("problem").hidden = false;
    setState("error");
  }

  function schedule() {
    if (timer) clearTimeout(timer);
    timer = setTimeout(load, REFRESH_MS);
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("token-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const value = $("token-input").value.trim();
      $("token-input").value = "";
      if (!value) return;
      sessionStorage.setItem(TOKEN_KEY, value);
      setState("loading");
      load();
    });
    $("forget").addEventListener("click", () => showLogin(""));
    window.addEventListener("hashchange", () => {
      if (currentToken()) load();
    });
    if (currentToken()) {
      setState("loading");
      load();
    } else {
      showLogin("");
    }
  });
})();

// memedit's dashboard: the API's own routes, drawn with plotly.js (served by the API).
"use strict";

const $ = (id) => document.getElementById(id);
const state = { model: null, stream: null, jobs: new Map(), refresh: null };
const keyInput = $("key");
keyInput.value = localStorage.getItem("memedit-key") || "";
keyInput.addEventListener("change", () => { localStorage.setItem("memedit-key", keyInput.value); start(); });

function headers(extra) {
  const h = Object.assign({}, extra || {});
  if (keyInput.value) h["Authorization"] = "Bearer " + keyInput.value;
  return h;
}

async function api(path, options) {
  const r = await fetch(path, Object.assign({}, options, { headers: headers((options || {}).headers) }));
  const text = await r.text();
  const body = text && r.headers.get("content-type", "").includes("json") ? JSON.parse(text) : text;
  if (!r.ok) throw new Error((body && body.detail) || r.status + "");
  return body;
}

async function all(path) {  // every page of a listing
  let items = [], cursor = null;
  do {
    const sep = path.includes("?") ? "&" : "?";
    const page = await api(path + sep + "limit=500" + (cursor ? "&cursor=" + cursor : ""));
    items = items.concat(page.items);
    cursor = page.next_cursor;
  } while (cursor);
  return items;
}

const esc = (s) => String(s == null ? "" : s).replace(/[&<>"]/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" }[c]));
const num = (x, d) => (x == null ? "" : Number(x).toFixed(d == null ? 3 : d));
const when = (t) => (t ? new Date(t).toLocaleString() : "");
const badge = (s) => `<span class="status ${esc(s)}">${esc(s)}</span>`;

function rows(id, html, empty) {
  $(id).querySelector("tbody").innerHTML = html.length ? html.join("") : `<tr><td colspan="12" class="empty">${empty}</td></tr>`;
}

const layout = (ytitle, extra) => Object.assign({
  margin: { l: 55, r: 10, t: 10, b: 40 }, xaxis: { title: { text: "version" }, dtick: 1 },
  yaxis: { title: { text: ytitle } }, legend: { orientation: "h", y: -0.25 }, font: { size: 11 },
}, extra || {});
const plot = (id, traces, ytitle, extra) => Plotly.react($(id), traces, layout(ytitle, extra), { displayModeBar: false, responsive: true });

// -- models, worker, queues --------------------------------------------------------------
async function loadModels() {
  const models = await api("/v1/models");
  const select = $("model");
  const wanted = new URLSearchParams(location.search).get("model") || state.model || (models[0] || {}).name;
  select.innerHTML = models.map((m) => `<option ${m.name === wanted ? "selected" : ""}>${esc(m.name)}</option>`).join("");
  state.model = select.value;
  const m = models.find((x) => x.name === state.model);
  if (m) {
    const w = m.worker || {};
    const pill = $("worker");
    pill.className = "pill " + (w.state === "no worker" ? "none" : w.state);
    pill.textContent = "worker: " + w.state + (w.progress != null && w.state !== "ready" ? " " + Math.round(w.progress * 100) + "%" : "") + (w.message ? " · " + w.message : "");
    $("head").textContent = "head v" + m.head_version;
  }
  const text = await (await fetch("/metrics")).text();
  const depth = {};
  for (const line of text.split("\n")) {
    const hit = line.match(/^memedit_queue_depth\{model="([^"]+)",queue="([^"]+)"\} (\S+)/);
    if (hit && hit[1] === state.model) depth[hit[2]] = Number(hit[3]);
  }
  $("queues").textContent = `queued: ${depth.edits || 0} edits · ${depth.evals || 0} evals · ${depth.reads || 0} reads`;
}

// -- jobs (live through the model's event stream) ----------------------------------------
function drawJobs() {
  const list = [...state.jobs.values()].sort((a, b) => (b.created_at > a.created_at ? 1 : -1)).slice(0, 12);
  rows("jobs", list.map((j) => {
    const pct = Math.round((j.progress || 0) * 100);
    const stop = j.status === "queued" || j.status === "running" ? `<button class="small" data-cancel="${j.id}">cancel</button>` : "";
    return `<tr class="job ${esc(j.status)}" data-job="${j.id}"><td><code>${esc(j.id.slice(0, 8))}</code></td><td>${esc(j.kind)}</td><td>${badge(j.status)}</td>` +
      `<td><span class="bar"><span style="width:${pct}%"></span></span> <span class="pct">${pct}%</span></td>` +
      `<td>${esc(j.error || j.message || "")}</td><td>${when(j.created_at)}</td><td>${stop}</td></tr>`;
  }), "no jobs yet");
}

async function loadJobs() {
  const page = await api(`/v1/jobs?model=${encodeURIComponent(state.model)}&limit=12`);
  state.jobs = new Map(page.items.map((j) => [j.id, j]));
  drawJobs();
}

async function follow() {  // fetch-based SSE: it can send the API key, which EventSource cannot
  if (state.stream) state.stream.abort();
  const ctrl = new AbortController();
  state.stream = ctrl;
  let last = null;
  while (!ctrl.signal.aborted) {
    try {
      const q = last == null ? "" : "?after=" + last;
      const r = await fetch(`/v1/models/${encodeURIComponent(state.model)}/events${q}`, { headers: headers(), signal: ctrl.signal });
      $("live").classList.add("on");
      const reader = r.body.getReader();
      const decoder = new TextDecoder();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true });
        let cut;
        while ((cut = buffer.indexOf("\n\n")) >= 0) {
          const chunk = buffer.slice(0, cut);
          buffer = buffer.slice(cut + 2);
          const data = chunk.split("\n").find((l) => l.startsWith("data: "));
          if (data) { const ev = JSON.parse(data.slice(6)); last = ev.id; onEvent(ev); }
        }
      }
    } catch (e) { if (ctrl.signal.aborted) return; }
    $("live").classList.remove("on");
    await new Promise((res) => setTimeout(res, 1000));
  }
}

function onEvent(ev) {
  const d = ev.data;
  if (ev.job_id) {
    const j = state.jobs.get(ev.job_id) || { id: ev.job_id, kind: d.kind || "", created_at: ev.created_at, progress: 0 };
    if (ev.kind === "status") { j.status = d.status; j.kind = d.kind || j.kind; j.message = d.message || null; j.error = d.error || null; if (d.status === "succeeded") j.progress = 1; }
    if (ev.kind === "progress") { j.progress = d.progress; j.message = d.message; j.status = j.status === "queued" ? "running" : j.status; }
    state.jobs.set(ev.job_id, j);
    drawJobs();
  }
  if (["version", "rejection", "evaluation", "alert"].includes(ev.kind) || (ev.kind === "status" && ["succeeded", "failed", "cancelled"].includes(d.status))) {
    clearTimeout(state.refresh);
    state.refresh = setTimeout(loadHistory, 300);
  }
}

// -- history -------------------------------------------------------------------------------
async function loadEdits() {
  const q = new URLSearchParams();
  if ($("search").value) q.set("subject", $("search").value);
  if ($("status").value) q.set("status", $("status").value);
  const edits = (await all(`/v1/models/${encodeURIComponent(state.model)}/edits?${q}`)).reverse();
  rows("edits", edits.slice(0, 200).map((e) => {
    const m = e.metrics || {};
    return `<tr class="edit ${esc(e.status)}"><td>${e.id}</td><td>${esc(e.subject)}</td><td>${esc(e.prompt)}</td><td>${esc(e.target_new)}</td><td>${esc(e.target_true)}</td>` +
      `<td>${esc(e.method)}</td><td>${badge(e.status)}</td><td>${e.version == null ? "" : "v" + e.version}</td>` +
      `<td class="num">${num(m.efficacy, 2)}</td><td class="num">${num(m.paraphrase, 2)}</td><td class="num">${num(m.neighborhood, 2)}</td><td>${esc(e.reason || "")}</td></tr>`;
  }), "no edits");
}

async function loadVersions() {
  const versions = await all(`/v1/models/${encodeURIComponent(state.model)}/versions`);
  rows("versions", versions.slice().reverse().slice(0, 100).map((v) =>
    `<tr class="version"><td>v${v.number}</td><td>${esc(v.kind)}</td><td>${esc(v.method || "")}</td><td>${v.parent_number == null ? "" : "v" + v.parent_number}</td>` +
    `<td class="num">${Object.keys(v.drift || {}).length || ""}</td><td class="num">${num(v.update_norm)}</td><td>${esc(v.requested_by || "")}</td><td>${when(v.created_at)}</td></tr>`), "no versions");
  $("rollback-to").innerHTML = versions.slice().reverse().map((v) => `<option value="${v.number}">v${v.number} (${esc(v.kind)})</option>`).join("");
  const base = `/v1/models/${encodeURIComponent(state.model)}/series/`;
  const [drift, norms, scores] = await Promise.all(["drift", "update_norm", "edit_scores"].map((n) => api(base + n)));
  const short = (p) => p.replace(/^model\./, "").replace(/\.weight$/, "");
  plot("drift", Object.entries(drift.series).map(([p, ys]) => ({ x: drift.x, y: ys.map((y) => (y == null ? 0 : y)), name: short(p), mode: "lines+markers", type: "scatter" })), "‖W − W₀‖ / rows");
  plot("norms", [{ x: norms.x, y: norms.series.update_norm, type: "bar", name: "update norm", marker: { color: "#3358d4" } }], "‖ΔW‖");
  plot("scores", Object.entries(scores.series).map(([k, ys]) => ({ x: scores.x, y: ys, name: k, mode: "lines+markers", type: "scatter" })), "mean score", { yaxis: { range: [0, 1.05], title: { text: "mean score" } } });
}

async function loadEvaluations() {
  const evals = await all(`/v1/models/${encodeURIComponent(state.model)}/evaluations`);
  const suites = [...new Set(evals.map((e) => e.suite))];
  const select = $("suite");
  const keep = select.value;
  select.innerHTML = suites.map((s) => `<option ${s === keep ? "selected" : ""}>${esc(s)}</option>`).join("");
  if (!suites.length) { plot("evals", [], "score", { annotations: [{ text: "no evaluation yet", showarrow: false, xref: "paper", yref: "paper", x: 0.5, y: 0.5 }] }); return; }
  const s = await api(`/v1/models/${encodeURIComponent(state.model)}/series/evaluations?suite=${encodeURIComponent(select.value)}`);
  const shapes = [], traces = Object.entries(s.series).map(([k, ys]) => ({ x: s.x, y: ys, name: k, mode: "lines+markers", type: "scatter" }));
  for (const [metric, bound] of Object.entries(s.thresholds || {})) {
    for (const side of ["min", "max"]) {
      if (bound[side] != null) {
        shapes.push({ type: "line", xref: "paper", x0: 0, x1: 1, y0: bound[side], y1: bound[side], line: { dash: "dash", color: "#d64545", width: 1 } });
        traces.push({ x: [s.x[0]], y: [bound[side]], name: `${metric} ${side} ${bound[side]}`, mode: "lines", line: { dash: "dash", color: "#d64545" }, type: "scatter" });
      }
    }
  }
  plot("evals", traces, "score", { shapes });
}

async function loadGuard() {
  const decisions = (await all(`/v1/models/${encodeURIComponent(state.model)}/guard-decisions`)).reverse();
  rows("guard", decisions.slice(0, 100).map((g) =>
    `<tr class="decision ${g.accepted ? "accepted" : "rejected"}"><td>v${g.parent_version}</td><td>${badge(g.accepted ? "accepted" : "rejected")}</td><td>${esc((g.rules || []).join(", "))}</td>` +
    `<td class="num">${num(g.norm_ratio, 2)}</td><td class="num">${num(g.perplexity_before, 2)} → ${num(g.perplexity_after, 2)}</td>` +
    `<td class="num">${num(g.recall_before, 2)} → ${num(g.recall_after, 2)}</td><td>${esc((g.edit_ids || []).join(", "))}</td><td>${esc(g.reason || "")}</td></tr>`), "no guard decisions (the guard is off, or nothing was edited)");
}

async function loadHistory() {
  try {
    await Promise.all([loadModels(), loadEdits(), loadVersions(), loadEvaluations(), loadGuard()]);
    document.body.dataset.loaded = String(Date.now());
  } catch (e) { console.error(e); }
}

// -- actions --------------------------------------------------------------------------------
$("edit-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const f = new FormData(ev.target);
  const req = { prompt: f.get("prompt"), subject: f.get("subject"), target_new: f.get("target_new") };
  if (f.get("target_true")) req.target_true = f.get("target_true");
  try {
    const r = await api(`/v1/models/${encodeURIComponent(state.model)}/edits`, {
      method: "POST", headers: { "content-type": "application/json", "Idempotency-Key": crypto.randomUUID() },
      body: JSON.stringify({ method: f.get("method"), requests: [req] }) });
    $("edit-note").textContent = "queued as job " + r.job_id;
  } catch (e) { $("edit-note").textContent = "refused: " + e.message; }
});

$("rollback-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const to = Number(new FormData(ev.target).get("to_version"));
  if (!confirm(`Roll ${state.model} back to version ${to}? A new version with its weights is committed; the later edits are marked reverted.`)) return;
  try {
    const r = await api(`/v1/models/${encodeURIComponent(state.model)}/rollback`, {
      method: "POST", headers: { "content-type": "application/json", "Idempotency-Key": crypto.randomUUID() },
      body: JSON.stringify({ to_version: to }) });
    $("rollback-note").textContent = "queued as job " + r.job_id;
  } catch (e) { $("rollback-note").textContent = "refused: " + e.message; }
});

$("jobs").addEventListener("click", async (ev) => {
  const id = ev.target.dataset && ev.target.dataset.cancel;
  if (id && confirm("Cancel job " + id + "?")) { try { await api(`/v1/jobs/${id}/cancel`, { method: "POST" }); } catch (e) { alert(e.message); } }
});

$("search").addEventListener("input", () => { clearTimeout(state.searching); state.searching = setTimeout(loadEdits, 250); });
$("status").addEventListener("change", loadEdits);
$("suite").addEventListener("change", loadEvaluations);
$("model").addEventListener("change", () => { state.model = $("model").value; start(); });

async function start() {
  await loadModels();
  await Promise.all([loadJobs(), loadHistory()]);
  follow();
}
start();
setInterval(loadModels, 5000);

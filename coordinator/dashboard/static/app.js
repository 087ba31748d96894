// The gptjt dashboard: renders the coordinator's status object (from /api/stream, once a
// second) and sends admin actions. It computes no numbers of its own: everything shown is a
// field of the status object, only formatted. Plots are inline SVG (no CDN, works offline).
"use strict";

const $ = (sel) => document.querySelector(sel);
const SVGNS = "http://www.w3.org/2000/svg";

// -- formatting -------------------------------------------------------------------------
const fmtInt = (x) => (x == null ? "–" : Math.round(x).toLocaleString("en-US"));
function fmtNum(x, digits = 3) {
  if (x == null || !isFinite(x)) return "–";
  if (x !== 0 && (Math.abs(x) < 1e-3 || Math.abs(x) >= 1e6)) return x.toExponential(2);
  return Number(x.toPrecision(digits)).toLocaleString("en-US", { maximumFractionDigits: 6 });
}
function fmtDuration(s) {
  if (s == null || !isFinite(s)) return "–";
  if (s < 1) return `${(s * 1000).toFixed(0)} ms`;
  if (s < 60) return `${s.toFixed(1)} s`;
  const m = Math.floor(s / 60), h = Math.floor(m / 60), d = Math.floor(h / 24);
  if (d > 0) return `${d}d ${h % 24}h`;
  if (h > 0) return `${h}h ${m % 60}m`;
  return `${m}m ${Math.round(s % 60)}s`;
}
function fmtBytes(n) {
  if (!n) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(n < 10 && i > 0 ? 1 : 0)} ${units[i]}`;
}
const fmtPct = (x) => (x == null ? "–" : `${Math.round(100 * x)}%`);
const fmtTime = (ts) => new Date(ts * 1000).toLocaleTimeString("en-GB", { hour12: false });

// -- DOM helpers (textContent only: worker names come from volunteers) ------------------
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v == null || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "dataset") Object.assign(node.dataset, v);
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}
function setText(id, text, value) {
  const node = document.getElementById(id);
  node.textContent = text;
  if (value !== undefined) node.dataset.value = value == null ? "" : String(value);
}
function fillBody(table, rows) {
  const body = document.querySelector(`${table} tbody`);
  body.replaceChildren(...rows);
}
const td = (text, cls, value) => el("td", { class: cls, dataset: value === undefined ? undefined : { value } }, text);

// -- plots ------------------------------------------------------------------------------
function svgEl(tag, attrs, text) {
  const node = document.createElementNS(SVGNS, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text != null) node.textContent = text;
  return node;
}
function niceTicks(lo, hi, n = 4) {
  const span = hi - lo || Math.abs(hi) || 1;
  const step = Math.pow(10, Math.floor(Math.log10(span / n)));
  const mult = [1, 2, 5, 10].find((m) => span / (step * m) <= n) || 10;
  const s = step * mult, ticks = [];
  for (let t = Math.ceil(lo / s) * s; t <= hi + 1e-12; t += s) ticks.push(Number(t.toPrecision(10)));
  return ticks;
}
function plot(svg, points, yLabel) {
  const W = 560, H = 220, L = 52, R = 12, T = 10, B = 28;
  const nodes = [];
  const pts = points.filter((p) => p.y != null && isFinite(p.y));
  if (!pts.length) {
    nodes.push(svgEl("text", { x: W / 2, y: H / 2, "text-anchor": "middle", class: "empty" }, "no closed steps yet"));
    svg.replaceChildren(...nodes);
    return;
  }
  let [x0, x1] = [Math.min(...pts.map((p) => p.x)), Math.max(...pts.map((p) => p.x))];
  let [y0, y1] = [Math.min(...pts.map((p) => p.y)), Math.max(...pts.map((p) => p.y))];
  if (x0 === x1) { x0 -= 1; x1 += 1; }
  const pad = (y1 - y0) * 0.08 || Math.abs(y1) * 0.1 || 1;
  y0 -= pad; y1 += pad;
  const sx = (x) => L + ((x - x0) / (x1 - x0)) * (W - L - R);
  const sy = (y) => H - B - ((y - y0) / (y1 - y0)) * (H - T - B);
  for (const t of niceTicks(y0, y1)) {
    nodes.push(svgEl("line", { x1: L, x2: W - R, y1: sy(t), y2: sy(t), class: "grid" }));
    nodes.push(svgEl("text", { x: L - 6, y: sy(t) + 3, "text-anchor": "end", class: "tick" }, fmtNum(t)));
  }
  for (const t of niceTicks(x0, x1, 6).filter((t) => Number.isInteger(t))) {
    nodes.push(svgEl("text", { x: sx(t), y: H - B + 14, "text-anchor": "middle", class: "tick" }, String(t)));
  }
  nodes.push(svgEl("line", { x1: L, x2: L, y1: T, y2: H - B, class: "axis" }));
  nodes.push(svgEl("line", { x1: L, x2: W - R, y1: H - B, y2: H - B, class: "axis" }));
  nodes.push(svgEl("text", { x: W - R, y: H - 2, "text-anchor": "end", class: "tick" }, "step"));
  nodes.push(svgEl("polyline", { class: "line", points: pts.map((p) => `${sx(p.x)},${sy(p.y)}`).join(" ") }));
  for (const p of pts) {
    const dot = svgEl("circle", { class: "pt", cx: sx(p.x), cy: sy(p.y), r: pts.length > 80 ? 1.5 : 3,
                                  "data-step": p.x, "data-value": p.y });
    dot.append(svgEl("title", {}, `step ${p.x}: ${yLabel} ${fmtNum(p.y, 5)}`));
    nodes.push(dot);
  }
  svg.replaceChildren(...nodes);
}

// -- sections ---------------------------------------------------------------------------
function renderOverview(s) {
  document.title = `gptjt · ${s.run} · step ${s.step}/${s.steps_total}`;
  setText("run-name", `run ${s.run}`);
  const phase = $("#phase");
  phase.textContent = s.phase;
  phase.className = `badge ${s.phase === "done" ? "done" : ""}`;
  $("#paused").hidden = !s.paused;
  setText("ov-step", fmtInt(s.step), s.step);
  setText("ov-steps-total", fmtInt(s.steps_total), s.steps_total);
  setText("ov-attempt", fmtInt(s.attempt), s.attempt);
  setText("ov-tokens", fmtInt(s.tokens), s.tokens);
  setText("ov-tokens-target", fmtInt(s.tokens_target), s.tokens_target);
  $("#ov-tokens-bar").style.width = `${Math.min(100, (100 * s.tokens) / (s.tokens_target || 1))}%`;
  setText("ov-tokens-per-s", fmtInt(s.tokens_per_s), s.tokens_per_s);
  setText("ov-eta", s.phase === "done" ? "done" : fmtDuration(s.eta_s), s.eta_s);
  setText("ov-lr", fmtNum(s.lr, 3), s.lr);
  setText("ov-loss", fmtNum(s.loss, 4), s.loss);
  setText("ov-step-s", fmtDuration(s.measured_step_s), s.measured_step_s);
  const predicted = s.plan && s.plan.predicted_step_s;
  $("#ov-predicted-wrap").hidden = predicted == null;
  if (predicted != null) setText("ov-predicted-s", fmtDuration(predicted), predicted);
}

// Checks of stage work (status.verification; docs/security.md, "Spot checks").
function renderVerification(s) {
  const v = s.verification || {};
  setText("ov-spot-disagree", fmtInt(v.spot_disagree), v.spot_disagree);
  setText("ov-spot-agree", fmtInt(v.spot_agree), v.spot_agree);
  setText("ov-spot-checks", fmtInt(v.spot_checks), v.spot_checks);
  setText("ov-chain-mismatches", fmtInt(v.mismatches), v.mismatches);
  setText("ov-quarantined", fmtInt(v.quarantined), v.quarantined);
  const f = v.spot_verified_fraction;  // of the closed steps' tokens x stages
  setText("ov-verified-fraction", f == null ? "–" : `${fmtNum(100 * f, 3)} %`, f);
}

// A stall stays on screen for 10 minutes after the coordinator last took a remedy.
const STALL_SHOWN_S = 600;
function renderLiveness(s) {
  const lv = s.liveness || {};
  setText("ov-phase-age", fmtDuration(lv.phase_age_s), lv.phase_age_s);
  setText("ov-phase-deadline", lv.deadline_s == null ? "none" : fmtDuration(lv.deadline_s), lv.deadline_s);
  const stall = lv.last_stall;
  const shown = stall != null && s.now - stall.at < STALL_SHOWN_S;
  $("#liveness").hidden = !shown;
  if (!shown) return;
  setText("lv-phase", stall.phase);
  setText("lv-step", `${stall.step} (attempt ${stall.attempt})`);
  setText("lv-ago", fmtDuration(s.now - stall.at));
  setText("lv-cause", stall.cause);
  setText("lv-remedy", stall.remedy);
  const held = Object.entries(lv.held_out || {});
  $("#lv-held-wrap").hidden = held.length === 0;
  setText("lv-held", held.map(([w, until]) => `${w} until step ${until}`).join(", "));
}

function renderPlots(s) {
  // The whole run, at most a few hundred points however long it is (status.loss_curve).
  plot($("#loss-plot"), s.loss_curve.map((p) => ({ x: p.step, y: p.loss })), "loss");
  plot($("#throughput-plot"), s.loss_curve.map((p) => ({ x: p.step, y: p.tokens_per_s })), "tokens/s");
}

function renderStageMap(s) {
  const byId = Object.fromEntries(s.workers.map((w) => [w.id, w]));
  const columns = [];
  s.stages.forEach((st, i) => {
    if (i > 0) columns.push(el("div", { class: "arrow" }, "→"));
    const holds = [st.embed && "embed", st.head && "head"].filter(Boolean).join(" + ");
    const replicas = st.workers.map((id) => {
      const w = byId[id] || { id, metrics: {}, name: "" };
      const m = w.metrics || {};
      const codecs = m.activation_codec ? `${m.activation_codec} / ${m.gradient_codec}` : "–";
      return el("div", { class: `replica${id === s.straggler ? " straggler" : ""}`, dataset: { worker: id } },
        el("div", {}, el("span", { class: "who" }, w.name || id), " ", el("span", { class: "sub" }, id), " ",
           (st.members || []).includes(id) ? el("span", { class: "member" }, "● member") : "",
           id === s.straggler ? el("strong", {}, " straggler") : ""),
        el("dl", {},
          el("dt", {}, "state"), el("dd", {}, w.state || "–"),
          el("dt", {}, "throughput"), el("dd", { class: "mbs", dataset: { value: m.micro_batches_per_s } },
                                          `${fmtNum(m.micro_batches_per_s, 3)} mb/s`),
          el("dt", {}, "busy"), el("dd", { class: "busy", dataset: { value: m.busy_fraction } }, fmtPct(m.busy_fraction)),
          el("dt", {}, "compute"), el("dd", {}, w.seconds_per_micro_batch ? `${fmtDuration(w.seconds_per_micro_batch)} / mb` : "–"),
          el("dt", {}, "link"), el("dd", {}, i === s.stages.length - 1 ? "(last stage)"
                                      : (m.downstream_mbit ? `${fmtNum(m.downstream_mbit, 3)} Mbit/s` : "not measured")),
          el("dt", {}, "codecs"), el("dd", {}, codecs)));
    });
    columns.push(el("div", { class: `stage${st.workers.length ? "" : " vacant"}`, dataset: { stage: st.index } },
      el("h4", {}, `stage ${st.index} `, el("span", { class: "layers" }, `layers ${st.start_layer}–${st.end_layer}`
                                               + (holds ? ` · ${holds}` : ""))),
      ...(replicas.length ? replicas : [el("div", { class: "sub" }, "vacant: waiting for a worker")])));
  });
  const predicted = s.plan && s.plan.predicted_step_s;
  columns.push(el("div", { class: "stage", id: "step-times" }, el("h4", {}, "step time"),
    el("dl", { class: "replica" },
      el("dt", {}, "measured"), el("dd", {}, fmtDuration(s.measured_step_s)),
      el("dt", {}, "predicted"), el("dd", {}, predicted == null ? "(the plan gives none)" : fmtDuration(predicted)),
      ...planFacts(s.plan || {}))));
  $("#stage-map").replaceChildren(...columns);
}

// The scheduler's bookkeeping beside the step times: placement, last re-plan and its moves,
// a plan waiting for a checkpoint, and why standby workers have no stage.
function planFacts(plan) {
  const facts = [el("dt", {}, "placement"), el("dd", {}, plan.placement || "–")];
  const last = plan.last_replan;
  if (last) {
    facts.push(el("dt", {}, "last re-plan"),
               el("dd", { id: "last-replan" }, `step ${last.step}: ${last.layers_moved} layer(s) moved — ${last.why}`));
  }
  facts.push(el("dt", {}, "layers moved"), el("dd", { id: "layers-moved" }, fmtInt(plan.layers_moved_total || 0)));
  if (plan.pending) {
    const to = (plan.pending_ranges || []).map(([a, b]) => `${a}-${b}`).join(", ");
    facts.push(el("dt", {}, "pending"),
               el("dd", {}, `${plan.pending} (${to ? "layers " + to + ", " : ""}at the next complete checkpoint)`));
  }
  for (const [worker, why] of Object.entries(plan.standby_why || {})) {
    facts.push(el("dt", {}, `standby ${worker}`), el("dd", { class: "sub" }, why));
  }
  return facts;
}

function renderWorkers(s) {
  const alive = s.workers.filter((w) => ["loading", "ready", "standby", "draining"].includes(w.state));
  setText("worker-count", `${alive.length} live of ${s.workers.length}`, alive.length);
  fillBody("#workers-table", s.workers.map((w) => {
    const d = w.device || {}, m = w.metrics || {};
    const rate = d.block_tflops || d.matmul_tflops;  // the block probe is what the scheduler plans with
    const device = [d.kind, d.name].filter(Boolean).join(" · ") + (rate ? ` (${fmtNum(rate, 3)} TFLOP/s)` : "");
    const canDrain = alive.includes(w);
    return el("tr", { class: `state-${w.state}${w.id === s.straggler ? " straggler" : ""}`, dataset: { worker: w.id } },
      td(w.id), td(w.name || ""), td(w.stage >= 0 ? w.stage : "–", "num"),
      td(w.state + (w.drain_requested && w.state !== "draining" ? " (drain asked)" : "")),
      td(device || "–"), td(fmtBytes(d.memory_bytes), "num"),
      td(w.joined ? fmtDuration(s.now - w.joined) + " ago" : "–", "num"),
      td(fmtDuration(w.last_heartbeat_s), "num heartbeat", w.last_heartbeat_s),
      td(fmtNum(m.micro_batches_per_s, 3), "num"), td(fmtPct(m.busy_fraction), "num"),
      td(fmtInt(w.tickets_done), "num tickets", w.tickets_done), td(w.address || ""),
      el("td", {}, canDrain ? el("button", { class: "drain", dataset: { worker: w.id },
                                             title: "finish the current step, then leave" }, "drain") : ""));
  }));
}

function renderLedger(s) {
  const t = s.tickets;
  const keys = ["issued", "committed", "reissued", "leased", "pending", "aborted", "rolled_back", "lost", "double"];
  fillBody("#tickets-table", [el("tr", {}, ...keys.map((k) => el("td", { class: "num", id: `tk-${k}`, dataset: { value: t[k] } },
                                                                   fmtInt(t[k]))))]);
  setText("current-step-label", s.phase === "done" ? "(run finished)" : `${s.step}, attempt ${s.attempt} (${s.phase})`);
  fillBody("#current-tickets", (s.current_step_tickets || []).map((k) => el("tr", {},
    td(k.idx, "num"), td(k.shard, "num"), td(k.offset, "num"), td(k.state), td(k.worker || "–"), td(k.leases, "num"))));
  fillBody("#steps-table", s.history.slice(-15).reverse().map((h) => el("tr", { dataset: { step: h.step } },
    td(h.step, "num"), td(fmtNum(h.loss, 5), "num", h.loss), td(fmtInt(h.tokens), "num"),
    td(fmtNum(h.seconds, 3), "num"), td(h.grad_norm == null ? "skipped" : fmtNum(h.grad_norm, 4), "num"),
    td(h.attempts, "num"))));
}

function renderEvents(s) {
  const events = $("#show-routine").checked ? s.events : s.notable_events;
  fillBody("#events-table", events.slice().reverse().map((e) => el("tr", { dataset: { kind: e.kind } },
    td(fmtTime(e.ts)), el("td", {}, el("span", { class: `cat cat-${e.category}` }, e.category)), td(e.kind),
    td(e.detail, "detail"))));
}

function renderTokens(s) {
  fillBody("#tokens-table", s.join_tokens.map((k) => el("tr", { dataset: { token: k.id } },
    td(k.id), td(fmtTime(k.created)), td(k.revoked ? "revoked" : "valid"),
    el("td", {}, ...(k.revoked ? [] : [
      el("button", { class: "revoke", dataset: { token: k.id } }, "revoke"),
      // also ends the sessions this token admitted: those workers are refused from their next call
      el("button", { class: "revoke-end", dataset: { token: k.id } }, "revoke + end sessions")])))));
}

let last = null;
window.gptjtRenders = 0;
function render(s) {
  last = s;
  window.gptjtStatus = s;
  renderOverview(s);
  renderLiveness(s);
  renderVerification(s);
  renderPlots(s);
  renderStageMap(s);
  renderWorkers(s);
  renderLedger(s);
  renderEvents(s);
  renderTokens(s);
  window.gptjtRenders += 1;
}

// -- reading behind a token -------------------------------------------------------------
// With coordinator.read_access = "token" every data route answers 401 until the run's read
// token (or its admin token) comes with the request. EventSource cannot set headers, so the page
// keeps the token in a cookie the browser sends with each request to this site: SameSite=Strict
// (no other site's page makes the browser send it), Secure over https, no expiry (it ends with
// the browser session). It cannot be HttpOnly: this script sets it, so a script injected into
// the page could read it (the page renders volunteer-supplied text with textContent only).
const READ_COOKIE = "gptjt-read-token";
const readPrompt = $("#read-token-prompt");
function askForReadToken(message) {
  readPrompt.hidden = false;
  $("#read-token-error").textContent = message;
  const conn = $("#connection");
  conn.textContent = "read token needed";
  conn.classList.add("bad");
}
$("#read-token-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const token = $("#read-token").value.trim();
  if (!token) return;
  const secure = location.protocol === "https:" ? "; Secure" : "";
  document.cookie = `${READ_COOKIE}=${encodeURIComponent(token)}; Path=/; SameSite=Strict${secure}`;
  readPrompt.hidden = true;
  start();
});

// -- live updates -----------------------------------------------------------------------
let source = null;
function connect() {
  const conn = $("#connection");
  if (source) source.close();
  source = new EventSource("/api/stream");
  source.addEventListener("status", (e) => {
    conn.textContent = `live · ${new Date().toLocaleTimeString("en-GB", { hour12: false })}`;
    conn.classList.remove("bad");
    render(JSON.parse(e.data));
  });
  source.onerror = () => {
    conn.textContent = "coordinator unreachable: retrying…";
    conn.classList.add("bad");
    // EventSource retries a dropped connection itself, but gives up on an error reply (a 401):
    // then ask /api/status why, and show the token prompt if that is the reason.
    if (source.readyState === EventSource.CLOSED) setTimeout(start, 2000);
  };
}
// Renders the status; false (and the token prompt) when reading needs a token this page lacks.
async function refresh() {
  const reply = await fetch("/api/status", { cache: "no-store" });
  if (reply.status === 401) {
    askForReadToken((await reply.json()).error);
    return false;
  }
  if (reply.ok) render(await reply.json());
  return true;
}
async function start() {
  const allowed = await refresh().catch(() => true);  // unreachable: the stream keeps retrying
  if (allowed) connect();
}

// -- admin actions ----------------------------------------------------------------------
const tokenInput = $("#admin-token");
tokenInput.value = sessionStorage.getItem("gptjt-admin-token") || "";
tokenInput.addEventListener("change", () => sessionStorage.setItem("gptjt-admin-token", tokenInput.value.trim()));

async function admin(action, body = {}) {
  const out = $("#admin-result");
  const token = tokenInput.value.trim();
  const headers = { "Content-Type": "application/json" };
  if (token) headers.Authorization = `Bearer ${token}`;
  let reply, result;
  try {
    reply = await fetch(`/api/admin/${action}`, { method: "POST", headers, body: JSON.stringify(body) });
    result = await reply.json();
  } catch (err) {
    out.className = "result error";
    out.textContent = `${action}: the coordinator did not answer (${err})`;
    return;
  }
  if (!reply.ok) {
    out.className = "result error";
    out.dataset.status = reply.status;
    out.textContent = `${action} refused (${reply.status}): ${result.error}`;
    return;
  }
  out.className = "result ok";
  out.dataset.status = reply.status;
  if (action === "token-create") {
    out.replaceChildren("new join token (shown once): ", el("code", {}, result.token), ` id ${result.id}`);
  } else {
    out.textContent = `${action}: done ${JSON.stringify(result)}`;
  }
  await refresh();
}
$("#btn-pause").addEventListener("click", () => admin("pause"));
$("#btn-resume").addEventListener("click", () => admin("resume"));
$("#btn-token-create").addEventListener("click", () => admin("token-create"));
document.addEventListener("click", (e) => {
  const target = e.target;
  if (target.matches("button.drain")) admin("drain", { worker: target.dataset.worker });
  if (target.matches("button.revoke")) admin("token-revoke", { token: target.dataset.token });
  if (target.matches("button.revoke-end")) admin("token-revoke-and-end-sessions", { token: target.dataset.token });
});
$("#show-routine").addEventListener("change", () => last && renderEvents(last));

start();

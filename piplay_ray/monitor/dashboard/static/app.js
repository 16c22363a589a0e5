// piplay-ray evolution dashboard. Polls the run's JSON endpoints and redraws.
// Model-written text is untrusted: it only ever reaches the page through text nodes (el() below);
// this file never parses HTML strings.
"use strict";

const POLL_METRICS_MS = 3000, POLL_SUMMARY_MS = 5000, POLL_HEALTH_MS = 5000, POLL_TASKS_MS = 10000;
const COLORS = ["#2f6fdf", "#e0662c", "#2a9d4b", "#9b3fc8", "#c9a21a", "#d1335b", "#17a2b8"];

const PANELS = {
  "grid-losses": [
    ["loss/distill_kl", "Distillation KL (student ‖ teacher)"], ["loss/policy_kl", "Policy KL"],
    ["loss/entropy", "Entropy"], ["schedule/lambda", "λ (distillation weight)"],
    ["loss/clip_frac", "Clip fraction"],
    [["diag/kl_reasoning", "diag/kl_search", "diag/kl_answer"], "Teacher–student KL by segment"],
    [["diag/teacher_top1_agreement", "diag/answer_before_search", "diag/answer_only_in_teacher"],
      "Top-1 agreement, answers before search, answer only in teacher"],
    ["teacher/shortened_contexts", "Teacher contexts shortened"],
  ],
  "grid-rollout": [
    ["rollout/searches_per_traj", "Searches per trajectory"], ["rollout/answer_len", "Answer length"],
    [["examiner/gate_pass_rate", "examiner/gate_pass_rate_h1", "examiner/gate_pass_rate_h2",
      "examiner/gate_pass_rate_h3", "examiner/gate_pass_rate_h4"], "Gate pass rate by hop count"],
  ],
  "grid-throughput": [
    [["throughput/rollout_tokens_per_s", "throughput/learner_tokens_per_s"], "Tokens / s"],
    ["weight_sync/seconds", "Weight sync (s)"], ["replay/staleness", "Replay staleness (versions)"],
    ["learner/idle_frac", "Learner idle fraction"], ["search/tool_failures", "Search tool failures"],
  ],
};
const REWARDS = ["student/reward", "student/em", "examiner/difficulty_reward"];
const HIST_KEY = "examiner/solve_rate_hist";
const HIST_BINS = [  // k/n bins: unsolved, partially solved (four bands), always solved
  ["0", v => v <= 0], ["(0, ¼]", v => v > 0 && v <= 0.25], ["(¼, ½]", v => v > 0.25 && v <= 0.5],
  ["(½, ¾]", v => v > 0.5 && v <= 0.75], ["(¾, 1)", v => v > 0.75 && v < 1], ["1", v => v >= 1],
];

const state = {rows: [], offset: 0, charts: new Map(), keys: new Set(), tasks: [], selected: null,
  taskDetailKey: null};

// ------------------------------------------------------------------------------------------ DOM helpers

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "style") Object.assign(node.style, v);
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, String(v));
  }
  for (const c of children) {
    if (c === null || c === undefined) continue;
    node.appendChild(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

function clear(node) { while (node.firstChild) node.removeChild(node.firstChild); }

function fmt(v, digits = 3) {
  if (v === null || v === undefined || Number.isNaN(v)) return "–";
  if (typeof v !== "number") return String(v);
  if (Number.isInteger(v)) return String(v);
  const a = Math.abs(v);
  return a !== 0 && (a < 1e-3 || a >= 1e5) ? v.toExponential(2) : v.toFixed(digits);
}

async function getJSON(url) {
  const r = await fetch(url, {cache: "no-store"});
  if (!r.ok) throw new Error(url + ": HTTP " + r.status);
  return r.json();
}

function setStatus(ok, text) {
  const s = document.getElementById("status");
  s.className = "status " + (ok ? "live" : "down");
  s.textContent = text;
}

// ------------------------------------------------------------------------------------------ charts

function isNum(v) { return typeof v === "number" && Number.isFinite(v); }

// Aligned uPlot data for `keys` against x = `xkey` ("step" or "iteration"); per-iteration values are means.
function series(keys, xkey) {
  const acc = new Map();  // x -> key -> [sum, n] (mean) or last value per step
  for (const r of state.rows) {
    const x = r[xkey];
    if (!isNum(x)) continue;
    for (const k of keys) {
      if (!isNum(r[k])) continue;
      if (!acc.has(x)) acc.set(x, {});
      const slot = acc.get(x);
      if (xkey === "step") slot[k] = [r[k], 1];
      else { const s = slot[k] || [0, 0]; slot[k] = [s[0] + r[k], s[1] + 1]; }
    }
  }
  const xs = [...acc.keys()].sort((a, b) => a - b);
  const data = [xs];
  let points = 0;
  for (const k of keys) {
    const ys = xs.map(x => { const s = acc.get(x)[k]; return s ? s[0] / s[1] : null; });
    points += ys.filter(v => v !== null).length;
    data.push(ys);
  }
  return {data, points};
}

function chartWidth(node) { return Math.max(240, (node.clientWidth || 360) - 4); }

// Axis ranges from the data, padded a little (uPlot's own would give a lone point a 0–100 axis);
// `lone` is the half-width around a single value.
function fitRange(min, max, pad, lone) {
  if (!isNum(min) || !isNum(max)) return [0, 1];
  if (max > min) return [min - (max - min) * pad, max + (max - min) * pad];
  return [min - lone(min), max + lone(max)];
}
const yRange = (u, min, max) => fitRange(min, max, 0.08, v => Math.abs(v) * 0.1 || 0.5);

function drawChart(node, keys, title, xkey) {
  const {data, points} = series(keys, xkey);
  node.dataset.points = String(points);
  node.dataset.series = keys.join(",");
  node.classList.toggle("nodata", points === 0);
  let entry = state.charts.get(node.id);
  if (!entry) {
    clear(node);
    node.appendChild(el("div", {class: "title"}, title));
    entry = {plot: null};
    state.charts.set(node.id, entry);
  }
  if (points === 0) return;
  if (!entry.plot) {
    const opts = {
      width: chartWidth(node), height: 170,
      scales: {x: {time: false}, y: {range: yRange}},
      hooks: {setScale: [(u, key) => {  // the drawn ranges, for tests and curious readers of the DOM
        node.dataset[key + "Range"] = fmt(u.scales[key].min, 4) + "," + fmt(u.scales[key].max, 4);
      }]},
      axes: [{label: xkey, incrs: [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000]}, {size: 56}],
      series: [{label: xkey}].concat(keys.map((k, i) => ({
        label: k, stroke: COLORS[i % COLORS.length], width: 1.5, spanGaps: true,
        points: {show: xkey === "iteration" || data[0].length < 40, size: 5},
      }))),
      legend: {live: true},
    };
    entry.plot = new uPlot(opts, data, node);
  } else {
    entry.plot.setData(data);
  }
  // x is set outright: uPlot skips a range function for a lone x value (it would give [0, 2x])
  const xs = data[0];
  const [min, max] = fitRange(xs[0], xs[xs.length - 1], 0, () => 1);
  entry.plot.setScale("x", {min, max});
}

function chartNode(gridId, id) {
  let node = document.getElementById(id);
  if (!node) {
    node = el("div", {class: "chart", id});
    document.getElementById(gridId).appendChild(node);
  }
  return node;
}

function chartId(keys) { return "chart-" + keys[0].replace(/[^a-zA-Z0-9]+/g, "-"); }

function resizeCharts(root) {
  for (const node of root.querySelectorAll(".chart")) {
    const entry = state.charts.get(node.id);
    if (entry && entry.plot) entry.plot.setSize({width: chartWidth(node), height: 170});
  }
}

// The collapsible group (<details>, closed until opened) of the other metrics in namespace `ns`; its grid's id.
function otherGroup(ns, count) {
  const id = "ns-" + ns.replace(/[^a-zA-Z0-9]+/g, "-");
  let det = document.getElementById(id);
  if (!det) {
    const grid = el("div", {class: "grid3", id: id + "-grid"});
    det = el("details", {class: "ns", id, "data-ns": ns}, el("summary", {}, ns, el("span", {class: "count"})), grid);
    det.addEventListener("toggle", () => { if (det.open) resizeCharts(grid); });
    const root = document.getElementById("other-groups");
    const next = [...root.children].find(d => d.dataset.ns > ns);  // keep the namespaces sorted
    root.insertBefore(det, next || null);
  }
  det.querySelector(".count").textContent = ` · ${count} chart${count === 1 ? "" : "s"}`;
  return id + "-grid";
}

function drawAllCharts() {
  drawChart(document.getElementById("chart-rewards"), REWARDS, "Reward / EM per learner step", "step");
  drawChart(document.getElementById("chart-rewards-iter"), REWARDS, "Reward / EM per iteration (mean)",
    "iteration");
  const known = new Set(REWARDS.concat([HIST_KEY]));
  for (const [grid, specs] of Object.entries(PANELS)) {
    for (const [k, title] of specs) {
      const keys = Array.isArray(k) ? k : [k];
      keys.forEach(x => known.add(x));
      drawChart(chartNode(grid, chartId(keys)), keys, title, "step");
    }
  }
  // anything the driver logs that no panel names (eval/*, new metrics) still gets a chart
  // grouped by namespace (the part before the first "/"), each group collapsed until opened
  const other = [...state.keys].filter(k => !known.has(k)).sort();
  document.getElementById("panel-other").hidden = other.length === 0;
  const groups = new Map();
  for (const k of other) {
    const ns = k.includes("/") ? k.slice(0, k.indexOf("/")) : "other";
    groups.set(ns, (groups.get(ns) || []).concat([k]));
  }
  for (const [ns, keys] of groups) {
    const grid = otherGroup(ns, keys.length);
    for (const k of keys) drawChart(chartNode(grid, chartId([k])), [k], k, "step");
  }
}

// ------------------------------------------------------------------------------------------ run summary

function withSE(v, se) { return fmt(v) + (isNum(se) ? " ± " + fmt(se) : ""); }

// How each held-out set is named: the natural questions are the headline, the rule-built ones check the protocol.
const SET_NAMES = {natural: "natural-question EM ", rule: "rule-built EM (protocol check) ", overall: "held-out EM "};

function pairedText(c) {
  return `paired by question ${c.delta >= 0 ? "+" : ""}${fmt(c.delta)} ± ${fmt(c.se)}, ` +
    `${c.gained} gained, ${c.lost} lost (n = ${c.n})`;
}

// The story first: the headline set's EM before → after (± standard error, n, the change paired by question),
// the other sets, then each target met or missed.
function renderSummary(s) {
  const root = document.getElementById("summary");
  clear(root);
  root.className = "summary";
  const before = isNum(s.em_before), after = isNum(s.em_after);
  const em = el("div", {class: "em", id: "summary-em", "data-before": before ? s.em_before : null,
    "data-after": after ? s.em_after : null, "data-n": isNum(s.eval_n) ? s.eval_n : null,
    "data-set": s.eval_set || null}, SET_NAMES[s.eval_set] || `${s.eval_set || "held-out"} EM `);
  if (!before && !after) em.appendChild(el("span", {class: "empty"}, "not evaluated yet"));
  if (before) em.appendChild(el("span", {class: "em-before"}, withSE(s.em_before, s.em_before_se)));
  if (before) em.appendChild(el("span", {class: "hint"}, " before training"));
  if (before || after) em.appendChild(document.createTextNode(" → "));
  if (after) {
    const cls = "em-after" + (before ? (s.em_after > s.em_before ? " up" : " flat") : "");
    em.appendChild(el("span", {class: cls}, withSE(s.em_after, s.em_after_se)));
    em.appendChild(el("span", {class: "hint"}, " " + (s.eval_after || "after")));
  } else if (before) {
    em.appendChild(el("span", {class: "empty"}, "after training: not yet"));
  }
  if (isNum(s.eval_n)) em.appendChild(el("span", {class: "hint"}, ` (n = ${s.eval_n})`));
  root.appendChild(em);
  if (s.em_change) root.appendChild(el("div", {class: "hint", id: "summary-paired"}, pairedText(s.em_change)));
  for (const [group, e] of Object.entries(s.eval_sets || {}).slice(1)) {
    const parts = ["before", "after"].filter(k => e[k]).map(k => `${k} ${withSE(e[k].em, e[k].se)}`);
    const n = (e.after || e.before || {}).n;
    root.appendChild(el("div", {class: "hint", "data-set": group},
      (SET_NAMES[group] || `${group} EM `) + parts.join(" → ") + (isNum(n) ? ` (n = ${n})` : "") +
      (e.change ? " · " + pairedText(e.change) : "")));
  }

  const body = el("tbody");
  for (const [key, t] of Object.entries(s.targets || {})) {
    const measured = isNum(t.value);
    const status = !measured ? "not measured yet" : t.met ? "met" : "missed";
    body.appendChild(el("tr", {"data-target": key, "data-met": measured ? String(Boolean(t.met)) : null},
      el("td", {}, t.what || key), el("td", {class: "num"}, fmt(t.value)),
      el("td", {class: "num"}, (key === "em_gain" ? "> " : "≥ ") + fmt(t.target)),
      el("td", {class: "status " + (measured ? (t.met ? "met" : "missed") : "empty")}, status)));
  }
  root.appendChild(el("table", {id: "summary-targets"},
    el("thead", {}, el("tr", {}, el("th", {}, "target"), el("th", {}, "value"), el("th", {}, "goal"),
      el("th", {}, ""))), body));
  root.appendChild(el("div", {class: "hint", id: "summary-training"},
    `training: student reward ${fmt(s.student_reward)} · answer rate ${fmt(s.train_answer_rate)} · ` +
    `searches per trajectory ${fmt(s.train_searches_per_traj)}`));
}

async function pollSummary() {
  let s;
  try { s = await getJSON("/api/summary"); } catch (e) { return; }  // the status line reports connectivity
  renderSummary(s);
}

// ------------------------------------------------------------------------------------------ solve rates

function drawSolveHist() {
  const perIter = new Map();
  for (const r of state.rows) {
    if (!Array.isArray(r[HIST_KEY])) continue;
    const counts = perIter.get(r.iteration) || new Array(HIST_BINS.length).fill(0);
    for (const v of r[HIST_KEY]) {
      if (!isNum(v)) continue;
      const b = HIST_BINS.findIndex(([, test]) => test(v));
      if (b >= 0) counts[b] += 1;
    }
    perIter.set(r.iteration, counts);
  }
  const root = document.getElementById("solve-hist");
  clear(root);
  if (perIter.size === 0) { root.className = "empty"; root.textContent = "no solve rates yet"; return; }
  root.className = "";
  const head = el("tr", {}, el("th", {}, "iteration"), el("th", {}, "tasks"),
    ...HIST_BINS.map(([label]) => el("th", {}, "k/n " + label)), el("th", {}, "0 < k < n"));
  const body = el("tbody");
  for (const it of [...perIter.keys()].sort((a, b) => a - b)) {
    const counts = perIter.get(it);
    const total = counts.reduce((a, b) => a + b, 0) || 1;
    const frontier = counts.slice(1, -1).reduce((a, b) => a + b, 0);
    body.appendChild(el("tr", {"data-iteration": it}, el("td", {}, it), el("td", {}, total),
      ...counts.map(c => el("td", {class: "cell", "data-count": c,
        style: {background: `rgba(47,111,223,${(0.08 + 0.8 * c / total).toFixed(3)})`}},
        `${Math.round(100 * c / total)}% (${c})`)),
      el("td", {}, `${Math.round(100 * frontier / total)}%`)));
  }
  root.appendChild(el("table", {}, el("thead", {}, head), body));
}

// ------------------------------------------------------------------------------------------ polling

let metricsBusy = false;
async function pollMetrics() {
  if (metricsBusy) return;  // a slow poll must not overlap the next one (rows would repeat)
  metricsBusy = true;
  try {
    for (let guard = 0; guard < 50; guard++) {
      const res = await getJSON("/api/metrics?offset=" + state.offset);
      if (res.reset) { state.rows = []; state.keys.clear(); }
      for (const r of res.rows) {
        state.rows.push(r);
        for (const k of Object.keys(r)) {
          if (!["time", "iteration", "phase", "step"].includes(k) && k !== HIST_KEY) state.keys.add(k);
        }
      }
      state.offset = res.next;
      if (!res.more) break;
    }
    drawAllCharts();
    drawSolveHist();
    const last = state.rows[state.rows.length - 1];
    setStatus(true, last ? `live · ${state.rows.length} records · iteration ${last.iteration} · step ` +
      `${last.step} (${last.phase}) · ${new Date().toLocaleTimeString()}` : "live · no metrics yet");
  } catch (e) {
    setStatus(false, "dashboard server unreachable: " + e.message);
  } finally {
    metricsBusy = false;
  }
}

async function pollHealth() {
  let h;
  try { h = await getJSON("/api/health"); } catch (e) { return; }
  const body = document.querySelector("#health tbody");
  clear(body);
  const names = Object.keys(h.actors || {}).sort();
  if (names.length === 0) body.appendChild(el("tr", {}, el("td", {colspan: 4, class: "empty"}, "no actor reports yet")));
  for (const name of names) {
    const a = h.actors[name] || {};
    body.appendChild(el("tr", {"data-actor": name},
      el("td", {}, name),
      el("td", {class: a.alive ? "alive-yes" : "alive-no"}, a.alive ? "alive" : "dead"),
      el("td", {}, fmt(a.restarts)),
      el("td", {class: "err"}, a.last_error || "")));
  }
  document.getElementById("health-updated").textContent =
    isNum(h.updated) ? "updated " + new Date(h.updated * 1000).toLocaleString() : "";
}

async function pollRun() {
  try {
    const run = await getJSON("/api/run");
    document.getElementById("run-name").textContent = run.name;
    document.title = "piplay-ray · " + run.name;
  } catch (e) { /* the status line reports connectivity */ }
}

// ------------------------------------------------------------------------------------------ task browser

function wantedTask() {
  const m = /(?:^#|&)task=([^&]*)/.exec(location.hash);
  return m ? decodeURIComponent(m[1]) : null;
}

async function pollTasks() {
  let res;
  try { res = await getJSON("/api/tasks"); } catch (e) { return; }
  state.tasks = res.tasks || [];
  const sel = document.getElementById("iter-filter");
  const have = new Set([...sel.options].map(o => o.value));
  for (const it of res.iterations || []) {
    if (!have.has(String(it))) sel.appendChild(el("option", {value: it}, "iteration " + it));
  }
  renderTaskList();
  if (state.selected === null && state.tasks.length) {
    const want = wantedTask();
    const pick = state.tasks.find(t => t.id === want) || state.tasks.find(t => t.samples > 0) || state.tasks[0];
    selectTask(pick.id);
  } else if (state.selected !== null) {
    selectTask(state.selected, true);  // new samples for the open task show up live
  }
}

function renderTaskList() {
  const filter = document.getElementById("iter-filter").value;
  const list = document.getElementById("task-list");
  clear(list);
  for (const t of state.tasks) {
    if (filter !== "" && String(t.iteration) !== filter) continue;
    const meta = `iter ${t.iteration} · ${t.hops ?? "?"} hop · ${t.samples} samples` +
      (t.mean_reward !== null ? ` · solved ${fmt(t.mean_reward, 2)}` : "") + (t.valid === false ? " · gate failed" : "");
    list.appendChild(el("li", {class: t.id === state.selected ? "sel" : null, "data-task": t.id,
      onclick: () => selectTask(t.id)}, el("div", {}, t.question || "(empty question)"), el("div", {class: "meta"}, meta)));
  }
}

async function selectTask(id, refresh = false) {
  let res;
  try { res = await getJSON("/api/task?id=" + encodeURIComponent(id)); } catch (e) { return; }
  const key = id + ":" + res.samples.length;
  if (refresh && key === state.taskDetailKey) return;
  state.selected = id;
  state.taskDetailKey = key;
  for (const li of document.querySelectorAll("#task-list li")) li.classList.toggle("sel", li.dataset.task === id);
  renderTask(res.task, res.samples);
}

function renderTask(task, samples) {
  const root = document.getElementById("task-detail");
  clear(root);
  root.className = "";
  root.dataset.task = task.id;
  const src = task.source || {};
  const flags = Object.entries(task.flags || {}).map(([k, v]) => `${k}: ${v ? "ok" : "FAILED"}`).join(", ");
  root.appendChild(el("div", {class: "kv"},
    el("div", {class: "k"}, "question"), el("div", {class: "question"}, task.question || ""),
    el("div", {class: "k"}, "answer"), el("div", {class: "answer"}, task.answer || ""),
    el("div", {class: "k"}, "hop target"), el("div", {}, task.hops ?? "?"),
    el("div", {class: "k"}, "iteration"), el("div", {}, task.iteration ?? "?"),
    el("div", {class: "k"}, "source doc"), el("div", {}, src.title || src.id || ""),
    el("div", {class: "k"}, "gates"), el("div", {}, flags || "–")));

  const qcp = task.qcp || [];
  root.appendChild(el("h3", {}, `Question construction path (${qcp.length} hops)`));
  const ol = el("ol", {class: "qcp"});
  for (const hop of qcp) {
    const li = el("li", {class: "qcp-hop" + (hop.ok === false ? " failed" : "")},
      el("span", {class: "query"}, hop.query || ""), hop.ok === false ? el("span", {class: "bad"}, " failed: " + (hop.error || "")) : null);
    for (const d of hop.docs || []) {
      const text = (d.contents || "").slice(0, 240);
      li.appendChild(el("div", {class: "doc"}, el("b", {}, d.title || d.id || ""), " — " + text + (text.length === 240 ? "…" : "")));
    }
    ol.appendChild(li);
  }
  if (!qcp.length) ol.appendChild(el("li", {class: "empty"}, "no search hops recorded"));
  root.appendChild(ol);

  const students = samples.filter(s => s.role === "student");
  root.appendChild(el("h3", {}, `Student trajectories (${students.length})`));
  const kls = students.flatMap(s => (s.token_kl || []).filter(isNum)).sort((a, b) => a - b);
  const scale = kls.length ? Math.max(kls[Math.floor(0.95 * (kls.length - 1))], 1e-6) : 1;
  root.appendChild(el("div", {class: "legend"}, "token colour = teacher–student KL: 0 ", el("span", {class: "swatch"}),
    ` ≥ ${fmt(scale)} (95th pct) · grey italics = retrieved text (not trained) · hover a token for its KL`));
  for (const s of students) root.appendChild(renderTrajectory(s, scale));
  if (!students.length) root.appendChild(el("div", {class: "empty"}, "no student samples for this task yet"));
  const examiner = samples.filter(s => s.role === "examiner");
  if (examiner.length) {
    root.appendChild(el("h3", {}, "Examiner trajectory"));
    for (const s of examiner) root.appendChild(renderTrajectory(s, scale));
  }
}

function renderTrajectory(s, scale) {
  const t = s.trajectory || {};
  const good = isNum(s.reward) && s.reward > 0;
  const head = el("div", {class: "head"}, `${s.role} · step ${s.step} · v${t.version ?? "?"} · reward `,
    el("span", {class: good ? "ok" : "bad"}, fmt(s.reward, 2)),
    ` · ${t.finish_reason || "?"} · ${(t.hops || []).length} searches · answer: `,
    el("span", {class: "traj-answer"}, t.answer === null || t.answer === undefined ? "(none)" : t.answer));
  const body = el("div", {class: "tokens"});
  const toks = Array.isArray(s.tokens) ? s.tokens : null;
  if (toks && toks.length) {
    const kl = Array.isArray(s.token_kl) ? s.token_kl : [];
    toks.forEach((tok, i) => {
      const v = kl[i];
      if (isNum(v)) {
        const a = Math.min(1, v / scale) * 0.85;
        body.appendChild(el("span", {class: "tok", "data-kl": v.toPrecision(4), title: "KL " + fmt(v, 4),
          style: {backgroundColor: `rgba(220,40,40,${a.toFixed(3)})`}}, tok));
      } else {
        body.appendChild(el("span", {class: "tok env"}, tok));
      }
    });
  } else {
    body.appendChild(document.createTextNode(t.text || ""));
  }
  return el("div", {class: "traj", "data-reward": s.reward}, head, body);
}

// ------------------------------------------------------------------------------------------ start

document.getElementById("iter-filter").addEventListener("change", renderTaskList);
window.addEventListener("hashchange", () => { const w = wantedTask(); if (w) selectTask(w); });
window.addEventListener("resize", () => resizeCharts(document));
pollRun();
pollSummary();
pollMetrics();
pollHealth();
pollTasks();
setInterval(pollMetrics, POLL_METRICS_MS);
setInterval(pollSummary, POLL_SUMMARY_MS);
setInterval(pollHealth, POLL_HEALTH_MS);
setInterval(pollTasks, POLL_TASKS_MS);

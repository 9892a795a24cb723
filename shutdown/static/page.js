// The shutdown demo's live page. Plain JavaScript, no build step, no third-party code:
// it polls the app's JSON endpoints and redraws. It keeps nothing in storage; the
// shutdown token lives in its input box until the stop request, which alone carries it.
"use strict";
(() => {
  const $ = (id) => document.getElementById(id);
  const el = (tag, props = {}, ...children) => {
    const node = Object.assign(document.createElement(tag), props);
    node.append(...children);
    return node;
  };
  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
  const PALETTE = ["#1565c0", "#6a1b9a", "#00838f", "#ef6c00", "#ad1457", "#4e342e", "#283593", "#558b2f"];
  const colours = new Map();
  function colour(executor) {
    if (!executor) return "";
    if (!colours.has(executor)) {
      const m = /(\d+)$/.exec(executor);
      colours.set(executor, PALETTE[(m ? Number(m[1]) : colours.size) % PALETTE.length]);
    }
    return colours.get(executor);
  }
  const chip = (executor) => el("span", {className: "chip", textContent: executor || "–"},);
  function paint(node, executor) {
    node.style.backgroundColor = colour(executor);
  }

  // --- connection: every request reports whether the server answered ---------------
  let online = null;
  let outages = 0;
  const marks = []; // {t, up}: when the page lost / found the server again
  function setOnline(up) {
    if (up === online) return;
    if (!up && online === true) {
      outages += 1;
      marks.push({t: Date.now(), up: false});
    }
    if (up && online === false && outages) marks.push({t: Date.now(), up: true});
    online = up;
    const c = $("conn");
    c.dataset.state = up ? "online" : "offline";
    c.dataset.outages = String(outages);
    c.textContent = up
      ? (outages ? `online (reconnected after ${outages} outage${outages > 1 ? "s" : ""})` : "online")
      : "server unreachable: reconnecting…";
  }

  async function api(path, options = {}) {
    const abort = new AbortController();
    const timer = setTimeout(() => abort.abort(), 15000);
    try {
      const resp = await fetch(path, {...options, signal: abort.signal, cache: "no-store", credentials: "omit"});
      setOnline(true);
      return resp;
    } catch (err) {
      setOnline(false);
      throw err;
    } finally {
      clearTimeout(timer);
    }
  }
  async function getJSON(path) {
    const resp = await api(path);
    if (!resp.ok) throw new Error(`${path}: ${resp.status}`);
    return resp.json();
  }
  function detail(body) {
    const d = body && body.detail;
    if (typeof d === "string") return d;
    if (Array.isArray(d)) return d.map((e) => `${(e.loc || []).slice(-1)[0]}: ${e.msg}`).join("; ");
    return "";
  }

  // --- the start form, built from the app's OpenAPI schema of POST /trigger_async ----
  async function buildForm() {
    const spec = await getJSON("/openapi.json");
    const resolve = (s) => {
      const ref = s && s.$ref;
      return ref ? resolve(ref.split("/").slice(1).reduce((o, k) => (o || {})[k], spec)) : s || {};
    };
    const op = ((spec.paths || {})["/trigger_async"] || {}).post || {};
    const box = $("trigger-fields");
    box.replaceChildren();
    for (const p of op.parameters || []) {
      if (p.in !== "query") continue;
      let s = resolve(p.schema);
      const variants = (s.anyOf || []).map(resolve).filter((v) => v.type !== "null");
      if (variants.length === 1) s = {...variants[0], default: s.default};
      let input;
      if (s.enum) {
        input = el("select");
        if (s.default === undefined || s.default === null) input.append(el("option", {value: "", textContent: "(default)"}));
        for (const v of s.enum) input.append(el("option", {value: String(v), textContent: String(v)}));
      } else {
        input = el("input", {type: s.type === "integer" || s.type === "number" ? "number" : "text"});
        if (s.minimum !== undefined) input.min = s.minimum;
        if (s.maximum !== undefined) input.max = s.maximum;
      }
      if (s.default !== undefined && s.default !== null) input.value = String(s.default);
      Object.assign(input, {name: p.name, id: `param-${p.name}`, title: p.description || ""});
      box.append(el("label", {textContent: `${p.name} `, title: p.description || ""}, input));
    }
  }

  // One Idempotency-Key per click: a retry of the click's request (its answer lost)
  // gets the same fan-out back (200) instead of starting a second one.
  function newKey() {
    if (crypto.randomUUID) return crypto.randomUUID();
    return Array.from(crypto.getRandomValues(new Uint8Array(16)), (b) => b.toString(16).padStart(2, "0")).join("");
  }
  function triggerText(resp, body) {
    if (resp.status === 202) return `started ${body.workflow_id}`;
    if (resp.status === 200) return `already started ${body.workflow_id} (same request)`;
    if (resp.status === 429) return `refused, overloaded: ${detail(body)} (retry in ${resp.headers.get("Retry-After")} s)`;
    if (resp.status === 409) return `refused: ${detail(body)}`;
    return `${resp.status}: ${detail(body)}`;
  }

  $("trigger").addEventListener("click", async () => {
    const query = new URLSearchParams();
    for (const f of $("trigger-fields").querySelectorAll("input, select")) {
      if (f.value !== "") query.set(f.name, f.value);
    }
    const out = $("trigger-result");
    const headers = {"Idempotency-Key": newKey()};
    for (let attempt = 1; attempt <= 2; attempt++) {
      try {
        const resp = await api(`/trigger_async?${query}`, {method: "POST", headers});
        const body = await resp.json().catch(() => ({}));
        out.dataset.status = String(resp.status);
        out.dataset.refused = String(resp.status === 429 || resp.status === 409);
        out.textContent = triggerText(resp, body);
        if (resp.ok) {
          choose(body.workflow_id);
          refreshFanouts().catch(() => {});
        }
        return;
      } catch (err) {
        out.textContent = attempt < 2 ? "no answer from the server: retrying with the same key" : "no answer from the server";
      }
    }
  });

  // --- recent fan-outs -----------------------------------------------------------------
  let chosen = null;
  function choose(id) {
    if (id === chosen) return;
    chosen = id;
    seen.clear();
    earlier.clear();
    $("fanout-id").textContent = id;
    $("grid").replaceChildren();
    for (const li of $("fanouts").children) li.classList.toggle("chosen", li.dataset.workflowId === id);
  }
  async function refreshFanouts() {
    const list = await getJSON("/fanouts?limit=10");
    $("fanouts").replaceChildren(...list.map((f) => {
      const li = el("li", {}, el("span", {className: "st", textContent: f.status}),
        `${f.workflow_id} steps=${f.steps} max_n=${f.max_n}${f.mode ? ` ${f.mode}` : ""}`);
      li.dataset.workflowId = f.workflow_id;
      li.dataset.status = f.status;
      li.classList.toggle("chosen", f.workflow_id === chosen);
      li.addEventListener("click", () => choose(f.workflow_id));
      return li;
    }));
    if (!chosen && list.length) choose(list[0].workflow_id);
  }

  // --- the chosen fan-out: grid and timeline ---------------------------------------------
  const seen = new Map(); // step index -> the last answer's step
  const earlier = new Map(); // step index -> earlier dispatches seen: [{start, end, executor}]
  function remember(s) {
    const prev = seen.get(s.index);
    if (prev && prev.started_at && prev.status === "PENDING" && s.started_at !== prev.started_at) {
      // It was running and was dispatched again: the earlier run ended at the last outage.
      const lost = marks.filter((m) => !m.up && m.t >= prev.started_at).map((m) => m.t);
      const runs = earlier.get(s.index) || [];
      runs.push({start: prev.started_at, end: lost.length ? lost[0] : Date.now(), executor: prev.executor_id});
      earlier.set(s.index, runs);
    }
    seen.set(s.index, s);
  }

  function renderSteps(v) {
    const box = $("fanout");
    box.dataset.workflowId = v.workflow_id;
    const sum = $("fanout-summary");
    Object.assign(sum.dataset, {status: v.status, done: v.done, total: v.total, rerun: v.rerun});
    sum.textContent = `${v.status}: ${v.done} of ${v.total} steps done` +
      (v.max_n !== null ? `, max_n ${v.max_n}` : "") + (v.mode ? `, executor=${v.mode}` : "") +
      `; ${v.rerun} step${v.rerun === 1 ? "" : "s"} ran again after a recovery` +
      (v.attempts > 1 ? `; the fan-out itself was recovered ${v.attempts - 1}×` : "");
    for (const li of $("fanouts").children) {
      if (li.dataset.workflowId === v.workflow_id && li.dataset.status !== v.status) {
        li.dataset.status = v.status;
        li.firstChild.textContent = v.status;
      }
    }
    $("progress-bar").style.width = `${v.total ? (100 * v.done) / v.total : 0}%`;

    const grid = $("grid");
    if (grid.children.length !== v.steps.length) {
      grid.replaceChildren(...v.steps.map((s) => el("div", {className: "cell", textContent: String(s.index)})));
    }
    const executors = new Set();
    v.steps.forEach((s, i) => {
      remember(s);
      const cell = grid.children[i];
      const ran = s.status === "PENDING" || s.status === "SUCCESS" || s.status === "ERROR";
      // ENQUEUED after a dispatch: a recovery put it back on the queue, to run again.
      const again = s.status === "ENQUEUED" && s.attempts >= 1;
      cell.className = `cell s-${s.status}${s.attempts > 1 ? " rerun" : ""}${again ? " again" : ""}`;
      Object.assign(cell.dataset, {index: s.index, status: s.status, executor: s.executor_id || "", attempts: s.attempts});
      paint(cell, ran ? s.executor_id : "");
      cell.title = `step ${s.index}: ${s.status}${s.executor_id ? ` on ${s.executor_id}` : ""}, dispatched ${s.attempts}×`;
      if (ran && s.executor_id) executors.add(s.executor_id);
      for (const r of earlier.get(s.index) || []) if (r.executor) executors.add(r.executor);
    });
    const legend = $("legend");
    const workers = [...executors].sort();
    if (legend.dataset.workers !== workers.join(" ")) {
      legend.dataset.workers = workers.join(" ");
      legend.replaceChildren("workers: ", ...workers.map((e) => {
        const c = chip(e);
        paint(c, e);
        return c;
      }));
    }
    renderGantt(v);
  }

  function renderGantt(v) {
    const now = Date.now();
    const t0 = v.created_at || now;
    let t1 = v.completed_at || now;
    for (const s of v.steps) t1 = Math.max(t1, s.completed_at || 0);
    const span = Math.max(t1 - t0, 1);
    const x = (t) => `${(100 * Math.min(Math.max(t - t0, 0), span)) / span}%`;
    const w = (a, b) => `${(100 * Math.max(Math.min(b, t1) - Math.max(a, t0), 0)) / span}%`;
    const rows = v.steps.map((s) => {
      const row = el("div", {className: "row", title: `step ${s.index}`});
      for (const r of earlier.get(s.index) || []) {
        row.append(el("div", {className: "bar earlier", title: `step ${s.index}: interrupted run on ${r.executor}`}));
        Object.assign(row.lastChild.style, {left: x(r.start), width: w(r.start, r.end)});
      }
      if (s.started_at) {
        const bar = el("div", {className: `bar s-${s.status}${s.attempts > 1 ? " rerun" : ""}`});
        Object.assign(bar.style, {left: x(s.started_at), width: w(s.started_at, s.completed_at || now)});
        paint(bar, s.executor_id);
        row.append(bar);
      }
      return row;
    });
    const lines = marks.filter((m) => m.t >= t0 && m.t <= t1).map((m) => {
      const line = el("div", {className: `mark${m.up ? " up" : ""}`, title: m.up ? "server back" : "server lost"});
      line.style.left = x(m.t);
      return line;
    });
    const axis = el("div", {className: "axis"},
      el("span", {textContent: "0 s (fan-out started)"}),
      el("span", {textContent: `${(span / 1000).toFixed(1)} s`}));
    const gantt = $("gantt");
    gantt.style.setProperty("--row", `${Math.max(1, Math.min(6, Math.floor(600 / Math.max(v.steps.length, 1))))}px`);
    gantt.replaceChildren(axis, ...rows, ...lines);
  }

  // --- the schedule ------------------------------------------------------------------------
  async function refreshSlots() {
    const list = await getJSON("/schedule/slots?limit=12");
    $("slots").replaceChildren(...list.map((s) => {
      const planned = Date.parse(s.scheduled_time);
      const late = s.started_at && planned ? `${((s.started_at - planned) / 1000).toFixed(1)} s` : "";
      const c = chip(s.executor_id);
      paint(c, s.started_at ? s.executor_id : "");
      const tr = el("tr", {}, el("td", {textContent: s.scheduled_time}), el("td", {textContent: s.status}),
        el("td", {}, c), el("td", {textContent: late}));
      Object.assign(tr.dataset, {workflowId: s.workflow_id, status: s.status, executor: s.executor_id || ""});
      return tr;
    }));
  }

  // --- stopping the server: the token goes in this one request's header only -------------
  async function stop(mode) {
    const box = $("token");
    const out = $("stop-result");
    const token = box.value;
    box.value = "";
    if (!token) {
      out.textContent = "type the SHUTDOWN_TOKEN first";
      return;
    }
    try {
      const resp = await fetch(`/shutdown?mode=${mode}`, {
        method: "POST", headers: {Authorization: `Bearer ${token}`}, cache: "no-store", credentials: "omit",
      });
      const body = await resp.json().catch(() => ({}));
      out.dataset.status = String(resp.status);
      out.textContent = resp.ok ? `${mode}: ${body.status} (${body.executor_id})` : `${resp.status}: ${detail(body)}`;
    } catch (err) {
      out.textContent = `${mode}: no answer`;
    }
  }
  $("graceful").addEventListener("click", () => stop("graceful"));
  $("crash").addEventListener("click", () => stop("crash"));
  $("stop-form").addEventListener("submit", (event) => event.preventDefault()); // Enter: no request

  // --- polling loops: each waits for its answer, then sleeps; errors mean "offline" --------
  async function loop(fn, ms) {
    for (;;) {
      try {
        await fn();
      } catch (err) {
        // shown by the connection badge; try again
      }
      await sleep(online === false ? 1000 : typeof ms === "function" ? ms() : ms);
    }
  }
  loop(async () => {
    if (!$("trigger-fields").children.length) await buildForm();
  }, 3000);
  loop(refreshFanouts, 2000);
  loop(refreshSlots, 2500);
  let stepsEvery = 500; // ms; longer for big fan-outs (up to 2 s for 500 steps)
  loop(async () => {
    if (!chosen) return;
    const v = await getJSON(`/workflows/${encodeURIComponent(chosen)}/steps`);
    stepsEvery = Math.max(500, 4 * v.total);
    if (v.workflow_id === chosen) renderSteps(v);
  }, () => stepsEvery);
})();

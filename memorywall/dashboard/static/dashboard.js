// memorywall dashboard: fetches api/snapshot every interval and draws one column per worker.
// Plain JavaScript, no framework and no build step. Every value element carries
// data-worker and data-metric attributes (the end-to-end test reads them from the DOM).
"use strict";

// What each row shows: the figure (and an optional second one), how to print it, and
// which history series its sparkline draws.
const ROWS = [
  { label: "tokens/s, all users", key: "tokens_per_s", fmt: rate },
  { label: "tokens/s per user", key: "tokens_per_s_per_user", fmt: rate },
  { label: "tokens/s per device", key: "tokens_per_s_per_device", fmt: rate, spark: "tokens_per_s" },
  { label: "TTFT p50 / p99", key: "ttft_p50_s", second: "ttft_p99_s", fmt: ms },
  { label: "ITL mean / p99", key: "itl_mean_s", second: "itl_p99_s", fmt: ms },
  { label: "batch running / waiting", key: "running", second: "waiting", fmt: count },
  { label: "KV cache used", key: "kv_usage", fmt: percent },
  { label: "power / rated", key: "power_w", second: "rated_power_w", fmt: watts },
  { label: "energy per token", key: "energy_per_token_j", fmt: joules },
  { label: "emulation lag p99 / stall", key: "lag_p99_s", second: "stall_share", fmt: ms,
    secondFmt: percent },
];

let intervalMs = 1000;
let updates = 0;

function sig(x, digits = 3) {
  if (x === 0) return "0";
  const a = Math.abs(x);
  if (a >= 10 ** digits) return Math.round(x).toLocaleString("en-US");
  return Number(x.toPrecision(digits)).toString();
}
function unit(text, u) { return [text, u]; }
function rate(x) { return unit(sig(x), "tok/s"); }
function ms(x) { return unit(sig(x * 1000), "ms"); }
function count(x) { return unit(String(Math.round(x)), ""); }
function percent(x) { return unit(sig(x * 100), "%"); }
function watts(x) { return x >= 1000 ? unit(sig(x / 1000), "kW") : unit(sig(x), "W"); }
function joules(x) { return x < 1 ? unit(sig(x * 1000), "mJ/tok") : unit(sig(x), "J/tok"); }

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

function valueSpan(worker, key, cls) {
  const s = el("span", cls);
  s.dataset.worker = worker;
  s.dataset.metric = key;
  return s;
}

function setValue(span, x, fmt) {
  if (x === null || x === undefined) {
    span.textContent = "—";
    return;
  }
  const [text, u] = typeof x === "boolean" ? [String(x), ""] : fmt(x);
  span.textContent = text;
  if (u) span.appendChild(el("span", "unit", u));
}

// One column, built once per worker and updated in place.
const columns = new Map();

function column(w) {
  let c = columns.get(w.name);
  if (c) return c;
  const root = el("section", "worker");
  root.dataset.worker = w.name;
  const title = el("h2");
  const meta = el("div", "meta");
  const state = el("div", "state");
  root.append(title, meta, state);
  const rows = ROWS.map((r) => {
    const row = el("div", "row");
    const value = el("div", "value");
    const main = valueSpan(w.name, r.key, "num");
    value.appendChild(main);
    let second = null;
    if (r.second) {
      second = valueSpan(w.name, r.second, "second");
      value.appendChild(second);
    }
    const canvas = el("canvas", "spark");
    canvas.width = 220;
    canvas.height = 52;
    row.append(el("div", "label", r.label), value, canvas);
    root.appendChild(row);
    return { spec: r, main, second, canvas };
  });
  document.getElementById("workers").appendChild(root);
  c = { root, title, meta, state, rows };
  columns.set(w.name, c);
  return c;
}

function spark(canvas, values) {
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  const xs = values.filter((v) => v !== null && v !== undefined);
  if (xs.length < 2) return;
  const hi = Math.max(...xs), lo = Math.min(0, ...xs);
  const span = hi - lo || 1;
  const step = canvas.width / Math.max(values.length - 1, 1);
  ctx.strokeStyle = "#4fc3f7";
  ctx.lineWidth = 2;
  ctx.beginPath();
  let drawing = false;
  values.forEach((v, i) => {
    if (v === null || v === undefined) { drawing = false; return; }
    const x = i * step, y = canvas.height - 2 - ((v - lo) / span) * (canvas.height - 4);
    if (drawing) ctx.lineTo(x, y); else ctx.moveTo(x, y);
    drawing = true;
  });
  ctx.stroke();
}

function render(snapshot) {
  intervalMs = Math.max(250, snapshot.interval_s * 1000);
  document.getElementById("window").textContent = snapshot.window_s;
  for (const w of snapshot.workers) {
    const c = column(w);
    const devices = w.devices ? ` × ${w.devices}` : "";
    c.title.textContent = (w.hardware || "hardware unknown") + devices;
    c.meta.textContent = `${w.name}${w.model ? " · " + w.model : ""}`;
    const f = w.figures || {};
    if (!w.up) {
      c.state.className = "state down";
      c.state.textContent = w.error ? `down: ${w.error}` : "waiting for the first scrape";
    } else if (f.degraded) {
      c.state.className = "state degraded";
      c.state.textContent = "up · degraded: the host is behind the modelled timeline";
    } else {
      c.state.className = "state up";
      c.state.textContent = `up · ${w.polls} scrapes`;
    }
    for (const r of c.rows) {
      setValue(r.main, f[r.spec.key], r.spec.fmt);
      if (r.second) setValue(r.second, f[r.spec.second], r.spec.secondFmt || r.spec.fmt);
      spark(r.canvas, (w.history[r.spec.spark || r.spec.key]) || []);
    }
  }
}

async function tick() {
  const status = document.getElementById("status");
  try {
    const response = await fetch("api/snapshot", { cache: "no-store" });
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    render(await response.json());
    updates += 1;
    status.className = "status";
    status.textContent = `updated ${new Date().toLocaleTimeString()} (${updates})`;
    status.dataset.updates = updates;
  } catch (e) {
    status.className = "status stale";
    status.textContent = `dashboard server unreachable: ${e.message}`;
  }
  setTimeout(tick, intervalMs);
}

tick();

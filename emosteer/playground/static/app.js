// emosteer playground: talks to the emosteer routes of the server that serves it.
// Every call goes to /v1/... with the API key entered in the page; every failure is
// shown next to the control that caused it (the server's 400s name the config field).
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORE = "emosteer-playground-key";
const state = { key: "", model: null, info: null, vectors: [], presets: {}, heads: [], runs: null };

// ---------------------------------------------------------------- errors
class ApiError extends Error {
  constructor(status, message, param) {
    super(status ? `${status}: ${message}` : message);
    this.status = status;
    this.param = param || null;
  }
}
class LocalError extends Error {
  constructor(control, message) { super(message); this.control = control; }
}

function errBox(control) {
  return document.querySelector(`.err[data-for="${control}"]`) || document.querySelector('.err[data-for="run"]');
}
function showError(control, message) {
  const box = errBox(control);
  box.textContent = box.textContent ? `${box.textContent}\n${message}` : message;
  const el = $(control);
  if (el) el.classList.add("bad");
}
function clearErrors(...controls) {
  for (const c of controls) {
    errBox(c).textContent = "";
    const el = $(c);
    if (el) el.classList.remove("bad");
  }
}

// The config field a server error names ("emosteer.steer[0].scale" as param, or in the message).
function fieldOf(err) {
  let field = (err.param || "").replace(/^emosteer\.?/, "");
  if (!field) {
    const m = /\b((?:steer|heads)\[\d+\][\w.[\]]*|neurons(?:\.\w+)?|when(?:\.\w+)?)/.exec(err.message);
    if (m) field = m[1];
  }
  return field;
}
const STEER_FIELD_CONTROL = { layers: "layers", vector: "vectors", positions: "positions",
  scale_mode: "scale-mode", mode: "mode" };
const REQUEST_FIELD_CONTROL = { max_tokens: "max-tokens", max_completion_tokens: "max-tokens",
  temperature: "temperature", messages: "prompt", model: "connect" };

// The control that caused a server error of a run column (scale/value: that column's strength).
function controlFor(err, column) {
  const field = fieldOf(err);
  let m;
  if ((m = /^steer\[\d+\]\.(\w+)/.exec(field))) {
    return (m[1] === "scale" || m[1] === "value") ? column.control : (STEER_FIELD_CONTROL[m[1]] || "vectors");
  }
  if (/^steer/.test(field)) return "vectors";
  if (/^heads/.test(field)) return "heads";
  if ((m = /^neurons\.(\w+)/.exec(field))) return m[1] === "gamma" ? "neuron-gamma" : "neuron-set";
  if (REQUEST_FIELD_CONTROL[field]) return REQUEST_FIELD_CONTROL[field];
  if (err.status === 401) return "connect";
  return "run";
}

// ---------------------------------------------------------------- HTTP
async function errorOf(res) {
  const text = await res.text();
  let body = null;
  try { body = JSON.parse(text); } catch (e) { /* not JSON: shown as text */ }
  const e = body && body.error;
  let message = (e && typeof e === "object" ? e.message : e) || (body && body.detail) || text.slice(0, 300) || res.statusText;
  if (typeof message !== "string") message = JSON.stringify(message);
  if (res.status === 401) message += " (enter the server's --api-key above)";
  return new ApiError(res.status, message, e && typeof e === "object" ? e.param : null);
}

async function api(method, path, body, headers = {}, signal = undefined) {
  const h = { ...headers };
  if (state.key) h.Authorization = `Bearer ${state.key}`;
  let res;
  try {
    res = await fetch(path, { method, headers: h, body, signal });
  } catch (e) {
    if (e.name === "AbortError") throw e;
    throw new ApiError(0, `the server cannot be reached (${e.message})`);
  }
  if (!res.ok) throw await errorOf(res);
  return res;
}

async function apiJSON(method, path, obj) {
  const res = await api(method, path, obj === undefined ? undefined : JSON.stringify(obj),
    obj === undefined ? {} : { "Content-Type": "application/json" });
  try {
    return await res.json();
  } catch (e) {
    throw new ApiError(res.status, `${path} answered something that is not JSON (${e.message})`);
  }
}

// ---------------------------------------------------------------- connect, vectors, status
async function connect() {
  clearErrors("connect");
  state.key = $("api-key").value.trim();
  sessionStorage.setItem(KEY_STORE, state.key);
  try {
    const models = await apiJSON("GET", "/v1/models");
    state.model = models.data[0].id;
    const targets = await apiJSON("GET", "/v1/emosteer/score");
    fillSelect($("target"), targets.targets, $("target").value || "joy");
    await loadVectors();
    await loadStatus();
  } catch (e) {
    showError("connect", e.message);
  }
}

function fillSelect(sel, values, keep, none = null) {
  sel.textContent = "";
  if (none !== null) sel.append(new Option(none, ""));
  for (const v of values) sel.append(new Option(v, v));
  if (values.includes(keep)) sel.value = keep;
}

function namesOfKind(kind) {
  return state.vectors.filter((v) => v.kind === kind).map((v) => v.name);
}

async function loadVectors() {
  const listing = await apiJSON("GET", "/v1/emosteer/vectors");
  const first = state.info === null;
  state.info = listing.model;
  state.vectors = listing.vectors;
  state.presets = { ...state.presets, ...(listing.presets || {}) };
  $("model").textContent = `${state.model}: ${state.info.num_layers} layers, ${state.info.num_heads} heads`;
  const tbody = $("vector-table").tBodies[0];
  tbody.textContent = "";
  for (const v of listing.vectors) {
    const tr = tbody.insertRow();
    for (const t of [v.name, v.kind, `[${v.shape.join(", ")}]`, v.hash.slice(0, 12)]) tr.insertCell().textContent = t;
    const rm = document.createElement("button");
    rm.textContent = "remove";
    rm.addEventListener("click", () => removeVector(v.name));
    tr.insertCell().append(rm);
  }
  const checked = new Set(checkedVectors());
  const list = $("vectors");
  list.textContent = "";
  for (const name of namesOfKind("residual")) {
    const label = document.createElement("label");
    const box = document.createElement("input");
    box.type = "checkbox";
    box.value = name;
    box.checked = checked.has(name) || (first && checked.size === 0 && list.children.length === 0);
    label.append(box, ` ${name}`);
    list.append(label);
  }
  fillSelect($("neuron-set"), namesOfKind("neurons"), $("neuron-set").value, "(none)");
  fillPresets();
  for (const id of ["layer-lo", "layer-hi"]) $(id).max = state.info.num_layers - 1;
  if (first) $("layer-hi").value = state.info.num_layers - 1;
  renderHeads();
  $("vector-table").dataset.loaded = String(Number($("vector-table").dataset.loaded || 0) + 1);
  update();
}

async function loadStatus() {
  clearErrors("status");
  try {
    const s = await apiJSON("GET", "/v1/emosteer/status");
    const a = s.admission;
    const rows = [["slots in use", `${a.slots_in_use} / ${a.max_slots}`],
      ["admitted requests", a.admitted_requests], ["waiting for slots", a.waiting_for_slots],
      ["capture rows in use", `${a.capture_rows_in_use} / ${a.capture_rows}`]];
    for (const [kind, total] of Object.entries(a.pool_rows)) {
      rows.push([`pool rows ${kind}`, `${a.pool_rows_in_use[kind]} in use, ${a.pool_rows_resident[kind]} resident / ${total}`]);
    }
    if (!a.ready) rows.push(["refusing requests", a.refusal]);
    const table = document.createElement("table");
    for (const [k, v] of rows) {
      const tr = table.insertRow();
      tr.insertCell().textContent = k;
      tr.insertCell().textContent = v;
    }
    $("status").replaceChildren(table);
    $("status").dataset.loaded = String(Number($("status").dataset.loaded || 0) + 1);
  } catch (e) {
    showError("status", e.message);
  }
}

async function upload() {
  clearErrors("upload-file", "upload-name");
  $("upload-done").textContent = "";
  const file = $("upload-file").files[0];
  if (!file) return showError("upload-file", "choose a bank (.safetensors) or GGUF file first");
  const name = $("upload-name").value.trim();
  const query = name ? `?name=${encodeURIComponent(name)}` : "";
  try {
    const res = await api("POST", `/v1/emosteer/vectors${query}`, file, { "Content-Type": "application/octet-stream" });
    const out = await res.json();
    $("upload-done").textContent = `registered ${out.registered.join(", ")}` +
      (out.replaced.length ? ` (replaced ${out.replaced.join(", ")})` : "");
    await loadVectors();
    await loadStatus();
  } catch (e) {
    showError(e.param === "name" ? "upload-name" : "upload-file", e.message);
  }
}

async function removeVector(name) {
  if (!confirm(`Remove ${name} from the server? New requests naming it will be refused.`)) return;
  clearErrors("upload-file", "upload-name");
  try {
    await api("DELETE", `/v1/emosteer/vectors/${encodeURIComponent(name)}`);
    $("upload-done").textContent = `removed ${name}`;
    await loadVectors();
    await loadStatus();
  } catch (e) {
    showError("upload-file", `remove ${name}: ${e.message}`);
  }
}

// ---------------------------------------------------------------- the config
function checkedVectors() {
  return [...document.querySelectorAll("#vectors input:checked")].map((b) => b.value);
}

function number(id, what = "a number") {
  const raw = $(id).value.trim();
  const v = Number(raw);
  if (raw === "" || !Number.isFinite(v)) throw new LocalError(id, `${what} is needed, got ${JSON.stringify(raw)}`);
  return v;
}

function layerRange() {
  const a = Number($("layer-lo").value), b = Number($("layer-hi").value);
  const lo = Math.min(a, b), hi = Math.max(a, b);
  return Array.from({ length: hi - lo + 1 }, (_, i) => lo + i);
}

function positionsValue() {
  const raw = $("positions").value.trim();
  return /^\d+(\s*,\s*\d+)*$/.test(raw) ? raw.split(",").map(Number) : raw;
}

// The request config at one strength (the page's one place that builds it).
function buildConfig(strength) {
  const cfg = {};
  const names = checkedVectors();
  const mode = $("mode").value, scaleMode = $("scale-mode").value;
  if (names.length) {
    const base = { layers: layerRange() };
    const positions = positionsValue();
    if (positions !== "all") base.positions = positions;
    if (mode === "project_out") {
      cfg.steer = [{ vector: names, ...base, mode }];
    } else {
      cfg.steer = names.map((vector) => {
        const item = { vector, ...base };
        if (mode !== "add") item.mode = mode;
        if (scaleMode !== "absolute") item.scale_mode = scaleMode;
        item[mode === "clamp" && scaleMode === "absolute" ? "value" : "scale"] = strength;
        return item;
      });
    }
  }
  if (state.heads.length) {
    cfg.heads = state.heads.map((h) => {
      const item = { layer: h.layer, head: h.head, mode: h.mode };
      if (h.mode === "add" || h.mode === "patch") item.vector = h.vector;
      if (h.mode === "add" || h.mode === "scale") item.scale = h.scale;
      return item;
    });
  }
  if ($("neuron-set").value) cfg.neurons = { set: $("neuron-set").value, gamma: number("neuron-gamma", "a gain") };
  return cfg;
}

// The columns of a run: plain (no config), then one per strength.
function runColumns() {
  const cols = [];
  if ($("plain").checked) cols.push({ label: "plain", config: null, control: "run" });
  const strengths = [[number("strength", "a strength"), "strength"]];
  for (const t of $("strengths").value.split(",").map((x) => x.trim()).filter(Boolean)) {
    const v = Number(t);
    if (!Number.isFinite(v)) throw new LocalError("strengths", `${JSON.stringify(t)} is not a number`);
    strengths.push([v, "strengths"]);
  }
  const projectOut = $("mode").value === "project_out";
  for (const [s, control] of projectOut ? strengths.slice(0, 1) : strengths) {
    const config = buildConfig(s);
    if (!Object.keys(config).length) throw new LocalError("vectors", "choose a vector, a head or a neuron set to steer with");
    cols.push({ label: projectOut ? "project_out" : `strength ${s}`, config, control });
  }
  return cols;
}

function update() {
  const lay = layerRange();
  $("layers-label").textContent = `${lay[0]}–${lay[lay.length - 1]}` + (state.info ? ` of 0–${state.info.num_layers - 1}` : "");
  clearErrors("neuron-gamma", "strength");
  try {
    $("config").value = JSON.stringify(buildConfig(number("strength", "a strength")), null, 1);
  } catch (e) {
    $("config").value = "";
    showError(e.control, e.message);
  }
}

// ---------------------------------------------------------------- presets
function fillPresets() {
  fillSelect($("preset"), Object.keys(state.presets).sort(), $("preset").value, "(none)");
}

function applyPreset() {
  clearErrors("preset");
  const cfg = state.presets[$("preset").value];
  if (!cfg) return;
  const steer = cfg.steer || [];
  const names = new Set(steer.flatMap((s) => (Array.isArray(s.vector) ? s.vector : [s.vector])));
  for (const box of document.querySelectorAll("#vectors input")) box.checked = names.has(box.value);
  const missing = [...names].filter((n) => typeof n !== "string" || !namesOfKind("residual").includes(n));
  if (missing.length) showError("preset", `not on the server: ${missing.map(String).join(", ")}`);
  if (steer.length) {
    const s = steer[0];
    const layers = s.layers === "all" ? layerRange() : [].concat(s.layers);
    const beyond = layers.filter((l) => l >= state.info.num_layers);
    if (beyond.length) showError("preset", `layers ${beyond.join(", ")} are beyond this model's ${state.info.num_layers}`);
    $("layer-lo").value = Math.min(...layers);
    $("layer-hi").value = Math.max(...layers);
    if (layers.length !== Math.max(...layers) - Math.min(...layers) + 1 && s.layers !== "all") {
      showError("preset", `its layers ${JSON.stringify(s.layers)} are not a range: shown as their span`);
    }
    $("mode").value = s.mode || "add";
    $("scale-mode").value = s.scale_mode || "absolute";
    if (s.scale !== undefined || s.value !== undefined) $("strength").value = s.scale ?? s.value;
    $("positions").value = Array.isArray(s.positions) ? s.positions.join(", ") : (s.positions || "all");
  }
  state.heads = (cfg.heads || []).flatMap((h) => [].concat(h.head).map((head) => ({
    layer: h.layer, head, mode: h.mode, vector: h.vector || "", scale: h.scale ?? 1 })));
  $("neuron-set").value = cfg.neurons ? cfg.neurons.set : "";
  if (cfg.neurons) $("neuron-gamma").value = cfg.neurons.gamma;
  renderHeads();
  update();
}

// ---------------------------------------------------------------- heads
function addHead(layer, head) {
  clearErrors("heads");
  if (state.info && (layer >= state.info.num_layers || head >= state.info.num_heads)) {
    showError("heads", `layer ${layer}, head ${head} is not in the served model ` +
      `(${state.info.num_layers} layers × ${state.info.num_heads} heads): the server will refuse it`);
  }
  state.heads.push({ layer, head, mode: "scale", vector: namesOfKind("head")[0] || "", scale: 2 });
  renderHeads();
  update();
}

function renderHeads() {
  const tbody = $("heads").tBodies[0];
  tbody.textContent = "";
  state.heads.forEach((h, i) => {
    const tr = tbody.insertRow();
    const input = (key, type) => {
      const el = document.createElement("input");
      el.type = type;
      el.value = h[key];
      el.size = 4;
      el.addEventListener("input", () => { h[key] = type === "number" ? Number(el.value) : el.value; update(); });
      tr.insertCell().append(el);
      return el;
    };
    input("layer", "number");
    input("head", "number");
    const mode = document.createElement("select");
    fillSelect(mode, ["add", "patch", "ablate", "scale"], h.mode);
    mode.addEventListener("change", () => { h.mode = mode.value; renderHeads(); update(); });
    tr.insertCell().append(mode);
    const vec = document.createElement("select");
    fillSelect(vec, namesOfKind("head"), h.vector, "(none)");
    vec.disabled = !(h.mode === "add" || h.mode === "patch");
    vec.addEventListener("change", () => { h.vector = vec.value; update(); });
    tr.insertCell().append(vec);
    input("scale", "number").disabled = !(h.mode === "add" || h.mode === "scale");
    const rm = document.createElement("button");
    rm.textContent = "remove";
    rm.addEventListener("click", () => { state.heads.splice(i, 1); renderHeads(); update(); });
    tr.insertCell().append(rm);
  });
}

// ---------------------------------------------------------------- run: streams side by side
async function run() {
  const controls = ["run", "prompt", "vectors", "layers", "strength", "strengths", "scale-mode", "mode",
    "positions", "heads", "neuron-set", "neuron-gamma", "max-tokens", "temperature", "target"];
  clearErrors(...controls);
  let cols, common;
  try {
    if (!state.model) throw new LocalError("connect", "connect to the server first");
    cols = runColumns();
    common = { model: state.model, messages: [{ role: "user", content: $("prompt").value }],
      max_tokens: number("max-tokens", "a token count"), temperature: number("temperature", "a temperature"),
      stream: true };
  } catch (e) {
    return showError(e.control || "run", e.message);
  }
  const abort = new AbortController();
  state.runs = { cols, abort };
  $("run").disabled = true;
  $("stop").disabled = false;
  const out = $("outputs");
  out.dataset.state = "running";
  out.textContent = "";
  for (const col of cols) {
    Object.assign(col, { text: "", chunks: 0, words: [], score: null, state: "streaming" });
    col.el = document.createElement("div");
    col.el.className = "column";
    col.el.dataset.label = col.label;
    col.el.innerHTML = '<h3></h3><div class="text"></div><div class="metrics"></div><div class="col-err"></div>';
    col.el.querySelector("h3").textContent = col.label;
    out.append(col.el);
  }
  await Promise.all(cols.map((col) => stream(col, common, abort.signal).then(
    () => { col.state = "done"; },
    (e) => {
      col.state = e.name === "AbortError" ? "stopped" : "error";
      if (col.state === "error") {
        col.el.querySelector(".col-err").textContent = e.message;
        showError(controlFor(e, col), `${col.label}: ${e.message}`);
      }
    }).finally(() => { col.el.dataset.state = col.state; scoreSoon(); })));
  await score();
  $("run").disabled = false;
  $("stop").disabled = true;
  out.dataset.state = "done";
  loadStatus();
}

async function stream(col, common, signal) {
  const body = { ...common };
  if (col.config) body.vllm_xargs = { emosteer: JSON.stringify(col.config) };
  const res = await api("POST", "/v1/chat/completions", JSON.stringify(body), { "Content-Type": "application/json" }, signal);
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buf = "", done = false;
  for (;;) {
    const { value, done: end } = await reader.read();
    if (end) break;
    buf += decoder.decode(value, { stream: true }).replace(/\r\n/g, "\n");
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const event = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") { done = true; continue; }
        const obj = JSON.parse(data);
        if (obj.error) throw new ApiError(obj.error.code || 500, obj.error.message, obj.error.param);
        const choice = (obj.choices || [])[0];
        if (choice && choice.delta && choice.delta.content) {
          col.text += choice.delta.content;
          col.chunks += 1;
          renderColumn(col);
          scoreSoon();
        }
        if (choice && choice.finish_reason) col.finish = choice.finish_reason;
      }
    }
  }
  if (!done) throw new ApiError(0, "the stream ended before [DONE]");
}

// Emotion words, hit rate and repeated 3-grams come from the server (the project's definitions).
let scoreTimer = null;
function scoreSoon() {
  if (scoreTimer === null) scoreTimer = setTimeout(() => { scoreTimer = null; score(); }, 300);
}

async function score() {
  const cols = state.runs ? state.runs.cols : [];
  const texts = cols.map((c) => c.text);
  clearErrors("target");
  try {
    const out = await apiJSON("POST", "/v1/emosteer/score", { texts, target: $("target").value || "joy" });
    cols.forEach((col, i) => {
      if (col.text !== texts[i]) return; // more text came: the next score covers it
      col.words = out.scores[i].words;
      col.score = out.scores[i];
      col.score.target = out.target;
      renderColumn(col);
    });
  } catch (e) {
    showError(e.param === "target" ? "target" : "run", `scoring: ${e.message}`);
  }
}

function renderColumn(col) {
  const el = col.el.querySelector(".text");
  const cps = Array.from(col.text); // the server's offsets count code points
  el.textContent = "";
  let at = 0;
  for (const [s, e, labels] of col.words) {
    if (e > cps.length) break;
    el.append(cps.slice(at, s).join(""));
    const mark = document.createElement("mark");
    mark.className = `emo ${labels.join(" ")}`;
    mark.title = labels.join(", ");
    mark.textContent = cps.slice(s, e).join("");
    el.append(mark);
    at = e;
  }
  el.append(cps.slice(at).join(""));
  const m = col.el.querySelector(".metrics");
  const sc = col.score;
  m.textContent = `${col.chunks} chunks` + (col.finish ? ` (${col.finish})` : "") + (sc
    ? ` · hit rate (${sc.target}): ${sc.hit_rate === null ? "no emotion words" : sc.hit_rate.toFixed(3)}` +
      ` · repeated 3-grams: ${sc.rep3.toFixed(3)}`
    : "");
  if (sc) {
    col.el.dataset.hitRate = sc.hit_rate === null ? "" : String(sc.hit_rate);
    col.el.dataset.rep3 = String(sc.rep3);
  }
}

// ---------------------------------------------------------------- report heatmaps
// {emotion: {profile: {layers, values, band, label}, maps: [{name, values, ci, top}], preset}}
function parseReport(obj) {
  const out = {};
  const grid = (m) => m.map((row) => row.map((v) => (v === null ? NaN : v)));
  if (obj && obj.emotions && typeof obj.emotions === "object") { // results.json of emosteer demo
    const hm = (obj.head_maps && obj.head_maps.maps) || {};
    const tops = (obj.head_maps && obj.head_maps.top) || {};
    for (const [emo, r] of Object.entries(obj.emotions)) {
      const e = { maps: [] };
      const lp = r.layer_profile;
      if (lp && lp.layers) e.profile = { layers: lp.layers, values: lp.change, band: lp.band, label: lp.profile_source || "change" };
      if (hm[emo]) e.maps.push({ name: `patching recovery (n=${hm[emo].n_pairs} pairs)`, values: grid(hm[emo].recovery), ci: hm[emo].ci95, top: tops[emo] || [] });
      if (r.heads && r.heads.intention) e.maps.push({ name: "emotional intention cos(W_O·z, S_l)", values: grid(r.heads.intention), ci: null, top: (r.heads.top || []).map((t) => [t.layer, t.head]) });
      if (r.preset) e.preset = r.preset;
      out[emo] = e;
    }
  } else if (obj && typeof obj.emotion === "string") { // attribution.json of emosteer attribute
    const e = { maps: [] };
    if (obj.layers && obj.layers.profile) {
      e.profile = { layers: obj.layers.profile.map((_, i) => i), values: obj.layers.profile, band: obj.layers.band, label: obj.layers.profile_source };
    }
    if (obj.heads && obj.heads.intention) {
      const inten = grid(obj.heads.intention);
      e.maps.push({ name: "emotional intention", values: inten, ci: null, top: obj.heads.top || [] });
      if (obj.heads.recovery && obj.heads.recovery.length) {
        const rec = inten.map((row) => row.map(() => NaN));
        for (const [l, h, r] of obj.heads.recovery) rec[l][h] = r;
        e.maps.push({ name: "patching recovery (candidates)", values: rec, ci: null, top: obj.heads.top || [] });
      }
    }
    out[obj.emotion] = e;
  } else {
    throw new Error("not a results.json of emosteer demo (no 'emotions') nor an attribution.json of emosteer attribute (no 'emotion')");
  }
  return out;
}

async function openReport() {
  clearErrors("report-file");
  const file = $("report-file").files[0];
  if (!file) return;
  let obj;
  try {
    const text = await file.text();
    try {
      obj = JSON.parse(text);
    } catch (e) { // Python's json writes NaN / Infinity, which JSON.parse refuses: read them as n/a
      obj = JSON.parse(text.replace(/-?\b(?:NaN|Infinity)\b/g, "null"));
    }
    state.report = parseReport(obj);
  } catch (e) {
    state.report = null;
    $("report").textContent = "";
    return showError("report-file", `${file.name}: ${e.message}`);
  }
  for (const [emo, e] of Object.entries(state.report)) {
    if (e.preset) state.presets[e.preset.name] = e.preset.config;
  }
  const depth = obj.model && obj.model.info && obj.model.info.num_layers;
  if (depth && state.info && depth !== state.info.num_layers) {
    showError("report-file", `${file.name} is of a model with ${depth} layers; the server's has ` +
      `${state.info.num_layers}: its layers and heads do not apply here`);
  }
  fillPresets();
  fillSelect($("report-emotion"), Object.keys(state.report), $("report-emotion").value);
  renderReport();
}

function color(v, vmax) {
  if (!Number.isFinite(v)) return "#e4e4e4";
  const t = Math.max(-1, Math.min(1, v / (vmax || 1)));
  const [r, g, b] = t >= 0 ? [178, 24, 43] : [33, 102, 172];
  const a = Math.abs(t);
  return `rgb(${Math.round(255 + (r - 255) * a)}, ${Math.round(255 + (g - 255) * a)}, ${Math.round(255 + (b - 255) * a)})`;
}

const fmt = (v) => (Number.isFinite(v) ? v.toFixed(4) : "n/a");

function heatmap(rows, cellText, onClick, vmax) {
  const table = document.createElement("table");
  table.className = "heatmap";
  rows.forEach((row, l) => {
    const tr = table.insertRow();
    tr.insertCell().textContent = l;
    row.forEach((v, h) => {
      const td = tr.insertCell();
      td.className = "cell";
      td.style.background = color(v, vmax);
      td.dataset.row = l;
      td.dataset.col = h;
      td.addEventListener("mousemove", (ev) => showTip(ev, cellText(l, h)));
      td.addEventListener("mouseleave", hideTip);
      td.addEventListener("click", () => onClick(l, h));
    });
  });
  return table;
}

function renderReport() {
  const e = state.report && state.report[$("report-emotion").value];
  const box = $("report");
  box.textContent = "";
  if (!e) return;
  if (e.profile) {
    const p = e.profile;
    const h = document.createElement("h4");
    h.textContent = `layer profile (${p.label}); click a layer to steer there. Head maps: rows are layers, ` +
      "columns heads; click a head to add it";
    const vmax = Math.max(...p.values.filter(Number.isFinite).map(Math.abs));
    const table = heatmap([p.values], (_, i) => `layer ${p.layers[i]}: ${p.label} ${fmt(p.values[i])}` +
      (p.band ? ` (95 % band ${fmt(p.band[i][0])} – ${fmt(p.band[i][1])})` : ""),
    (_, i) => { $("layer-lo").value = p.layers[i]; $("layer-hi").value = p.layers[i]; update(); }, vmax);
    table.id = "layer-profile";
    table.rows[0].cells[0].textContent = "";
    box.append(h, table);
  }
  const maps = document.createElement("div");
  maps.className = "maps";
  box.append(maps);
  e.maps.forEach((m, k) => {
    const h = document.createElement("h4");
    h.textContent = `${m.name}`;
    const vmax = Math.max(...m.values.flat().filter(Number.isFinite).map(Math.abs));
    const table = heatmap(m.values, (l, hd) => `layer ${l}, head ${hd}: ${m.name.split(" (")[0]} ${fmt(m.values[l][hd])}` +
      (m.ci ? ` (95 % CI ${fmt(m.ci[l][hd][0])} – ${fmt(m.ci[l][hd][1])})` : ""), addHead, vmax);
    table.className += " head-map";
    table.dataset.map = String(k);
    for (const [l, hd] of m.top) {
      const cell = table.rows[l] && table.rows[l].cells[hd + 1];
      if (cell) cell.classList.add("top");
    }
    const div = document.createElement("div");
    div.append(h, table);
    maps.append(div);
  });
  box.dataset.loaded = String(Number(box.dataset.loaded || 0) + 1);
}

function showTip(ev, text) {
  const tip = $("tip");
  tip.textContent = text;
  tip.hidden = false;
  tip.style.left = `${ev.pageX + 12}px`;
  tip.style.top = `${ev.pageY + 12}px`;
}
function hideTip() { $("tip").hidden = true; }

// ---------------------------------------------------------------- wiring
$("connect").addEventListener("click", connect);
$("api-key").addEventListener("keydown", (ev) => { if (ev.key === "Enter") connect(); });
$("run").addEventListener("click", run);
$("stop").addEventListener("click", () => state.runs && state.runs.abort.abort());
$("upload").addEventListener("click", upload);
$("refresh-status").addEventListener("click", loadStatus);
$("preset").addEventListener("change", applyPreset);
$("report-file").addEventListener("change", openReport);
$("report-emotion").addEventListener("change", renderReport);
$("add-head").addEventListener("click", () => addHead(0, 0));
$("copy").addEventListener("click", async () => {
  try {
    await navigator.clipboard.writeText($("config").value);
    $("copied").textContent = "copied";
  } catch (e) {
    $("config").select();
    $("copied").textContent = "selected: press Ctrl+C";
  }
});
for (const id of ["layer-lo", "layer-hi", "strength", "scale-mode", "mode", "positions", "neuron-set", "neuron-gamma"]) {
  $(id).addEventListener("input", update);
}
$("vectors").addEventListener("change", update);
$("api-key").value = sessionStorage.getItem(KEY_STORE) || "";
connect();

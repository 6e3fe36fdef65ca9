// celeba-ddpm's page: start jobs, watch their previews sharpen over the event stream, cancel, download.
// Plain JavaScript, no build step, nothing from outside this server (the page's Content-Security-Policy says so).
"use strict";

const KEY_STORE = "celeba-ddpm-key";
const HISTORY_STORE = "celeba-ddpm-history";
const $ = (id) => document.getElementById(id);
let model = null;

// ---- talking to the server ------------------------------------------------------------------------------------
function headers(json) {
  const h = {};
  if (json) h["Content-Type"] = "application/json";
  const key = sessionStorage.getItem(KEY_STORE);
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

class ApiError extends Error {
  constructor(status, detail, retryAfter) {
    super(detail);
    this.status = status;
    this.retryAfter = retryAfter;
  }
}

async function api(method, path, bodyText) {
  const r = await fetch(path, { method, headers: headers(bodyText !== undefined), body: bodyText });
  const text = await r.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch (e) { data = null; }
  if (!r.ok) {
    const detail = (data && data.detail) || text || r.statusText;
    throw new ApiError(r.status, detail, r.headers.get("Retry-After"));
  }
  return data;
}

function explain(err) {
  if (!(err instanceof ApiError)) return "Could not reach the server: " + err.message;
  if (err.status === 401) {
    $("key-row").hidden = false;
    return "This server needs an API key: enter it above and try again (" + err.message + ").";
  }
  let text = err.message;
  if (err.status === 503 && err.retryAfter) text += ` (try again in ${err.retryAfter} s)`;
  return `${err.status}: ${text}`;
}

// Server-Sent Events over fetch (EventSource cannot send an Authorization header).
async function stream(path, onEvent, signal) {
  const r = await fetch(path, { headers: headers(false), signal });
  if (!r.ok) throw new ApiError(r.status, (await r.text()) || r.statusText, r.headers.get("Retry-After"));
  const reader = r.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "", ended = false;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      let kind = "message", data = "";
      for (const line of block.split("\n")) {
        if (line.startsWith("event: ")) kind = line.slice(7);
        else if (line.startsWith("data: ")) data += line.slice(6);
      }
      if (data && !ended && onEvent(kind, JSON.parse(data)) === false) ended = true;  // the server closes next
    }
  }
}

// ---- the form ---------------------------------------------------------------------------------------------------
function randomSeed() {  // below 2^52: exact in JavaScript, and under the server's 2^53 - MAX_N limit
  const a = new Uint32Array(2);
  crypto.getRandomValues(a);
  return (BigInt(a[0] & 0xfffff) << 32n) | BigInt(a[1]);
}

function readForm() {
  const seedText = $("seed").value.trim();
  if (seedText && !/^\d+$/.test(seedText)) throw new Error("Seed: a whole number from 0, or blank for a random one.");
  const seed = seedText ? BigInt(seedText) : randomSeed();
  const num = (id) => { const v = $(id).value.trim(); return v === "" ? NaN : Number(v); };
  const fields = { n: num("n"), sampler: $("sampler").value, steps: num("steps"), preview_every: num("preview") };
  for (const [name, value] of Object.entries(fields)) {
    if (typeof value === "number" && !Number.isInteger(value)) throw new Error(`${name}: a whole number, please.`);
  }
  // The seed goes into the JSON as written: it may exceed what a JavaScript number holds exactly.
  const bodyText = JSON.stringify(fields).replace(/}$/, `,"seed":${seed}}`);
  return { fields, seed, bodyText };
}

function curlFor(bodyText) {
  const key = sessionStorage.getItem(KEY_STORE);
  const auth = key ? ` -H 'Authorization: Bearer ${key.replace(/'/g, "")}'` : "";
  return `curl -s -X POST ${location.origin}/v1/jobs -H 'content-type: application/json'${auth} -d '${bodyText}'`;
}

async function submit(event) {
  event.preventDefault();
  const error = $("form-error");
  error.hidden = true;
  if ($("key").value) sessionStorage.setItem(KEY_STORE, $("key").value);
  let request;
  try {
    request = readForm();
  } catch (e) {
    error.textContent = e.message;
    error.hidden = false;
    return;
  }
  $("go").disabled = true;
  try {
    const job = await api("POST", "/v1/jobs", request.bodyText);
    remember({ id: job.id, body: request.bodyText, seed: String(request.seed), n: request.fields.n,
               created: Date.now() });
    watch(job, request);
  } catch (e) {
    error.textContent = explain(e);
    error.hidden = false;
  } finally {
    $("go").disabled = false;
  }
}

// ---- a job on the page -------------------------------------------------------------------------------------------
function card(job, request) {
  $("no-jobs").hidden = true;
  const node = $("job-template").content.firstElementChild.cloneNode(true);
  node.dataset.job = job.id;
  node.querySelector(".job-title").textContent =
    `${job.n} × ${job.sampler}, ${job.steps} steps, seeds ${request.seed}…${request.seed + BigInt(job.n - 1)}`;
  node.querySelector(".curl pre").textContent = curlFor(request.bodyText);
  node.querySelector(".copy").addEventListener("click", () =>
    navigator.clipboard.writeText(curlFor(request.bodyText)).catch(() => {}));
  const grid = node.querySelector(".grid");
  for (let i = 0; i < job.n; i++) {
    const fig = document.createElement("figure");
    const img = document.createElement("img");
    img.alt = `image ${i}, seed ${request.seed + BigInt(i)}: waiting`;
    fig.append(img);
    const caption = document.createElement("figcaption");
    caption.textContent = `seed ${request.seed + BigInt(i)}`;
    fig.append(caption);
    grid.append(fig);
  }
  $("job-list").prepend(node);
  return node;
}

function setState(node, state, text) {
  const badge = node.querySelector(".state");
  badge.textContent = state;
  badge.className = "state " + state;
  if (text !== undefined) node.querySelector(".status").textContent = text;
  const ended = ["succeeded", "failed", "cancelled"].includes(state);
  node.querySelector(".cancel").hidden = ended;
  node.dataset.state = state;
}

function showImages(node, images, seed) {
  const figures = node.querySelectorAll("figure");
  images.forEach((im, i) => {
    const fig = figures[i];
    const img = fig.querySelector("img");
    img.src = "data:image/png;base64," + im.png;
    img.alt = `image ${i}, seed ${seed + BigInt(i)}`;
    img.dataset.final = "1";
    const link = document.createElement("a");
    link.href = img.src;
    link.download = `face-${seed + BigInt(i)}.png`;
    link.textContent = "Download PNG";
    fig.append(document.createElement("br"), link);
  });
}

function watch(job, request) {
  const node = card(job, request);
  const bar = node.querySelector("progress");
  const controller = new AbortController();
  node.querySelector(".cancel").addEventListener("click", async () => {
    node.querySelector(".cancel").disabled = true;
    try {
      await api("DELETE", `/v1/jobs/${job.id}`);
    } catch (e) {
      node.querySelector(".status").textContent = "Cancel failed: " + explain(e);
    }
  });
  setState(node, job.state, job.state === "queued" ? "Waiting for a place in the batch…" : "Starting…");
  stream(`/v1/jobs/${job.id}/events`, (kind, data) => {
    if (kind === "queued") {
      setState(node, "queued", `Queued: ${data.queue_position} job(s) ahead.`);
    } else if (kind === "running" || kind === "progress") {
      bar.value = data.steps ? data.step / data.steps : 0;
      const eta = data.eta_s === null || data.eta_s === undefined ? "" : `, about ${Math.ceil(data.eta_s)} s left`;
      setState(node, "running", `Step ${data.step} of ${data.steps}${eta}.`);
    } else if (kind === "preview") {
      const img = node.querySelectorAll("figure img")[data.index];
      if (img && !img.dataset.final) {
        img.src = "data:image/png;base64," + data.png;
        img.alt = `image ${data.index}: preview at step ${data.step}`;
        img.dataset.step = data.step;
      }
    } else if (kind === "completed") {
      bar.value = 1;
      showImages(node, data.images, request.seed);
      setState(node, "succeeded", "Done.");
      remember({ id: job.id, state: "succeeded" });
      return false;
    } else if (kind === "failed" || kind === "cancelled") {
      setState(node, kind, (kind === "cancelled" ? "Cancelled: " : "Failed: ") + (data.detail || data.reason));
      remember({ id: job.id, state: kind });
      return false;
    }
    return true;
  }, controller.signal).catch((e) => {
    if (!["succeeded", "failed", "cancelled"].includes(node.dataset.state)) {
      node.querySelector(".status").textContent = "Lost the event stream: " + explain(e);
    }
  });
}

// ---- history (this browser's recent jobs, sessionStorage) --------------------------------------------------------
function history() {
  try { return JSON.parse(sessionStorage.getItem(HISTORY_STORE)) || []; } catch (e) { return []; }
}

function remember(entry) {
  const list = history();
  const found = list.find((e) => e.id === entry.id);
  if (found) Object.assign(found, entry); else list.unshift(entry);
  sessionStorage.setItem(HISTORY_STORE, JSON.stringify(list.slice(0, 20)));
  drawHistory();
}

function drawHistory() {
  const ol = $("history");
  ol.replaceChildren();
  for (const e of history()) {
    const li = document.createElement("li");
    li.textContent = `${new Date(e.created).toLocaleTimeString()}: ${e.n} image(s), seed ${e.seed}, ` +
                     `${e.state || "started"} `;
    const show = document.createElement("button");
    show.type = "button";
    show.className = "secondary";
    show.textContent = "Show";
    show.addEventListener("click", () => reopen(e));
    li.append(show);
    ol.append(li);
  }
}

async function reopen(entry) {
  try {
    const job = await api("GET", `/v1/jobs/${entry.id}`);
    watch(job, { seed: BigInt(entry.seed), bodyText: entry.body });
  } catch (e) {
    $("form-error").textContent = explain(e);
    $("form-error").hidden = false;
  }
}

// ---- the model panel ---------------------------------------------------------------------------------------------
async function loadModel() {
  try {
    model = await api("GET", "/v1/model");
  } catch (e) {
    $("model-info").textContent = explain(e);
    return;
  }
  const rows = [["name", model.name], ["resolution", `${model.resolution}×${model.resolution}`],
                ["parameters", model.parameters.toLocaleString()], ["training steps", model.training_steps.toLocaleString()],
                ["device", `${model.device}, ${model.dtype}`], ["samplers", model.samplers.join(", ")],
                ["images per job", `up to ${model.max_n}`]];
  $("model-info").replaceChildren(...rows.flatMap(([k, v]) => {
    const dt = document.createElement("dt"); dt.textContent = k;
    const dd = document.createElement("dd"); dd.textContent = v;
    return [dt, dd];
  }));
  $("n").max = model.max_n;
  if (model.auth_required) $("key-row").hidden = false;
}

document.addEventListener("DOMContentLoaded", () => {
  $("form").addEventListener("submit", submit);
  $("full").addEventListener("click", () => {
    $("sampler").value = "ddpm";
    $("steps").value = 1000;
    $("preview").value = 100;
    $("form").requestSubmit();
  });
  $("key").value = sessionStorage.getItem(KEY_STORE) || "";
  drawHistory();
  loadModel();
});

// Kiln gallery: every number and picture comes from Kiln's public HTTP API (GET /models,
// POST /models/{name}/{method}); this file only draws. No build step, no external resources.
"use strict";

const state = { token: null, models: [], byPlugin: {}, a: null, b: null };
const $ = (id) => document.getElementById(id);

// ---------------------------------------------------------------------------- API
class ApiError extends Error {}

// Paths are relative to the page, so the gallery works wherever the app is mounted (/, /secure/).
async function request(path, options = {}) {
  const headers = Object.assign({}, options.headers || {});
  if (state.token) headers["Authorization"] = "Bearer " + state.token;
  const r = await fetch(path, Object.assign({}, options, { headers }));
  if (r.status === 401) {
    $("auth").hidden = false;
    $("token").focus();
    throw new ApiError("this server needs its API token: enter it above");
  }
  if (!r.ok) {
    let message = r.status + " " + r.statusText;
    try { message = (await r.json()).error || message; } catch (e) { /* not JSON */ }
    throw new ApiError(message);
  }
  return r;
}

async function call(model, method, args, png = false) {
  const r = await request(`models/${model.name}/versions/${model.version}/${method}`, {
    method: "POST",
    headers: { "Content-Type": "application/json", "Accept": png ? "image/png" : "application/json" },
    body: JSON.stringify(args || {}),
  });
  return png ? URL.createObjectURL(await r.blob()) : r.json();
}

function served(plugin) { return state.byPlugin[plugin] || null; }

function report(section, error) {
  const status = document.querySelector(`#${section} .status`);
  if (status) status.textContent = error ? String(error.message || error) : "";
}

async function guarded(section, fn) {
  report(section, null);
  try { await fn(); } catch (e) { report(section, e); }
}

// ---------------------------------------------------------------------------- pictures
function drawImage(canvas, img) {   // img: rows of values in [0, 1] (or [H][W][1])
  const h = img.length, w = img[0].length;
  const small = document.createElement("canvas");
  small.width = w; small.height = h;
  const ctx = small.getContext("2d");
  const data = ctx.createImageData(w, h);
  for (let y = 0; y < h; y++) for (let x = 0; x < w; x++) {
    let v = img[y][x];
    if (Array.isArray(v)) v = v[0];
    const g = Math.max(0, Math.min(255, Math.round(v * 255)));
    const i = 4 * (y * w + x);
    data.data[i] = data.data[i + 1] = data.data[i + 2] = g; data.data[i + 3] = 255;
  }
  ctx.putImageData(data, 0, 0);
  const out = canvas.getContext("2d");
  out.imageSmoothingEnabled = false;
  out.clearRect(0, 0, canvas.width, canvas.height);
  out.drawImage(small, 0, 0, canvas.width, canvas.height);
}

function normalise(img) {          // any real-valued map -> [0, 1]
  let lo = Infinity, hi = -Infinity;
  for (const row of img) for (const v of row) { lo = Math.min(lo, v); hi = Math.max(hi, v); }
  const span = hi - lo || 1;
  return img.map((row) => row.map((v) => (v - lo) / span));
}

function tile(container, img, caption, size = 56) {
  const fig = document.createElement("figure");
  const c = document.createElement("canvas");
  c.width = size; c.height = size;
  drawImage(c, img);
  fig.appendChild(c);
  if (caption) {
    const cap = document.createElement("figcaption");
    cap.textContent = caption;
    fig.appendChild(cap);
  }
  container.appendChild(fig);
}

// ---------------------------------------------------------------------------- the drawing pad
const pad = { drawn: false, timer: null, photo: null };

// The model the pad's picture goes to: any served model with a classify method (the select).
function classifier() {
  const ref = $("classifier").value;
  return state.models.find((m) => m.ref === ref) || served("cnn");
}

// A model that reads MNIST-style digits (28x28, one channel) gets the pad's drawing prepared as
// MNIST's digits were; any other gets the picture (an uploaded photo as it is) at its own size.
function isDigitModel(model) {
  const shape = model.methods.classify.inputs.images["x-shape"];
  return shape[1] === 28 && shape[2] === 28 && (shape.length < 4 || shape[3] === 1);
}

function setupPad() {
  const canvas = $("pad");
  const ctx = canvas.getContext("2d");
  const clear = () => {
    ctx.fillStyle = "#000"; ctx.fillRect(0, 0, canvas.width, canvas.height);
    pad.drawn = false;
    pad.photo = null;
    $("prediction").textContent = "Draw a digit.";
    $("bars").replaceChildren();
  };
  clear();
  let last = null;
  const point = (e) => {
    const r = canvas.getBoundingClientRect();
    return [(e.clientX - r.left) * canvas.width / r.width, (e.clientY - r.top) * canvas.height / r.height];
  };
  canvas.addEventListener("pointerdown", (e) => {
    canvas.setPointerCapture(e.pointerId);
    last = point(e);
    stroke(last, last);
  });
  canvas.addEventListener("pointermove", (e) => { if (last) { const p = point(e); stroke(last, p); last = p; } });
  const end = () => { if (last) { last = null; classifySoon(0); } };
  canvas.addEventListener("pointerup", end);
  canvas.addEventListener("pointercancel", end);
  function stroke(a, b) {
    ctx.strokeStyle = "#fff"; ctx.lineWidth = 20; ctx.lineCap = "round"; ctx.lineJoin = "round";
    ctx.beginPath(); ctx.moveTo(a[0], a[1]); ctx.lineTo(b[0], b[1]); ctx.stroke();
    pad.drawn = true;
    classifySoon(120);
  }
  $("clear").addEventListener("click", clear);
  $("upload").addEventListener("change", async (e) => {
    const file = e.target.files[0];
    if (!file) return;
    const img = new Image();
    img.onload = () => {
      clear();
      const s = Math.min(canvas.width / img.width, canvas.height / img.height);
      ctx.drawImage(img, (canvas.width - img.width * s) / 2, (canvas.height - img.height * s) / 2,
                    img.width * s, img.height * s);
      pad.photo = img;
      // a photo of dark ink on white paper: invert so the digit is light on dark, as in MNIST
      const d = ctx.getImageData(0, 0, canvas.width, canvas.height);
      let sum = 0;
      for (let i = 0; i < d.data.length; i += 4) sum += d.data[i];
      const model = classifier();
      if (model && isDigitModel(model) && sum / (d.data.length / 4) > 127) {
        for (let i = 0; i < d.data.length; i += 4) for (let k = 0; k < 3; k++) d.data[i + k] = 255 - d.data[i + k];
        ctx.putImageData(d, 0, 0);
      }
      pad.drawn = true;
      classifySoon(0);
    };
    img.src = URL.createObjectURL(file);
  });
}

// The pad as a 28x28 MNIST-style image, pixel values 0-255: the drawing's bounding box scaled to
// 20x20 and centred by its centre of mass, as MNIST's digits were prepared.
function padImage() {
  const canvas = $("pad");
  const src = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
  let x0 = canvas.width, y0 = canvas.height, x1 = -1, y1 = -1;
  for (let y = 0; y < canvas.height; y++) for (let x = 0; x < canvas.width; x++) {
    if (src[4 * (y * canvas.width + x)] > 20) { x0 = Math.min(x0, x); x1 = Math.max(x1, x); y0 = Math.min(y0, y); y1 = Math.max(y1, y); }
  }
  const out = Array.from({ length: 28 }, () => Array.from({ length: 28 }, () => [0]));
  if (x1 < 0) return out;
  const w = x1 - x0 + 1, h = y1 - y0 + 1, s = 20 / Math.max(w, h);
  const tmp = document.createElement("canvas");
  tmp.width = 28; tmp.height = 28;
  const t = tmp.getContext("2d");
  t.fillStyle = "#000"; t.fillRect(0, 0, 28, 28);
  t.drawImage(canvas, x0, y0, w, h, (28 - w * s) / 2, (28 - h * s) / 2, w * s, h * s);
  const px = t.getImageData(0, 0, 28, 28).data;
  let m = 0, cx = 0, cy = 0;
  for (let y = 0; y < 28; y++) for (let x = 0; x < 28; x++) { const v = px[4 * (y * 28 + x)]; m += v; cx += v * x; cy += v * y; }
  const dx = Math.round(13.5 - cx / m), dy = Math.round(13.5 - cy / m);
  for (let y = 0; y < 28; y++) for (let x = 0; x < 28; x++) {
    const sx = x - dx, sy = y - dy;
    out[y][x][0] = sx >= 0 && sx < 28 && sy >= 0 && sy < 28 ? px[4 * (sy * 28 + sx)] : 0;
  }
  return out;
}

// The pad (or the uploaded photo, whole) at a model's own size and channels, pixel values 0-255.
function pictureFor(model) {
  const shape = model.methods.classify.inputs.images["x-shape"];
  const h = shape[1], w = shape[2], channels = shape.length > 3 ? shape[3] : 1;
  const tmp = document.createElement("canvas");
  tmp.width = w; tmp.height = h;
  const t = tmp.getContext("2d");
  t.drawImage(pad.photo || $("pad"), 0, 0, w, h);
  const px = t.getImageData(0, 0, w, h).data;
  return Array.from({ length: h }, (_, y) => Array.from({ length: w }, (_, x) => {
    const i = 4 * (y * w + x);
    const rgb = [px[i], px[i + 1], px[i + 2]];
    return channels === 3 ? rgb : [Math.round((rgb[0] * 299 + rgb[1] * 587 + rgb[2] * 114) / 1000)];
  }));
}

function classifySoon(delay) {
  clearTimeout(pad.timer);
  pad.timer = setTimeout(() => guarded("classify", classifyPad), delay);
}

async function classifyPad() {
  const model = classifier();
  if (!model || !pad.drawn) return;
  const picture = isDigitModel(model) ? padImage() : pictureFor(model);
  const out = await call(model, "classify", { images: [picture] });
  const probs = out.probabilities[0], names = model.class_names.length ? model.class_names : probs.map((_, i) => String(i));
  const best = probs.indexOf(Math.max(...probs));
  $("prediction").textContent = `${names[best]} (${(100 * probs[best]).toFixed(1)}%)`;
  const bars = $("bars");
  bars.replaceChildren();
  probs.forEach((p, i) => {
    const label = document.createElement("span"); label.textContent = names[i];
    const track = document.createElement("div");
    const bar = document.createElement("div");
    bar.className = "bar" + (i === best ? " top" : "");
    bar.style.width = `${Math.max(0.5, 100 * p)}%`;
    bar.setAttribute("role", "img");
    bar.setAttribute("aria-label", `${names[i]}: ${(100 * p).toFixed(1)}%`);
    track.appendChild(bar);
    const value = document.createElement("span"); value.textContent = `${(100 * p).toFixed(1)}%`;
    bars.append(label, track, value);
  });
}

// ---------------------------------------------------------------------------- inside the CNN
const FIXED = {
  identity: [[0, 0, 0], [0, 1, 0], [0, 0, 0]],
  "edge detection": [[-1, -1, -1], [-1, 8, -1], [-1, -1, -1]],
  sharpen: [[0, -1, 0], [-1, 5, -1], [0, -1, 0]],
  "box blur": [[1 / 9, 1 / 9, 1 / 9], [1 / 9, 1 / 9, 1 / 9], [1 / 9, 1 / 9, 1 / 9]],
};

function convolve(img, k) {      // 'same' 2-D convolution of a 28x28 image (values 0-1)
  const n = img.length, r = Math.floor(k.length / 2);
  return img.map((row, y) => row.map((_, x) => {
    let s = 0;
    for (let i = 0; i < k.length; i++) for (let j = 0; j < k.length; j++) {
      const yy = y + i - r, xx = x + j - r;
      if (yy >= 0 && yy < n && xx >= 0 && xx < n) s += img[yy][xx] * k[i][j];
    }
    return s;
  }));
}

async function showInside() {
  if (!pad.drawn) throw new ApiError("draw a digit on the pad first");
  const img = padImage().map((row) => row.map((v) => v[0] / 255));
  const fixed = $("fixed");
  fixed.replaceChildren();
  for (const [name, k] of Object.entries(FIXED)) tile(fixed, normalise(convolve(img, k)), name, 84);
  const out = await call(served("cnn"), "features", { images: [padImage()] });
  const learned = $("learned");
  learned.replaceChildren();
  out.kernels.forEach((k, f) => {
    const group = document.createElement("div");
    tile(group, normalise(k), `kernel ${f + 1}`, 56);
    tile(group, normalise(out.maps[0].map((row) => row.map((v) => v[f]))), "its map", 56);
    learned.appendChild(group);
  });
}

// ---------------------------------------------------------------------------- denoise
function gaussian(rng) { let u = 0, v = 0; while (!u) u = rng(); v = rng(); return Math.sqrt(-2 * Math.log(u)) * Math.cos(2 * Math.PI * v); }
function mulberry(seed) { return () => { seed |= 0; seed = (seed + 0x6d2b79f5) | 0; let t = Math.imul(seed ^ (seed >>> 15), 1 | seed); t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t; return ((t ^ (t >>> 14)) >>> 0) / 4294967296; }; }

async function reconstruct() {
  if (!pad.drawn) throw new ApiError("draw a digit on the pad first");
  const level = parseFloat($("noise").value), rng = mulberry(7);
  const noisy = padImage().map((row) => row.map((v) => [Math.max(0, Math.min(255, v[0] + 255 * level * gaussian(rng)))]));
  drawImage($("noisy"), noisy.map((row) => row.map((v) => v[0] / 255)));
  const ae = served("autoencoder"), vae = served("vae");
  const jobs = [];
  if (ae) jobs.push(call(ae, "reconstruct", { images: [noisy] }).then((o) => drawImage($("ae-out"), o.images[0])));
  if (vae) jobs.push(call(vae, "reconstruct", { images: [noisy] }).then((o) => drawImage($("vae-out"), o.images[0])));
  await Promise.all(jobs);
}

// ---------------------------------------------------------------------------- latent space
const plane = { range: 3, point: [0, 0], dims: 0 };
const COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"];

async function setupPlane() {
  const vae = served("vae");
  const canvas = $("plane");
  const out = await call(vae, "latent_map", {});
  plane.dims = out.z.length ? out.z[0].length : 0;
  if (plane.dims !== 2) throw new ApiError(`the clickable plane needs a VAE with a 2-D latent space; this one has ${plane.dims} dimensions (kiln train vae --set latent_dim=2)`);
  // the plane spans the test set's codes (a short-trained VAE keeps them near the origin)
  plane.range = Math.max(0.5, ...out.z.map((p) => Math.max(Math.abs(p[0]), Math.abs(p[1])))) * 1.1;
  const ctx = canvas.getContext("2d");
  const toPx = (v) => (v / plane.range + 1) * canvas.width / 2;
  ctx.fillStyle = "#fff"; ctx.fillRect(0, 0, canvas.width, canvas.height);
  out.z.forEach((p, i) => { ctx.fillStyle = COLOURS[out.labels[i] % 10]; ctx.fillRect(toPx(p[0]) - 1.5, canvas.height - toPx(p[1]) - 1.5, 3, 3); });
  plane.background = ctx.getImageData(0, 0, canvas.width, canvas.height);
  const pick = async (z) => {
    plane.point = z;
    ctx.putImageData(plane.background, 0, 0);
    ctx.strokeStyle = "#000"; ctx.lineWidth = 2;
    ctx.beginPath(); ctx.arc(toPx(z[0]), canvas.height - toPx(z[1]), 7, 0, 2 * Math.PI); ctx.stroke();
    const o = await call(vae, "decode", { z: [z] });
    drawImage($("decoded"), o.images[0]);
    $("decoded-at").textContent = `z = (${z[0].toFixed(2)}, ${z[1].toFixed(2)})`;
  };
  canvas.addEventListener("click", (e) => {
    const r = canvas.getBoundingClientRect();
    const x = ((e.clientX - r.left) / r.width * 2 - 1) * plane.range;
    const y = (1 - (e.clientY - r.top) / r.height * 2) * plane.range;
    guarded("latent", () => pick([x, y]));
  });
  canvas.addEventListener("keydown", (e) => {
    const step = plane.range / 20, [x, y] = plane.point;
    const moves = { ArrowLeft: [x - step, y], ArrowRight: [x + step, y], ArrowUp: [x, y + step], ArrowDown: [x, y - step] };
    if (moves[e.key]) { e.preventDefault(); guarded("latent", () => pick(moves[e.key])); }
  });
  await pick([0, 0]);
}

async function interpolate() {
  if (!state.a || !state.b) throw new ApiError("keep two drawings first (A and B)");
  const out = await call(served("vae"), "interpolate", { a: state.a, b: state.b, steps: 10 });
  const strip = $("interp");
  strip.replaceChildren();
  out.images.forEach((img, i) => tile(strip, img, i === 0 ? "A" : i === out.images.length - 1 ? "B" : "", 56));
}

// ---------------------------------------------------------------------------- generate
async function showPng(img, model, method, args) {
  if (img.src.startsWith("blob:")) URL.revokeObjectURL(img.src);
  img.src = await call(model, method, args, true);
  img.hidden = false;
}

function setupGenerate() {
  const digits = $("digits");
  for (let d = 0; d < 10; d++) {
    const b = document.createElement("button");
    b.type = "button"; b.textContent = String(d);
    b.setAttribute("aria-label", `Generate the digit ${d}`);
    b.addEventListener("click", () => guarded("generate", () => showPng($("cgan-out"), served("cgan"), "sample", { digit: d, n: 8, seed: d })));
    digits.appendChild(b);
    for (const id of ["from", "to", "diffusion-digit"]) { const o = document.createElement("option"); o.value = o.textContent = String(d); $(id).appendChild(o); }
  }
  const diffusion = () => ({ digit: +$("diffusion-digit").value, steps: Math.max(1, parseInt($("diffusion-steps").value, 10) || 25),
    guidance: Math.max(0, parseFloat($("diffusion-guidance").value) || 0), seed: Math.floor(Math.random() * 1e6) });
  $("diffusion-run").addEventListener("click", () => guarded("generate", () =>
    showPng($("diffusion-out"), served("diffusion"), "sample", { ...diffusion(), n: 8 })));
  $("diffusion-path").addEventListener("click", () => guarded("generate", () => {
    const args = diffusion();
    return showPng($("diffusion-trajectory"), served("diffusion"), "trajectory", { ...args, steps: Math.max(2, args.steps), frames: 8 });
  }));
  $("to").value = "7";
  $("dcgan-run").addEventListener("click", () => guarded("generate", () =>
    showPng($("dcgan-out"), served("dcgan"), "sample", { n: 16, seed: Math.max(0, parseInt($("seed").value, 10) || 0) })));
  $("morph-run").addEventListener("click", () => guarded("generate", () =>
    showPng($("morph-out"), served("cgan"), "interpolate", { a: +$("from").value, b: +$("to").value, steps: 10 })));
}

// ---------------------------------------------------------------------------- activity
async function setupActivity() {
  const har = served("har");
  const ex = await call(har, "examples", {});
  const select = $("window");
  ex.labels.forEach((label, i) => { const o = document.createElement("option"); o.value = String(i); o.textContent = `window ${i + 1}: a ${label} recording`; select.appendChild(o); });
  const show = async () => {
    const i = +select.value, w = ex.windows[i];
    drawTraces($("traces"), w, ex.channels);
    const out = await call(har, "classify", { windows: [w] });
    const p = out.probabilities[0][out.classes[0]];
    $("activity-out").textContent = `predicted: ${out.labels[0]} (${(100 * p).toFixed(1)}%), true: ${ex.labels[i]}`;
  };
  select.addEventListener("change", () => guarded("activity", show));
  await show();
}

function drawTraces(canvas, w, channels) {
  const ctx = canvas.getContext("2d"), n = w.length, c = w[0].length, lane = canvas.height / c;
  ctx.fillStyle = "#fff"; ctx.fillRect(0, 0, canvas.width, canvas.height);
  ctx.font = "11px system-ui"; ctx.lineWidth = 1.2;
  for (let k = 0; k < c; k++) {
    const col = w.map((row) => row[k]), lo = Math.min(...col), hi = Math.max(...col), span = hi - lo || 1;
    ctx.strokeStyle = COLOURS[k % 10]; ctx.beginPath();
    col.forEach((v, t) => { const x = 70 + t * (canvas.width - 80) / (n - 1), y = lane * (k + 0.9) - (v - lo) / span * lane * 0.8; t ? ctx.lineTo(x, y) : ctx.moveTo(x, y); });
    ctx.stroke();
    ctx.fillStyle = "#333"; ctx.fillText(channels[k] || `ch ${k}`, 4, lane * (k + 0.55));
  }
}

// ---------------------------------------------------------------------------- text
function textModel() { return state.models.find((m) => m.ref === $("text-model").value) || served("gpt") || served("lstm"); }

async function continueText() {
  const model = textModel();
  const args = { prompt: $("prompt").value, temperature: parseFloat($("temperature").value),
    max_chars: Math.max(1, parseInt($("length").value, 10) || 1), seed: Math.floor(Math.random() * 1e6) };
  if (model.methods.generate.inputs.top_k) args.top_k = 40;
  const out = await call(model, "generate", args);
  $("text-out").textContent = out.text;
}

async function showAttention() {   // one block's attention over the prompt, averaged over its heads
  const model = served("gpt");
  const out = await call(model, "attention", { text: $("prompt").value.slice(-48) || "ROMEO:",
    layer: Math.max(1, parseInt($("attention-layer").value, 10) || 1) });
  const heads = out.weights, n = out.characters.length, canvas = $("attention"), ctx = canvas.getContext("2d");
  const cell = Math.floor((canvas.width - 20) / n);
  ctx.fillStyle = "#fff"; ctx.fillRect(0, 0, canvas.width, canvas.height);
  ctx.font = "10px monospace"; ctx.textAlign = "center";
  for (let q = 0; q < n; q++) {
    for (let k = 0; k < n; k++) {
      const w = heads.reduce((sum, h) => sum + h[q][k], 0) / heads.length;
      ctx.fillStyle = `rgba(180, 70, 30, ${Math.min(1, w * 1.5)})`;
      ctx.fillRect(20 + k * cell, 20 + q * cell, cell, cell);
    }
    const c = out.characters[q] === "\n" ? "\u21b5" : out.characters[q];
    ctx.fillStyle = "#333"; ctx.fillText(c, 10, 20 + q * cell + cell * 0.8); ctx.fillText(c, 20 + q * cell + cell / 2, 14);
  }
  canvas.hidden = false;
}

// ---------------------------------------------------------------------------- models
function renderModels() {
  const list = $("model-list");
  if (!state.models.length) { list.innerHTML = "<p>No models are served. Train one with <code>kiln train cnn</code> and restart <code>kiln serve</code>.</p>"; return; }
  const table = document.createElement("table");
  table.innerHTML = "<thead><tr><th scope=col>model</th><th scope=col>plugin</th><th scope=col>dataset</th><th scope=col>metrics</th><th scope=col>training</th></tr></thead>";
  const body = document.createElement("tbody");
  for (const m of state.models) {
    const tr = document.createElement("tr");
    const metrics = Object.entries(m.metrics || {}).slice(0, 4).map(([k, v]) => `${k} ${typeof v === "number" ? v.toFixed(4) : v}`).join(", ");
    for (const text of [`${m.name} v${m.version}`, m.plugin, m.dataset, metrics]) { const td = document.createElement("td"); td.textContent = text; tr.appendChild(td); }
    const curve = document.createElement("td");
    if (m.history && m.history.length) curve.appendChild(lossCurve(m.history, m.headline));
    tr.appendChild(curve);
    body.appendChild(tr);
    const pics = document.createElement("tr");
    const td = document.createElement("td"); td.colSpan = 5; td.className = "thumbs";
    for (const name of m.artifacts || []) {
      const img = document.createElement("img");
      img.alt = `${m.name} v${m.version}: ${name}`; img.title = name; img.loading = "lazy";
      request(`models/${m.name}/versions/${m.version}/artifacts/${encodeURIComponent(name)}`)
        .then((r) => r.blob()).then((b) => { img.src = URL.createObjectURL(b); }).catch(() => img.remove());
      td.appendChild(img);
    }
    pics.appendChild(td);
    body.appendChild(pics);
  }
  table.appendChild(body);
  list.replaceChildren(table);
}

function lossCurve(history, headline) {      // the first logged metric per epoch, as a sparkline
  const key = Object.keys(history[0]).find((k) => !["epoch", "examples_per_s", "seconds", "workers"].includes(k));
  const values = history.map((h) => h[key]), lo = Math.min(...values), hi = Math.max(...values), span = hi - lo || 1;
  const c = document.createElement("canvas"); c.width = 160; c.height = 48;
  c.style.background = "#fff";
  c.setAttribute("role", "img");
  c.setAttribute("aria-label", `${key} over ${values.length} epochs: ${values[0].toFixed(3)} to ${values[values.length - 1].toFixed(3)}`);
  const ctx = c.getContext("2d"); ctx.strokeStyle = "#b4461e"; ctx.lineWidth = 2; ctx.beginPath();
  const at = (v, i) => [4 + i * 152 / Math.max(1, values.length - 1), 44 - (v - lo) / span * 40];
  values.forEach((v, i) => { const [x, y] = at(v, i); i ? ctx.lineTo(x, y) : ctx.moveTo(x, y); });
  ctx.stroke();
  ctx.fillStyle = "#b4461e";
  values.forEach((v, i) => { const [x, y] = at(v, i); ctx.beginPath(); ctx.arc(x, y, 2.5, 0, 2 * Math.PI); ctx.fill(); });
  ctx.fillStyle = "#333"; ctx.font = "10px system-ui"; ctx.fillText(key, 4, 10);
  return c;
}

// ---------------------------------------------------------------------------- start
const TRAIN = { cnn: "kiln train cnn", autoencoder: "kiln train autoencoder", vae: "kiln train vae --set latent_dim=2",
  dcgan: "kiln train dcgan", cgan: "kiln train cgan", har: "kiln train har", lstm: "kiln train lstm",
  gpt: "kiln train gpt", diffusion: "kiln train diffusion" };

function markSections() {
  for (const section of document.querySelectorAll("section[data-plugin]")) {
    const wanted = section.dataset.plugin.split(" ");
    const missing = wanted.filter((p) => !served(p));
    const note = section.querySelector(".missing");
    const body = section.querySelector(".body");
    body.hidden = missing.length === wanted.length;
    note.hidden = missing.length === 0;
    note.innerHTML = "";
    if (missing.length) {
      note.append(missing.length === wanted.length ? "Not served here. " : "Partly served. ");
      missing.forEach((p, i) => {
        note.append(`${i ? " " : ""}${p} is not served: train it with `);
        const code = document.createElement("code"); code.textContent = TRAIN[p] || `kiln train ${p}`;
        note.append(code, ", then restart kiln serve.");
      });
    }
    for (const part of section.querySelectorAll("[data-part]")) part.hidden = !served(part.dataset.part);
  }
}

async function load() {
  const r = await request("models");
  state.models = (await r.json()).models.filter((m) => m.state === "READY");
  state.byPlugin = {};
  for (const m of state.models) if (!state.byPlugin[m.plugin]) state.byPlugin[m.plugin] = m;
  markSections();
  renderModels();
  const choice = $("classifier");
  choice.replaceChildren(...state.models.filter((m) => m.methods && m.methods.classify && m.methods.classify.inputs.images)
    .map((m) => { const o = document.createElement("option"); o.value = m.ref; o.textContent = `${m.ref} (${m.dataset.split("/").pop().split("?")[0]})`; return o; }));
  if (served("cnn")) choice.value = served("cnn").ref;
  $("text-model").replaceChildren(...state.models.filter((m) => m.methods && m.methods.generate && m.methods.generate.inputs.prompt)
    .map((m) => { const o = document.createElement("option"); o.value = m.ref; o.textContent = `${m.ref} (${m.plugin})`; return o; }));
  if (served("gpt")) { $("text-model").value = served("gpt").ref; $("attention-layer").max = served("gpt").methods.attention.inputs.layer.maximum || 1; }
  if (served("vae")) guarded("latent", setupPlane);
  if (served("har")) guarded("activity", setupActivity);
}

function start() {
  setupPad();
  setupGenerate();
  $("classifier").addEventListener("change", () => classifySoon(0));
  $("inside-run").addEventListener("click", () => guarded("inside", showInside));
  $("noise").addEventListener("input", () => { $("noise-value").textContent = $("noise").value; });
  $("denoise-run").addEventListener("click", () => guarded("denoise", reconstruct));
  $("keep-a").addEventListener("click", () => { state.a = padImage(); report("latent", { message: "kept A" }); });
  $("keep-b").addEventListener("click", () => { state.b = padImage(); report("latent", { message: "kept B" }); });
  $("interp-run").addEventListener("click", () => guarded("latent", interpolate));
  $("temperature").addEventListener("input", () => { $("temperature-value").textContent = $("temperature").value; });
  $("text-run").addEventListener("click", () => guarded("text", continueText));
  $("attention-run").addEventListener("click", () => guarded("text", showAttention));
  $("auth").addEventListener("submit", (e) => {
    e.preventDefault();
    state.token = $("token").value.trim() || null;
    $("auth").hidden = true;
    load().catch((err) => { $("model-list").textContent = err.message; });
  });
  load().catch((err) => { $("model-list").textContent = err.message; });
}

document.addEventListener("DOMContentLoaded", start);

// napari-medsam serve: the decoder in the browser: up to two Web Workers (static/worker.js), each
// with ONNX Runtime Web (wasm) and the two graphs of server/decoder_onnx.py: the per-image part
// (run once on each embedding) and the per-box part (every drag move, only the token window
// around the box, as the engine's fast decoder). Here: the authors' postprocessing (crop, bilinear
// align_corners=False, logit > 0) and painting, coalesced previews (each worker decodes one box at
// a time, a move goes to a free worker at once, else it waits as the newest box; a result older
// than the one painted is dropped), the live stats. The server decodes when the page cannot.
import { api, q, sliceParam, winParam } from "./api.js";
import { draw } from "./canvas.js";
import { $, M, S, fail, params } from "./state.js";

function startWorker(threads) {
  // a decoder worker; resolves once its sessions are made
  const w = new Worker("/static/worker.js");
  w.busy = false; w.waits = new Map();
  w.onmessage = (ev) => {
    const m = ev.data, key = m.type === "logits" ? `logits:${m.seq}` : m.type === "image" ? `image:${m.token}` : m.type;
    const f = w.waits.get(key);
    if (f) { w.waits.delete(key); f(m); }
  };
  w.onerror = (ev) => { // the worker itself failed (e.g. no vendor files): the server decodes
    ev.preventDefault();
    for (const [k, f] of w.waits) { w.waits.delete(k); f({ ok: false, error: ev.message || "the decoder worker failed" }); }
  };
  w.ask = (msg, key, transfer) => new Promise((done) => { w.waits.set(key, done); w.postMessage(msg, transfer || []); });
  return w.ask({ type: "init", image: S.session.decoder.image, box: S.session.decoder.box, threads }, "init").then((m) => {
    if (!m.ok) { w.terminate(); throw new Error(m.error); }
    return w;
  });
}

export async function initDecoder() {
  let label = "decoder: on the server";
  if (params.get("decoder") === "server" || !S.session.decoder || !window.Worker || !window.WebAssembly) {
    M.decoder = "server";
  } else {
    try {
      const cores = window.crossOriginIsolated ? Math.max(1, Math.min(4, navigator.hardwareConcurrency || 1)) : 1;
      // on up to 2 cores one worker with a thread a core (a decode in 22-29 ms, p50; two workers
      // of one thread each: 28-34 ms, the two decodes sharing the cores, docs/benchmarks_web.md);
      // on more, two workers, so a move's decode starts at once instead of waiting for the one in flight
      const opt = (k, v) => Math.max(1, Math.floor(Number(params.get(k)) || v)); // a bad ?workers= etc.: the default
      const n = opt("workers", cores > 2 ? 2 : 1), threads = opt("threads", Math.max(1, Math.floor(cores / n)));
      S.workers = await Promise.all(Array.from({ length: n }, () => startWorker(threads)));
      M.decoder = "browser";
      label = `decoder: in the browser (wasm ${n} × ${threads} thread${threads > 1 ? "s" : ""})`;
    } catch (e) {
      console.warn("ONNX Runtime Web unavailable, the server decodes previews:", e);
      M.decoder = "server";
    }
  }
  const badge = $("decoder-badge");
  badge.textContent = label;
  badge.className = "pill " + (M.decoder === "browser" ? "ok" : "warn");
}

function makeInterp(H, W, nh, nw) {
  // bilinear, align_corners=False, from the (nh, nw) unpadded logits to (H, W), as torch's interpolate
  const axis = (nIn, nOut) => {
    const i0 = new Int32Array(nOut), i1 = new Int32Array(nOut), f = new Float32Array(nOut), scale = nIn / nOut;
    for (let o = 0; o < nOut; o++) {
      const src = Math.max(0, (o + 0.5) * scale - 0.5), a = Math.min(Math.floor(src), nIn - 1);
      i0[o] = a; i1[o] = Math.min(a + 1, nIn - 1); f[o] = src - a;
    }
    return { i0, i1, f };
  };
  return { H, W, nh, nw, rows: axis(nh, H), cols: axis(nw, W), row: new Float32Array(nw) };
}

function paintMask(maskFn) {
  // maskFn(px) fills preview pixels; returns nothing
  const c = S.preview;
  if (c.width !== S.W || c.height !== S.H) { c.width = S.W; c.height = S.H; S.previewData = null; }
  const g = c.getContext("2d");
  if (!S.previewData) S.previewData = g.createImageData(S.W, S.H);
  const px = new Uint32Array(S.previewData.data.buffer);
  px.fill(0);
  maskFn(px);
  g.putImageData(S.previewData, 0, 0);
  S.previewShown = true;
}
const PREVIEW = (200 << 24) | (63 << 16) | (210 << 8) | 255; // rgba(255, 210, 63)

function paintLogits(logits, size, region) {
  // region [y0, y1, x0, x1]: the image pixels the decoded window can set (the rest is FILL_LOGIT)
  const it = S.interp, { H, W, nw, rows, cols, row } = it;
  const [y0, y1, x0, x1] = region || [0, H, 0, W];
  const c0 = cols.i0[x0], c1 = cols.i1[x1 - 1] + 1;
  paintMask((px) => {
    for (let y = y0; y < y1; y++) {
      const a = rows.i0[y] * size, b = rows.i1[y] * size, fy = rows.f[y];
      for (let x = c0; x < Math.min(c1, nw); x++) { const t = logits[a + x]; row[x] = t + (logits[b + x] - t) * fy; }
      const base = y * W;
      for (let x = x0; x < x1; x++) {
        const l = row[cols.i0[x]], v = l + (row[cols.i1[x]] - l) * cols.f[x];
        if (v > 0) px[base + x] = PREVIEW;
      }
    }
  });
}
function paintBits(bits) {
  paintMask((px) => {
    const n = S.W * S.H;
    for (let i = 0; i < n; i++) if (bits[i >> 3] & (128 >> (i & 7))) px[i] = PREVIEW;
  });
}

function paintJob(job, res) {
  // paint a decoded box in the next animation frame, unless the drag ended or a newer one is on screen
  return new Promise((done) => requestAnimationFrame(() => {
    if (job.id === S.dragId && S.drag && job.seq > S.paintedSeq) {
      S.paintedSeq = job.seq;
      const t0 = performance.now();
      if (res.logits) paintLogits(res.logits, res.size, res.region); else paintBits(res.bits);
      const t1 = performance.now();
      draw();
      const t2 = performance.now();
      M.stats.previews++; M.stats.latency_ms.push(t2 - job.t);
      // where a preview's time goes: waiting for a free decoder, result -> frame, mask, canvas
      push("queue_ms", (job.started || job.t) - job.t); push("frame_ms", t0 - (job.back || t0));
      push("mask_ms", t1 - t0); push("draw_ms", t2 - t1);
      if (res.tr) { const o = performance.timeOrigin; push("to_worker_ms", res.tr - (o + job.started)); push("worker_wait_ms", res.ts - res.tr); push("from_worker_ms", o + job.back - res.te); }
    }
    done();
  }));
}

const push = (k, v) => { (M.stats[k] = M.stats[k] || []).push(v); };
export function requestPreview(box, tEvent) {
  M.stats.moves++;
  if (M.stats.handler_ms) M.stats.handler_ms.push(performance.now() - tEvent); else M.stats.handler_ms = [performance.now() - tEvent];
  S.pending = { box, t: tEvent, id: S.dragId, seq: ++S.seq };
  if (M.decoder === "browser") dispatch(); else if (!S.inflight) pumpServer();
}

function dispatch() {
  // hand the newest box to a free worker (the box in model pixels, the authors' trunc(box * 256 / max(H, W)))
  for (const w of S.workers) {
    if (!S.pending || !S.emb) return;
    if (w.busy) continue;
    const job = S.pending, e = S.emb, r = e.inputSize / Math.max(e.H, e.W);
    S.pending = null; w.busy = true; job.started = performance.now();
    const b = new Float32Array(job.box.map((v) => Math.trunc(v * r)));
    w.ask({ type: "decode", seq: job.seq, box: b }, `logits:${job.seq}`).then((res) => {
      w.busy = false; job.back = performance.now();
      dispatch(); // the next box goes to the worker now, not after this one is painted
      if (res.ok === false) throw new Error(res.error);
      M.stats.decode_ms.push(res.ms);
      if (res.grown) M.stats.grown = (M.stats.grown || 0) + 1;
      return paintJob(job, res);
    }).catch(fail).finally(showStats);
    // (no ``w.busy = false`` here: by now the worker may be decoding the next box, dispatched above;
    // clearing it queued boxes inside the worker, up to 90 ms of waiting, docs/benchmarks_web.md)
  }
}

async function pumpServer() {
  // the server decodes (no wasm): one request at a time, the newest box waits
  while (S.pending) {
    const job = S.pending; S.pending = null; S.inflight = true;
    try {
      const t0 = performance.now();
      const r = await api("POST", `/api/images/${S.index}/preview`, { box: job.box, z: S.z, window: S.window }, true);
      const res = { bits: new Uint8Array(await r.arrayBuffer()) };
      M.stats.decode_ms.push(performance.now() - t0);
      await paintJob(job, res);
    } catch (e) { fail(e); } finally { S.inflight = false; }
  }
  showStats();
}
export function previewBits() {
  // the preview on screen as packed bits (row-major, most significant bit first), base64: for tests
  if (!S.previewShown || !S.previewData) return null;
  const px = new Uint32Array(S.previewData.data.buffer), n = px.length, out = new Uint8Array((n + 7) >> 3);
  for (let i = 0; i < n; i++) if (px[i]) out[i >> 3] |= 128 >> (i & 7);
  let bin = ""; for (let i = 0; i < out.length; i += 8192) bin += String.fromCharCode.apply(null, out.subarray(i, i + 8192));
  return btoa(bin);
}
export function resetStats() { M.stats = { warm_ms: M.stats.warm_ms, previews: 0, moves: 0, latency_ms: [], decode_ms: [], accepts: 0, accept_ms: [] }; showStats(); }
function pct(a, p) { if (!a.length) return NaN; const s = [...a].sort((x, y) => x - y); return s[Math.min(s.length - 1, Math.floor(p * s.length))]; }
export function showStats() {
  const L = M.stats.latency_ms.slice(-200);
  $("stat-previews").textContent = `${M.stats.previews} / ${M.stats.moves} moves`;
  $("stat-latency").textContent = L.length ? `p50 ${pct(L, 0.5).toFixed(0)} · p95 ${pct(L, 0.95).toFixed(0)} ms` : "–";
  const A = M.stats.accept_ms;
  $("stat-accept").textContent = A.length ? `${A[A.length - 1].toFixed(0)} ms` : "–";
}

export async function loadEmbedding(token) {
  if (M.decoder !== "browser") return;
  const r = await api("GET", `/api/images/${S.index}/embedding${q(sliceParam(), winParam())}`, undefined, true);
  const buf = await r.arrayBuffer();
  if (token !== S.token) return;
  const [H, W] = r.headers.get("X-Medsam-Original").split(",").map(Number);
  const [nh, nw] = r.headers.get("X-Medsam-Resized").split(",").map(Number);
  const shape = r.headers.get("X-Medsam-Shape").split(",").map(Number);
  const inputSize = Number(r.headers.get("X-Medsam-Input-Size"));
  // the per-image part of the decoder, once per embedding in every worker: its outputs stay there
  S.emb = null; S.pending = null;
  await Promise.all(S.workers.map((w, i) => {
    const copy = i === S.workers.length - 1 ? buf : buf.slice(0);
    return w.ask({ type: "image", token, buf: copy, shape, meta: { H, W, nh, nw, gh: shape[2], gw: shape[3], inputSize } }, `image:${token}`, [copy]);
  })).then((replies) => { for (const m of replies) { if (m.ok === false) throw new Error(m.error); if (m.warm && m.warm.length) M.stats.warm_ms = m.warm; } });
  if (token !== S.token) return;
  S.emb = { H, W, nh, nw, gh: shape[2], gw: shape[3], inputSize };
  S.interp = makeInterp(H, W, nh, nw);
}

// napari-medsam serve: the decoder in the browser: two ONNX Runtime Web (wasm) sessions, the
// per-image part (run once on each embedding) and the per-box part (every drag move, only the
// token window around the box, as the engine's fast decoder: server/web_decoder.py), the
// authors' postprocessing (crop, bilinear align_corners=False, logit > 0), coalesced previews
// (one decode at a time, the newest box waits), the live stats.
import { api, q, sliceParam, winParam } from "./api.js";
import { draw } from "./canvas.js";
import { $, M, S, fail, params } from "./state.js";

export async function initDecoder() {
  if (params.get("decoder") === "server" || !S.session.decoder || !window.ort) {
    M.decoder = "server";
  } else {
    try {
      ort.env.wasm.wasmPaths = "/static/vendor/";
      const threads = window.crossOriginIsolated ? Math.max(1, Math.min(4, navigator.hardwareConcurrency || 1)) : 1;
      ort.env.wasm.numThreads = Number(params.get("threads") || threads);
      const opts = { executionProviders: ["wasm"], graphOptimizationLevel: "all" };
      S.ortImage = await ort.InferenceSession.create(S.session.decoder.image, opts);
      S.ort = await ort.InferenceSession.create(S.session.decoder.box, opts);
      M.decoder = "browser";
    } catch (e) {
      console.warn("ONNX Runtime Web unavailable, the server decodes previews:", e);
      M.decoder = "server";
    }
  }
  const badge = $("decoder-badge");
  badge.textContent = M.decoder === "browser" ? `decoder: in the browser (wasm ×${ort.env.wasm.numThreads})` : "decoder: on the server";
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

// the token window of a box (model pixels), as engine.fast.windows.auto_window: the box grown by
// a quarter of its size + 8 px a side; null when empty (then the whole grid is decoded)
const FILL_LOGIT = -1e4, MARGIN = 0.25, PAD = 8;
function autoWindow(b, e) {
  const s = e.inputSize / e.gh, x0 = Math.min(b[0], b[2]), x1 = Math.max(b[0], b[2]);
  const y0 = Math.min(b[1], b[3]), y1 = Math.max(b[1], b[3]);
  const mx = (x1 - x0) * MARGIN + PAD, my = (y1 - y0) * MARGIN + PAD;
  const ty0 = Math.max(0, Math.floor((y0 - my) / s)), ty1 = Math.min(Math.ceil(e.nh / s), Math.ceil((y1 + my) / s) + 1);
  const tx0 = Math.max(0, Math.floor((x0 - mx) / s)), tx1 = Math.min(Math.ceil(e.nw / s), Math.ceil((x1 + mx) / s) + 1);
  return ty1 <= ty0 || tx1 <= tx0 ? null : [ty0, ty1, tx0, tx1];
}
function touchesBorder(L, win, e, s, size) {
  // a positive logit on a window edge that is not the edge of the unpadded image (windows.touches_border)
  const [ty0, ty1, tx0, tx1] = win, y0 = ty0 * s, y1 = Math.min(ty1 * s, e.nh), x0 = tx0 * s, x1 = Math.min(tx1 * s, e.nw);
  const rowHit = (y) => { for (let x = x0; x < x1; x++) if (L[y * size + x] > 0) return true; return false; };
  const colHit = (x) => { for (let y = y0; y < y1; y++) if (L[y * size + x] > 0) return true; return false; };
  return (ty0 > 0 && rowHit(y0)) || (y1 < e.nh && rowHit(y1 - 1)) || (tx0 > 0 && colHit(x0)) || (x1 < e.nw && colHit(x1 - 1));
}
function pixelSpan(nIn, nOut, lo, hi) {
  // output rows outside which bilinear reads no input row in [lo, hi) (windows._pixel_span)
  const r = nOut / nIn;
  return [Math.max(0, Math.floor((lo - 0.5) * r - 0.5) - 1), Math.min(nOut, Math.ceil((hi + 0.5) * r - 0.5) + 1)];
}
const range = (a, b) => { const v = new BigInt64Array(b - a); for (let i = 0; i < v.length; i++) v[i] = BigInt(a + i); return v; };
async function runWindow(b, win) {
  const e = S.emb, [ty0, ty1, tx0, tx1] = win, s = e.inputSize / e.gh, size = e.inputSize, w = (tx1 - tx0) * s;
  const out = await S.ort.run({
    ...S.decState, box: new ort.Tensor("float32", b, [1, 4]),
    rows: new ort.Tensor("int64", range(ty0, ty1), [ty1 - ty0]), cols: new ort.Tensor("int64", range(tx0, tx1), [tx1 - tx0]),
  });
  const L = S.logits || (S.logits = new Float32Array(size * size)), m = out.logits.data;
  L.fill(FILL_LOGIT);
  for (let r = 0; r < (ty1 - ty0) * s; r++) L.set(m.subarray(r * w, (r + 1) * w), (ty0 * s + r) * size + tx0 * s);
  return L;
}
async function decodeBox(box) {
  if (M.decoder === "browser") {
    const e = S.emb, r = e.inputSize / Math.max(e.H, e.W), s = e.inputSize / e.gh, size = e.inputSize;
    const b = new Float32Array(box.map((v) => Math.trunc(v * r)));
    const full = [0, e.gh, 0, e.gw];
    let win = autoWindow(b, e) || full, L = await runWindow(b, win);
    if (win !== full && touchesBorder(L, win, e, s, size)) { win = full; L = await runWindow(b, win); M.stats.grown = (M.stats.grown || 0) + 1; }
    const [ys, ye] = pixelSpan(e.nh, e.H, win[0] * s, Math.min(win[1] * s, e.nh));
    const [xs, xe] = pixelSpan(e.nw, e.W, win[2] * s, Math.min(win[3] * s, e.nw));
    return { logits: L, size, region: [ys, ye, xs, xe] };
  }
  const r = await api("POST", `/api/images/${S.index}/preview`, { box, z: S.z, window: S.window }, true);
  return { bits: new Uint8Array(await r.arrayBuffer()) };
}

export function requestPreview(box, tEvent) {
  M.stats.moves++;
  if (M.stats.handler_ms) M.stats.handler_ms.push(performance.now() - tEvent); else M.stats.handler_ms = [performance.now() - tEvent];
  S.pending = { box, t: tEvent, id: S.dragId };
  if (!S.inflight) pump();
}
async function pump() {
  while (S.pending) {
    const job = S.pending; S.pending = null; S.inflight = true;
    try {
      const t0 = performance.now();
      const res = await decodeBox(job.box);
      M.stats.decode_ms.push(performance.now() - t0);
      if (job.id !== S.dragId || !S.drag) continue; // the drag ended meanwhile
      await new Promise((done) => requestAnimationFrame(() => {
        if (res.logits) paintLogits(res.logits, res.size, res.region); else paintBits(res.bits);
        draw();
        const ms = performance.now() - job.t;
        M.stats.previews++; M.stats.latency_ms.push(ms);
        done();
      }));
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
export function resetStats() { M.stats = { previews: 0, moves: 0, latency_ms: [], decode_ms: [], accepts: 0, accept_ms: [] }; showStats(); }
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
  // the per-image part of the decoder, once per embedding: its outputs are the box part's inputs
  const state = await S.ortImage.run({ embedding: new ort.Tensor("float16", new Uint16Array(buf), shape) });
  if (token !== S.token) return;
  S.decState = state;
  S.emb = { H, W, nh, nw, gh: shape[2], gw: shape[3], inputSize: Number(r.headers.get("X-Medsam-Input-Size")) };
  S.interp = makeInterp(H, W, nh, nw);
}

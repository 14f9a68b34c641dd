// napari-medsam serve: the decoder in the browser: ONNX Runtime Web (wasm) session over the
// image embedding, the authors' postprocessing (crop, bilinear align_corners=False, logit > 0),
// coalesced previews (one decode at a time, the newest box waits), the live stats.
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
      S.ort = await ort.InferenceSession.create(S.session.decoder, { executionProviders: ["wasm"], graphOptimizationLevel: "all" });
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

function paintLogits(logits, size) {
  const it = S.interp, { H, W, nw, rows, cols, row } = it;
  paintMask((px) => {
    for (let y = 0; y < H; y++) {
      const a = rows.i0[y] * size, b = rows.i1[y] * size, fy = rows.f[y];
      for (let x = 0; x < nw; x++) { const t = logits[a + x]; row[x] = t + (logits[b + x] - t) * fy; }
      const base = y * W;
      for (let x = 0; x < W; x++) {
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

async function decodeBox(box) {
  if (M.decoder === "browser") {
    const e = S.emb, r = e.inputSize / Math.max(e.H, e.W);
    const b = new Float32Array(box.map((v) => Math.trunc(v * r)));
    const out = await S.ort.run({ embedding: e.tensor, box: new ort.Tensor("float32", b, [1, 4]) });
    return { logits: out.logits.data, size: out.logits.dims[3] };
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
        if (res.logits) paintLogits(res.logits, res.size); else paintBits(res.bits);
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
  S.emb = { tensor: new ort.Tensor("float16", new Uint16Array(buf), shape), H, W, nh, nw, inputSize: Number(r.headers.get("X-Medsam-Input-Size")) };
  S.interp = makeInterp(H, W, nh, nw);
}

// napari-medsam serve: one decoder of the page, in a Web Worker (classic script): ONNX Runtime Web
// (wasm) with the two graphs of server/web_decoder.py. The page runs up to two of these, so a
// move's decode starts at once on a free core instead of waiting for the one in flight.
// Messages in:  {type: "init", image, box, threads}   -> {type: "init", ok, error}
//               {type: "image", token, buf, shape}    -> {type: "image", token, warm}   (the image graph, once;
//                                                        warm: the warm-up decodes' ms, first image only)
//               {type: "decode", seq, box}            -> {type: "logits", seq, logits, size, region, ms, grown,
//                                                        tr, ts, te}  (tr/ts/te: absolute ms at receipt,
//                                                        decode start and end, for the page's stats)
// ``box`` in model pixels (the page scales it); ``logits`` the 256 x 256 grid (FILL_LOGIT outside
// the decoded token window), ``region`` [y0, y1, x0, x1] the image pixels the window can set.
/* global ort */
importScripts("/static/vendor/ort.wasm.min.js");

const FILL_LOGIT = -1e4, MARGIN = 0.25, PAD = 8;
let image = null, box = null, state = null, emb = null;

function autoWindow(b, e) {
  // the box grown by a quarter of its size + 8 px a side, in tokens (engine.fast.windows.auto_window)
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
  const e = emb, [ty0, ty1, tx0, tx1] = win, s = e.inputSize / e.gh, size = e.inputSize, w = (tx1 - tx0) * s;
  const out = await box.run({
    ...state, box: new ort.Tensor("float32", b, [1, 4]),
    rows: new ort.Tensor("int64", range(ty0, ty1), [ty1 - ty0]), cols: new ort.Tensor("int64", range(tx0, tx1), [tx1 - tx0]),
  });
  const L = new Float32Array(size * size).fill(FILL_LOGIT), m = out.logits.data;
  for (let r = 0; r < (ty1 - ty0) * s; r++) L.set(m.subarray(r * w, (r + 1) * w), (ty0 * s + r) * size + tx0 * s);
  return L;
}

async function decode(b) {
  const e = emb, s = e.inputSize / e.gh, size = e.inputSize, full = [0, e.gh, 0, e.gw];
  let win = autoWindow(b, e) || full, L = await runWindow(b, win), grown = false;
  if (win !== full && touchesBorder(L, win, e, s, size)) { win = full; L = await runWindow(b, win); grown = true; }
  const [ys, ye] = pixelSpan(e.nh, e.H, win[0] * s, Math.min(win[1] * s, e.nh));
  const [xs, xe] = pixelSpan(e.nw, e.W, win[2] * s, Math.min(win[3] * s, e.nw));
  return { logits: L, size, region: [ys, ye, xs, xe], grown };
}

// V8 compiles the wasm's functions as they are first called (the first decode measured 40 ms, the
// next ones 27 at the same size): the first image's state runs the box graph on four boxes of
// growing size before the page is told it is ready, so the user's first drag does not pay for it.
const WARM_RUNS = 4;
let warmed = false;
async function warmUp() {
  const ms = [], e = emb, n = Math.min(e.nh, e.nw);
  for (let k = 0; k < WARM_RUNS; k++) {
    const f = 0.1 + (0.4 * k) / (WARM_RUNS - 1), c = n / 2, h = (n * f) / 2, t0 = performance.now();
    await decode(new Float32Array([c - h, c - h, c + h, c + h]));
    ms.push(performance.now() - t0);
  }
  return ms;
}

// one message at a time, in order (an image's tensors are never replaced under a running decode)
let chain = Promise.resolve();
const abs = () => performance.timeOrigin + performance.now();
onmessage = (ev) => { ev.data.tr = abs(); chain = chain.then(() => handle(ev.data)); };

async function handle(m) {
  try {
    if (m.type === "init") {
      ort.env.wasm.wasmPaths = "/static/vendor/";
      ort.env.wasm.numThreads = m.threads;
      const opts = { executionProviders: ["wasm"], graphOptimizationLevel: "all" };
      image = await ort.InferenceSession.create(m.image, opts);
      box = await ort.InferenceSession.create(m.box, opts);
      postMessage({ type: "init", ok: true });
    } else if (m.type === "image") {
      state = await image.run({ embedding: new ort.Tensor("float16", new Uint16Array(m.buf), m.shape) });
      emb = m.meta;
      const warm = warmed ? [] : await warmUp();
      warmed = true;
      postMessage({ type: "image", token: m.token, warm });
    } else if (m.type === "decode") {
      const t0 = performance.now(), ts = abs(), r = await decode(m.box);
      postMessage({ type: "logits", seq: m.seq, ...r, ms: performance.now() - t0, tr: m.tr, ts, te: abs() }, [r.logits.buffer]);
    }
  } catch (e) {
    postMessage({ type: m.type === "decode" ? "logits" : m.type, seq: m.seq, token: m.token, ok: false, error: String(e && e.message || e) });
  }
}

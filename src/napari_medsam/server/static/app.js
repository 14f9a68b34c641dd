// napari-medsam serve: the page. The server encodes; this page decodes every drag move
// itself with ONNX Runtime Web (wasm) against the image embedding it was sent once,
// and paints the mask while the box is dragged. Release accepts: the server decodes the
// box with the engine's default path and saves it as a new object.
//
// Automation contract (docs/web.md): #medsam-canvas, window.medsam.ready,
// window.medsam.imageToClient(x, y), window.medsam.stats = {previews, latency_ms}.
"use strict";
(() => {
  const $ = (id) => document.getElementById(id);
  const canvas = $("medsam-canvas");
  const ctx = canvas.getContext("2d");
  const params = new URLSearchParams(location.search);
  const clientId = sessionStorage.getItem("medsam-client") || (crypto.randomUUID ? crypto.randomUUID() : String(Math.random()).slice(2));
  sessionStorage.setItem("medsam-client", clientId);

  const M = (window.medsam = {
    ready: false, readonly: false, busy: false, image: -1, slice: null, decoder: "loading", client: clientId,
    stats: { previews: 0, moves: 0, latency_ms: [], decode_ms: [], accepts: 0, accept_ms: [] },
    imageToClient, clientToImage, resetStats, open: (i) => openImage(i), errors: [], previewBits,
  });

  const S = {
    session: null, state: null, index: -1, z: null, window: null, token: 0,
    img: null, W: 0, H: 0, labels: null, labelCanvas: document.createElement("canvas"),
    preview: document.createElement("canvas"), previewShown: false, emb: null, ort: null,
    view: { s: 1, ox: 0, oy: 0 }, selected: null, drag: null, pending: null, inflight: false, dragId: 0,
    colors: new Map(), interp: null,
  };

  // ---------------------------------------------------------------- server calls
  async function api(method, path, body, raw) {
    const opt = { method, headers: { "X-Medsam-Client": clientId } };
    if (body !== undefined) { opt.headers["Content-Type"] = "application/json"; opt.body = JSON.stringify(body); }
    const r = await fetch(path, opt);
    if (!r.ok) {
      let msg = `${r.status} ${r.statusText}`;
      try { msg = (await r.json()).error || msg; } catch (e) { /* not JSON */ }
      const err = new Error(msg); err.status = r.status; throw err;
    }
    return raw ? r : r.json();
  }

  function status(text) { $("status-text").textContent = text; }
  function overlay(text) { $("overlay-msg").textContent = text || ""; }
  let toastTimer = 0;
  function toast(text, error) {
    const t = $("toast"); t.textContent = text; t.hidden = false; t.className = "toast" + (error ? " error" : "");
    clearTimeout(toastTimer); toastTimer = setTimeout(() => { t.hidden = true; }, error ? 6000 : 3500);
    if (error) M.errors.push(text);
  }
  function fail(e) { toast(e.message || String(e), true); status(`error: ${e.message || e}`); }

  // ---------------------------------------------------------------- colours
  function colorOf(id) {
    if (!S.colors.has(id)) {
      const h = (id * 137.508) % 360, s = 70, l = 55;
      const c = hsl(h / 360, s / 100, l / 100);
      S.colors.set(id, c);
    }
    return S.colors.get(id);
  }
  function hsl(h, s, l) {
    const f = (n) => { const k = (n + h * 12) % 12; const a = s * Math.min(l, 1 - l); return l - a * Math.max(-1, Math.min(k - 3, 9 - k, 1)); };
    return [Math.round(f(0) * 255), Math.round(f(8) * 255), Math.round(f(4) * 255)];
  }
  const css = (c, a = 1) => `rgba(${c[0]},${c[1]},${c[2]},${a})`;

  // ---------------------------------------------------------------- geometry
  function layout() {
    const r = canvas.getBoundingClientRect(), dpr = window.devicePixelRatio || 1;
    canvas.width = Math.max(1, Math.round(r.width * dpr)); canvas.height = Math.max(1, Math.round(r.height * dpr));
    if (S.W) {
      const pad = 16, s = Math.min((r.width - 2 * pad) / S.W, (r.height - 2 * pad) / S.H);
      S.view = { s, ox: (r.width - S.W * s) / 2, oy: (r.height - S.H * s) / 2 };
    }
    draw();
  }
  function imageToClient(x, y) {
    const r = canvas.getBoundingClientRect(), v = S.view;
    return { x: r.left + v.ox + (x + 0.5) * v.s, y: r.top + v.oy + (y + 0.5) * v.s };
  }
  function clientToImage(cx, cy) {
    const r = canvas.getBoundingClientRect(), v = S.view;
    return { x: (cx - r.left - v.ox) / v.s, y: (cy - r.top - v.oy) / v.s };
  }
  const clampPx = (v, n) => Math.min(n - 1, Math.max(0, Math.floor(v)));
  function boxFrom(a, b) {
    const x0 = clampPx(a.x, S.W), y0 = clampPx(a.y, S.H), x1 = clampPx(b.x, S.W), y1 = clampPx(b.y, S.H);
    return [Math.min(x0, x1), Math.min(y0, y1), Math.max(x0, x1), Math.max(y0, y1)];
  }
  const hasArea = (b) => b[2] > b[0] && b[3] > b[1];

  // ---------------------------------------------------------------- drawing
  function draw() {
    const dpr = window.devicePixelRatio || 1, v = S.view;
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    if (!S.img) return;
    ctx.imageSmoothingEnabled = v.s < 1;
    ctx.drawImage(S.img, v.ox, v.oy, S.W * v.s, S.H * v.s);
    ctx.imageSmoothingEnabled = false;
    ctx.globalAlpha = 0.45; ctx.drawImage(S.labelCanvas, v.ox, v.oy, S.W * v.s, S.H * v.s);
    ctx.globalAlpha = 0.55; if (S.previewShown) ctx.drawImage(S.preview, v.ox, v.oy, S.W * v.s, S.H * v.s);
    ctx.globalAlpha = 1;
    for (const o of currentBoxes()) {
      if (S.drag && S.drag.mode === "corner" && S.drag.label === o.label) continue;
      strokeBox(o.box, colorOf(o.label), o.label === S.selected, false);
    }
    if (S.drag && (S.drag.mode === "new" || S.drag.mode === "corner") && S.drag.box) {
      strokeBox(S.drag.box, S.drag.mode === "corner" ? colorOf(S.drag.label) : [255, 210, 63], S.drag.mode === "corner", true);
    }
  }
  function rectOf(b) { const v = S.view; return [v.ox + b[0] * v.s, v.oy + b[1] * v.s, (b[2] - b[0] + 1) * v.s, (b[3] - b[1] + 1) * v.s]; }
  function strokeBox(b, c, selected, dashed) {
    const [x, y, w, h] = rectOf(b);
    ctx.lineWidth = selected ? 2.5 : 1.6; ctx.strokeStyle = css(c); ctx.setLineDash(dashed ? [6, 4] : []);
    ctx.strokeRect(x, y, w, h); ctx.setLineDash([]);
    if (selected) {
      ctx.fillStyle = "#fff";
      for (const [hx, hy] of [[x, y], [x + w, y], [x + w, y + h], [x, y + h]]) { ctx.fillRect(hx - 4, hy - 4, 8, 8); ctx.strokeRect(hx - 4, hy - 4, 8, 8); }
    }
  }
  function currentBoxes() {
    if (!S.state) return [];
    const out = [];
    for (const o of S.state.objects) for (const b of o.boxes) if (!S.state.depth || b.slice === S.z) out.push({ label: o.label, box: b.box });
    return out;
  }
  function paintLabels() {
    const c = S.labelCanvas, W = S.W, H = S.H;
    if (c.width !== W || c.height !== H) { c.width = W; c.height = H; }
    if (!S.labels) { c.getContext("2d").clearRect(0, 0, W, H); return; }
    const g = c.getContext("2d"), im = g.createImageData(W, H), px = new Uint32Array(im.data.buffer), lut = new Map();
    const L = S.labels;
    for (let i = 0; i < L.length; i++) {
      const id = L[i];
      if (!id) continue;
      let v = lut.get(id);
      if (v === undefined) { const k = colorOf(id); v = (255 << 24) | (k[2] << 16) | (k[1] << 8) | k[0]; lut.set(id, v); }
      px[i] = v;
    }
    g.putImageData(im, 0, 0);
  }

  // ---------------------------------------------------------------- the decoder in the browser
  async function initDecoder() {
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

  function requestPreview(box, tEvent) {
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
  function previewBits() {
    // the preview on screen as packed bits (row-major, most significant bit first), base64: for tests
    if (!S.previewShown || !S.previewData) return null;
    const px = new Uint32Array(S.previewData.data.buffer), n = px.length, out = new Uint8Array((n + 7) >> 3);
    for (let i = 0; i < n; i++) if (px[i]) out[i >> 3] |= 128 >> (i & 7);
    let bin = ""; for (let i = 0; i < out.length; i += 8192) bin += String.fromCharCode.apply(null, out.subarray(i, i + 8192));
    return btoa(bin);
  }
  function resetStats() { M.stats = { previews: 0, moves: 0, latency_ms: [], decode_ms: [], accepts: 0, accept_ms: [] }; showStats(); }
  function pct(a, p) { if (!a.length) return NaN; const s = [...a].sort((x, y) => x - y); return s[Math.min(s.length - 1, Math.floor(p * s.length))]; }
  function showStats() {
    const L = M.stats.latency_ms.slice(-200);
    $("stat-previews").textContent = `${M.stats.previews} / ${M.stats.moves} moves`;
    $("stat-latency").textContent = L.length ? `p50 ${pct(L, 0.5).toFixed(0)} · p95 ${pct(L, 0.95).toFixed(0)} ms` : "–";
    const A = M.stats.accept_ms;
    $("stat-accept").textContent = A.length ? `${A[A.length - 1].toFixed(0)} ms` : "–";
  }

  // ---------------------------------------------------------------- loading an image
  function sliceParam() { return S.state && S.state.depth ? `z=${S.z}` : ""; }
  function winParam() { return S.window ? `window=${encodeURIComponent(S.window)}` : ""; }
  const q = (...p) => { const s = p.filter(Boolean).join("&"); return s ? `?${s}` : ""; };

  async function loadImagePixels(token) {
    const r = await api("GET", `/api/images/${S.index}/image.png${q(sliceParam(), winParam())}`, undefined, true);
    const bmp = await createImageBitmap(await r.blob());
    if (token !== S.token) return;
    S.img = bmp;
  }
  async function loadLabels(token) {
    const r = await api("GET", `/api/images/${S.index}/labels${q(sliceParam())}`, undefined, true);
    const buf = await r.arrayBuffer();
    if (token !== S.token) return;
    S.labels = r.headers.get("X-Medsam-Dtype") === "uint32" ? new Uint32Array(buf) : new Uint16Array(buf);
    paintLabels();
  }
  async function loadEmbedding(token) {
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

  async function loadView() {
    const token = ++S.token;
    M.ready = false; S.previewShown = false;
    overlay(M.readonly ? "" : "Encoding the image…");
    status(`loading ${S.state.name}${S.state.depth ? ` slice ${S.z}` : ""}…`);
    const t0 = performance.now();
    await Promise.all([loadImagePixels(token), loadLabels(token)]);
    if (token !== S.token) return;
    layout();
    if (!M.readonly) await loadEmbedding(token);
    if (token !== S.token) return;
    if (M.decoder === "server") {
      // the server's embedding must exist before the first preview: ask for it now
      await api("GET", `/api/images/${S.index}/embedding${q(sliceParam(), winParam())}`, undefined, true).then((r) => r.arrayBuffer());
    }
    if (token !== S.token) return;
    overlay("");
    M.ready = !M.readonly;
    status(`${S.state.name}: ready (${((performance.now() - t0) / 1000).toFixed(2)} s) · ${M.readonly ? "read-only" : "drag a box"}`);
  }

  async function openImage(i) {
    if (S.drag) return;
    try {
      M.ready = false;
      const st = await api("POST", `/api/open/${i}`);
      S.index = i; M.image = i; S.selected = null;
      setState(st);
      S.W = st.shape[st.depth ? 2 : 1]; S.H = st.shape[st.depth ? 1 : 0];
      S.window = st.window || (st.ct ? null : null);
      S.z = st.depth ? (S.z !== null && S.z < st.depth && S._lastIndex === i ? S.z : Math.floor(st.depth / 2)) : null;
      S._lastIndex = i; M.slice = S.z;
      setupControls();
      await loadView();
      refreshList();
    } catch (e) { fail(e); }
  }

  function setState(st) {
    S.state = st; M.readonly = st.readonly;
    $("image-name").textContent = st.name;
    const s = $("image-status"); s.textContent = st.status; s.className = "pill s-" + st.status.replace(" ", "-");
    $("readonly-badge").hidden = !st.readonly;
    canvas.classList.toggle("readonly", st.readonly);
    $("btn-undo").disabled = st.readonly || !st.can_undo;
    $("btn-redo").disabled = st.readonly || !st.can_redo;
    $("btn-delete").disabled = st.readonly || S.selected === null;
    $("btn-done").disabled = st.readonly;
    $("btn-prev").disabled = st.index <= 0;
    $("btn-next").disabled = S.session && st.index >= S.session.total - 1;
    setProgress(st.done, st.total);
    renderObjects();
  }
  function setProgress(done, total) {
    $("progress-text").textContent = `${done}/${total} done`;
    $("progress-fill").style.width = `${total ? (100 * done) / total : 0}%`;
  }
  function renderObjects() {
    const ul = $("object-list"); ul.innerHTML = "";
    const objs = S.state.objects;
    $("object-count").textContent = objs.length ? `(${objs.length})` : "";
    if (!objs.length) { const li = document.createElement("li"); li.className = "empty"; li.textContent = "none yet: drag a box on the image"; ul.appendChild(li); }
    for (const o of objs) {
      const li = document.createElement("li");
      li.className = o.label === S.selected ? "selected" : "";
      const sl = o.boxes.length && S.state.depth ? ` · z ${o.boxes.map((b) => b.slice).join(",")}` : "";
      li.innerHTML = `<span class="swatch" style="background:${css(colorOf(o.label))}"></span><span>object ${o.label}${sl}</span><span class="px mono">${o.pixels.toLocaleString()} px</span>`;
      li.onclick = () => { select(o.label); const b = o.boxes[0]; if (b && S.state.depth && b.slice !== S.z && b.slice !== null) setSlice(b.slice); };
      ul.appendChild(li);
    }
  }
  function select(label) { S.selected = label; $("btn-delete").disabled = M.readonly || label === null; renderObjects(); draw(); }

  function setupControls() {
    const st = S.state;
    $("window-ctl").hidden = !st.ct;
    if (st.ct) {
      const sel = $("window-select"); sel.innerHTML = "";
      const opts = [["", "auto (soft tissue 40/400)"], ...Object.entries(st.presets).map(([k, v]) => [k, `${k.replace("_", " ")} ${v[0]}/${v[1]}`])];
      for (const [v, t] of opts) { const o = document.createElement("option"); o.value = v; o.textContent = t; sel.appendChild(o); }
      if (S.window && !opts.some(([v]) => v === S.window)) { const o = document.createElement("option"); o.value = S.window; o.textContent = S.window; sel.appendChild(o); }
      sel.value = S.window || "";
    }
    $("slice-ctl").hidden = !st.depth;
    if (st.depth) { const sl = $("slice-slider"); sl.max = st.depth - 1; sl.value = S.z; $("slice-text").textContent = `${S.z}/${st.depth - 1}`; }
  }
  function setSlice(z) {
    if (!S.state || !S.state.depth || S.drag) return;
    z = Math.max(0, Math.min(S.state.depth - 1, z));
    if (z === S.z) return;
    S.z = z; M.slice = z; $("slice-slider").value = z; $("slice-text").textContent = `${z}/${S.state.depth - 1}`;
    loadView().catch(fail);
  }

  async function refreshList() {
    try {
      const s = await api("GET", "/api/session");
      S.session = { ...S.session, ...s };
      const ul = $("image-list"); ul.innerHTML = "";
      $("list-count").textContent = `(${s.total})`;
      for (const it of s.items) {
        const li = document.createElement("li");
        li.className = it.index === S.index ? "current" : "";
        li.title = it.name + (it.held ? " (another labeler has it)" : "");
        li.innerHTML = `<span class="dot s-${it.status.replace(" ", "-")}"></span><span class="name"></span>${it.held ? '<span class="lock">● busy</span>' : ""}`;
        li.querySelector(".name").textContent = it.name;
        li.onclick = () => openImage(it.index);
        ul.appendChild(li);
      }
      setProgress(s.done, s.total);
    } catch (e) { fail(e); }
  }

  // ---------------------------------------------------------------- edits
  async function edit(fn, what) {
    if (M.readonly) { toast("read-only: another labeler has this image", true); return; }
    M.busy = true; overlay(what);
    const t0 = performance.now();
    try {
      const st = await fn();
      const ms = performance.now() - t0;
      setState(st);
      await loadLabels(S.token);
      S.previewShown = false; draw();
      return { st, ms };
    } catch (e) { fail(e); S.previewShown = false; draw(); } finally { M.busy = false; overlay(""); }
  }
  async function acceptBox(box) {
    const r = await edit(() => api("POST", `/api/images/${S.index}/objects`, { box, z: S.z, window: S.window }), "Saving…");
    if (r) {
      M.stats.accepts++; M.stats.accept_ms.push(r.ms); showStats();
      select(r.st.label);
      status(`object ${r.st.label} saved (${r.ms.toFixed(0)} ms)`);
      refreshList();
    }
  }
  async function editBox(label, box) {
    const r = await edit(() => api("PUT", `/api/images/${S.index}/objects/${label}`, { box, z: S.z, window: S.window }), "Saving…");
    if (r) status(`object ${label} re-segmented (${r.ms.toFixed(0)} ms)`);
  }
  async function deleteSelected() {
    if (S.selected === null) return;
    const label = S.selected;
    const r = await edit(() => api("DELETE", `/api/images/${S.index}/objects/${label}`), "Deleting…");
    if (r) { select(null); status(`object ${label} deleted`); }
  }
  async function undo(redo) {
    const r = await edit(() => api("POST", `/api/images/${S.index}/${redo ? "redo" : "undo"}`), redo ? "Redo…" : "Undo…");
    if (r) { if (S.selected !== null && !r.st.objects.some((o) => o.label === S.selected)) select(null); status((redo ? "redone: " : "undone: ") + (r.st.undone || r.st.redone || "nothing")); }
  }
  async function markDone() {
    const r = await edit(() => api("POST", `/api/images/${S.index}/status`, { status: "done" }), "Marking done…");
    if (!r) return;
    await refreshList();
    const n = await api("GET", `/api/images/${S.index}/next`);
    if (n.index !== S.index) await openImage(n.index); else toast("all images are done 🎉");
  }
  async function exportAll() {
    try {
      status("exporting…");
      const r = await api("POST", "/api/export");
      const errs = Object.keys(r.errors).length;
      toast(`exported ${r.files} image(s) to OUT/${r.folder} (summary: OUT/${r.summary})${errs ? `; ${errs} failed` : ""}`, errs > 0);
      status(`export: ${r.files} file(s) in OUT/${r.folder}`);
    } catch (e) { fail(e); }
  }
  function step(d) { const i = S.index + d; if (S.session && i >= 0 && i < S.session.total) openImage(i); }

  // ---------------------------------------------------------------- pointer
  function hitHandle(p) {
    if (S.selected === null) return null;
    const o = currentBoxes().find((b) => b.label === S.selected);
    if (!o) return null;
    const [x, y, w, h] = rectOf(o.box), r = canvas.getBoundingClientRect();
    const cx = p.clientX - r.left, cy = p.clientY - r.top;
    const corners = [[x, y], [x + w, y], [x + w, y + h], [x, y + h]];
    for (let k = 0; k < 4; k++) if (Math.abs(cx - corners[k][0]) <= 8 && Math.abs(cy - corners[k][1]) <= 8) return { label: o.label, box: o.box, corner: k };
    return null;
  }
  function boxAt(pt) {
    let best = null;
    for (const o of currentBoxes()) {
      const b = o.box;
      if (pt.x >= b[0] && pt.x < b[2] + 1 && pt.y >= b[1] && pt.y < b[3] + 1) {
        const a = (b[2] - b[0]) * (b[3] - b[1]);
        if (!best || a < best.a) best = { label: o.label, a };
      }
    }
    return best && best.label;
  }
  canvas.addEventListener("pointerdown", (e) => {
    if (e.button !== 0 || !S.img) return;
    canvas.focus();
    const pt = clientToImage(e.clientX, e.clientY);
    const h = M.ready && !M.busy ? hitHandle(e) : null;
    S.dragId++;
    if (h) {
      const b = h.box, opp = [[b[2], b[3]], [b[0], b[3]], [b[0], b[1]], [b[2], b[1]]][h.corner];
      S.drag = { mode: "corner", label: h.label, anchor: { x: opp[0] + 0.5, y: opp[1] + 0.5 }, box: b.slice() };
    } else {
      S.drag = { mode: "pending", start: pt, cx: e.clientX, cy: e.clientY };
    }
    canvas.setPointerCapture(e.pointerId);
    e.preventDefault();
  });
  canvas.addEventListener("pointermove", (e) => {
    const d = S.drag;
    if (!d) return;
    const pt = clientToImage(e.clientX, e.clientY);
    if (d.mode === "pending") {
      if (Math.hypot(e.clientX - d.cx, e.clientY - d.cy) < 3 || !M.ready || M.busy) return;
      d.mode = "new";
    }
    d.box = boxFrom(d.mode === "new" ? d.start : d.anchor, pt);
    draw();
    if (hasArea(d.box)) requestPreview(d.box.slice(), e.timeStamp);
  });
  function endDrag(e, cancel) {
    const d = S.drag;
    if (!d) return;
    S.drag = null; S.dragId++; S.pending = null;
    if (e && canvas.hasPointerCapture(e.pointerId)) canvas.releasePointerCapture(e.pointerId);
    if (cancel) { S.previewShown = false; draw(); return; }
    if (d.mode === "pending") { select(boxAt(clientToImage(e.clientX, e.clientY)) ?? null); return; }
    if (!d.box || !hasArea(d.box)) { S.previewShown = false; draw(); return; }
    draw();
    if (d.mode === "new") acceptBox(d.box); else editBox(d.label, d.box);
  }
  canvas.addEventListener("pointerup", (e) => endDrag(e, false));
  canvas.addEventListener("pointercancel", (e) => endDrag(e, true));

  // ---------------------------------------------------------------- keys and buttons
  document.addEventListener("keydown", (e) => {
    if (e.target.tagName === "SELECT" || e.target.tagName === "INPUT") return;
    const k = e.key.toLowerCase();
    if (k === "escape") endDrag(null, true);
    else if ((e.ctrlKey || e.metaKey) && k === "z") { e.preventDefault(); undo(e.shiftKey); }
    else if ((e.ctrlKey || e.metaKey) && k === "y") { e.preventDefault(); undo(true); }
    else if (k === "delete" || k === "backspace") { e.preventDefault(); deleteSelected(); }
    else if (e.ctrlKey || e.metaKey || e.altKey) return;
    else if (k === "n") step(1);
    else if (k === "p") step(-1);
    else if (k === "d" && !M.readonly) markDone();
    else if (k === "arrowup") { e.preventDefault(); setSlice(S.z + 1); }
    else if (k === "arrowdown") { e.preventDefault(); setSlice(S.z - 1); }
  });
  $("btn-prev").onclick = () => step(-1);
  $("btn-next").onclick = () => step(1);
  $("btn-done").onclick = () => markDone();
  $("btn-undo").onclick = () => undo(false);
  $("btn-redo").onclick = () => undo(true);
  $("btn-delete").onclick = () => deleteSelected();
  $("btn-export").onclick = () => exportAll();
  $("slice-slider").oninput = (e) => setSlice(Number(e.target.value));
  $("window-select").onchange = (e) => { S.window = e.target.value || null; loadView().catch(fail); };
  new ResizeObserver(() => layout()).observe($("canvas-wrap"));

  // ---------------------------------------------------------------- start
  setInterval(() => { api("POST", "/api/heartbeat").catch(() => {}); }, 5000);
  setInterval(() => { if (!S.drag && !M.busy) refreshList(); }, 15000);
  window.addEventListener("pagehide", () => navigator.sendBeacon(`/api/release?client=${encodeURIComponent(clientId)}`));

  async function start() {
    try {
      S.session = await api("GET", "/api/session");
      $("session-name").textContent = `· ${S.session.total} images · ${S.session.model}`;
      await initDecoder();
      await refreshList();
      const want = params.get("image");
      await openImage(want !== null ? Math.max(0, Math.min(S.session.total - 1, Number(want))) : S.session.start);
    } catch (e) { fail(e); overlay(e.message); }
  }
  start();
})();

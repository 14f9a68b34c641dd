// napari-medsam serve: the page. The server encodes; this page decodes every drag move
// itself with ONNX Runtime Web (wasm) against the image embedding it was sent once
// (decoder.js), and paints the mask while the box is dragged (canvas.js). Release accepts:
// the server decodes the box with the engine's default path and saves it as a new object.
//
// Automation contract (docs/web.md): #medsam-canvas, window.medsam.ready,
// window.medsam.imageToClient(x, y), window.medsam.stats = {previews, latency_ms}.
import { api, q, sliceParam, winParam } from "./api.js";
import { bindPointer, clientToImage, colorOf, css, draw, endDrag, imageToClient, layout, paintLabels } from "./canvas.js";
import { initDecoder, loadEmbedding, previewBits, requestPreview, resetStats, showStats } from "./decoder.js";
import { $, M, S, canvas, clientId, fail, overlay, params, status, toast } from "./state.js";

window.medsam = Object.assign(M, { imageToClient, clientToImage, resetStats, open: (i) => openImage(i), previewBits });

// ---------------------------------------------------------------- loading an image
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
  S.state = st; M.readonly = st.readonly; showWarnings(st.warnings);
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
    showWarnings(s.warnings);
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

// the session's warnings (damaged records moved aside, interrupted saves settled): a banner
let warningsSeen = 0;
function showWarnings(list) {
  if (!list) return;
  M.warnings = list;
  if (list.length <= warningsSeen) return;
  const ul = $("warn-list"); ul.innerHTML = "";
  for (const w of list) { const li = document.createElement("li"); li.textContent = w; ul.appendChild(li); }
  warningsSeen = list.length;
  $("warn-banner").hidden = false;
  layout();
}
$("warn-close").onclick = () => { $("warn-banner").hidden = true; layout(); };

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

// ---------------------------------------------------------------- pointer, keys and buttons
bindPointer({ preview: requestPreview, accept: acceptBox, edit: editBox, select });
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
    showWarnings(S.session.warnings);
    $("session-name").textContent = `· ${S.session.total} images · ${S.session.model}`;
    await initDecoder();
    await refreshList();
    const want = params.get("image");
    await openImage(want !== null ? Math.max(0, Math.min(S.session.total - 1, Number(want))) : S.session.start);
  } catch (e) { fail(e); overlay(e.message); }
}
start();

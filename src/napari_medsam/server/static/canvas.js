// napari-medsam serve: the canvas: colours, image <-> client geometry, drawing, pointer events.
import { canvas, ctx, M, S } from "./state.js";

// ---------------------------------------------------------------- colours
export function colorOf(id) {
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
export const css = (c, a = 1) => `rgba(${c[0]},${c[1]},${c[2]},${a})`;

// ---------------------------------------------------------------- geometry
export function layout() {
  const r = canvas.getBoundingClientRect(), dpr = window.devicePixelRatio || 1;
  canvas.width = Math.max(1, Math.round(r.width * dpr)); canvas.height = Math.max(1, Math.round(r.height * dpr));
  if (S.W) {
    const pad = 16, s = Math.min((r.width - 2 * pad) / S.W, (r.height - 2 * pad) / S.H);
    S.view = { s, ox: (r.width - S.W * s) / 2, oy: (r.height - S.H * s) / 2 };
  }
  draw();
}
export function imageToClient(x, y) {
  const r = canvas.getBoundingClientRect(), v = S.view;
  return { x: r.left + v.ox + (x + 0.5) * v.s, y: r.top + v.oy + (y + 0.5) * v.s };
}
export function clientToImage(cx, cy) {
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
export function draw() {
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
export function paintLabels() {
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

// ---------------------------------------------------------------- pointer
// act: { preview(box, tEvent), accept(box), edit(label, box), select(label) }, given by app.js
let act = null;
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
function onDown(e) {
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
}
// Where the browser has it (Chromium), the preview is asked for on pointerrawupdate, which comes as
// soon as the pointer moves, instead of pointermove, which waits for the next animation frame (up to
// 16.7 ms of latency, docs/benchmarks_web.md); the outline is drawn on pointermove either way.
const RAW = "onpointerrawupdate" in window;
function track(e) {
  // the dragged box at this event; false while a click has not yet become a drag
  const d = S.drag;
  if (!d) return false;
  if (d.mode === "pending") {
    if (Math.hypot(e.clientX - d.cx, e.clientY - d.cy) < 3 || !M.ready || M.busy) return false;
    d.mode = "new";
  }
  d.box = boxFrom(d.mode === "new" ? d.start : d.anchor, clientToImage(e.clientX, e.clientY));
  return true;
}
function ask(e) { if (hasArea(S.drag.box)) act.preview(S.drag.box.slice(), e.timeStamp); }
function onRaw(e) { if (track(e)) ask(e); }
function onMove(e) {
  if (!track(e)) return;
  draw();
  if (!RAW) ask(e);
}
export function endDrag(e, cancel) {
  const d = S.drag;
  if (!d) return;
  S.drag = null; S.dragId++; S.pending = null;
  if (e && canvas.hasPointerCapture(e.pointerId)) canvas.releasePointerCapture(e.pointerId);
  if (cancel) { S.previewShown = false; draw(); return; }
  if (d.mode === "pending") { act.select(boxAt(clientToImage(e.clientX, e.clientY)) ?? null); return; }
  if (!d.box || !hasArea(d.box)) { S.previewShown = false; draw(); return; }
  draw();
  if (d.mode === "new") act.accept(d.box); else act.edit(d.label, d.box);
}
export function bindPointer(actions) {
  act = actions;
  canvas.addEventListener("pointerdown", onDown);
  canvas.addEventListener("pointermove", onMove);
  if (RAW) canvas.addEventListener("pointerrawupdate", onRaw);
  canvas.addEventListener("pointerup", (e) => endDrag(e, false));
  canvas.addEventListener("pointercancel", (e) => endDrag(e, true));
}

// napari-medsam serve: the page's shared state and status messages (see app.js).
export const $ = (id) => document.getElementById(id);
export const canvas = $("medsam-canvas");
export const ctx = canvas.getContext("2d");
export const params = new URLSearchParams(location.search);
export const clientId = sessionStorage.getItem("medsam-client") || (crypto.randomUUID ? crypto.randomUUID() : String(Math.random()).slice(2));
sessionStorage.setItem("medsam-client", clientId);

// window.medsam (the automation contract, docs/web.md); app.js adds the functions
export const M = {
  ready: false, readonly: false, busy: false, image: -1, slice: null, decoder: "loading", client: clientId,
  stats: { previews: 0, moves: 0, latency_ms: [], decode_ms: [], accepts: 0, accept_ms: [] }, errors: [],
};

export const S = {
  session: null, state: null, index: -1, z: null, window: null, token: 0,
  img: null, W: 0, H: 0, labels: null, labelCanvas: document.createElement("canvas"),
  preview: document.createElement("canvas"), previewShown: false, emb: null, workers: [], seq: 0, paintedSeq: 0,
  view: { s: 1, ox: 0, oy: 0 }, selected: null, drag: null, pending: null, inflight: false, dragId: 0,
  colors: new Map(), interp: null,
};

export function status(text) { $("status-text").textContent = text; }
export function overlay(text) { $("overlay-msg").textContent = text || ""; }
let toastTimer = 0;
export function toast(text, error) {
  const t = $("toast"); t.textContent = text; t.hidden = false; t.className = "toast" + (error ? " error" : "");
  clearTimeout(toastTimer); toastTimer = setTimeout(() => { t.hidden = true; }, error ? 6000 : 3500);
  if (error) M.errors.push(text);
}
export function fail(e) { toast(e.message || String(e), true); status(`error: ${e.message || e}`); }

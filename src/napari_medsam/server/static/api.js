// napari-medsam serve: HTTP calls to the server (the image is addressed by its index, never a path).
import { S, clientId } from "./state.js";

export async function api(method, path, body, raw) {
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

export function sliceParam() { return S.state && S.state.depth ? `z=${S.z}` : ""; }
export function winParam() { return S.window ? `window=${encodeURIComponent(S.window)}` : ""; }
export const q = (...p) => { const s = p.filter(Boolean).join("&"); return s ? `?${s}` : ""; };

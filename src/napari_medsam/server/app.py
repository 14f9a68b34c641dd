"""HTTP layer of ``napari-medsam serve``: FastAPI routes over :class:`WebService`.

Images are addressed by index (``/api/images/3``), never by a path; static files
come from the package's ``static/`` folder only. With a token, every request
(page, static files, API) needs it: once as ``?token=`` on the page address (then
an HttpOnly cookie), or as ``Authorization: Bearer <token>``.
"""

from __future__ import annotations

import hmac
import mimetypes
from pathlib import Path

from fastapi import Body, FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles

from napari_medsam.engine.errors import MedSAMError
from napari_medsam.engine.session import SessionError

from .service import LockedError, WebService
from .work import EditError

STATIC = Path(__file__).parent / "static"
# the page is ES modules: browsers refuse a module served with another type (X-Content-Type-Options:
# nosniff); some systems' type tables map .js to text/plain, so say it here
mimetypes.add_type("text/javascript", ".js")
mimetypes.add_type("text/javascript", ".mjs")
COOKIE = "medsam_token"
ISOLATION = {  # cross-origin isolation: lets ONNX Runtime Web use wasm threads (SharedArrayBuffer)
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Embedder-Policy": "require-corp",
    "Cross-Origin-Resource-Policy": "same-origin",
    "X-Content-Type-Options": "nosniff",
}


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": " ".join(str(message).split())}, status_code=status)


def create_app(
    service: WebService,
    decoder=None,
    token: str | None = None,
    allowed_hosts: list[str] | None = None,
) -> FastAPI:
    """The app. ``allowed_hosts``: Host header names accepted without a token (DNS-rebinding guard)."""
    app = FastAPI(title="napari-medsam", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service
    hosts = set(allowed_hosts or ["127.0.0.1", "localhost", "::1", "[::1]"])

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if token:
            auth = request.headers.get("authorization", "")
            given = (
                auth[7:].strip()
                if auth.lower().startswith("bearer ")
                else (request.query_params.get("token") or request.cookies.get(COOKIE) or "")
            )
            if not hmac.compare_digest(given.encode(), token.encode()):
                return _error(401, "a valid token is needed: open the address printed by `napari-medsam serve`")
        elif _hostname(request.headers.get("host", "")) not in hosts:
            return _error(403, f"host {request.headers.get('host')!r} refused: this server answers {sorted(hosts)}")
        response = await call_next(request)
        for k, v in ISOLATION.items():
            response.headers.setdefault(k, v)
        if token and request.query_params.get("token"):
            response.set_cookie(COOKIE, token, httponly=True, samesite="strict")
        return response

    @app.exception_handler(MedSAMError)
    async def medsam_error(request: Request, exc: MedSAMError):
        if isinstance(exc, LockedError):
            return _error(409, str(exc))
        if isinstance(exc, EditError):
            return _error(404, str(exc))
        return _error(400, str(exc))

    def idx(i: int) -> int:
        try:
            return service.check_index(i)
        except SessionError as exc:
            raise _NotFound(str(exc)) from None

    @app.exception_handler(_NotFound)
    async def not_found(request: Request, exc: _NotFound):
        return _error(404, str(exc))

    def client(request: Request) -> str:
        return request.headers.get("x-medsam-client") or request.query_params.get("client") or "anonymous"

    def z_of(z: int | None) -> int | None:
        return None if z is None or z < 0 else z

    @app.get("/")
    def index(request: Request):
        if token and request.query_params.get("token"):
            resp = RedirectResponse("/", status_code=303)
            return resp
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")

    @app.get("/api/session")
    def session_info(request: Request):
        c = client(request)
        return {
            **service.listing(c),
            "start": service.start_index(c),
            "model": service.model.name,
            # the file's stem (a digest of the weights and the graph code) in the address: a browser
            # never pairs an old cached graph with a new one (they are cached for a day)
            "decoder": {k: f"/api/decoder/{k}.onnx?v={getattr(decoder, k).stem}" for k in ("image", "box")}
            if decoder
            else None,
            "device": str(service.model.device),
            "warnings": list(service.session.warnings),
        }

    @app.get("/api/decoder/{part}.onnx")
    def decoder_file(part: str):
        if decoder is None:
            return _error(404, f"no browser decoder for {service.model.name}: previews are decoded by the server")
        if part not in ("image", "box"):
            return _error(404, f"the browser decoder has an image and a box part, not {part!r}")
        return FileResponse(
            getattr(decoder, part), media_type="application/octet-stream", headers={"Cache-Control": "max-age=86400"}
        )

    @app.get("/api/by-name")
    def by_name(name: str):
        i = service.index_of(name)
        return _error(404, f"{name!r} is not an image of this session") if i is None else {"index": i}

    @app.post("/api/open/{i}")
    def open_image(i: int, request: Request):
        return service.open(idx(i), client(request))

    @app.get("/api/images/{i}")
    def state(i: int, request: Request):
        return service.state(idx(i), client(request))

    @app.get("/api/images/{i}/image.png")
    def image_png(i: int, z: int | None = None, window: str | None = None):
        import cv2

        rgb = service.slice_rgb(idx(i), z_of(z), window)
        gray = bool((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all())
        ok, buf = cv2.imencode(".png", rgb[..., 0] if gray else rgb[..., ::-1], [cv2.IMWRITE_PNG_COMPRESSION, 1])
        return Response(buf.tobytes(), media_type="image/png", headers={"Cache-Control": "no-cache"})

    @app.get("/api/images/{i}/embedding")
    def embedding(i: int, z: int | None = None, window: str | None = None):
        data, head = service.embedding_bytes(idx(i), z_of(z), window)
        return Response(data, media_type="application/octet-stream", headers={**head, "Cache-Control": "no-store"})

    @app.get("/api/images/{i}/labels")
    def labels(i: int, z: int | None = None):
        data, dtype = service.labels_bytes(idx(i), z_of(z))
        return Response(
            data,
            media_type="application/octet-stream",
            headers={"Content-Encoding": "deflate", "X-Medsam-Dtype": dtype, "Cache-Control": "no-store"},
        )

    @app.post("/api/images/{i}/preview")
    def preview(i: int, box: list[float] = Body(...), z: int | None = Body(None), window: str | None = Body(None)):
        return Response(service.preview_bits(idx(i), z_of(z), window, box), media_type="application/octet-stream")

    @app.post("/api/images/{i}/objects")
    def accept(
        i: int,
        request: Request,
        box: list[float] = Body(...),
        z: int | None = Body(None),
        window: str | None = Body(None),
    ):
        label = service.accept(idx(i), client(request), box, z_of(z), window)
        return {"label": label, **service.state(i, client(request))}

    @app.put("/api/images/{i}/objects/{label}")
    def edit(
        i: int,
        label: int,
        request: Request,
        box: list[float] = Body(...),
        z: int | None = Body(None),
        window: str | None = Body(None),
    ):
        service.edit(idx(i), client(request), label, box, z_of(z), window)
        return {"label": label, **service.state(i, client(request))}

    @app.delete("/api/images/{i}/objects/{label}")
    def delete(i: int, label: int, request: Request):
        service.delete(idx(i), client(request), label)
        return service.state(i, client(request))

    @app.post("/api/images/{i}/undo")
    def undo(i: int, request: Request):
        what = service.undo(idx(i), client(request))
        return {"undone": what, **service.state(i, client(request))}

    @app.post("/api/images/{i}/redo")
    def redo(i: int, request: Request):
        what = service.undo(idx(i), client(request), redo=True)
        return {"redone": what, **service.state(i, client(request))}

    @app.post("/api/images/{i}/status")
    def status(i: int, request: Request, status: str = Body(..., embed=True)):
        service.set_status(idx(i), client(request), status)
        return service.state(i, client(request))

    @app.get("/api/images/{i}/next")
    def next_pending(i: int, request: Request, step: int = 1):
        return {"index": service.next_pending(idx(i), client(request), 1 if step >= 0 else -1)}

    @app.post("/api/heartbeat")
    def heartbeat(request: Request):
        return {"holding": service.locks.touch(client(request))}

    @app.post("/api/release")
    def release(request: Request):
        service.locks.release(client(request))
        return {"released": True}

    @app.post("/api/export")
    def export():
        return service.export()

    @app.get("/api/export/summary.csv")
    def export_summary():
        p = service.session.output_dir / "export" / "summary.csv"
        if not p.exists():
            return _error(404, "nothing exported yet")
        return FileResponse(p, media_type="text/csv", filename="summary.csv")

    @app.get("/api/stats")
    def stats():
        return {**service.stats, "queue": service.queue.pending(), "held": len(service.locks.held())}

    return app


class _NotFound(Exception):
    pass


def _hostname(host: str) -> str:
    if host.startswith("["):
        return host.split("]")[0] + "]"
    return host.rsplit(":", 1)[0] if ":" in host else host

"""``napari-medsam serve``: build the service, export the browser decoder, run uvicorn."""

from __future__ import annotations

import ipaddress
import logging
import os
import secrets
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from napari_medsam.engine.errors import MedSAMError

from .encoder import close_at_exit

log = logging.getLogger(__name__)
DEFAULT_PORT = 7860


class ServeError(MedSAMError, ValueError):
    """The server cannot start as asked."""


def is_loopback(host: str) -> bool:
    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_token(host: str, token: str | None) -> str | None:
    """The token to require: the given one, a fresh one for a non-loopback host, or None (loopback, none given)."""
    if token is not None:
        if len(token) < 8:
            raise ServeError("--token must be at least 8 characters")
        return token
    return None if is_loopback(host) else secrets.token_urlsafe(18)


@dataclass
class Built:
    app: Any
    service: Any
    token: str | None
    decoder: Any  # decoder_onnx.WebDecoder (the two graph files) or None


def build(
    images,
    out,
    model: str = "litemedsam",
    device: str = "auto",
    checkpoint: str | None = None,
    host: str = "127.0.0.1",
    token: str | None = None,
    web_cache: os.PathLike | None = None,
    lease_s: float = 20.0,
    prefetch: bool = True,
    model_obj=None,
) -> Built:
    """Open (or resume) the session in ``out`` over ``images`` and make the app for it."""
    from napari_medsam.engine.predictor import MedSAM
    from napari_medsam.engine.session import LabelingSession

    from .app import create_app
    from .decoder_onnx import WEB_MODELS, default_folder, export_web_decoder
    from .service import WebService

    token = check_token(host, token)
    session = LabelingSession(images, out)
    check_records(session)
    if model_obj is None:
        model_obj = MedSAM.load(model, device=device, checkpoint=checkpoint, cache=session.embedding_cache())
    decoder = None
    if model_obj.name in WEB_MODELS:
        try:
            decoder = export_web_decoder(model_obj, default_folder(session.output_dir, web_cache))
        except Exception as exc:  # noqa: BLE001 - no ONNX export here: the server decodes the previews
            log.warning("browser decoder unavailable (%s): previews are decoded by the server", exc)
    service = WebService(session, model_obj, lease_s=lease_s, prefetch=prefetch)
    hosts = ["127.0.0.1", "localhost", "[::1]", host]
    return Built(create_app(service, decoder, token, hosts), service, token, decoder)


def check_records(session) -> list[str]:
    """Read every saved record once, so damaged ones are moved aside (and reported) at start, not on open."""
    for i in range(len(session)):
        if session.record_path(i).exists():
            session.load_record(i)
    return list(session.warnings)


def startup_lines(b: Built, host: str, port: int, token_given: bool) -> list[str]:
    """What ``serve`` prints at start: the session, the decoder, the session's warnings, the address."""
    s = b.service.session
    lines = [
        f"napari-medsam serve: {len(s)} images from {s.input}, labels into {s.output_dir} ({s.progress_text()})",
        (
            f"model {b.service.model.name} on {b.service.model.device}; "
            f"previews decoded {'in the browser (ONNX Runtime Web)' if b.decoder else 'by the server'}"
        ),
    ]
    lines += [f"warning: {w}" for w in s.warnings]
    if b.token and not token_given:
        lines.append("a token was generated (non-loopback host): share the address with the labelers only")
    lines.append(f"open {address(host, port, b.token)}")
    return lines


def address(host: str, port: int, token: str | None) -> str:
    shown = socket.gethostname() if host in ("0.0.0.0", "::") else host
    shown = f"[{shown}]" if ":" in shown and not shown.startswith("[") else shown
    return f"http://{shown}:{port}/" + (f"?token={token}" if token else "")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class ServerThread:
    """uvicorn in a background thread (tests, benchmarks, notebooks): ``start()``, ``url``, ``stop()``."""

    def __init__(self, app, host: str = "127.0.0.1", port: int | None = None):
        import uvicorn

        self.host, self.port = host, port or free_port(host)
        self.server = uvicorn.Server(
            uvicorn.Config(app, host=self.host, port=self.port, log_level="warning", lifespan="off")
        )
        self.thread = threading.Thread(target=self.server.run, name="medsam-web", daemon=True)
        close_at_exit(self)  # stopped at interpreter exit if still running (see encoder.close_at_exit)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> ServerThread:
        self.thread.start()
        t0 = time.monotonic()
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() - t0 > timeout:
                raise ServeError(f"the web server did not start on {self.host}:{self.port}")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Stop serving: requests in flight finish (up to ``timeout``, then uvicorn is forced out); joined."""
        if not self.thread.is_alive():
            return
        self.server.should_exit = True
        self.thread.join(timeout)
        if self.thread.is_alive():
            self.server.force_exit = True
            self.thread.join(10)

    close = stop


def serve(
    images,
    out,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    model: str = "litemedsam",
    device: str = "auto",
    checkpoint: str | None = None,
    token: str | None = None,
) -> int:
    """Run the server until interrupted (the CLI's ``serve``)."""
    import uvicorn

    if not Path(images).exists():
        raise ServeError(f"IMAGES {images} does not exist")
    b = build(images, out, model, device, checkpoint, host, token)
    print("\n".join(startup_lines(b, host, port, token is not None)), flush=True)
    try:
        uvicorn.run(b.app, host=host, port=port, log_level="warning")
    finally:
        b.service.close()
    return 0

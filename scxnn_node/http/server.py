"""The HTTP port: routing (GET /metrics, GET /, POST retry of a dead delivery), the retry token
check, and the server's thread.

The standard library's ThreadingHTTPServer rather than prometheus_client's start_http_server:
the same port also serves the status page and the token-guarded POST, which the client's
helper (a metrics-only WSGI app) has no place for; one small router covers all three."""

from __future__ import annotations

import hmac
import logging
import os
import re
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from prometheus_client import CONTENT_TYPE_LATEST

from scxnn_node.config import NodeConfig
from scxnn_node.http.metrics import metrics_text
from scxnn_node.http.status_page import render_status_page
from scxnn_node.http.view import NodeView
from scxnn_node.model.manifest import Manifest
from scxnn_node.store.db import Database
from scxnn_node.store.results import retry_deliveries
from scxnn_node.store.spool import Spool

log = logging.getLogger(__name__)

REQUEST_TIMEOUT_S = 10.0  # a client that stops sending mid-request frees its thread after this
MAX_FORM_BYTES = 4096
POLL_INTERVAL_S = 0.2  # how soon serve_forever notices shutdown()
_RETRY_PATH = re.compile(r"^/deliveries/(\d{1,18})/retry$")
_GET_PATHS = ("/", "/metrics")
# The page needs nothing from elsewhere: no scripts at all, styles inline, forms post back here.
_SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; "
    "form-action 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


class HttpServer:
    """The node's HTTP port, served from a daemon thread of the serve process."""

    def __init__(self, config: NodeConfig, db: Database, spool: Spool, manifest: Manifest) -> None:
        self.config = config
        self.view = NodeView(config, db, spool, manifest)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The port bound (the configured one once started)."""
        return self._server.server_address[1] if self._server else self.config.http.port

    def start(self) -> None:
        """Bind (an address in use fails here, at start) and serve in a daemon thread."""
        self._server = _Server((self.config.http.host, self.config.http.port), _Handler, self)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": POLL_INTERVAL_S},
            daemon=True,
            name="http",
        )
        self._thread.start()
        log.info(
            "HTTP on %s:%d: GET /metrics (Prometheus), GET / (status page)%s",
            self.config.http.host,
            self.port,
            "" if self.retry_token_set() else "; retry from the page off (no token)",
        )

    def shutdown(self) -> None:
        """Stop listening within about POLL_INTERVAL_S; a request in flight is not waited for
        (its daemon thread ends with the process)."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(5)
        self._server, self._thread = None, None

    def retry_token_set(self) -> bool:
        return bool(self._retry_token())

    def _retry_token(self) -> str:
        """Read at each request, so a changed token needs no restart; never logged."""
        name = self.config.http.retry_token_env
        return os.environ.get(name, "") if name else ""

    def token_accepted(self, offered: str) -> bool:
        expected = self._retry_token()
        return bool(expected) and hmac.compare_digest(offered.encode(), expected.encode())

    def page(self, message: str = "") -> str:
        view = self.view
        return render_status_page(
            status=view.status(),
            studies=view.last_studies(),
            deliveries=view.unsent_deliveries(),
            free_bytes=view.free_bytes(),
            min_free_bytes=self.config.storage.min_free_bytes,
            manifest=view.manifest,
            retry_enabled=self.retry_token_set(),
            now=self.view.db.now(),
            message=message,
        )

    def retry(self, delivery_id: int) -> str:
        """The delivery back to pending (the `deliveries retry` rule); what happened, in words."""
        outcome = retry_deliveries(self.view.db, self.view.spool.root, delivery_id=delivery_id)
        if outcome.retried:
            log.info("delivery %d back to pending (retried from the status page)", delivery_id)
            return f"Delivery {delivery_id} is pending again."
        if outcome.missing:
            return f"Delivery {delivery_id} left as it was: {outcome.missing[0][1]}."
        return f"Delivery {delivery_id}: no such delivery waiting to be sent."


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a slow client never holds up the node's exit

    def __init__(self, address: tuple[str, int], handler: type, app: HttpServer) -> None:
        self.app = app
        super().__init__(address, handler)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    timeout = REQUEST_TIMEOUT_S
    server_version = "scxnn-node"
    sys_version = ""

    def do_GET(self) -> None:  # the standard library's naming
        path = urlsplit(self.path).path
        app = self.server.app
        try:
            if path == "/metrics":
                self._send(HTTPStatus.OK, metrics_text(app.view), CONTENT_TYPE_LATEST)
            elif path == "/":
                self._send_html(HTTPStatus.OK, app.page())
            else:
                self._send_text(HTTPStatus.NOT_FOUND, "not found")
        except Exception:  # the database away, say: an answer, and the server goes on
            log.exception("HTTP GET %s failed", path)
            self._send_text(HTTPStatus.SERVICE_UNAVAILABLE, "unavailable: see the node's log")

    def do_POST(self) -> None:
        path = urlsplit(self.path).path
        match = _RETRY_PATH.match(path)
        if match is None:
            if path in _GET_PATHS:
                self._method_not_allowed()
            else:
                self._send_text(HTTPStatus.NOT_FOUND, "not found")
            return
        app = self.server.app
        offered = self._offered_token()
        if offered is None:
            self._send_text(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "form too large")
            return
        if not app.retry_token_set():
            self._send_text(HTTPStatus.FORBIDDEN, "retry from the HTTP port is off")
            return
        if not app.token_accepted(offered):
            log.warning("HTTP retry of delivery %s refused: wrong token", match.group(1))
            self._send_text(HTTPStatus.FORBIDDEN, "wrong token")
            return
        try:
            message = app.retry(int(match.group(1)))
            self._send_html(HTTPStatus.OK, app.page(message))
        except Exception:
            log.exception("HTTP retry of delivery %s failed", match.group(1))
            self._send_text(HTTPStatus.SERVICE_UNAVAILABLE, "unavailable: see the node's log")

    def _method_not_allowed(self) -> None:
        self._send_text(HTTPStatus.METHOD_NOT_ALLOWED, "read-only", extra={"Allow": "GET"})

    do_PUT = do_DELETE = do_PATCH = _method_not_allowed

    def _offered_token(self) -> str | None:
        """The token from `Authorization: Bearer ...` or the form's `token` field ("" when
        neither); None for a body too large (or a length unreadable) to be the form."""
        header = self.headers.get("Authorization", "")
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            return None
        if length > MAX_FORM_BYTES:
            return None
        body = self.rfile.read(length).decode("utf-8", "replace") if length > 0 else ""
        if header.startswith("Bearer "):
            return header[len("Bearer ") :].strip()
        return parse_qs(body).get("token", [""])[0]

    def _send_html(self, status: HTTPStatus, page: str) -> None:
        self._send(status, page.encode(), "text/html; charset=utf-8")

    def _send_text(
        self, status: HTTPStatus, text: str, extra: dict[str, str] | None = None
    ) -> None:
        self._send(status, (text + "\n").encode(), "text/plain; charset=utf-8", extra)

    def _send(
        self,
        status: HTTPStatus,
        body: bytes,
        content_type: str,
        extra: dict[str, str] | None = None,
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in {**_SECURITY_HEADERS, **(extra or {})}.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        log.debug("HTTP %s " + format, self.address_string(), *args)

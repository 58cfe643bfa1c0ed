"""The emulator dashboard's HTTP edge: one page and its JSON over plain HTTP on loopback
(docs/emulator.md, "Dashboard"). What it shows and does is `stub/dashboard_view.py`.

Every request names the random token in its path (`/d/TOKEN/...`, the ready line's
`dashboard_url`); anything else is 403. A POST must carry the token in the
`X-Dashboard-Token` header too: a page of another origin can make the browser send a URL it
learnt, but not a custom header, so an action needs the page's own script (CSRF).
"""

from __future__ import annotations

import hmac
import json
import secrets
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from urllib.parse import unquote

from device_sim.stub.dashboard_view import DashboardError, DashboardView
from device_sim.stub.net.listener import ListenError

DEFAULT_HOST = "127.0.0.1"
TOKEN_HEADER = "X-Dashboard-Token"
MAX_BODY = 4096
ASSETS = {"": ("index.html", "text/html; charset=utf-8"),
          "index.html": ("index.html", "text/html; charset=utf-8"),
          "app.js": ("app.js", "text/javascript; charset=utf-8"),
          "style.css": ("style.css", "text/css; charset=utf-8"),
          "favicon.svg": ("favicon.svg", "image/svg+xml")}
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                               "connect-src 'self'; img-src 'self'; base-uri 'none'; "
                               "form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def read_asset(name: str) -> bytes:
    return resources.files("device_sim.stub.net").joinpath("dashboard", name).read_bytes()


class DashboardListener:
    """A `server.Listener`: `url` (the ready line's `dashboard_url`) carries the token."""

    name = "dashboard"

    def __init__(self, view: DashboardView, host: str = DEFAULT_HOST, port: int = 0,
                 url_host: str | None = None, log=lambda message: None):
        self.token = secrets.token_urlsafe(24)
        handler = type("Handler", (_Handler,), {"view": view, "token": self.token, "log": staticmethod(log)})
        try:
            self.httpd = ThreadingHTTPServer((host, port), handler)
        except OSError as exc:
            raise ListenError(self.name, host, port, exc) from None
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        shown = url_host or ("localhost" if host in ("0.0.0.0", "::", "") else host)
        self.url = f"http://{shown}:{self.port}/d/{self.token}/"
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="dashboard", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        if self._thread.is_alive():  # shutdown() waits for a serve_forever that never ran
            self.httpd.shutdown()
        self.httpd.server_close()


def listener_factory(port: int = 0, host: str = DEFAULT_HOST):
    """The dashboard `server.ListenerFactory` (0 picks a free port; loopback by default)."""

    def factory(app):
        return DashboardListener(DashboardView(app.service_api), host, port, log=app.log)

    return factory


class _Handler(BaseHTTPRequestHandler):
    view: DashboardView
    token: str
    server_version = "device-sim-dashboard"
    sys_version = ""

    def log_message(self, format, *args):  # the URL carries the token: log no request lines
        pass

    def do_GET(self):
        rest = self._authorised(need_header=False)
        if rest is None:
            return
        if rest in ASSETS:
            name, content_type = ASSETS[rest]
            return self._send(200, read_asset(name), content_type)
        if rest == "api/state":
            return self._json(lambda: self.view.state())
        self._send_json(404, {"error": f"no such page: {rest}"})

    def do_POST(self):
        rest = self._authorised(need_header=True)
        if rest is None:
            return
        parts = [unquote(p) for p in rest.split("/")]
        if len(parts) == 5 and parts[:2] == ["api", "enrollments"] and parts[4] == "enabled":
            body = self._body()
            if body is None or not isinstance(body.get("enabled"), bool):
                return self._send_json(400, {"error": 'body must be {"enabled": true|false}'})
            return self._json(lambda: self.view.set_enabled(parts[2], parts[3], body["enabled"]))
        if len(parts) == 4 and parts[:2] == ["api", "registrations"] and parts[3] == "delete":
            return self._json(lambda: self.view.delete_registration(parts[2]) or {"deleted": parts[2]})
        self._send_json(404, {"error": f"no such action: {rest}"})

    def do_PUT(self):
        self._send_json(405, {"error": "GET or POST only"})

    do_DELETE = do_PATCH = do_PUT

    def _authorised(self, need_header: bool) -> str | None:
        """The path after `/d/TOKEN/`, or None once a 403 is sent."""
        path = self.path.split("?", 1)[0]
        prefix, _, rest = path.partition("/d/")
        given, _, rest = rest.partition("/")
        ok = prefix == "" and hmac.compare_digest(given.encode(), self.token.encode())
        if ok and need_header:
            ok = hmac.compare_digest(self.headers.get(TOKEN_HEADER, "").encode(), self.token.encode())
        if not ok:
            self._send(403, b"forbidden: open the dashboard_url of the emulator's ready line\n",
                       "text/plain; charset=utf-8")
            return None
        return rest

    def _body(self) -> dict | None:
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            return None
        if not 0 <= length <= MAX_BODY:
            return None
        try:
            data = json.loads(self.rfile.read(length) or b"null")
        except ValueError:
            return None
        return data if isinstance(data, dict) else None

    def _json(self, produce) -> None:
        try:
            result = produce()
        except DashboardError as exc:
            return self._send_json(exc.status, {"error": str(exc)})
        except Exception as exc:  # a bug: the page shows one line, the log has the name
            self.log(f"dashboard: {type(exc).__name__}: {exc}")
            return self._send_json(500, {"error": f"internal error ({type(exc).__name__})"})
        self._send_json(200, result)

    def _send_json(self, status: int, data) -> None:
        self._send(status, json.dumps(data).encode(), "application/json; charset=utf-8")

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in SECURITY_HEADERS.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

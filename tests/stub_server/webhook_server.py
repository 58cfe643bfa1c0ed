"""A custom allocation webhook for the tests: a real `http.server` on loopback, plain HTTP
or HTTPS (an `ssl` context with a test CA's server certificate), recording every
AllocationRequest it is sent.

Paths (the query, e.g. a function key, is ignored):
- `/choose`: hub-a for registration IDs ending in `-a`, else hub-b; a payload counting the
  calls per device and an initialTwin
- `/flip`: hub-a on a device's first call, hub-b after
- `/status/N`: answers status N
- `/slow/S`: waits S seconds, then answers like /choose
- `/notjson`: 200 with a text body
- `/unlinked`: a hub the emulator does not link
- `/trickle/S`: the head at once, then the body one byte every S seconds
"""

from __future__ import annotations

import json
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

HUB_A = "hub-a.example.net"
HUB_B = "hub-b.example.net"


class Webhook:
    def __init__(self, tls: tuple[Path, Path] | None = None):
        """`tls`: (certificate chain, key) files for HTTPS; None = plain HTTP."""
        self.requests: list[tuple[str, dict]] = []
        self.calls: dict[str, int] = {}
        self._lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        scheme = "http"
        if tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(str(tls[0]), str(tls[1]))
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
            scheme = "https"
        self.base = f"{scheme}://localhost:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"{self.base}{path}?code=function-key-secret"

    def received(self, registration_id: str) -> list[tuple[str, dict]]:
        with self._lock:
            return [(path, doc) for path, doc in self.requests
                    if doc["deviceRuntimeContext"]["registrationId"] == registration_id]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _record(self, path: str, document: dict) -> int:
        rid = document["deviceRuntimeContext"]["registrationId"]
        with self._lock:
            self.requests.append((path, document))
            self.calls[rid] = self.calls.get(rid, 0) + 1
            return self.calls[rid]

    def _answer(self, path: str, document: dict) -> tuple[int, bytes]:
        count = self._record(path, document)
        rid = document["deviceRuntimeContext"]["registrationId"]
        parts = path.strip("/").split("/")
        if parts[0] == "status":
            return int(parts[1]), b'{"error": "no"}'
        if parts[0] == "notjson":
            return 200, b"this is not JSON"
        if parts[0] == "unlinked":
            return 200, json.dumps({"iotHubHostName": "elsewhere.example.net"}).encode()
        if parts[0] == "slow":
            time.sleep(float(parts[1]))
        if parts[0] == "flip":
            hub = HUB_A if count == 1 else HUB_B
        else:
            hub = HUB_A if rid.endswith("-a") else HUB_B
        return 200, json.dumps({
            "iotHubHostName": hub,
            "initialTwin": {"tags": {"chosenBy": "webhook"}, "properties": {"desired": {"call": count}}},
            "payload": {"for": rid, "call": count},
        }).encode()

    def _handler(self):
        webhook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's name
                length = int(self.headers.get("Content-Length", "0"))
                document = json.loads(self.rfile.read(length))
                path = self.path.split("?")[0]
                status, body = webhook._answer(path, document)
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                pause = float(path.split("/")[2]) if path.startswith("/trickle/") else 0
                try:
                    for index in range(0, len(body), 1 if pause else len(body)):
                        self.wfile.write(body[index:index + (1 if pause else len(body))])
                        self.wfile.flush()
                        time.sleep(pause)
                except OSError:
                    pass  # the emulator gave up (timeout tests)

            def log_message(self, *args):
                pass

        return Handler

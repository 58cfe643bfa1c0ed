"""Helpers for the WebSocket tests: the emulator in process with enrollments made through its
own service API, and WebSocket clients over real TLS (wsproto for framing, raw bytes for
garbage)."""

from __future__ import annotations

import json
import ssl
from dataclasses import dataclass, field
from pathlib import Path

from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, RejectConnection, RejectData, Request

from device_sim.stub import server
from device_sim.stub.core import sas
from device_sim.testing import TestCA

from .conftest import client_context, tls_connect

SERVICE_API = "2021-10-01"
PATH = "/$iothub/websocket"


@dataclass
class Running:
    server: server.StubServer
    ready: dict
    logged: list[str] = field(default_factory=list)

    @property
    def app(self) -> server.StubApp:
        return self.server.app

    @property
    def port(self) -> int:
        return int(self.ready["device_url"].rsplit(":", 1)[1])

    @property
    def ca_cert(self) -> Path:
        return Path(self.ready["ca_cert"])

    def service(self, method: str, path: str, doc: dict | None = None) -> dict:
        app = self.app
        token = sas.make_token(app.config.service_host, app.service_api.service_key)
        reply = app.service_api.handle(method, path, {"api-version": SERVICE_API},
                                       {"Authorization": token, "Content-Type": "application/json"},
                                       json.dumps(doc).encode() if doc is not None else b"")
        assert reply.status < 300, (method, path, reply.status, reply.body)
        return reply.body

    def enroll_group(self, group_id: str, ca: TestCA) -> None:
        """`ca` uploaded as verified and made the signing certificate of an enrollment group."""
        pem = ca.cert_pem.decode()
        self.service("PUT", f"/certificates/{group_id}", {"properties": {"certificate": pem, "isVerified": True}})
        self.service("PUT", f"/enrollmentGroups/{group_id}", {
            "enrollmentGroupId": group_id,
            "attestation": {"type": "x509", "x509": {"signingCertificates": {"primary": {"certificate": pem}}}},
        })

    def close(self) -> None:
        self.server.close()


def start(home: Path, **options) -> Running:
    """The `stub serve` assembly in process, every port picked free, polls wait 0 s."""
    logged: list[str] = []
    options.setdefault("retry_after", 0)
    stub = server.StubServer(server.ServeOptions(home=home, **options), log=logged.append)
    return Running(stub, stub.start(), logged)


class WsClient:
    """A WebSocket client over CPython ssl: wsproto frames what a test sends, or raw bytes."""

    def __init__(self, port: int, ca_cert: Path, identity: tuple[Path, Path] | None = None, timeout: float = 5.0):
        context: ssl.SSLContext = client_context(ca_cert, *(identity or (None, None)))
        self.sock = tls_connect(port, context, timeout)
        self.ws = WSConnection(ConnectionType.CLIENT)

    def upgrade(self, subprotocols=("mqtt",), target: str = PATH):
        """The handshake; AcceptConnection, or (RejectConnection, JSON body)."""
        self.sock.sendall(self.ws.send(Request(host="localhost", target=target, subprotocols=list(subprotocols))))
        events = self.events()
        first = events.pop(0)
        if isinstance(first, AcceptConnection):
            return first
        assert isinstance(first, RejectConnection), first
        body = b""
        while True:
            for event in events:
                assert isinstance(event, RejectData)
                body += event.data
                if event.body_finished:
                    return first, json.loads(body)
            events = self.events()

    def events(self) -> list:
        """The next batch of events (reads until at least one arrives; [] when the server closed)."""
        while True:
            got = list(self.ws.events())
            if got:
                return got
            data = self.sock.recv(65536)
            if not data:
                return []
            self.ws.receive_data(data)

    def send(self, event) -> None:
        self.sock.sendall(self.ws.send(event))

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

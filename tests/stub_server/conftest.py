"""Fixtures for the emulator's server side: a test PKI, TLS clients, running listeners."""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

import pytest

from device_sim.stub.net import http as http_server
from device_sim.stub.net.listener import Limits, TlsListener
from device_sim.stub.net.server_pki import ServerIdentity, ensure_server_identity
from device_sim.stub.net.tls_context import device_context
from device_sim.stub.core.errors import Reply

@pytest.fixture(scope="session")
def server_identity(tmp_path_factory) -> ServerIdentity:
    return ensure_server_identity(tmp_path_factory.mktemp("stub-tls"))


class EchoDeviceApi:
    """Stand-in for DeviceApi in the transport tests: answers with what the transport passed."""

    def _echo(self, op, chain, **fields):
        body = {"op": op, "chain": [c.subject.rfc4514_string() for c in chain], **fields}
        if fields.get("registration_id") == "explode":
            raise RuntimeError("handler bug")
        return Reply(200, body, {"x-test": "1"})

    def register(self, id_scope, registration_id, api_version, chain, body, host=None):
        return self._echo("register", chain, id_scope=id_scope, registration_id=registration_id,
                          api_version=api_version, body=body.decode())

    def operation_status(self, id_scope, registration_id, operation_id, api_version, chain):
        return self._echo("operation_status", chain, id_scope=id_scope, registration_id=registration_id,
                          operation_id=operation_id, api_version=api_version)

    def registration_status(self, id_scope, registration_id, api_version, chain, body):
        return self._echo("registration_status", chain, id_scope=id_scope, registration_id=registration_id,
                          api_version=api_version, body=body.decode())


def start_echo_listener(server_identity, *, one_at_a_time: bool = False) -> TlsListener:
    """A device-port listener with short deadlines in front of the echo stand-in."""
    limits = Limits(handshake_timeout=1.0, idle_timeout=1.0, request_timeout=1.0, max_connections=32)
    handler = http_server.device_handler(EchoDeviceApi())
    logged: list[str] = []
    listener = TlsListener(
        "device", "https", "127.0.0.1", 0, device_context(server_identity),
        lambda stream: http_server.serve_http(stream, handler, limits, 96 * 1024, logged.append),
        limits=limits, on_not_tls=http_server.plain_http_hint, url_host="localhost", log=logged.append,
        one_at_a_time=one_at_a_time,
    )
    listener.start()
    listener.logged = logged
    return listener


@pytest.fixture
def echo_listener(server_identity):
    listener = start_echo_listener(server_identity)
    yield listener
    listener.close()


def client_context(ca_cert: Path, chain: Path | None = None, key: Path | None = None,
                   version: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca_cert))
    if chain is not None:
        context.load_cert_chain(str(chain), str(key))
    if version is not None:
        context.minimum_version = version
        context.maximum_version = version
    return context


def tls_connect(port: int, context: ssl.SSLContext, timeout: float = 5.0) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    return context.wrap_socket(raw, server_hostname="localhost")


def read_response(sock) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response from a socket (Content-Length framed, as the emulator sends)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before a full response head: {data!r}")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        rest += chunk
    return status, headers, rest[:length]


@pytest.fixture
def device_files(tmp_path, file_cas):
    """dev-a with the full chain (leaf, inter2, inter1, root) in files."""
    return file_cas.device("dev-a").write(tmp_path, "dev-a")

"""TlsListener reuses its connection threads and still bounds them by max_connections."""

from __future__ import annotations

import socket
import threading
import time

from device_sim.stub.net import http as http_server
from device_sim.stub.net.listener import Limits, TlsListener
from device_sim.stub.net.tls_context import device_context

from .conftest import EchoDeviceApi, client_context, read_response, tls_connect
from .test_transport import request_bytes


def listener_threads(name: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == f"{name}-conn" and t.is_alive()]


def start_listener(server_identity, name: str, max_connections: int) -> TlsListener:
    limits = Limits(handshake_timeout=2.0, idle_timeout=1.0, request_timeout=1.0,
                        max_connections=max_connections)
    handler = http_server.device_handler(EchoDeviceApi())
    listener = TlsListener(
        name, "https", "127.0.0.1", 0, device_context(server_identity),
        lambda stream: http_server.serve_http(stream, handler, limits, 1024, None),
        limits=limits, log=lambda message: None)
    listener.start()
    return listener


def one_request(port: int, context) -> int:
    with tls_connect(port, context) as sock:
        sock.sendall(request_bytes("GET", "/s/registrations/r/operations/o?api-version=1",
                                   headers={"Connection": "close"}))
        return read_response(sock)[0]


def test_sequential_connections_reuse_the_same_threads(server_identity):
    listener = start_listener(server_identity, "reuse", 64)
    context = client_context(server_identity.ca_cert)
    try:
        seen: set[threading.Thread] = set()
        for _ in range(12):
            assert one_request(listener.port, context) == 200
            seen.update(listener_threads("reuse"))
        # A few threads (one may still be closing the last connection while the next one
        # arrives), never a new one per connection.
        assert len(seen) <= 4
    finally:
        listener.close()
    assert listener_threads("reuse") == []


def test_max_connections_bounds_threads_and_extra_clients_wait(server_identity):
    listener = start_listener(server_identity, "bounded", 2)
    context = client_context(server_identity.ca_cert)
    silent = [socket.create_connection(("127.0.0.1", listener.port)) for _ in range(2)]
    try:
        time.sleep(0.3)
        assert len(listener_threads("bounded")) == 2
        started = time.monotonic()
        # Both threads are busy with silent clients until their handshake deadline (2 s):
        # the next client waits in the backlog, then is served.
        assert one_request(listener.port, context) == 200
        assert time.monotonic() - started > 1.0
        assert len(listener_threads("bounded")) <= 2
    finally:
        for sock in silent:
            sock.close()
        listener.close()
    assert listener_threads("bounded") == []


def test_close_cuts_open_connections_quietly_and_promptly(server_identity):
    logged: list[str] = []
    listener = TlsListener("cut", "https", "127.0.0.1", 0, device_context(server_identity),
                               lambda stream: stream.recv(1, 5), log=logged.append)
    listener.start()
    context = client_context(server_identity.ca_cert)
    clients = [tls_connect(listener.port, context) for _ in range(4)]  # handshaken, then idle
    try:
        time.sleep(0.2)
        started = time.monotonic()
        listener.close()
        assert time.monotonic() - started < 1.0
        assert listener_threads("cut") == []
        assert logged == []  # a connection cut by close() is not a failure worth a log line
    finally:
        for sock in clients:
            sock.close()

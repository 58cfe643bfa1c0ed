"""The device port's connection threads take turns (`TlsListener(one_at_a_time=True)`,
a speed measure against GIL hand-offs). The whole transport suite runs again here against
such a listener: silent, half-open, slow and plain-HTTP clients must still never block
the others, because a thread lets go of its turn whenever it waits for its client."""

from __future__ import annotations

import threading
import time

import pytest

from device_sim.stub.net import http as http_server
from device_sim.stub.net.listener import Limits, TlsListener
from device_sim.stub.net.tls_context import device_context

from .conftest import EchoDeviceApi, client_context, start_echo_listener
from .test_transport import *  # noqa: F401,F403 - the transport tests, collected again here
from .test_transport import ask


@pytest.fixture
def echo_listener(server_identity):
    """The transport suite's listener, with the connection threads taking turns."""
    listener = start_echo_listener(server_identity, one_at_a_time=True)
    yield listener
    listener.close()


class CountingApi(EchoDeviceApi):
    """Records how many handler calls ever ran at the same moment."""

    def __init__(self):
        self.lock = threading.Lock()
        self.inside = 0
        self.most = 0

    def _echo(self, op, chain, **fields):
        with self.lock:
            self.inside += 1
            self.most = max(self.most, self.inside)
        time.sleep(0.002)  # widen the window in which a second thread could enter
        with self.lock:
            self.inside -= 1
        return super()._echo(op, chain, **fields)


def test_handlers_of_different_connections_never_run_at_once(server_identity):
    api = CountingApi()
    limits = Limits(handshake_timeout=5.0, idle_timeout=5.0, request_timeout=5.0, max_connections=32)
    handler = http_server.device_handler(api)
    listener = TlsListener(
        "turns", "https", "127.0.0.1", 0, device_context(server_identity),
        lambda stream: http_server.serve_http(stream, handler, limits, 1024, None),
        limits=limits, log=lambda message: None, one_at_a_time=True)
    listener.start()
    context = client_context(server_identity.ca_cert)
    statuses: list[int] = []

    def client():
        for _ in range(3):
            statuses.append(ask(listener, context, "GET", "/s/registrations/r/operations/o?api-version=1")[0])

    threads = [threading.Thread(target=client) for _ in range(16)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        listener.close()
    assert statuses == [200] * 48
    assert api.most == 1

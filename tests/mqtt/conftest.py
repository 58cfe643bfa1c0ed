"""Fixtures for the MQTT tests: test PKI, the emulator's TLS identity, raw MQTT clients."""

from __future__ import annotations

import pytest

from device_sim.stub.net.server_pki import ServerIdentity, ensure_server_identity
from mqtt_helpers import Pki, RawClient, issue


@pytest.fixture(scope="session")
def pki() -> Pki:
    root = issue("mqtt-test-root")
    inter1 = root.issue("mqtt-test-inter1", ca=True)
    return Pki(root, inter1, inter1.issue("mqtt-test-inter2", ca=True))


@pytest.fixture(scope="session")
def server_identity(tmp_path_factory) -> ServerIdentity:
    return ensure_server_identity(tmp_path_factory.mktemp("mqtt-tls"))


@pytest.fixture
def raw_clients():
    made: list[RawClient] = []

    def make(port, ca_cert, identity=None, timeout=5.0) -> RawClient:
        client = RawClient(port, ca_cert, identity, timeout)
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()

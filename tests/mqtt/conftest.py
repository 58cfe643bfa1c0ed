"""Fixtures for the MQTT tests: the emulator's TLS identity, raw MQTT clients (the file-key
CAs are `file_cas` of tests/conftest.py)."""

from __future__ import annotations

import pytest

from mqtt_helpers import RawClient
from device_sim.stub.net.server_pki import ServerIdentity, ensure_server_identity


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

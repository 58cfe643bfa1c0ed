"""An in-process transport: the device's registration flow against the emulator's core,
with no socket, no TLS and no token (as httpx's MockTransport stands in for the network).

    >>> from device_sim.device.driver import run_registration
    >>> from device_sim.device.registration import RegistrationFlow
    >>> from device_sim.testing import DeviceApiTransport
    >>> transport = DeviceApiTransport(device_api, id_scope, "device-1", leaf.chain)  # doctest: +SKIP
    >>> outcome, timings = run_registration(RegistrationFlow("device-1"), transport, timeout=5)
    >>> outcome.status, outcome.assigned_hub
    ('assigned', 'hub1.example')

`device_api` is a `device_sim.stub.core.device_api.DeviceApi` (for a running in-process
emulator: `Emulator.in_process(home).app.device_api`); `chain` is what the device would
present in its TLS handshake, leaf first. `requests` records every (operation, reply).
"""

from __future__ import annotations

import json
from typing import Sequence

from cryptography import x509

from device_sim.device.registration import Response

DEVICE_API_VERSION = "2021-06-01"


def _response(reply) -> Response:
    body = b"" if reply.body is None else json.dumps(reply.body).encode()
    return Response(reply.status, {k.lower(): v for k, v in (reply.headers or {}).items()}, body)


class DeviceApiTransport:
    """The `device_sim.device.transport.Transport` protocol, answered by a `DeviceApi`."""

    def __init__(self, device_api, id_scope: str, registration_id: str, chain: Sequence[x509.Certificate],
                 *, api_version: str = DEVICE_API_VERSION):
        self.device_api = device_api
        self.id_scope = id_scope
        self.registration_id = registration_id
        self.chain = list(chain)
        self.api_version = api_version
        self.connected = False
        self.requests: list[tuple[str, Response]] = []

    def connect(self, timeout: float) -> None:
        self.connected = True

    def send_register(self, body: bytes, timeout: float) -> Response:
        reply = self.device_api.register(self.id_scope, self.registration_id, self.api_version, self.chain, body)
        return self._record("register", reply)

    def send_poll(self, operation_id: str, timeout: float) -> Response:
        reply = self.device_api.operation_status(self.id_scope, self.registration_id, operation_id,
                                                 self.api_version, self.chain)
        return self._record("poll", reply)

    def close(self) -> None:
        self.connected = False

    def _record(self, operation: str, reply) -> Response:
        response = _response(reply)
        self.requests.append((operation, response))
        return response

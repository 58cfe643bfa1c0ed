"""The seam between the registration flow and whatever carries its requests.

A transport knows where the service is and who the device is (endpoint, ID scope,
registration ID, TLS identity); it turns the two DPS requests into one round trip each
and gives back a `Response` (status, lower-case headers, body). It makes no protocol
decision: retries, polling and waits are the flow's (`registration.py`).

HTTPS (`transport_https.HttpsTransport`) and MQTT implement this same interface:

    class Transport(Protocol):
        def connect(self, timeout: float) -> None
        def send_register(self, body: bytes, timeout: float) -> Response
        def send_poll(self, operation_id: str, timeout: float) -> Response
        def close(self) -> None

`connect` is optional to call: the send methods connect on first use. A transport keeps
its connection open between requests (the polls reuse it) and reconnects once when the
server closed it in between. Failures are raised as the exceptions below, which the
driver maps to outcomes (and exit codes).
"""

from __future__ import annotations

from typing import Protocol

from device_sim.device.registration import Response


class TransportError(Exception):
    """Base of everything a transport raises; the message is one line, no secrets."""


class Unreachable(TransportError):
    """No connection: name does not resolve, connection refused, network down."""


class TlsFailure(TransportError):
    """The TLS handshake failed (server not trusted, client certificate refused, ...)."""


class TransportTimeout(TransportError):
    """The server did not answer within the time left."""


class ProtocolFailure(TransportError):
    """The server answered something that is not HTTP (or not MQTT)."""


class Transport(Protocol):
    def connect(self, timeout: float) -> None: ...

    def send_register(self, body: bytes, timeout: float) -> Response: ...

    def send_poll(self, operation_id: str, timeout: float) -> Response: ...

    def close(self) -> None: ...

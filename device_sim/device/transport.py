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
its connection open between requests (the polls reuse it) and opens a new one on the next
request after the old one failed. Failures are raised as the exceptions below; each
carries a `cause` (`registration.REFUSED`, `TLS_EOF`, ...) saying what happened, which the
driver hands to the flow as a `ConnectionFailed` event: whether to retry is the flow's call.
"""

from __future__ import annotations

from typing import Protocol

from device_sim.device import registration as reg
from device_sim.device.registration import Response


class TransportError(Exception):
    """Base of everything a transport raises; the message is one line, no secrets."""

    default_cause = reg.BAD_ANSWER

    def __init__(self, message: str, cause: str | None = None):
        super().__init__(message)
        self.cause = cause or self.default_cause


class Unreachable(TransportError):
    """No connection: name does not resolve, connection refused or reset, network down."""

    default_cause = reg.NO_ROUTE


class TlsFailure(TransportError):
    """The TLS handshake failed (server not trusted, client certificate refused, peer hung up)."""

    default_cause = reg.TLS_REJECTED


class TransportTimeout(TransportError):
    """The server did not answer (or accept) within the time given."""

    default_cause = reg.NO_ANSWER


class ProtocolFailure(TransportError):
    """The server answered something that is not HTTP (or not MQTT), or hung up instead."""

    default_cause = reg.BAD_ANSWER


class Transport(Protocol):
    def connect(self, timeout: float) -> None: ...

    def send_register(self, body: bytes, timeout: float) -> Response: ...

    def send_poll(self, operation_id: str, timeout: float) -> Response: ...

    def close(self) -> None: ...

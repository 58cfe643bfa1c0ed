"""The DPS registration flow as a state machine without I/O (h11 style).

Events in (`Response`: status, headers, body; or `ConnectionFailed`: what happened to the
connection), next action out (`Send` a register or a poll after a delay, or `Done` with an
`Outcome`). The HTTPS and MQTT transports only move bytes and report what happened; every
protocol decision - when to poll, how long to wait, what is retried, what is terminal, what
counts as unauthorized - lives here, so both transports behave the same (docs/device.md).

Driving it:

    flow = RegistrationFlow(registration_id, payload)
    action = flow.start()
    while isinstance(action, Send):
        sleep(action.delay)
        try:
            response = transport.send_register(action.body) if action.kind == REGISTER \
                else transport.send_poll(action.operation_id)
        except TransportError as exc:
            response = ConnectionFailed(exc.cause, str(exc))
        action = flow.receive(response)
    outcome = action.outcome

`run_registration` in `device_sim.device.driver` is that loop with a deadline; when the
deadline passes first it asks `flow.expire(reason)` for the outcome.
"""

from __future__ import annotations

import base64
import binascii
import json
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Mapping, NamedTuple

from device_sim.common import dps

REGISTER = "register"
POLL = "poll"

# Outcome statuses: the one vocabulary of how a device's registration ended (the CLI's
# exit codes and the fleet report use these names). The first three are the DPS operation
# statuses that end a flow.
ASSIGNED = dps.ASSIGNED
FAILED = dps.FAILED
DISABLED = dps.DISABLED
UNAUTHORIZED = "unauthorized"  # HTTP 401: DPS could not authenticate the device
REJECTED = "rejected"  # any other 3xx/4xx answer: the request itself was refused
PROTOCOL_ERROR = "protocol_error"  # an answer the device cannot understand
TIMEOUT = "timeout"  # the deadline passed before a terminal answer
UNREACHABLE = "unreachable"  # no connection could be made
TLS_ERROR = "tls_error"  # the TLS handshake failed

STATUSES = (ASSIGNED, FAILED, DISABLED, UNAUTHORIZED, REJECTED, PROTOCOL_ERROR, TIMEOUT,
            UNREACHABLE, TLS_ERROR)

# DPS keeps polling while the operation is in one of these (C# also polls on unassigned).
IN_PROGRESS = (dps.ASSIGNING, dps.UNASSIGNED)
TERMINAL = (ASSIGNED, FAILED, DISABLED)

# Causes: why a request is repeated, or what happened to a connection. Transports report
# the connection causes (`ConnectionFailed.cause`); the flow decides what follows.
THROTTLED = "throttled"  # HTTP/MQTT 429
SERVER_ERROR = "server_error"  # 5xx
REFUSED = "refused"  # nothing accepted the connection (the service is down or restarting)
RESET = "reset"  # the peer reset the connection
CONNECT_TIMEOUT = "connect_timeout"  # no connection or TLS session within the connect timeout
TLS_EOF = "tls_eof"  # the peer closed the connection during the TLS handshake
DROPPED = "dropped"  # the connection closed after the request, before its answer
RESOLVE_FAILED = "resolve_failed"  # the resolver failed for now (not: the name does not exist)
NO_ROUTE = "no_route"  # the name does not resolve, no route to the host
TLS_REJECTED = "tls_rejected"  # the handshake failed for a stated reason (alert, untrusted peer)
NO_ANSWER = "no_answer"  # the answer did not come within the time left
BAD_ANSWER = "bad_answer"  # something that is not HTTP / MQTT came back

# Connection failures that are retried (with backoff, within the deadline), and the status
# a device ends with when the deadline passes while they go on.
RETRIED_CONNECTION_CAUSES = {
    REFUSED: UNREACHABLE,
    RESET: UNREACHABLE,
    CONNECT_TIMEOUT: TIMEOUT,
    TLS_EOF: TLS_ERROR,
    DROPPED: PROTOCOL_ERROR,
    RESOLVE_FAILED: UNREACHABLE,
}
# Connection failures that end the registration at once: retrying cannot change them.
FINAL_CONNECTION_CAUSES = {
    NO_ROUTE: UNREACHABLE,
    TLS_REJECTED: TLS_ERROR,
    NO_ANSWER: TIMEOUT,
    BAD_ANSWER: PROTOCOL_ERROR,
}


class Response(NamedTuple):
    """One answer from the service, whatever carried it.

    `headers` has lower-case names; MQTT maps its topic properties (`retry-after`) here.
    """

    status: int
    headers: Mapping[str, str]
    body: bytes


class ConnectionFailed(NamedTuple):
    """What a transport saw instead of an answer: `cause` is one of the connection causes."""

    cause: str
    message: str


@dataclass(frozen=True)
class Outcome:
    """How a registration ended; `registration_state` is DPS's `registrationState`."""

    status: str
    operation_id: str | None = None
    registration_state: Mapping = field(default_factory=dict)
    http_status: int | None = None
    error_code: int | str | None = None
    error_message: str | None = None

    @property
    def assigned_hub(self) -> str | None:
        return self.registration_state.get("assignedHub")

    @property
    def device_id(self) -> str | None:
        return self.registration_state.get("deviceId")

    @property
    def substatus(self) -> str | None:
        return self.registration_state.get("substatus")

    @property
    def payload(self):
        return self.registration_state.get("payload")

    @property
    def issued_chain(self) -> list[bytes]:
        """`issuedCertificateChain` as DER, leaf first (certificate issuance,
        docs/certificate-issuance.md); empty when none came or an item is not base64."""
        return issued_chain_der(self.registration_state)


@dataclass(frozen=True)
class Send:
    """Send a request after waiting `delay` seconds.

    `kind` is REGISTER (send `body`) or POLL (ask about `operation_id`).
    `retry` is True when this repeats a request; `cause` says why (THROTTLED, REFUSED, ...).
    """

    kind: str
    delay: float
    body: bytes = b""
    operation_id: str | None = None
    retry: bool = False
    cause: str | None = None

    @property
    def reconnect(self) -> bool:
        """True when this repeats a request after a connection failure: its wait is the
        device's own backoff, so a driver may shorten it to fit a last try in the deadline."""
        return self.cause in RETRIED_CONNECTION_CAUSES


@dataclass(frozen=True)
class Done:
    outcome: Outcome


@dataclass(frozen=True)
class RetryPolicy:
    """How long to wait between requests.

    Polls wait what the service says in Retry-After, else `poll_default` (the SDKs use 2 s).
    429 and 5xx are retried: the wait is Retry-After when given, else an exponential
    backoff from `backoff_base` capped at `backoff_cap`; jitter of up to `jitter` of the
    wait is added so a fleet that was throttled together does not retry together.
    Retry-After is clamped to `retry_after_cap` (the C SDK clamps to 300 s).
    Refused, reset, timed-out and dropped connections and TLS EOFs are retried after an
    exponential backoff from `reconnect_base` capped at `reconnect_cap`, with up to
    `reconnect_jitter` of the wait added: short waits, since an outage of a few seconds
    (a restart) is what they ride out, and wide jitter, since a whole fleet loses its
    connections at the same instant.
    """

    poll_default: float = 2.0
    backoff_base: float = 1.0
    backoff_cap: float = 30.0
    jitter: float = 0.2
    retry_after_cap: float = 300.0
    reconnect_base: float = 0.25
    reconnect_cap: float = 4.0
    reconnect_jitter: float = 0.5


def parse_retry_after(headers: Mapping[str, str], cap: float) -> float | None:
    """Retry-After in seconds, clamped to `cap` (rule: `device_sim.common.dps.parse_retry_after`)."""
    seconds = dps.parse_retry_after(headers.get("retry-after"))
    return None if seconds is None else float(min(seconds, cap))


def registration_body(registration_id: str, payload=None, csr: bytes | None = None) -> bytes:
    """The `DeviceRegistration` JSON a register request carries; `csr` is DER PKCS#10,
    sent as base64 without PEM armour (device API 2025-07-01-preview)."""
    document = {"registrationId": registration_id}
    if payload is not None:
        document["payload"] = payload
    if csr is not None:
        document["csr"] = base64.b64encode(csr).decode("ascii")
    return json.dumps(document, separators=(",", ":")).encode()


def issued_chain_der(state: Mapping) -> list[bytes]:
    items = state.get("issuedCertificateChain")
    if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
        return []
    try:
        return [base64.b64decode(item, validate=True) for item in items]
    except (binascii.Error, ValueError):
        return []


def _json_object(body: bytes) -> dict | None:
    try:
        document = json.loads(body.decode("utf-8")) if body else None
    except (UnicodeDecodeError, ValueError):
        return None
    return document if isinstance(document, dict) else None


def error_from_body(body: bytes) -> tuple[int | str | None, str | None]:
    """(errorCode, message) from a `ProvisioningServiceErrorDetails` body, if it is one."""
    document = _json_object(body) or {}
    return document.get("errorCode"), document.get("message")


class RegistrationFlow:
    """One device's registration: start(), then receive() each response until Done."""

    def __init__(
        self,
        registration_id: str,
        payload=None,
        *,
        csr: bytes | None = None,
        policy: RetryPolicy = RetryPolicy(),
        rng: random.Random | None = None,
    ):
        self.registration_id = registration_id
        self.body = registration_body(registration_id, payload, csr)
        self.wants_certificate = csr is not None
        self.policy = policy
        self.rng = rng or random.Random()
        self.operation_id: str | None = None
        self.retries = 0  # consecutive 429/5xx answers
        self.reconnects = 0  # consecutive connection failures
        self.retries_by_cause: Counter[str] = Counter()
        self.requests = 0
        self._last: Send | None = None
        self._failure: ConnectionFailed | None = None  # the last event, when it was one
        self._done: Done | None = None

    @property
    def total_retries(self) -> int:
        return sum(self.retries_by_cause.values())

    # -- events in -------------------------------------------------------------------

    def start(self) -> Send:
        return self._send(Send(REGISTER, 0.0, body=self.body))

    def receive(self, response: Response | ConnectionFailed) -> Send | Done:
        if self._last is None or self._done is not None:
            raise RuntimeError("receive() called without an outstanding request")
        if isinstance(response, ConnectionFailed):
            return self._connection_failed(response)
        self._failure = None
        self.reconnects = 0
        status = response.status
        if status == 429 or status >= 500:
            return self._retry(response)
        self.retries = 0
        if status == 401:
            return self._finish_error(UNAUTHORIZED, response)
        if status not in (200, 202):
            return self._finish_error(REJECTED, response)
        return self._operation_status(response)

    # -- decisions ------------------------------------------------------------------

    def _operation_status(self, response: Response) -> Send | Done:
        document = _json_object(response.body)
        if document is None:
            return self._finish(Outcome(PROTOCOL_ERROR, self.operation_id, http_status=response.status,
                                        error_message="the service answered with a body that is not a JSON object"))
        operation_id = document.get("operationId") or self.operation_id
        state = document.get("registrationState")
        state = state if isinstance(state, dict) else {}
        status = document.get("status")
        if operation_id and isinstance(operation_id, str):
            self.operation_id = operation_id
        if status in IN_PROGRESS:
            if not self.operation_id:
                return self._finish(Outcome(PROTOCOL_ERROR, None, state, response.status,
                                            error_message="the service answered 'assigning' without an operationId"))
            retry_after = parse_retry_after(response.headers, self.policy.retry_after_cap)
            delay = self.policy.poll_default if retry_after is None else retry_after
            return self._send(Send(POLL, delay, operation_id=self.operation_id))
        if status == ASSIGNED and self.wants_certificate and not issued_chain_der(state):
            return self._finish(Outcome(PROTOCOL_ERROR, self.operation_id, state, response.status,
                                        error_message="the service assigned the device but sent no "
                                        "issuedCertificateChain for the csr (base64 DER items expected)"))
        if status in TERMINAL:
            return self._finish(Outcome(
                status, self.operation_id, state, response.status,
                error_code=state.get("errorCode"), error_message=state.get("errorMessage"),
            ))
        return self._finish(Outcome(PROTOCOL_ERROR, self.operation_id, state, response.status,
                                    error_message=f"the service answered an unknown operation status {status!r}"))

    def expire(self, reason: str) -> Done:
        """The deadline passed before a final answer, and the pending `Send` will not be
        sent: how the registration ended.

        While connection failures were being retried the device ends with what they mean
        (`unreachable` for refused connections, ...); otherwise with `timeout`.
        """
        if self._last is not None and self._done is None:
            self.requests -= 1  # counts say what was sent, not what was planned
            if self._last.retry:
                self.retries_by_cause[self._last.cause] -= 1
                self.retries_by_cause += Counter()  # drop causes that fell to zero
        return self._expired(reason)

    def _expired(self, reason: str) -> Done:
        failure = self._failure
        if failure is not None:
            return self._finish(Outcome(RETRIED_CONNECTION_CAUSES[failure.cause], self.operation_id,
                                        error_message=f"{failure.message}; {self.reconnects} connection "
                                        f"attempt(s) in a row failed ({reason})"))
        return self._finish(Outcome(TIMEOUT, self.operation_id, error_message=reason))

    def _connection_failed(self, failure: ConnectionFailed) -> Send | Done:
        """Retry what can pass (an outage, a restart, a drop); end on what cannot."""
        if failure.cause == NO_ANSWER:
            return self._expired(failure.message)  # the transport waited all the time that was left
        if failure.cause not in RETRIED_CONNECTION_CAUSES:
            status = FINAL_CONNECTION_CAUSES.get(failure.cause, PROTOCOL_ERROR)
            return self._finish(Outcome(status, self.operation_id, error_message=failure.message))
        self._failure = failure
        self.reconnects += 1
        wait = min(self.policy.reconnect_base * 2 ** min(self.reconnects - 1, 30), self.policy.reconnect_cap)
        wait += self.rng.uniform(0, wait * self.policy.reconnect_jitter)
        # The last request again: once DPS gave an operation id that is a poll, so a device
        # whose connection dropped after register resumes its operation instead of registering again.
        return self._repeat(wait, failure.cause)

    def _retry(self, response: Response) -> Send:
        """429 / 5xx: repeat the same request later (the deadline is the driver's job)."""
        self.retries += 1
        retry_after = parse_retry_after(response.headers, self.policy.retry_after_cap)
        if retry_after is None:
            wait = min(self.policy.backoff_base * 2 ** min(self.retries - 1, 30), self.policy.backoff_cap)
        else:
            wait = retry_after
        wait += self.rng.uniform(0, wait * self.policy.jitter)
        return self._repeat(wait, THROTTLED if response.status == 429 else SERVER_ERROR)

    def _repeat(self, wait: float, cause: str) -> Send:
        self.retries_by_cause[cause] += 1
        last = self._last
        return self._send(Send(last.kind, wait, body=last.body, operation_id=last.operation_id,
                               retry=True, cause=cause))

    def _finish_error(self, status: str, response: Response) -> Done:
        code, message = error_from_body(response.body)
        if message is None:
            message = f"the service answered HTTP {response.status}"
        return self._finish(Outcome(status, self.operation_id, {}, response.status, code, message))

    def _send(self, action: Send) -> Send:
        self._last = action
        self.requests += 1
        return action

    def _finish(self, outcome: Outcome) -> Done:
        self._done = Done(outcome)
        return self._done

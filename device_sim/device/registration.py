"""The DPS registration flow as a state machine without I/O (h11 style).

Events in (`Response`: status, headers, body), next action out (`Send` a register or a
poll after a delay, or `Done` with an `Outcome`). The HTTPS and MQTT transports only
move bytes; every protocol decision - when to poll, how long to wait, what is terminal,
what counts as unauthorized - lives here, so both transports behave the same.

Driving it:

    flow = RegistrationFlow(registration_id, payload)
    action = flow.start()
    while isinstance(action, Send):
        sleep(action.delay)
        response = transport.send_register(action.body) if action.kind == REGISTER \
            else transport.send_poll(action.operation_id)
        action = flow.receive(response)
    outcome = action.outcome

`run_registration` in `device_sim.device.driver` is that loop with a deadline.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from typing import Mapping, NamedTuple

REGISTER = "register"
POLL = "poll"

# Outcome statuses. The first three are the DPS operation statuses that end a flow.
ASSIGNED = "assigned"
FAILED = "failed"
DISABLED = "disabled"
UNAUTHORIZED = "unauthorized"  # HTTP 401: DPS could not authenticate the device
REJECTED = "rejected"  # any other 3xx/4xx answer: the request itself was refused
PROTOCOL_ERROR = "protocol_error"  # an answer the device cannot understand
TIMEOUT = "timeout"  # the deadline passed before a terminal answer
UNREACHABLE = "unreachable"  # no connection could be made
TLS_ERROR = "tls_error"  # the TLS handshake failed

# DPS keeps polling while the operation is in one of these (C# also polls on unassigned).
IN_PROGRESS = ("assigning", "unassigned")
TERMINAL = (ASSIGNED, FAILED, DISABLED)


class Response(NamedTuple):
    """One answer from the service, whatever carried it.

    `headers` has lower-case names; MQTT maps its topic properties (`retry-after`) here.
    """

    status: int
    headers: Mapping[str, str]
    body: bytes


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


@dataclass(frozen=True)
class Send:
    """Send a request after waiting `delay` seconds.

    `kind` is REGISTER (send `body`) or POLL (ask about `operation_id`).
    `retry` is True when this repeats a request the service asked us to repeat (429/5xx).
    """

    kind: str
    delay: float
    body: bytes = b""
    operation_id: str | None = None
    retry: bool = False


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
    """

    poll_default: float = 2.0
    backoff_base: float = 1.0
    backoff_cap: float = 30.0
    jitter: float = 0.2
    retry_after_cap: float = 300.0


def parse_retry_after(headers: Mapping[str, str], cap: float) -> float | None:
    """Retry-After as integer seconds (the HTTP-date form is ignored, as the C SDK does)."""
    raw = headers.get("retry-after")
    if raw is None:
        return None
    try:
        seconds = int(str(raw).strip())
    except ValueError:
        return None
    return float(min(max(seconds, 0), cap))


def registration_body(registration_id: str, payload=None) -> bytes:
    """The `DeviceRegistration` JSON a register request carries."""
    document = {"registrationId": registration_id}
    if payload is not None:
        document["payload"] = payload
    return json.dumps(document, separators=(",", ":")).encode()


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
        policy: RetryPolicy = RetryPolicy(),
        rng: random.Random | None = None,
    ):
        self.registration_id = registration_id
        self.body = registration_body(registration_id, payload)
        self.policy = policy
        self.rng = rng or random.Random()
        self.operation_id: str | None = None
        self.retries = 0  # consecutive 429/5xx answers
        self.total_retries = 0
        self.requests = 0
        self._last: Send | None = None
        self._done: Done | None = None

    # -- events in -------------------------------------------------------------------

    def start(self) -> Send:
        return self._send(Send(REGISTER, 0.0, body=self.body))

    def receive(self, response: Response) -> Send | Done:
        if self._last is None or self._done is not None:
            raise RuntimeError("receive() called without an outstanding request")
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
        if status in TERMINAL:
            return self._finish(Outcome(
                status, self.operation_id, state, response.status,
                error_code=state.get("errorCode"), error_message=state.get("errorMessage"),
            ))
        return self._finish(Outcome(PROTOCOL_ERROR, self.operation_id, state, response.status,
                                    error_message=f"the service answered an unknown operation status {status!r}"))

    def _retry(self, response: Response) -> Send:
        """429 / 5xx: repeat the same request later (the deadline is the driver's job)."""
        self.retries += 1
        self.total_retries += 1
        retry_after = parse_retry_after(response.headers, self.policy.retry_after_cap)
        if retry_after is None:
            wait = min(self.policy.backoff_base * 2 ** (self.retries - 1), self.policy.backoff_cap)
        else:
            wait = retry_after
        wait += self.rng.uniform(0, wait * self.policy.jitter)
        last = self._last
        return self._send(Send(last.kind, wait, body=last.body, operation_id=last.operation_id, retry=True))

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

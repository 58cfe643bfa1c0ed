"""Runs a `RegistrationFlow` over a `Transport` within a total deadline, and times it."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

from device_sim.device import registration as reg
from device_sim.device.transport import Transport, TransportError

# A last try is squeezed in before the deadline only when at least this much time is left
# for it: a refused connect answers in microseconds, and the device still ends on time.
LAST_TRY_S = 0.1


@dataclass
class Timings:
    """Milliseconds: connect+TLS handshake, register request to terminal answer, total."""

    connect_ms: float | None = None
    register_ms: float | None = None
    total_ms: float | None = None
    requests: int = 0  # register + polls + retries sent
    retries: int = 0  # of those, repeats (after 429 / 5xx / a failed connection)
    retries_by_cause: Counter = field(default_factory=Counter)  # registration.THROTTLED, REFUSED, ...


def run_registration(
    flow: reg.RegistrationFlow,
    transport: Transport,
    timeout: float,
    *,
    clock=time.monotonic,
    sleep=time.sleep,
) -> tuple[reg.Outcome, Timings]:
    """Drive `flow` to its end; every wait and every request fits inside `timeout` seconds.

    A wait the service asked for (Retry-After, a poll interval) that would end after the
    deadline is not started: the outcome comes at once, so a throttled device reports
    promptly instead of sleeping past its budget. A wait of the device's own reconnect
    backoff is shortened instead, so one last try happens just before the deadline.
    """
    started = clock()
    deadline = started + timeout
    timings = Timings()
    register_started = None
    action = flow.start()
    try:
        while isinstance(action, reg.Send):
            delay = _fitted_delay(action, deadline - clock())
            if delay is None:
                action = flow.expire(f"no final answer within {timeout:g} s "
                                     f"(next request would be after {action.delay:g} s)")
                break
            if delay:
                sleep(delay)
            try:
                if timings.connect_ms is None:
                    connect_started = clock()
                    transport.connect(max(0.001, deadline - clock()))
                    timings.connect_ms = (clock() - connect_started) * 1000
                    register_started = clock()
                response = _send(transport, action, max(0.001, deadline - clock()))
            except TransportError as exc:
                response = reg.ConnectionFailed(exc.cause, str(exc))
            action = flow.receive(response)
    finally:
        transport.close()
    if register_started is not None:
        timings.register_ms = (clock() - register_started) * 1000
    timings.total_ms = (clock() - started) * 1000
    timings.requests, timings.retries = flow.requests, flow.total_retries
    timings.retries_by_cause = Counter(flow.retries_by_cause)
    return action.outcome, timings


def _fitted_delay(action: reg.Send, left: float) -> float | None:
    """The wait before `action`, or None when it cannot happen before the deadline."""
    if action.delay < left:
        return action.delay
    if action.reconnect and left > 2 * LAST_TRY_S:  # after that last try, too little is left for another
        return left - LAST_TRY_S
    return None


def _send(transport: Transport, action: reg.Send, left: float) -> reg.Response:
    if action.kind == reg.REGISTER:
        return transport.send_register(action.body, left)
    return transport.send_poll(action.operation_id, left)

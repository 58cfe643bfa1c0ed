"""Runs a `RegistrationFlow` over a `Transport` within a total deadline, and times it."""

from __future__ import annotations

import time
from dataclasses import dataclass

from device_sim.device import registration as reg
from device_sim.device.transport import (
    ProtocolFailure,
    TlsFailure,
    Transport,
    TransportError,
    TransportTimeout,
    Unreachable,
)


@dataclass
class Timings:
    """Milliseconds: connect+TLS handshake, register request to terminal answer, total."""

    connect_ms: float | None = None
    register_ms: float | None = None
    total_ms: float | None = None
    requests: int = 0  # register + polls + retries sent
    retries: int = 0  # of those, repeats after 429 / 5xx


def _failure_outcome(flow: reg.RegistrationFlow, exc: TransportError) -> reg.Outcome:
    status = {
        Unreachable: reg.UNREACHABLE,
        TlsFailure: reg.TLS_ERROR,
        TransportTimeout: reg.TIMEOUT,
        ProtocolFailure: reg.PROTOCOL_ERROR,
    }.get(type(exc), reg.UNREACHABLE)
    return reg.Outcome(status, flow.operation_id, error_message=str(exc))


def run_registration(
    flow: reg.RegistrationFlow,
    transport: Transport,
    timeout: float,
    *,
    clock=time.monotonic,
    sleep=time.sleep,
) -> tuple[reg.Outcome, Timings]:
    """Drive `flow` to its end; every wait and every request fits inside `timeout` seconds.

    A wait that would end after the deadline is not started: the outcome is TIMEOUT at
    once, so a throttled device reports promptly instead of sleeping past its budget.
    """
    started = clock()
    deadline = started + timeout
    timings = Timings()
    try:
        transport.connect(timeout)
        timings.connect_ms = (clock() - started) * 1000
        register_started = clock()
        action = flow.start()
        while isinstance(action, reg.Send):
            if clock() + action.delay >= deadline:
                outcome = reg.Outcome(reg.TIMEOUT, flow.operation_id,
                                      error_message=f"no final answer within {timeout:g} s "
                                      f"(next request would be after {action.delay:g} s)")
                break
            if action.delay:
                sleep(action.delay)
            left = deadline - clock()
            if action.kind == reg.REGISTER:
                response = transport.send_register(action.body, left)
            else:
                response = transport.send_poll(action.operation_id, left)
            action = flow.receive(response)
        else:
            outcome = action.outcome
        timings.register_ms = (clock() - register_started) * 1000
    except TransportError as exc:
        outcome = _failure_outcome(flow, exc)
    finally:
        transport.close()
    timings.total_ms = (clock() - started) * 1000
    timings.requests, timings.retries = flow.requests, flow.total_retries
    return outcome, timings

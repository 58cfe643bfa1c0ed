"""What `device-sim register` reports: exit codes, the JSON object, the human summary."""

from __future__ import annotations

from device_sim.device import registration as reg
from device_sim.device.driver import Timings
from device_sim.common.errors import EXIT_USAGE

# Exit codes of `device-sim register` (documented in docs/device.md and the README).
EXIT_ASSIGNED = 0
EXIT_DISABLED = 3
EXIT_UNAUTHORIZED = 4
EXIT_FAILED = 5
EXIT_TIMEOUT = 6  # timeout or unreachable: nothing (final) came back in time
EXIT_TLS = 7
EXIT_PROTOCOL = 8  # refused request (other 4xx) or an answer the device cannot parse

EXIT_CODES = {
    reg.ASSIGNED: EXIT_ASSIGNED,
    reg.DISABLED: EXIT_DISABLED,
    reg.UNAUTHORIZED: EXIT_UNAUTHORIZED,
    reg.FAILED: EXIT_FAILED,
    reg.TIMEOUT: EXIT_TIMEOUT,
    reg.UNREACHABLE: EXIT_TIMEOUT,
    reg.TLS_ERROR: EXIT_TLS,
    reg.REJECTED: EXIT_PROTOCOL,
    reg.PROTOCOL_ERROR: EXIT_PROTOCOL,
}

EXIT_TABLE = (
    (EXIT_ASSIGNED, "assigned to a hub"),
    (EXIT_USAGE, "usage or configuration error (arguments, PIN, token object, certificate checks)"),
    (EXIT_DISABLED, "the matching enrollment is disabled"),
    (EXIT_UNAUTHORIZED, "DPS refused the device: HTTP 401 (chain not verified, unknown certificate, ID mismatch)"),
    (EXIT_FAILED, "DPS accepted the device but the assignment failed (status 'failed')"),
    (EXIT_TIMEOUT, "timeout or endpoint unreachable"),
    (EXIT_TLS, "TLS handshake failed (server not trusted, client certificate refused)"),
    (EXIT_PROTOCOL, "request refused (other HTTP 4xx) or an answer that is not DPS protocol"),
)


def exit_code(outcome: reg.Outcome) -> int:
    return EXIT_CODES.get(outcome.status, EXIT_PROTOCOL)


def _ms(value):
    return None if value is None else round(value, 1)


def as_json(registration_id: str, outcome: reg.Outcome, timings: Timings, **extra) -> dict:
    """The one object `--json` prints; keys are stable, absent values are null."""
    error = None
    if outcome.status != reg.ASSIGNED:
        error = {"code": outcome.error_code, "message": outcome.error_message}
    document = {
        "registration_id": registration_id,
        "status": outcome.status,
        "assigned_hub": outcome.assigned_hub,
        "device_id": outcome.device_id,
        "substatus": outcome.substatus,
        "operation_id": outcome.operation_id,
        "payload": outcome.payload,
        "http_status": outcome.http_status,
        "error": error,
        "exit_code": exit_code(outcome),
        "timings_ms": {
            "connect_tls": _ms(timings.connect_ms),
            "register": _ms(timings.register_ms),
            "total": _ms(timings.total_ms),
        },
        "requests": timings.requests,
        "retries": timings.retries,
    }
    document.update(extra)
    return document


def human_summary(registration_id: str, outcome: reg.Outcome, timings: Timings) -> str:
    lines = [f"device {registration_id}: {outcome.status}"]
    if outcome.status == reg.ASSIGNED:
        lines.append(f"  hub:        {outcome.assigned_hub}")
        lines.append(f"  device id:  {outcome.device_id}")
        if outcome.substatus:
            lines.append(f"  substatus:  {outcome.substatus}")
        if outcome.payload is not None:
            lines.append(f"  payload:    {outcome.payload}")
    else:
        code = f" ({outcome.error_code})" if outcome.error_code is not None else ""
        if outcome.error_message or code:
            lines.append(f"  error:      {outcome.error_message or ''}{code}")
    if outcome.operation_id:
        lines.append(f"  operation:  {outcome.operation_id}")
    parts = []
    for name, value in (("connect+TLS", timings.connect_ms), ("register", timings.register_ms),
                        ("total", timings.total_ms)):
        if value is not None:
            parts.append(f"{name} {value:.0f} ms")
    if parts:
        lines.append("  timings:    " + ", ".join(parts))
    return "\n".join(lines)

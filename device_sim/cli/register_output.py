"""What `device-sim register` reports: its exit code, the `--json` object, the human summary.

The codes themselves are the one table in `device_sim.common.errors`; this maps each way a
registration ends (`device_sim.device.registration` statuses) onto them.
"""

from __future__ import annotations

from device_sim.common import errors
from device_sim.common.x509util import sha256_thumbprint
from device_sim.device import registration as reg
from device_sim.device.driver import Timings

EXIT_CODES = {
    reg.ASSIGNED: errors.EXIT_ASSIGNED,
    reg.DISABLED: errors.EXIT_DISABLED,
    reg.UNAUTHORIZED: errors.EXIT_UNAUTHORIZED,
    reg.FAILED: errors.EXIT_FAILED,
    reg.TIMEOUT: errors.EXIT_TIMEOUT,
    reg.UNREACHABLE: errors.EXIT_TIMEOUT,
    reg.TLS_ERROR: errors.EXIT_TLS,
    reg.REJECTED: errors.EXIT_PROTOCOL,
    reg.PROTOCOL_ERROR: errors.EXIT_PROTOCOL,
}

EXIT_TABLE = tuple((code, errors.EXIT_MEANINGS[code]) for code in errors.REGISTER_EXIT_CODES)


def exit_code(outcome: reg.Outcome) -> int:
    return EXIT_CODES.get(outcome.status, errors.EXIT_PROTOCOL)


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
        "retries_by_cause": dict(timings.retries_by_cause),
    }
    document.update(extra)
    return document


def issued_json(leaf, uri: str, chain_length: int) -> dict:
    """`issued_certificate` of `--json` (register --issue-cert): where it is and what it says."""
    return {
        "uri": uri,
        "subject": leaf.subject.rfc4514_string(),
        "issuer": leaf.issuer.rfc4514_string(),
        "not_before": leaf.not_valid_before_utc.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "not_after": leaf.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "sha256_thumbprint": sha256_thumbprint(leaf),
        "chain_length": chain_length,
    }


def human_summary(registration_id: str, outcome: reg.Outcome, timings: Timings,
                  issued_certificate: dict | None = None) -> str:
    lines = [f"device {registration_id}: {outcome.status}"]
    if outcome.status == reg.ASSIGNED:
        lines.append(f"  hub:        {outcome.assigned_hub}")
        lines.append(f"  device id:  {outcome.device_id}")
        if outcome.substatus:
            lines.append(f"  substatus:  {outcome.substatus}")
        if outcome.payload is not None:
            lines.append(f"  payload:    {outcome.payload}")
        if issued_certificate is not None:
            lines.append(f"  issued:     {issued_certificate['uri']}")
            lines.append(f"              {issued_certificate['subject']} by {issued_certificate['issuer']}, "
                         f"valid {issued_certificate['not_before']} .. {issued_certificate['not_after']}")
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
    if timings.retries_by_cause:
        lines.append("  retries:    " + ", ".join(f"{cause} {n}" for cause, n in sorted(timings.retries_by_cause.items())))
    return "\n".join(lines)

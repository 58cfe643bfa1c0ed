"""The DPS registration-ID rule, in one place (device side and emulator reuse it).

DPS: case-insensitive alphanumerics plus `- . _ :`, the last character alphanumeric
or `-`, at most 128 characters, and at most 64 when the ID is an X.509 subject CN
(the CN upper bound of RFC 5280). IDs compare case-insensitively.
"""

from __future__ import annotations

import re

from device_sim.common.errors import UserError

MAX_LENGTH = 128
MAX_CN_LENGTH = 64

_ALLOWED = re.compile(r"[A-Za-z0-9\-._:]*[A-Za-z0-9\-]\Z")


def registration_id_problem(value: str, *, max_length: int = MAX_CN_LENGTH) -> str | None:
    """Why `value` is not a valid registration ID, or None when it is (pure function)."""
    if not value:
        return "registration ID is empty"
    if len(value) > max_length:
        return f"registration ID is {len(value)} characters long, the limit is {max_length}"
    if not _ALLOWED.match(value):
        bad = sorted({c for c in value if not (c.isascii() and (c.isalnum() or c in "-._:"))})
        if bad:
            return f"registration ID contains {''.join(bad)!r}: only letters, digits and - . _ : are allowed"
        return "registration ID must end with a letter, a digit or '-'"
    return None


def validate_registration_id(value: str, *, max_length: int = MAX_CN_LENGTH) -> str:
    """Return `value` unchanged if it is a valid ID (X.509 CN limit by default), else raise UserError."""
    problem = registration_id_problem(value, max_length=max_length)
    if problem:
        raise UserError(f"invalid registration ID {value[:80]!r}: {problem}")
    return value


def normalize_registration_id(value: str) -> str:
    """The comparison key: DPS treats IDs case-insensitively."""
    return value.lower()

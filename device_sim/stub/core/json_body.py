"""JSON documents from clients, bounded so that reading one can never fail later.

Every body is at most `config.max_body` bytes (checked by the callers) and nests at most
MAX_DEPTH arrays/objects; NaN, Infinity and numbers too large for a double are refused.
The nesting is measured on the text before `json.loads` runs, so a 5,000-deep body is a
400, not a RecursionError. Documents the store keeps are checked again at write time
(`deeper_than`), because the emulator wraps client values in its own records
(docs/emulator.md, "Limits").
"""

from __future__ import annotations

import json
import math
import re

from .errors import BAD_REQUEST, DpsError

MAX_DEPTH = 32  # the deepest real DPS document (an initialTwin) needs far fewer levels

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKET = re.compile(r"[\[\]{}]")


def text_deeper_than(text: str, limit: int) -> bool:
    """True when the JSON text opens more than `limit` arrays/objects at once."""
    if text.count("[") + text.count("{") <= limit:
        return False
    depth = 0
    for match in _BRACKET.finditer(_STRING.sub('""', text)):
        if match.group() in "[{":
            depth += 1
            if depth > limit:
                return True
        else:
            depth -= 1
    return False


def deeper_than(value: object, limit: int) -> bool:
    """True when a parsed JSON value nests more than `limit` arrays/objects."""
    level = [value] if isinstance(value, (dict, list)) else []
    depth = 0
    while level:  # one pass per nesting level, holding only the containers
        depth += 1
        if depth > limit:
            return True
        level = [child for item in level
                 for child in (item.values() if isinstance(item, dict) else item)
                 if isinstance(child, (dict, list))]
    return False


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def _finite(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):
        raise ValueError("number out of range")
    return number


def json_object(body: bytes, required: bool = True) -> dict:
    """A request body that must be one JSON object (empty allowed unless `required`);
    DpsError 400 otherwise."""
    if not body.strip():
        if required:
            raise DpsError(BAD_REQUEST, "a JSON object body is required")
        return {}
    try:
        text = body.decode(json.detect_encoding(body))
    except (UnicodeDecodeError, LookupError):
        raise DpsError(BAD_REQUEST, "the request body is not valid JSON") from None
    if text_deeper_than(text, MAX_DEPTH):
        raise DpsError(BAD_REQUEST, f"the request body nests JSON deeper than {MAX_DEPTH} "
                       "levels; flatten it")
    try:
        data = json.loads(text, parse_constant=_no_constant, parse_float=_finite)
    except (ValueError, RecursionError):
        raise DpsError(BAD_REQUEST, "the request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise DpsError(BAD_REQUEST, "the request body must be a JSON object")
    return data

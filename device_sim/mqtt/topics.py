"""The DPS MQTT names: CONNECT username, request topics, response topics (parse and format).

Shapes (docs/mqtt.md):
    username   {idScope}/registrations/{registrationId}/api-version={V}[&ClientVersion={ua}]
    register   $dps/registrations/PUT/iotdps-register/?$rid={rid}
    status     $dps/registrations/GET/iotdps-get-operationstatus/?$rid={rid}&operationId={id}
    response   $dps/registrations/res/{status}/?$rid={rid}[&retry-after={seconds}]

`$rid` is an opaque client token: it is echoed byte for byte, never decoded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple
from urllib.parse import quote, unquote

from device_sim.common.dps import parse_retry_after  # noqa: F401  (the one Retry-After rule; the emulator's MQTT edge uses it from here)

RESPONSE_FILTER = "$dps/registrations/res/#"
REGISTER_PREFIX = "$dps/registrations/PUT/iotdps-register/?"
STATUS_PREFIX = "$dps/registrations/GET/iotdps-get-operationstatus/?"
RESPONSE_PREFIX = "$dps/registrations/res/"


class TopicError(ValueError):
    """A username or topic that is not one of the DPS shapes."""


@dataclass(frozen=True)
class Username:
    id_scope: str
    registration_id: str
    api_version: str | None  # None when the client sent none: the decision engine rejects it
    client_version: str | None = None


class RegisterRequest(NamedTuple):
    rid: str


class StatusRequest(NamedTuple):
    rid: str
    operation_id: str


@dataclass(frozen=True)
class ResponseTopic:
    status: int
    rid: str
    retry_after: int | None = None


def _is_number(text: str) -> bool:
    return text.isascii() and text.isdigit()


def _query(text: str) -> dict[str, str]:
    """`a=1&b=2` -> dict, values left encoded; duplicate keys are ambiguous, so refused."""
    pairs: dict[str, str] = {}
    for part in text.split("&"):
        if not part:
            continue
        key, _, value = part.partition("=")
        if key in pairs:
            raise TopicError(f"duplicate key {key!r}")
        pairs[key] = value
    return pairs


def parse_username(username: str) -> Username:
    """Lenient: any text after `/registrations/{id}/` is a query; unknown keys are ignored."""
    scope, sep, rest = username.partition("/registrations/")
    reg_id, _, query = rest.partition("/")
    if not sep or not scope or not reg_id:
        raise TopicError("username is not {idScope}/registrations/{registrationId}/api-version=...")
    fields = _query(query.lstrip("?"))
    api_version = unquote(fields["api-version"]) if fields.get("api-version") else None
    client_version = unquote(fields["ClientVersion"]) if "ClientVersion" in fields else None
    return Username(scope, reg_id, api_version, client_version)


def format_username(id_scope: str, registration_id: str, api_version: str, client_version: str | None = None) -> str:
    text = f"{id_scope}/registrations/{registration_id}/api-version={api_version}"
    if client_version:
        text += "&ClientVersion=" + quote(client_version, safe="")
    return text


def parse_request(topic: str) -> RegisterRequest | StatusRequest:
    """A device PUBLISH topic; TopicError for anything but the two documented requests."""
    if topic.startswith(REGISTER_PREFIX):
        fields = _query(topic[len(REGISTER_PREFIX) :])
        if "$rid" in fields:
            return RegisterRequest(fields["$rid"])
    elif topic.startswith(STATUS_PREFIX):
        fields = _query(topic[len(STATUS_PREFIX) :])
        if "$rid" in fields and fields.get("operationId"):
            return StatusRequest(fields["$rid"], unquote(fields["operationId"]))
    raise TopicError(f"not a DPS request topic: {topic[:120]!r}")


def format_register(rid: str) -> str:
    return f"{REGISTER_PREFIX}$rid={rid}"


def format_status(rid: str, operation_id: str) -> str:
    return f"{STATUS_PREFIX}$rid={rid}&operationId={quote(operation_id, safe='')}"


def format_response(status: int, rid: str, retry_after: int | None = None) -> str:
    # `$rid` must come first: C#'s regex and Python's splitter both expect it there.
    topic = f"{RESPONSE_PREFIX}{status}/?$rid={rid}"
    if retry_after is not None:
        topic += f"&retry-after={retry_after}"
    return topic


def parse_response(topic: str) -> ResponseTopic:
    """A topic DPS published to the device."""
    if not topic.startswith(RESPONSE_PREFIX):
        raise TopicError(f"not a DPS response topic: {topic[:120]!r}")
    status_text, sep, query = topic[len(RESPONSE_PREFIX) :].partition("/?")
    if not sep or not _is_number(status_text):
        raise TopicError(f"response topic without a status: {topic[:120]!r}")
    fields = _query(query)
    if "$rid" not in fields:
        raise TopicError(f"response topic without $rid: {topic[:120]!r}")
    return ResponseTopic(int(status_text), fields["$rid"], parse_retry_after(fields.get("retry-after")))

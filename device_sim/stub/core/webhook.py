"""Custom allocation webhooks: the AllocationRequest the core sends, how it reads the
AllocationResponse, and the `WebhookCaller` interface the server plugs an HTTP client into
(docs/emulator.md, "Custom allocation webhooks").

Sans-IO: the core hands a `WebhookCall` to a `WebhookCaller` and is told the outcome later
through a callback, so no request thread waits for the customer's function; the HTTP
client is an edge (`stub/net/webhook_client.py`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urlsplit, urlunsplit

from .errors import DpsError
from .json_body import MAX_DEPTH, json_object

# The oldest customAllocationDefinition.apiVersion the service accepts.
MIN_API_VERSION = "2018-09-01"
FAILED_PREFIX = "Custom allocation failed"


@dataclass(frozen=True)
class WebhookCall:
    url: str
    document: dict  # the AllocationRequest


@dataclass(frozen=True)
class WebhookAnswer:
    """What came back: an HTTP status and body, or why there was none (`error`)."""

    status: int | None = None
    body: bytes = b""
    error: str | None = None


class WebhookCaller(Protocol):
    def submit(self, call: WebhookCall, done: Callable[[WebhookAnswer], None]) -> None:
        """Start the POST and return at once; `done` is called (from any thread) exactly once."""


@dataclass(frozen=True)
class AllocationResponse:
    hub: str
    initial_twin: dict | None
    payload: dict | None


def url_problem(url) -> str | None:
    """Why a webhookUrl cannot be called: only absolute http(s) URLs with a host."""
    if not isinstance(url, str) or not url:
        return "webhookUrl must be an http:// or https:// URL"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port out of range
    except ValueError:
        return "webhookUrl is not a valid URL"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "webhookUrl must be an absolute http:// or https:// URL with a host"
    return None


def definition_problem(definition) -> str | None:
    """Why a customAllocationDefinition is unusable (both fields are required)."""
    if not isinstance(definition, dict):
        return ('custom allocation needs customAllocationDefinition {"webhookUrl": ..., '
                '"apiVersion": ...}')
    problem = url_problem(definition.get("webhookUrl"))
    if problem:
        return f"customAllocationDefinition.{problem}"
    version = definition.get("apiVersion")
    if not isinstance(version, str) or version[:10] < MIN_API_VERSION:
        return (f"customAllocationDefinition.apiVersion must be a service API version "
                f"({MIN_API_VERSION}-preview or later, e.g. 2021-10-01)")
    return None


def masked_url(url: str) -> str:
    """The URL without its query: a function key travels there (`?code=...`) and the
    service masks it in the record it sends, as the docs' example shows."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, parts.path, "****" if parts.query else "", ""))


def entry_record(entry_doc: dict) -> dict:
    """The enrollment record as the webhook sees it: the function key masked."""
    record = dict(entry_doc)
    definition = record.get("customAllocationDefinition")
    if isinstance(definition, dict) and isinstance(definition.get("webhookUrl"), str):
        record["customAllocationDefinition"] = {**definition,
                                                "webhookUrl": masked_url(definition["webhookUrl"])}
    return record


def allocation_request(entry_kind_field: str, entry_doc: dict, registration_id: str,
                       x509_info: dict, payload: dict | None, previous: dict,
                       linked_hubs: list[str]) -> dict:
    """The AllocationRequest body. `entry_kind_field` is `individualEnrollment` or
    `enrollmentGroup`; `previous` the last record's internal fields (empty when new)."""
    context: dict = {"registrationId": registration_id}
    if previous.get("assignedHub"):
        context["currentIotHubHostName"] = previous["assignedHub"]
        context["currentDeviceId"] = previous.get("deviceId") or registration_id
    context["x509"] = x509_info
    if payload is not None:
        context["payload"] = payload
    return {entry_kind_field: entry_record(entry_doc), "deviceRuntimeContext": context,
            "linkedHubs": list(linked_hubs)}


def read_answer(answer: WebhookAnswer) -> tuple[AllocationResponse | None, str | None]:
    """(response, None), or (None, the registration's errorMessage)."""
    if answer.error is not None:
        return None, f"{FAILED_PREFIX}: {answer.error}"
    if answer.status is None or not 200 <= answer.status < 300:
        return None, f"{FAILED_PREFIX} with status code: {answer.status}"
    try:  # the request bodies' rules: what the store could not keep back is refused here
        document = json_object(answer.body)
    except DpsError as exc:
        if "deeper" in exc.message:
            return None, f"{FAILED_PREFIX}: the webhook's answer nests JSON deeper than {MAX_DEPTH} levels"
        if "must be a JSON object" in exc.message:
            return None, f"{FAILED_PREFIX}: the webhook's answer is not a JSON object"
        return None, f"{FAILED_PREFIX}: the webhook's answer is not JSON"
    hub = document.get("iotHubHostName")
    if not isinstance(hub, str) or not hub:
        return None, f"{FAILED_PREFIX}: the webhook's answer has no iotHubHostName"
    for name in ("initialTwin", "payload"):
        if document.get(name) is not None and not isinstance(document[name], dict):
            return None, f"{FAILED_PREFIX}: the webhook's {name} is not a JSON object"
    return AllocationResponse(hub, document.get("initialTwin"), document.get("payload")), None

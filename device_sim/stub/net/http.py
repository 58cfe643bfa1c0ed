"""HTTP/1.1 front ends of the emulator: device API and service API over `listener.TlsListener`.

The HTTP reader is deliberately small: request line, headers, Content-Length bodies,
keep-alive. Chunked bodies are refused (411/501): DPS clients send Content-Length, and a
refusal is safer than a half-done decoder. Parsing (`parse_head`, `body_length`) and
rendering (`render_response`) are pure functions; `serve_http` is the only I/O loop.

Every failure a client can cause ends in a DPS-style JSON error (`errors.error_reply`)
with the right status, never a traceback.
"""

from __future__ import annotations

import json
import re
import socket
import time
from dataclasses import dataclass
from http import HTTPStatus
from typing import Callable, Mapping, Sequence
from urllib.parse import parse_qsl, unquote

from cryptography import x509
from OpenSSL import SSL

from device_sim.stub.core import errors
from device_sim.stub.core.errors import Reply, error_reply
from device_sim.stub.core.faults import FaultAction, fault_reply
from device_sim.stub.net.listener import Limits, pause, reset_socket
from device_sim.stub.net.tls_context import UnreadablePeerChain
from device_sim.stub.net.tls_stream import TlsClosed, TlsStream

MAX_HEAD = 16 * 1024  # request line + headers
MAX_HEADERS = 100
DEFAULT_MAX_BODY = 96 * 1024  # DPS's published maximum message size
JSON_TYPE = "application/json; charset=utf-8"
TOKEN = re.compile(rb"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
DIGITS = re.compile(r"[0-9]+\Z")


# --------------------------------------------------------------------------- values


@dataclass(frozen=True)
class Request:
    method: str
    target: str  # as sent, e.g. "/0ne00/registrations/dev1/register?api-version=2021-06-01"
    path: str  # raw (still percent-encoded) path
    query: dict[str, str]
    headers: dict[str, str]  # lower-case names
    body: bytes
    keep_alive: bool


@dataclass(frozen=True)
class Faulted:
    """A handler's reply that a fault plan touched: `serve_http` waits, answers or drops."""

    reply: object
    action: FaultAction


class HttpError(Exception):
    """A request this layer refuses; the connection is closed after the reply when `close`.

    `code` is the DPS-style six-digit error code; its first three digits are the status.
    """

    def __init__(self, code: int, message: str, close: bool = True):
        super().__init__(message)
        self.code = code
        self.message = message
        self.close = close

    def reply(self) -> Reply:
        return error_reply(self.code, self.message)


# --------------------------------------------------------------------------- parsing (pure)


def parse_head(head: bytes) -> tuple[str, str, str, dict[str, str]]:
    """Request line and headers (without the final blank line) -> method, target, version, headers."""
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not TOKEN.match(parts[0]) or not parts[1].startswith(b"/"):
        raise HttpError(400000, "malformed request line; send 'METHOD /path HTTP/1.1'")
    method, target, version = (p.decode("ascii", "replace") for p in parts)
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        raise HttpError(505000, f"unsupported HTTP version {version!r}; use HTTP/1.1")
    if len(lines) - 1 > MAX_HEADERS:
        raise HttpError(431000, f"more than {MAX_HEADERS} headers")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not TOKEN.match(name):
            raise HttpError(400000, "malformed header line")
        key = name.decode("ascii").lower()
        text = value.strip().decode("latin-1")
        if key in headers:
            if key == "content-length" and headers[key] != text:
                raise HttpError(400000, "conflicting Content-Length headers")
            headers[key] = text if key == "content-length" else f"{headers[key]}, {text}"
        else:
            headers[key] = text
    return method, target, version, headers


def body_length(method: str, headers: Mapping[str, str], max_body: int) -> int:
    """How many body bytes to read; refuses chunked and oversized bodies before reading any."""
    if "transfer-encoding" in headers:
        if headers["transfer-encoding"].strip().lower() == "chunked":
            raise HttpError(411000, "chunked request bodies are not supported; send Content-Length")
        raise HttpError(501000, f"Transfer-Encoding {headers['transfer-encoding']!r} is not supported")
    raw = headers.get("content-length")
    if raw is None:
        return 0
    # Only ASCII digits: str.isdigit() also takes "²" or "٣", which int() then refuses.
    if not DIGITS.match(raw):
        raise HttpError(400000, "Content-Length is not a number; send the body size in ASCII digits")
    length = int(raw)
    if length > max_body:
        raise HttpError(413000, f"request body of {length} bytes exceeds the {max_body}-byte limit")
    return length


def wants_keep_alive(version: str, headers: Mapping[str, str]) -> bool:
    tokens = {t.strip().lower() for t in headers.get("connection", "").split(",")}
    if version == "HTTP/1.0":
        return "keep-alive" in tokens
    return "close" not in tokens


def split_target(target: str) -> tuple[str, dict[str, str]]:
    path, _, query = target.partition("?")
    return path, dict(parse_qsl(query, keep_blank_values=True))


def check_json_body(request: Request) -> None:
    """A body must be declared as JSON (415 otherwise); an empty body needs no type."""
    if not request.body:
        return
    content_type = request.headers.get("content-type", "")
    media = content_type.split(";")[0].strip().lower()
    if media != "application/json":
        shown = content_type or "none"
        raise HttpError(415000, f"Content-Type {shown!r} is not supported; send application/json", close=False)


# Built once: json.dumps with non-default separators builds a new encoder per call, and
# an HTTPStatus lookup per response is an Enum call.
_COMPACT_JSON = json.JSONEncoder(separators=(",", ":"))
_REASONS = {status.value: status.phrase for status in HTTPStatus}


def render_response(reply, keep_alive: bool) -> bytes:
    raw = isinstance(reply.body, bytes)  # a fault plan's non-JSON body
    body = reply.body if raw else b"" if reply.body is None else _COMPACT_JSON.encode(reply.body).encode()
    reason = _REASONS.get(reply.status, "Unknown")
    lines = [f"HTTP/1.1 {reply.status} {reason}"]
    headers = {k.lower(): v for k, v in (reply.headers or {}).items()}
    if body:
        headers["content-type"] = "text/html" if raw else JSON_TYPE
    headers["content-length"] = str(len(body))
    headers["connection"] = "keep-alive" if keep_alive else "close"
    for name, value in headers.items():
        if "\r" in value or "\n" in value:
            continue  # never let a value split the header block
        lines.append(f"{_header_case(name)}: {value}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def _header_case(name: str) -> str:
    if name.startswith("x-ms-"):
        return name
    return "-".join(part.capitalize() for part in name.split("-"))


# --------------------------------------------------------------------------- I/O loop


class _Reader:
    """Buffered reads from a TlsStream with the head/body limits of one request.

    Deadlines are absolute, never per read (docs/emulator.md, "HTTP"): between requests the
    connection may idle for `idle_timeout`; from the first byte of a request, its head and
    body together must arrive within `request_timeout`, however the bytes trickle in.
    """

    def __init__(self, stream: TlsStream):
        self.stream = stream
        self.buffer = b""
        self.request_deadline: float | None = None

    def read_head(self, limits: Limits) -> bytes | None:
        """Bytes up to the blank line; None if the client closed or idled out between requests."""
        idle_deadline = time.monotonic() + limits.idle_timeout
        self.request_deadline = None
        while True:
            started = bool(self.buffer.strip())
            if started and self.request_deadline is None:
                self.request_deadline = time.monotonic() + limits.request_timeout
            end = self.buffer.find(b"\r\n\r\n")
            if end >= 0:
                head, self.buffer = self.buffer[:end], self.buffer[end + 4 :]
                return head
            if len(self.buffer) > MAX_HEAD:
                raise HttpError(431000, f"request head exceeds {MAX_HEAD} bytes")
            if not started:
                self.buffer = b""  # tolerate stray CRLFs between requests
            try:
                chunk = self._recv(MAX_HEAD, self.request_deadline if started else idle_deadline)
            except (TimeoutError, socket.timeout):
                if started:
                    raise HttpError(408000, "request not completed in time")
                return None
            if not chunk:
                if started:
                    raise HttpError(400000, "connection closed in the middle of a request")
                return None
            self.buffer += chunk

    def read_body(self, length: int) -> bytes:
        while len(self.buffer) < length:
            try:
                chunk = self._recv(length - len(self.buffer), self.request_deadline)
            except (TimeoutError, socket.timeout):
                raise HttpError(408000, "request body not completed in time")
            if not chunk:
                raise HttpError(400000, "connection closed before the whole body arrived")
            self.buffer += chunk
        body, self.buffer = self.buffer[:length], self.buffer[length:]
        return body

    def _recv(self, size: int, deadline: float) -> bytes:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("deadline passed")
        return self.stream.recv(size, remaining)


def read_request(reader: _Reader, limits: Limits, max_body: int) -> Request | None:
    head = reader.read_head(limits)
    if head is None:
        return None
    method, target, version, headers = parse_head(head)
    length = body_length(method, headers, max_body)
    body = reader.read_body(length)
    path, query = split_target(target)
    return Request(method, target, path, query, headers, body, wants_keep_alive(version, headers))


RequestHandler = Callable[[Request, Sequence[x509.Certificate]], object]


def serve_http(
    stream: TlsStream,
    handle: RequestHandler,
    limits: Limits,
    max_body: int = DEFAULT_MAX_BODY,
    log: Callable[[str], None] | None = None,
    upgrade: Callable[[TlsStream, Request, bytes], bool] | None = None,
) -> None:
    """Answer requests on one connection until the client closes, idles out, or errs.

    `upgrade(stream, request, buffered)` may take the connection over (net/websocket.py);
    it gets the bytes read past the request and returns True when it did."""
    try:
        chain, refusal = stream.presented_chain(), None
    except UnreadablePeerChain as exc:
        chain, refusal = [], error_reply(errors.INVALID_CERTIFICATE, f"the client certificate cannot be read ({exc})")
    reader = _Reader(stream)
    while True:
        try:
            request = read_request(reader, limits, max_body)
        except HttpError as exc:
            if _send(stream, exc.reply(), keep_alive=False):
                _linger(stream)
            return
        except (TlsClosed, SSL.Error, OSError):
            return
        if request is None:
            return
        if upgrade is not None and upgrade(stream, request, reader.buffer):
            return
        try:
            reply = refusal or handle(request, chain)
        except HttpError as exc:
            reply = exc.reply()
            if exc.close:
                _send(stream, reply, keep_alive=False)
                return
        except Exception as exc:  # a bug in a handler: answer 500, keep the server up
            if log is not None:
                log(f"internal error on {request.method} {request.path}: {type(exc).__name__}: {exc}")
            reply = error_reply(errors.INTERNAL_ERROR, "internal error in the emulator")
        if isinstance(reply, Faulted):
            reply = _carry_out(stream, reply)
            if reply is None:
                return
        if not _send(stream, reply, request.keep_alive):
            return
        if not request.keep_alive:
            return


def _carry_out(stream: TlsStream, faulted: Faulted):
    """Wait the plan's latency; None when the answer is to be lost with the connection."""
    action = faulted.action
    if action.latency_s:
        pause(stream, action.latency_s)
    if action.reset == "after_request":
        reset_socket(stream.sock)
        return None
    if action.close == "after_request":
        return None  # the listener closes the stream
    return faulted.reply


def _send(stream: TlsStream, reply, keep_alive: bool) -> bool:
    try:
        stream.sendall(render_response(reply, keep_alive))
        return True
    except (SSL.Error, OSError):
        return False


# After refusing a body we did not read (413, 411), the client may still be sending it.
# Closing now would make the kernel answer its next segment with a reset, and many clients
# then report the reset instead of our answer. So the rest is read and thrown away, briefly
# and within a bound (what nginx calls a lingering close); nothing of it is kept.
LINGER_BYTES = 1024 * 1024
LINGER_SECONDS = 1.0


def _linger(stream: TlsStream) -> None:
    deadline = time.monotonic() + LINGER_SECONDS
    drained = 0
    try:
        while drained < LINGER_BYTES:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            chunk = stream.recv(64 * 1024, remaining)
            if not chunk:
                return
            drained += len(chunk)
    except (TimeoutError, socket.timeout, TlsClosed, SSL.Error, OSError):
        return


def plain_http_hint(sock: socket.socket, first_bytes: bytes) -> None:
    """A client that speaks plain HTTP to a TLS port gets told so (instead of silence)."""
    if not re.match(rb"^[A-Z]{3,7} /", first_bytes):
        return
    reply = error_reply(errors.BAD_REQUEST, "this port speaks HTTPS; use an https:// URL")
    try:
        sock.settimeout(2)
        sock.sendall(render_response(reply, keep_alive=False))
    except OSError:
        pass


# --------------------------------------------------------------------------- routing

# Device routes: segments are matched on the raw path, then percent-decoded one by one,
# so an encoded "/" inside a registration ID cannot change which route matches.
DEVICE_ROUTES = (
    ("register", "PUT", ("*", "registrations", "*", "register")),
    ("operation_status", "GET", ("*", "registrations", "*", "operations", "*")),
    ("registration_status", "POST", ("*", "registrations", "*")),
)


def match_device_route(method: str, path: str) -> tuple[str, list[str]]:
    """(route name, decoded path parameters); HttpError 404/405 when nothing fits."""
    segments = path.split("/")[1:]
    path_matched = False
    for name, route_method, pattern in DEVICE_ROUTES:
        if len(segments) != len(pattern):
            continue
        if not all(p == "*" and s or p == s for p, s in zip(pattern, segments)):
            continue
        path_matched = True
        if method == route_method:
            return name, [unquote(s) for p, s in zip(pattern, segments) if p == "*"]
    if path_matched:
        raise HttpError(405000, f"method {method} is not allowed on {path}", close=False)
    raise HttpError(404000, f"no device API route for {method} {path}", close=False)


# Route names as a fault plan's `operation` names them.
FAULT_OPERATIONS = {"register": "register", "operation_status": "poll", "registration_status": "status_lookup"}


def with_faults(faults, operation: str, registration_id: str | None, serve: Callable[[FaultAction | None], object]):
    """Ask the plan about one request; `serve(action)` runs unless the plan answers instead."""
    action = faults.decide("https", operation, registration_id) if faults is not None else None
    if action is None:
        return serve(None)
    return Faulted(fault_reply(action) or serve(action), action)


def device_handler(device_api) -> RequestHandler:
    """Route the three DPS device operations to `DeviceApi` (transport-independent core)."""
    faults = getattr(device_api, "faults", None)

    def handle(request: Request, chain: Sequence[x509.Certificate]):
        name, params = match_device_route(request.method, request.path)
        return with_faults(faults, FAULT_OPERATIONS[name], params[1],
                           lambda action: _device_call(device_api, name, params, request, chain, action))

    return handle


def _device_call(device_api, name: str, params: list[str], request: Request, chain, action):
    api_version = request.query.get("api-version")
    if name == "register":
        check_json_body(request)
        id_scope, registration_id = params
        hold = {"hold": action.assigning_s} if action is not None and action.assigning_s else {}
        return device_api.register(id_scope, registration_id, api_version, chain, request.body,
                                   host=request.headers.get("host"), **hold)
    if name == "operation_status":
        id_scope, registration_id, operation_id = params
        return device_api.operation_status(id_scope, registration_id, operation_id, api_version, chain)
    check_json_body(request)
    id_scope, registration_id = params
    return device_api.registration_status(id_scope, registration_id, api_version, chain, request.body)


def service_handler(service_api, faults=None) -> RequestHandler:
    """Everything on the service port goes to `ServiceApi`, which authenticates the SAS token.

    The path stays percent-encoded: ServiceApi splits it into segments before decoding.
    `/emulator/...` paths are never faulted, so a plan can always be changed or cleared."""

    def handle(request: Request, chain: Sequence[x509.Certificate]):
        check_json_body(request)

        def serve(_action):
            return service_api.handle(request.method, request.path, request.query, request.headers, request.body)

        if unquote(request.path.split("/", 2)[1]).lower() == "emulator":
            return serve(None)
        return with_faults(faults, "service", None, serve)

    return handle


# The first path segment of every service API route (compared case-insensitively). A device
# path starts with an ID scope ("0ne" + hex digits), so the two never overlap.
SERVICE_HEADS = frozenset({"certificates", "enrollments", "enrollmentgroups", "registrations"})


def device_or_service_handler(on_device: RequestHandler, on_service: RequestHandler) -> RequestHandler:
    """One port for both APIs (for clients that can only dial 443): routed by the first segment."""

    def handle(request: Request, chain: Sequence[x509.Certificate]):
        head = request.path.split("/", 2)[1]  # parse_head made sure the path starts with "/"
        if unquote(head).lower() in SERVICE_HEADS:
            return on_service(request, chain)
        return on_device(request, chain)

    return handle

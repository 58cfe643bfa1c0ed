"""DPS over AMQP 1.0, sans-IO: bytes a device sends in, bytes to answer out.

`DpsAmqpSession` drives python-qpid-proton's protocol engine (Transport, Connection,
Collector: a codec and state machine that does no I/O) and maps each DPS request message
to a `DeviceApi` call, with the chain the device presented in its TLS handshake. The I/O
loop is in `net/amqp.py`; docs/emulator.md ("AMQP") lists the names used on the wire.

What a device does, and what it gets:

    AMQP header, or SASL header  SASL is optional: a device may skip it (X.509 devices
                                 authenticate in TLS) or pick ANONYMOUS, the one mechanism
                                 offered (proton's built-in SASL offers EXTERNAL only when
                                 proton runs the TLS itself, and here our TlsStream does)
    open, begin                  open, begin (a few sessions at most)
    attach, address              the link is attached when its address (target of the
    {scope}/registrations/{id}   device's sender, source of its receiver) has that shape,
                                 optionally behind amqps://host/; else refused (detached
                                 with amqp:not-found)
    transfer on its sender       DeviceApi decides: 2xx -> accepted, and a reply message on
                                 the device's receiver link of the same address; >= 400 ->
                                 rejected, the error JSON in the rejection's description
    oversized or undecodable     the link is detached (message-size-exceeded), or the
    message                      delivery rejected (amqp:decode-error)
    malformed frames             the connection is closed with the engine's framing error

Request application properties: `iotdps-operation-type` (`iotdps-register`,
`iotdps-get-operationstatus`, `iotdps-get-registration`), `iotdps-operation-id` (polls),
`iotdps-forceRegistration` (accepted; the emulator runs every register afresh). The API
version is the link attach property `com.microsoft:api-version`, else the default device
API version (older C SDKs send none). Replies carry the request's correlation-id (its
message-id when it had none), the JSON body in a data section, `iotdps-status` and, on
`202`, `retry-after` (seconds, as text).

A fault plan (`core.faults`) is asked once per DPS request message, as `amqp` with the
operation names of `FAULT_OPERATIONS`; its answer takes the core's place, and what needs
I/O (`delay`, `dropped`) is left for the loop in `net/amqp.py` to carry out.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

from cryptography import x509
from proton import Collector, Condition, Connection, Delivery, Endpoint, Event, Message, SASL, Transport

from device_sim.common import dps
from device_sim.stub.core import errors
from device_sim.stub.core.faults import fault_reply

OPERATION_TYPE = "iotdps-operation-type"
OPERATION_ID = "iotdps-operation-id"
FORCE_REGISTRATION = "iotdps-forceRegistration"
STATUS = "iotdps-status"
RETRY_AFTER = "retry-after"
REGISTER = "iotdps-register"
GET_OPERATION_STATUS = "iotdps-get-operationstatus"
GET_REGISTRATION = "iotdps-get-registration"
API_VERSION_PROPERTY = "com.microsoft:api-version"

CONTAINER_ID = "device-sim-stub"
MAX_FRAME_SIZE = 64 * 1024
MAX_CHANNEL = 3  # four sessions: a device uses one
MAX_LINKS = 8  # a device uses two
MAX_QUEUED_REPLIES = 16  # replies waiting for a receiver link or its credit
CREDIT = 10  # messages a device may send before we grant more
MESSAGE_OVERHEAD = 16 * 1024  # headers and properties allowed on top of the body limit

# The rejection's error condition for each HTTP-like status the core answers. The error
# JSON (with the 6-digit code the SDKs classify by) is the description either way.
_CONDITIONS = {401: "amqp:unauthorized-access", 403: "amqp:unauthorized-access",
               404: "amqp:not-found", 409: "amqp:precondition-failed", 412: "amqp:precondition-failed",
               413: "amqp:resource-limit-exceeded", 429: "com.microsoft:device-container-throttled"}

_ADDRESS = re.compile(r"^(?:[a-z][a-z0-9+.-]*://[^/]*)?/?(?P<scope>[^/]+)/registrations/(?P<id>[^/]+)$",
                      re.IGNORECASE)


@dataclass(frozen=True)
class LinkAddress:
    id_scope: str
    registration_id: str

    @property
    def key(self) -> tuple[str, str]:
        return self.id_scope.casefold(), self.registration_id.casefold()


def parse_address(address: str | None) -> LinkAddress | None:
    """`{scope}/registrations/{id}`, bare or behind `amqps://host/` (the C SDK's form)."""
    if not isinstance(address, str) or len(address) > 512:
        return None
    match = _ADDRESS.match(address)
    if match is None:
        return None
    return LinkAddress(match["scope"], match["id"])


def link_api_version(properties: Mapping | None) -> str:
    value = (properties or {}).get(API_VERSION_PROPERTY)
    return value if isinstance(value, str) and value else dps.DEVICE_API_VERSION


@dataclass(frozen=True)
class Answer:
    """A request's outcome: a reply message to send, or the rejection's error."""

    reply: Message | None = None
    rejection: Condition | None = None


def _body_bytes(body) -> bytes | None:
    if body is None:
        return b""
    if isinstance(body, (bytes, bytearray, memoryview)):
        return bytes(body)
    if isinstance(body, str):
        return body.encode()
    return None  # a map, list or number is no DeviceRegistration JSON


# A request's operation type as a fault plan's `operation` names it.
FAULT_OPERATIONS = {REGISTER: "register", GET_OPERATION_STATUS: "poll", GET_REGISTRATION: "status_lookup"}


def fault_operation(message: Message) -> str | None:
    """The plan's name for a request (None: not a DPS request, the core refuses it)."""
    return FAULT_OPERATIONS.get((message.properties or {}).get(OPERATION_TYPE))


def call_api(api, address: LinkAddress, api_version: str, chain: Sequence[x509.Certificate],
             message: Message, hold: float | None = None):
    """The core's `Reply` for one request message (edge-level refusals shaped by the core too).

    `hold`: a fault plan's `assigning_s` for a register."""
    properties = message.properties or {}
    operation = properties.get(OPERATION_TYPE)
    scope, registration_id = address.id_scope, address.registration_id
    if operation == REGISTER or operation == GET_REGISTRATION:
        body = _body_bytes(message.body)
        if body is None:
            return errors.error_reply(errors.BAD_REQUEST, "the request body must be DeviceRegistration "
                                      "JSON in a data section (or empty)")
        if operation == REGISTER:
            extra = {"hold": hold} if hold else {}
            return api.register(scope, registration_id, api_version, chain, body, **extra)
        return api.registration_status(scope, registration_id, api_version, chain, body)
    if operation == GET_OPERATION_STATUS:
        operation_id = properties.get(OPERATION_ID)
        if not isinstance(operation_id, str) or not operation_id:
            return errors.error_reply(errors.BAD_REQUEST, f"{GET_OPERATION_STATUS} needs the "
                                      f"application property {OPERATION_ID}")
        # The poll body is ignored: C# sends an AMQP value, Node an empty string.
        return api.operation_status(scope, registration_id, operation_id, api_version, chain)
    return errors.error_reply(errors.BAD_REQUEST, f"application property {OPERATION_TYPE} is "
                              f"{operation!r}; use {REGISTER} or {GET_OPERATION_STATUS}")


def _header(headers: Mapping[str, str], name: str) -> str | None:
    for key, value in headers.items():
        if key.lower() == name:
            return value
    return None


def answer_for(reply, request: Message) -> Answer:
    """A core `Reply` as DPS answers it over AMQP.

    A `bytes` body (a fault plan's non-JSON answer) goes out as it is: the rejection's
    description, or the reply's data section typed text/html without `iotdps-status`."""
    retry_after = dps.parse_retry_after(_header(reply.headers, "retry-after"))
    raw = isinstance(reply.body, bytes)
    if reply.status >= 400:
        info = {RETRY_AFTER: str(retry_after)} if retry_after is not None else None
        name = _CONDITIONS.get(reply.status, "amqp:internal-error" if reply.status >= 500 else "amqp:invalid-field")
        description = reply.body.decode("utf-8", "replace") if raw else json.dumps(reply.body, separators=(",", ":"))
        return Answer(rejection=Condition(name, description, info))
    properties = {}
    if not raw:
        properties[STATUS] = str((reply.body or {}).get("status", ""))
    if retry_after is not None:
        properties[RETRY_AFTER] = str(retry_after)
    correlation = request.correlation_id if request.correlation_id is not None else request.id
    data = reply.body if raw else json.dumps(reply.body or {}, separators=(",", ":")).encode()
    message = Message(body=data, inferred=True, correlation_id=correlation,
                      content_type="text/html" if raw else "application/json", properties=properties)
    return Answer(reply=message)


class DpsAmqpSession:
    """One device connection: `receive(data)`, then `output()`; `finished` when it is over.

    `note(reason)` hears why a connection ends badly (for the log, never sent as text the
    device did not cause). `DeviceApi` answers every request with a `Reply`, never an
    exception, so nothing a device sends raises out of `receive`.
    """

    def __init__(self, api, chain: Sequence[x509.Certificate], max_body: int,
                 note: Callable[[str], None] | None = None, faults=None):
        self.api = api
        self.chain = chain
        self.faults = faults  # core.faults.Faults, asked once per DPS request
        # What the I/O loop carries out for a fault plan: seconds to wait before the
        # output goes (it sets this back to 0), and a drop after the request ("close" or
        # "reset": nothing more is sent, not even the output already made).
        self.delay = 0.0
        self.dropped: str | None = None
        self.max_message = max_body + MESSAGE_OVERHEAD
        self.note = note or (lambda message: None)
        self.progressed = False  # a protocol step completed since the I/O loop last looked
        self.partial = False  # a request message is arriving in several frames
        self.transport = Transport(Transport.SERVER)
        self.transport.max_frame_size = MAX_FRAME_SIZE
        self.transport.channel_max = MAX_CHANNEL
        self.transport.require_auth(False)  # X.509 devices skip SASL: TLS authenticated them
        SASL(self.transport).allowed_mechs("ANONYMOUS")
        self.connection = Connection()
        self.collector = Collector()
        self.connection.collect(self.collector)
        self.transport.bind(self.connection)
        self._links = 0  # attached DPS links
        self._reply_links: dict[tuple[str, str], object] = {}
        self._queued: list[tuple[tuple[str, str], Message]] = []
        self._tag = 0

    # -- bytes in and out ---------------------------------------------------------------

    def receive(self, data: bytes) -> None:
        view = memoryview(data)
        while view and self.dropped is None:
            capacity = self.transport.capacity()
            if capacity < 0:
                return  # the engine stopped reading (error or close): the rest is ignored
            if capacity == 0:
                self._process()
                if self.transport.capacity() == 0:
                    return
                continue
            chunk = bytes(view[:capacity])
            view = view[capacity:]
            try:
                self.transport.push(chunk)
            except Exception as exc:  # the engine's own framing errors land in its condition
                self.note(f"amqp input refused: {exc}")
            self._process()

    def end_of_input(self) -> None:
        if self.transport.capacity() >= 0:
            self.transport.close_tail()
        self._process()

    def tick(self, now: float) -> float:
        """Heartbeats the device asked for (its idle-timeout); the next deadline or 0."""
        deadline = self.transport.tick(now)
        self._process()
        return deadline

    def output(self) -> bytes:
        chunks = []
        while (size := self.transport.pending()) > 0:
            chunks.append(self.transport.peek(size))
            self.transport.pop(size)
        return b"".join(chunks)

    @property
    def finished(self) -> bool:
        """Nothing more will be written (the engine closed its output)."""
        return self.transport.pending() < 0

    def close(self, name: str, description: str) -> None:
        """End the connection with an AMQP error (a deadline passed, a bound was hit)."""
        if not self.connection.state & Endpoint.LOCAL_CLOSED:
            self.connection.condition = Condition(name, description)
            if self.connection.state & Endpoint.LOCAL_UNINIT:
                self.connection.open()  # a close frame needs an open before it
            self.connection.close()
        # The input stays open: closing it now would make the engine replace our error
        # with its own "connection aborted" before the close frame is written.
        self._process()

    # -- protocol events ----------------------------------------------------------------

    def _process(self) -> None:
        while self.dropped is None and (event := self.collector.peek()) is not None:
            try:
                self._dispatch(event)
            finally:
                self.collector.pop()

    def _dispatch(self, event: Event) -> None:
        kind = event.type
        if kind == Event.CONNECTION_REMOTE_OPEN:
            self.progressed = True
            self.connection.container = CONTAINER_ID
            self.connection.open()
        elif kind == Event.SESSION_REMOTE_OPEN:
            self.progressed = True
            event.session.open()
        elif kind == Event.LINK_REMOTE_OPEN:
            self.progressed = True
            self._attach(event.link)
        elif kind == Event.LINK_FLOW:
            if event.link.is_sender:
                self._send_queued()
        elif kind == Event.DELIVERY:
            self._delivery(event.delivery)
        elif kind == Event.LINK_REMOTE_CLOSE:
            self.progressed = True
            self._detached(event.link)
        elif kind == Event.SESSION_REMOTE_CLOSE:
            event.session.close()
        elif kind == Event.CONNECTION_REMOTE_CLOSE:
            self.connection.close()
        elif kind == Event.TRANSPORT_ERROR:
            condition = self.transport.condition
            if condition is not None:
                self.note(f"closing connection: {condition.name}: {condition.description}")

    def _attach(self, link) -> None:
        remote = link.remote_target if link.is_receiver else link.remote_source
        address = parse_address(remote.address)
        if address is None or self._links >= MAX_LINKS:
            if address is None:
                condition = Condition("amqp:not-found", f"no DPS node {remote.address!r}: the address is "
                                      "{idScope}/registrations/{registrationId}")
            else:
                condition = Condition("amqp:resource-limit-exceeded", f"{MAX_LINKS} links at most on one connection")
            link.open()  # attach with a null terminus, then detach: how AMQP refuses a link
            link.condition = condition
            link.close()
            return
        self._links += 1
        link.source.copy(link.remote_source)
        link.target.copy(link.remote_target)
        link.dps_address = address
        link.dps_api_version = link_api_version(link.remote_properties)
        if link.is_receiver:
            link.max_message_size = self.max_message
            link.open()
            link.flow(CREDIT)
        else:
            link.open()
            self._reply_links[address.key] = link
            self._send_queued()

    def _detached(self, link) -> None:
        address = getattr(link, "dps_address", None)
        if address is not None:
            self._links -= 1
            if self._reply_links.get(address.key) == link:
                del self._reply_links[address.key]
        if not link.state & Endpoint.LOCAL_CLOSED:
            link.close()

    def _delivery(self, delivery: Delivery) -> None:
        link = delivery.link
        if link.is_sender:
            if delivery.remote_state or delivery.remote.settled:
                delivery.settle()  # the device took one of our replies
            return
        if getattr(link, "dps_address", None) is None or link.state & Endpoint.LOCAL_CLOSED:
            return
        if delivery.pending > self.max_message:
            link.condition = Condition("amqp:link:message-size-exceeded",
                                       f"a request message may have {self.max_message} bytes at most")
            link.close()
            self.partial = False
            return
        if delivery.partial:
            self.partial = True
            return
        if delivery.aborted:
            delivery.settle()
            self.partial = False
            return
        if not delivery.readable:
            return
        self.partial = False
        self.progressed = True
        data = link.recv(delivery.pending) or b""
        link.advance()
        self._request(link, delivery, data)
        if link.credit < CREDIT // 2:
            link.flow(CREDIT - link.credit)

    def _request(self, link, delivery: Delivery, data: bytes) -> None:
        message = Message()
        try:
            message.decode(data)
        except Exception as exc:  # proton raises several types for undecodable sections
            delivery.local.condition = Condition("amqp:decode-error", f"the message cannot be decoded: {exc}")
            delivery.update(Delivery.REJECTED)
            delivery.settle()
            return
        answer = answer_for(self._reply(link, message), message)
        if self.dropped is not None:
            return  # processed, and its answer lost with the connection
        if answer.rejection is not None:
            delivery.local.condition = answer.rejection
            delivery.update(Delivery.REJECTED)
            delivery.settle()
            return
        delivery.update(Delivery.ACCEPTED)
        delivery.settle()
        if len(self._queued) >= MAX_QUEUED_REPLIES:
            self.close("amqp:resource-limit-exceeded", "too many replies waiting: attach a receiver "
                       "link on the same address and grant it credit")
            return
        self._queued.append((link.dps_address.key, answer.reply))
        self._send_queued()

    def _reply(self, link, message: Message):
        """The core's reply, or the fault plan's in its place (docs/emulator.md, "Fault plans")."""
        operation = fault_operation(message)
        action = None
        if self.faults is not None and operation is not None:
            action = self.faults.decide("amqp", operation, link.dps_address.registration_id)
        reply = fault_reply(action)
        if reply is None:
            hold = action.assigning_s if action is not None else None
            reply = call_api(self.api, link.dps_address, link.dps_api_version, self.chain, message, hold)
        if action is not None:
            self.delay += action.latency_s
            if action.drops_after_request:
                self.dropped = "reset" if action.reset == "after_request" else "close"
        return reply

    def _send_queued(self) -> None:
        waiting = []
        for key, message in self._queued:
            link = self._reply_links.get(key)
            if link is None or link.credit <= 0 or link.state & Endpoint.LOCAL_CLOSED:
                waiting.append((key, message))
                continue
            self._tag += 1
            delivery = link.delivery(str(self._tag).encode())
            link.send(message.encode())
            link.advance()
            if link.snd_settle_mode == link.SND_SETTLED:
                delivery.settle()
        self._queued = waiting

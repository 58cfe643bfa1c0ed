"""DPS over AMQP 1.0 (`--transport amqp`, port 5671) and over AMQP in WebSockets (`amqp-ws`, 443).

Implements the `Transport` seam (docs/device.md, "Transports"), so `RegistrationFlow` takes
every decision and outcomes, JSON and exit codes are those of HTTPS.

Three layers, each doing one thing:

- `AmqpClient`: python-qpid-proton's protocol engine (Transport, Connection, Collector in
  client mode: a codec and state machine without I/O) holding the DPS link pair. Bytes in,
  bytes out, answers collected by correlation-id. No socket here.
- `TlsByteStream` / `WebSocketByteStream`: where the bytes go. TLS is CPython `ssl` with the
  token key through pkcs11-provider (`transport_openssl.tls_socket`, the client signature is
  made in the token): awscrt's Python API offers HTTP, MQTT and WebSocket clients but no raw
  TLS stream to run another protocol over. wsproto does the RFC 6455 client framing of
  `amqp-ws` (`GET /$iothub/websocket`, subprotocol `AMQPWSB10`).
- `AmqpTransport`: the I/O loop (`_pump`) with the deadline, and the mapping of what happened
  to `Response`s and `TransportError` causes.

The DPS link (docs/emulator.md, "AMQP"): one session; a receiver, then a sender, both on the
node `{idScope}/registrations/{registrationId}` with the attach properties
`com.microsoft:api-version` and `com.microsoft:client-version`. X.509 devices skip SASL (the
TLS client certificate is the identity). A request is a message whose application property
`iotdps-operation-type` says register or get-operationstatus (with `iotdps-operation-id`);
the body is the DeviceRegistration JSON in a data section. An accepted request is answered
by a message on the receiver carrying our correlation-id, the operation JSON and
`retry-after`; a rejected one carries the error JSON in the rejection's description, whose
`errorCode / 1000` is the HTTP-like status the flow reads (as the C# SDK classifies it).
"""

from __future__ import annotations

import dataclasses
import json
import socket
import ssl
import time
import uuid
from typing import Callable

from proton import Collector, Connection, Delivery, Endpoint, Event, Message, Transport, symbol
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (AcceptConnection, BytesMessage, CloseConnection, Ping, RejectConnection,
                            Request, TextMessage)
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

from device_sim.amqp import engine
from device_sim.common import dps
from device_sim.common.dps import DEVICE_API_VERSION
from device_sim.device import registration as reg
from device_sim.device.registration import Response, error_from_body
from device_sim.device.transport import ProtocolFailure, TlsFailure, TransportError, TransportTimeout
from device_sim.device.transport_https import MAX_BODY, USER_AGENT
from device_sim.device.transport_openssl import tls_socket

DEFAULT_PORT = 5671
WEBSOCKET_PORT = 443
WEBSOCKET_PATH = "/$iothub/websocket"
WEBSOCKET_SUBPROTOCOL = "AMQPWSB10"

OPERATION_TYPE = "iotdps-operation-type"
OPERATION_ID = "iotdps-operation-id"
FORCE_REGISTRATION = "iotdps-forceRegistration"
REGISTER = "iotdps-register"
GET_OPERATION_STATUS = "iotdps-get-operationstatus"
RETRY_AFTER = "retry-after"
API_VERSION_PROPERTY = symbol("com.microsoft:api-version")
CLIENT_VERSION_PROPERTY = symbol("com.microsoft:client-version")

MAX_FRAME_SIZE = 64 * 1024  # DPS messages are at most 96 KB: frames of 64 KiB carry them in two
CREDIT = 4  # replies the service may send before we grant more (one per request in flight)
READ_CHUNK = 64 * 1024
MAX_WEBSOCKET_HANDSHAKE = 64 * 1024

# The status a rejection means when its description carries no DPS error JSON.
_CONDITION_STATUS = {"amqp:unauthorized-access": 401, "amqp:not-found": 404,
                     "com.microsoft:device-container-throttled": 429, "amqp:resource-limit-exceeded": 429,
                     "amqp:internal-error": 500}
UNAUTHORIZED_CONDITION = "amqp:unauthorized-access"


def link_address(id_scope: str, registration_id: str) -> str:
    return f"{id_scope}/registrations/{registration_id}"


def rejection_response(name: str | None, description: str | None, info) -> Response:
    """A rejected request as the `Response` HTTPS would have given (status from errorCode)."""
    body = (description or "").encode()
    code, _ = error_from_body(body)
    if isinstance(code, int) and 100_000 <= code <= 599_999:
        status = code // 1000
    else:
        status = _CONDITION_STATUS.get(name, 400)
        if code is None:
            body = json.dumps({"message": f"the service rejected the request ({name}: {description})"}).encode()
    retry_after = dps.parse_retry_after((info or {}).get(RETRY_AFTER))
    headers = {} if retry_after is None else {"retry-after": str(retry_after)}
    return Response(status, headers, body)


def reply_response(message: Message) -> Response:
    """A reply message as a `Response`: 202 while the operation is in progress, else 200 (as HTTPS)."""
    body = message.body
    if isinstance(body, str):
        body = body.encode()
    elif not isinstance(body, (bytes, bytearray, memoryview)):
        body = b""  # a map or number is no operation JSON: the flow reports a protocol error
    properties = message.properties or {}
    status = properties.get("iotdps-status")
    try:
        document = json.loads(bytes(body))
    except ValueError:
        document = None
    if isinstance(document, dict):
        status = document.get("status", status)
    in_progress = status in reg.IN_PROGRESS
    headers = {}
    retry_after = dps.parse_retry_after(properties.get(RETRY_AFTER))
    if retry_after is not None:
        headers["retry-after"] = str(retry_after)
    return Response(202 if in_progress else 200, headers, bytes(body))


class AmqpClient(engine.EngineEndpoint):
    """The engine side of one device connection: `output()` to send, `receive(data)` what came
    (`engine.EngineEndpoint`).

    `ready` once both links are attached and the sender has credit; `request()` queues a
    message and returns its correlation-id; `answers[correlation_id]` is then a `Response`.
    `failure` is set when the connection or a link ended: (cause, message), or a 401
    `Response` when the service closed it as unauthorized.
    """

    def __init__(self, host: str, id_scope: str, registration_id: str, api_version: str,
                 client_version: str = USER_AGENT):
        self.address = link_address(id_scope, registration_id)
        self.transport = Transport()  # client mode; no SASL: X.509 authenticates in TLS
        self.transport.max_frame_size = MAX_FRAME_SIZE
        self.connection = Connection()
        self.connection.container = f"device-sim-{registration_id}"
        self.connection.hostname = host
        self.collector = Collector()
        self.connection.collect(self.collector)
        self.transport.bind(self.connection)
        self.answers: dict[str, Response] = {}
        self.failure: tuple[str, str] | Response | None = None
        self._waiting: dict[str, str] = {}  # our delivery's tag -> its correlation-id
        self._tags = 0
        properties = {API_VERSION_PROPERTY: api_version, CLIENT_VERSION_PROPERTY: client_version}
        self.connection.open()
        session = self.connection.session()
        session.open()
        self.receiver = session.receiver(f"{self.address}-receiver")
        self.receiver.source.address = self.address
        self.receiver.target.address = self.address
        self.receiver.properties = properties
        self.receiver.max_message_size = MAX_BODY  # DPS replies are at most 96 KB
        self.receiver.open()
        self.receiver.flow(CREDIT)
        self.sender = session.sender(f"{self.address}-sender")
        self.sender.source.address = self.address
        self.sender.target.address = self.address
        self.sender.properties = properties
        self.sender.open()

    @property
    def ready(self) -> bool:
        return (self.receiver.state & Endpoint.REMOTE_ACTIVE and self.sender.state & Endpoint.REMOTE_ACTIVE
                and self.sender.credit > 0)

    # -- requests (bytes in and out: receive, end_of_input, tick, output of EngineEndpoint) -----------------------------------------------------------------------

    def request(self, properties: dict, body: bytes) -> str:
        correlation_id = str(uuid.uuid4())
        message = Message(body=body, inferred=True, id=correlation_id, correlation_id=correlation_id,
                          content_type="application/json", properties=properties)
        self._tags += 1
        tag = str(self._tags)
        self.sender.delivery(tag)
        self.sender.send(message.encode())
        self.sender.advance()
        self._waiting[tag] = correlation_id
        return correlation_id

    def close(self) -> None:
        if not self.connection.state & Endpoint.LOCAL_CLOSED:
            self.connection.close()
        self._process()

    # -- engine events ------------------------------------------------------------------

    def _dispatch(self, event: Event) -> None:
        kind = event.type
        if kind == Event.DELIVERY:
            self._delivery(event.delivery)
        elif kind in (Event.LINK_REMOTE_CLOSE, Event.SESSION_REMOTE_CLOSE, Event.CONNECTION_REMOTE_CLOSE):
            endpoint = {Event.LINK_REMOTE_CLOSE: event.link, Event.SESSION_REMOTE_CLOSE: event.session,
                        Event.CONNECTION_REMOTE_CLOSE: event.connection}[kind]
            self._closed_by_service(endpoint.remote_condition, kind)
        elif kind == Event.TRANSPORT_ERROR:
            condition = self.transport.condition
            if self.failure is None and condition is not None and "framing" in (condition.name or ""):
                self.failure = (reg.BAD_ANSWER, f"the server answered something that is not AMQP 1.0 "
                                f"({condition.description})")

    def _closed_by_service(self, condition, kind) -> None:
        if self.failure is not None:
            return
        if condition is not None and condition.name == UNAUTHORIZED_CONDITION:
            self.failure = rejection_response(condition.name, condition.description, condition.info)
            return
        what = {Event.LINK_REMOTE_CLOSE: "detached the DPS link", Event.SESSION_REMOTE_CLOSE: "ended the session",
                Event.CONNECTION_REMOTE_CLOSE: "closed the AMQP connection"}[kind]
        reason = f" ({condition.name}: {condition.description})" if condition is not None else ""
        # A refused attach (no such node) cannot pass on a retry; a closed connection may.
        cause = reg.BAD_ANSWER if kind == Event.LINK_REMOTE_CLOSE and condition is not None else reg.DROPPED
        self.failure = (cause, f"the service {what}{reason}")

    def _delivery(self, delivery: Delivery) -> None:
        link = delivery.link
        if link.is_sender:
            self._settled(delivery)
        elif delivery.readable and not delivery.partial:
            data = link.recv(delivery.pending) or b""
            link.advance()
            delivery.update(Delivery.ACCEPTED)
            delivery.settle()
            if link.credit < CREDIT // 2:
                link.flow(CREDIT - link.credit)
            self._reply(data)

    def _settled(self, delivery: Delivery) -> None:
        correlation_id = self._waiting.get(delivery.tag)
        state = delivery.remote_state
        if correlation_id is None or not state:
            return
        del self._waiting[delivery.tag]
        if state == Delivery.REJECTED:
            condition = delivery.remote.condition
            self.answers[correlation_id] = rejection_response(
                condition.name if condition else None, condition.description if condition else None,
                condition.info if condition else None)
        elif state != Delivery.ACCEPTED and self.failure is None:
            # released or modified: the service did not take the request; a repeat may pass
            self.failure = (reg.DROPPED, f"the service did not take the request (delivery {state})")
        delivery.settle()  # accepted: the answer follows on the receiver

    def _reply(self, data: bytes) -> None:
        message = Message()
        try:
            message.decode(data)
        except Exception as exc:
            if self.failure is None:
                self.failure = (reg.BAD_ANSWER, f"the service sent a reply that cannot be decoded ({exc})")
            return
        correlation_id = message.correlation_id
        if correlation_id is not None:
            self.answers[str(correlation_id)] = reply_response(message)


class TlsByteStream:
    """The TLS connection itself as the byte stream AMQP runs over."""

    def __init__(self, sock: ssl.SSLSocket):
        self.sock = sock

    def send(self, data: bytes, timeout: float) -> None:
        self.sock.settimeout(max(0.001, timeout))
        self.sock.sendall(data)

    def recv(self, timeout: float) -> bytes:
        """Bytes as they arrive; b"" when the server closed the connection."""
        self.sock.settimeout(max(0.001, timeout))
        return self.sock.recv(READ_CHUNK)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class WebSocketByteStream:
    """Binary WebSocket messages over a `TlsByteStream`, as one byte stream (wsproto framing).

    Message boundaries carry no meaning for AMQP: each `send` is one binary message, and what
    `recv` returns is the payload of whatever messages arrived.
    """

    def __init__(self, tls: TlsByteStream):
        self.tls = tls
        self.ws = WSConnection(ConnectionType.CLIENT)
        self._closed = False

    def upgrade(self, host: str, deadline: float) -> None:
        self.tls.send(self.ws.send(Request(host=host, target=WEBSOCKET_PATH,
                                           subprotocols=[WEBSOCKET_SUBPROTOCOL])), _left(deadline))
        received = 0
        while not self._upgraded():
            data = self.tls.recv(_left(deadline))
            if not data:
                raise ProtocolFailure(f"the server closed the connection instead of answering the WebSocket "
                                      f"upgrade of {WEBSOCKET_PATH}", reg.DROPPED)
            received += len(data)
            if received > MAX_WEBSOCKET_HANDSHAKE:
                raise ProtocolFailure(f"the answer to the WebSocket upgrade of {WEBSOCKET_PATH} is too large")
            try:
                self.ws.receive_data(data)
            except RemoteProtocolError as exc:
                raise ProtocolFailure(f"the answer to the WebSocket upgrade of {WEBSOCKET_PATH} is not "
                                      f"HTTP: {exc}") from None

    def _upgraded(self) -> bool:
        try:
            events = list(self.ws.events())
        except RemoteProtocolError as exc:
            raise ProtocolFailure(f"the answer to the WebSocket upgrade of {WEBSOCKET_PATH} is not "
                                  f"HTTP: {exc}") from None
        for event in events:
            if isinstance(event, AcceptConnection):
                if event.subprotocol != WEBSOCKET_SUBPROTOCOL:
                    raise ProtocolFailure(f"the server upgraded {WEBSOCKET_PATH} without the "
                                          f"{WEBSOCKET_SUBPROTOCOL} subprotocol")
                return True
            if isinstance(event, RejectConnection):
                raise ProtocolFailure(f"the server refused the WebSocket upgrade of {WEBSOCKET_PATH} "
                                      f"with HTTP {event.status_code} (does it serve AMQP over WebSockets?)")
        return False

    def send(self, data: bytes, timeout: float) -> None:
        try:
            if self._closed:
                raise LocalProtocolError("closed")
            frame = self.ws.send(BytesMessage(data=data))
        except LocalProtocolError:
            raise ProtocolFailure("the server closed the WebSocket", reg.DROPPED) from None
        self.tls.send(frame, timeout)

    def recv(self, timeout: float) -> bytes:
        while True:
            if self._closed:
                return b""
            data = self.tls.recv(timeout)
            self._feed(data)
            if not data:
                self._closed = True
            payload = self._events()
            if payload:
                return payload

    def close(self) -> None:
        if not self._closed:
            try:
                self.tls.send(self.ws.send(CloseConnection(code=1000)), 1.0)
            except (OSError, LocalProtocolError, TransportError):
                pass  # the server went first; the TCP close below is what matters
        self.tls.close()

    def _feed(self, data: bytes) -> None:
        try:
            self.ws.receive_data(data or None)
        except RemoteProtocolError as exc:
            raise ProtocolFailure(f"the server broke the WebSocket framing: {exc}") from None

    def _events(self) -> bytes:
        payload = bytearray()
        try:
            for event in self.ws.events():
                if isinstance(event, BytesMessage):
                    payload += event.data
                elif isinstance(event, Ping):
                    self.tls.send(self.ws.send(event.response()), 1.0)
                elif isinstance(event, CloseConnection):
                    if self.ws.state is ConnectionState.REMOTE_CLOSING:
                        self.tls.send(self.ws.send(event.response()), 1.0)
                    self._closed = True
                elif isinstance(event, TextMessage):
                    raise ProtocolFailure("the server sent a WebSocket text message: AMQP is binary")
        except RemoteProtocolError as exc:
            raise ProtocolFailure(f"the server broke the WebSocket framing: {exc}") from None
        except LocalProtocolError:
            self._closed = True  # a pong or close echo after the WebSocket closed: nothing more comes
        return bytes(payload)


def _left(deadline: float) -> float:
    """Seconds until `deadline`; a socket timeout once it passed (`_io` names it)."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise socket.timeout()
    return left


@dataclasses.dataclass(eq=False)
class AmqpTransport:
    """One device's AMQP connection to DPS (real or emulated); implements `Transport`.

    `tls_context` is an `ssl.SSLContext` presenting the chain with the token key
    (`transport_openssl.client_context`); `websocket` carries AMQP inside WebSockets.
    """

    host: str
    port: int
    id_scope: str
    registration_id: str
    tls_context: ssl.SSLContext
    _: dataclasses.KW_ONLY
    api_version: str = DEVICE_API_VERSION
    websocket: bool = False
    server_name: str | None = None
    stream: TlsByteStream | WebSocketByteStream | None = dataclasses.field(default=None, init=False)
    client: AmqpClient | None = dataclasses.field(default=None, init=False)
    connects: int = dataclasses.field(default=0, init=False)

    def __post_init__(self):
        self.server_name = self.server_name or self.host

    # -- Transport ---------------------------------------------------------------------

    def connect(self, timeout: float) -> None:
        if self.client is not None:
            return
        deadline = time.monotonic() + timeout
        what = f"connecting to {self.host}:{self.port}"
        stream = TlsByteStream(tls_socket(self.host, self.port, self.tls_context, self.server_name, timeout))
        try:
            if self.websocket:
                stream = WebSocketByteStream(stream)
                host = self.server_name if self.port == 443 else f"{self.server_name}:{self.port}"
                self._io(lambda: stream.upgrade(host, deadline), what, connecting=True)
            self.stream = stream
            self.client = AmqpClient(self.server_name, self.id_scope, self.registration_id, self.api_version)
            self._pump(lambda: self.client.ready, deadline, what, connecting=True)
        except BaseException:
            if self.stream is None:
                stream.close()
            self.close()
            raise
        self.connects += 1

    def send_register(self, body: bytes, timeout: float) -> Response:
        properties = {OPERATION_TYPE: REGISTER, FORCE_REGISTRATION: False}
        return self._request(properties, body, timeout, "register")

    def send_poll(self, operation_id: str, timeout: float) -> Response:
        properties = {OPERATION_TYPE: GET_OPERATION_STATUS, OPERATION_ID: operation_id}
        return self._request(properties, b"", timeout, "operation status")

    def close(self) -> None:
        client, stream = self.client, self.stream
        self.client = self.stream = None
        if client is not None and stream is not None:
            client.close()
            try:
                output = client.output()
                if output:
                    stream.send(output, 1.0)  # our close frame, so the service logs no abort
            except (OSError, TransportError):
                pass
        if stream is not None:
            stream.close()

    # -- internals ----------------------------------------------------------------------

    def _request(self, properties: dict, body: bytes, timeout: float, what: str) -> Response:
        deadline = time.monotonic() + timeout
        self.connect(timeout)
        if isinstance(self.client.failure, Response):
            return self.client.failure
        client = self.client
        correlation_id = client.request(properties, body)
        try:
            self._pump(lambda: correlation_id in client.answers, deadline,
                       f"waiting for the answer to the {what} request")
        except BaseException:
            self.close()  # a late answer must not be taken for the next request's
            raise
        answer = client.answers.pop(correlation_id, None)
        if answer is None:  # the service closed the connection as unauthorized
            self.close()
            return client.failure
        return answer

    def _pump(self, done: Callable[[], bool], deadline: float, what: str, connecting: bool = False) -> None:
        """Move bytes between the engine and the stream until `done()` or a failure."""
        client = self.client
        while True:
            output = client.output()
            if output:
                self._io(lambda: self.stream.send(output, _left(deadline)), what, connecting)
            if done():
                return
            failure = client.failure
            if isinstance(failure, Response):
                return  # closed as unauthorized: the request gets the 401 as its answer
            if failure is not None:
                raise ProtocolFailure(f"{failure[1]} while {what}", failure[0])
            wake = client.tick(time.monotonic())  # 0, or when the next heartbeat is due
            left = deadline - time.monotonic()
            wait = min(left, wake - time.monotonic()) if wake else left
            try:
                data = self._io(lambda: self.stream.recv(max(0.001, wait)) if left > 0 else _left(deadline),
                                what, connecting)
            except TransportTimeout:
                if wait < left:
                    continue  # woke up for a heartbeat
                raise
            if not data:
                client.end_of_input()
                if isinstance(client.failure, Response):
                    continue  # closed as unauthorized, then hung up: the 401 is the answer
                # (the engine calls an end of input without a close frame a framing error)
                raise ProtocolFailure(f"the server closed the connection while {what}", reg.DROPPED)
            client.receive(data)

    def _io(self, step, what: str, connecting: bool):
        """One stream operation, its OS and TLS errors as `TransportError`s."""
        try:
            return step()
        except TransportError:
            raise
        except (socket.timeout, TimeoutError):
            if connecting:
                raise TransportTimeout(f"no AMQP link with {self.host}:{self.port} while {what}",
                                       reg.CONNECT_TIMEOUT) from None
            raise TransportTimeout(f"no answer from the server while {what}") from None
        except ssl.SSLError as exc:  # TLS 1.3: a refused client certificate arrives after the handshake
            raise TlsFailure(f"TLS failed while {what}: {exc.reason or exc}") from None
        except OSError as exc:
            cause = reg.RESET if isinstance(exc, ConnectionResetError) and connecting else reg.DROPPED
            raise ProtocolFailure(f"the server closed the connection while {what}: {exc.strerror or exc}",
                                  cause) from None

"""WebSockets on the device HTTPS port: `GET /$iothub/websocket` upgraded for MQTT or AMQP.

Firewalled sites allow only 443, so the official SDKs can carry MQTT (subprotocol `mqtt`)
and AMQP (`AMQPWSB10`) inside WebSocket binary messages on the device HTTPS port. The HTTP
loop (`net/http.py`) hands such a request to `upgrade_handler`; wsproto checks the
handshake and does the framing (RFC 6455: masking, fragments, ping/pong, close codes), and
`WebSocketStream` turns the binary messages back into the byte stream a `TlsStream` gives,
so the protocol loops (`mqtt.serve_mqtt`, AMQP's) run over it unchanged. The client chain
is the one of the TLS connection underneath: the same chain-as-sent, the same `DeviceApi`.

Which loop runs is looked up in a `Subprotocols` registry the server wires
(`StubApp.websocket_subprotocols`). A front end adds its own with
`register_subprotocol(name, handler)`, `handler(stream)` being the same callable its
`TlsListener` runs. An upgrade nobody can serve is refused with a DPS-style JSON error.

Fault plans: the connection met the plan's rules for every transport when the device port
accepted it (as `https`); at the upgrade, rules naming `websocket` or the inner protocol
(`mqtt`, `amqp`) get their connection-level turn (before `101`), and the inner loop runs
inside `faults.carried_over("websocket")`, so its requests match both names. A request
whose answer the plan drops ends the connection without a close frame, as a real drop
would. docs/emulator.md ("WebSockets", "Fault plans") describes what a client gets.
"""

from __future__ import annotations

import time
from typing import Callable, Sequence
from urllib.parse import unquote

import h11
from cryptography import x509
from OpenSSL import SSL
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import AcceptConnection, BytesMessage, CloseConnection, Event, Ping, TextMessage
from wsproto.events import Request as UpgradeRequest
from wsproto.frame_protocol import CloseReason
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

from device_sim.stub.core import errors
from device_sim.stub.core.errors import error_reply
from device_sim.stub.core.faults import carried_over
from device_sim.stub.net import http
from device_sim.stub.net.listener import reset_socket

PATH = "/$iothub/websocket"  # the only path the official SDKs upgrade
MQTT = "mqtt"
AMQP = "AMQPWSB10"
READ_CHUNK = 64 * 1024
# Larger than any MQTT packet the codec takes (96 KiB + headers) and than the AMQP frames
# DPS clients negotiate; a message past it is closed with 1009 before more is read.
DEFAULT_MAX_MESSAGE = 256 * 1024
# How long our close frame waits for the client's, so the TCP close does not race it.
CLOSE_WAIT = 1.0

StreamHandler = Callable[["WebSocketStream"], None]


class Subprotocols:
    """Subprotocol name -> the loop that serves a connection upgraded to it."""

    def __init__(self):
        self._handlers: dict[str, StreamHandler] = {}

    def register_subprotocol(self, name: str, handler: StreamHandler) -> None:
        self._handlers[name] = handler

    def names(self) -> list[str]:
        return list(self._handlers)

    def choose(self, offered: Sequence[str]) -> str | None:
        """The first subprotocol the client offered that is served here (RFC 6455 §4.2.2)."""
        return next((name for name in offered if name in self._handlers), None)

    def handler(self, name: str) -> StreamHandler:
        return self._handlers[name]


class WebSocketClosed(ConnectionError):
    """Data was to be sent after the WebSocket closed (an OSError, like a broken pipe)."""


class WebSocketStream:
    """The binary messages of one server-side WebSocket as a byte stream with deadlines.

    Offers what the protocol loops use of `TlsStream`: `recv(size, timeout)` (b"" once the
    client closed), `sendall`, `presented_chain`, `close`. Message boundaries carry no
    meaning for MQTT or AMQP, so fragments and messages are simply concatenated.
    """

    def __init__(self, stream, ws: WSConnection, subprotocol: str,
                 max_message: int = DEFAULT_MAX_MESSAGE, log: Callable[[str], None] | None = None):
        self.stream = stream  # the TLS connection underneath; the listener closes it
        self.ws = ws
        self.subprotocol = subprotocol
        self.max_message = max_message
        self.log = log
        self._pending = bytearray()
        self._message_size = 0
        self._ended = False  # no more data for the reader: a close frame came or went, or EOF
        self._eof = False  # the TLS connection underneath ended
        self._unparseable = False

    def presented_chain(self) -> list[x509.Certificate]:
        return self.stream.presented_chain()

    # What `listener.pause` and `listener.reset_socket` use of a TlsStream (a fault
    # plan's latency and reset, carried out by the inner protocol's loop).
    @property
    def turn(self):
        return self.stream.turn

    @property
    def sock(self):
        return self.stream.sock

    def recv(self, size: int, timeout: float) -> bytes:
        """Up to `size` bytes of message data; b"" once the WebSocket is closed."""
        deadline = time.monotonic() + timeout
        while not self._pending and not self._ended:
            self._pump(deadline)
        data = bytes(self._pending[:size])
        del self._pending[:size]
        return data

    def sendall(self, data: bytes) -> None:
        if not data:
            return  # an empty binary message would still be a frame the client must parse
        if self.ws.state is not ConnectionState.OPEN:
            raise WebSocketClosed("the WebSocket is closed")
        self.stream.sendall(self.ws.send(BytesMessage(data=data)))

    def close(self) -> None:
        """Finish the closing handshake (our close frame, then the client's); never raises."""
        try:
            if self.ws.state in (ConnectionState.OPEN, ConnectionState.REMOTE_CLOSING):
                self._send(CloseConnection(code=CloseReason.NORMAL_CLOSURE))
            deadline = time.monotonic() + CLOSE_WAIT
            while self.ws.state is ConnectionState.LOCAL_CLOSING and not (self._eof or self._unparseable):
                self._pump(deadline)
        except (TimeoutError, OSError, SSL.Error, LocalProtocolError):
            pass
        self._ended = True

    def _pump(self, deadline: float) -> None:
        """Handle what wsproto holds, else read once from the connection underneath."""
        if self._handle_events():
            return
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("client too slow")
        data = self.stream.recv(READ_CHUNK, remaining)
        if not data:
            self._eof = self._ended = True  # gone without a close frame (RFC 6455 code 1006)
            return
        if self.ws.state is not ConnectionState.CLOSED:
            self.ws.receive_data(data)
            self._handle_events()

    def _handle_events(self) -> bool:
        handled = False
        for event in self.ws.events():
            self._on_event(event)
            handled = True
        return handled

    def _on_event(self, event: Event) -> None:
        if isinstance(event, BytesMessage):
            self._message_size += len(event.data)
            if self._message_size > self.max_message:
                self._fail(CloseReason.MESSAGE_TOO_BIG, f"message larger than {self.max_message} bytes")
                return
            if event.message_finished:
                self._message_size = 0
            if not self._ended:
                self._pending += event.data
        elif isinstance(event, TextMessage):
            # MQTT 3.1.1 §6.0 and the AMQP WebSocket binding allow binary messages only.
            self._fail(CloseReason.UNSUPPORTED_DATA, "text message; this subprotocol uses binary messages")
        elif isinstance(event, Ping):
            if self.ws.state is ConnectionState.OPEN:
                self._send(event.response())
        elif isinstance(event, CloseConnection):
            if self.ws.state is ConnectionState.REMOTE_CLOSING:
                self._send(event.response())  # the client's close, echoed
            elif self.ws.state is ConnectionState.OPEN:
                # wsproto reports a frame it could not parse as a close with the code to
                # send; nothing after it can be parsed, so no close frame will be read either.
                self._unparseable = True
                self._fail(event.code, event.reason or "malformed frame")
            self._ended = True
        # Pong: only an answer to a ping we never send; nothing to do.

    def _fail(self, code: int, reason: str) -> None:
        if self.log is not None:
            self.log(f"websocket: closing connection ({code}): {reason}")
        if self.ws.state is ConnectionState.OPEN:
            self._send(CloseConnection(code=code, reason=reason))
        self._ended = True

    def _send(self, event: Event) -> None:
        self.stream.sendall(self.ws.send(event))


UpgradeHandler = Callable[[object, "http.Request", bytes], bool]


def is_websocket_upgrade(request: http.Request) -> bool:
    """A request for `/$iothub/websocket` that asks to switch to the WebSocket protocol."""
    upgrade = request.headers.get("upgrade")
    if upgrade is None:  # every device request passes here: the common case costs one lookup
        return False
    tokens = {token.strip().lower() for token in upgrade.split(",")}
    return "websocket" in tokens and unquote(request.path) == PATH


def upgrade_handler(subprotocols: Subprotocols, max_message: int = DEFAULT_MAX_MESSAGE,
                    log: Callable[[str], None] | None = None, faults=None) -> UpgradeHandler:
    """What `http.serve_http` calls with each request: True when it took the connection over.

    `faults`: the emulator's `core.faults.Faults` (None: no plan spoils WebSockets)."""

    def upgrade(stream, request: http.Request, buffered: bytes) -> bool:
        if not is_websocket_upgrade(request):
            return False
        serve_websocket(stream, request, buffered, subprotocols, max_message, log, faults)
        return True

    return upgrade


# The fault plan's transport name for what runs inside each subprotocol.
INNER_TRANSPORTS = {MQTT: "mqtt", AMQP: "amqp"}
CARRIER = "websocket"


def serve_websocket(stream, request: http.Request, buffered: bytes, subprotocols: Subprotocols,
                    max_message: int = DEFAULT_MAX_MESSAGE, log: Callable[[str], None] | None = None,
                    faults=None) -> None:
    """Answer the upgrade request and run the chosen subprotocol's loop to its end.

    Deadlines: the request itself was read under the HTTP ones; after the upgrade the
    subprotocol's loop keeps its own (they pass through `WebSocketStream.recv`)."""
    accepted = _handshake(request, subprotocols)
    if not isinstance(accepted, tuple):
        _refuse(stream, accepted)
        return
    ws, name = accepted
    inner = INNER_TRANSPORTS.get(name, name)
    with carried_over(CARRIER) as carrier:
        if faults is not None and _spoiled_upgrade(stream, faults.on_connection(inner, named_only=True)):
            return
        try:
            stream.sendall(ws.send(AcceptConnection(subprotocol=name)))
        except (OSError, SSL.Error):
            return
        ws_stream = WebSocketStream(stream, ws, name, max_message, log)
        try:
            if buffered:
                ws.receive_data(buffered)  # frames the client sent right behind its request
            subprotocols.handler(name)(ws_stream)
        except (OSError, SSL.Error, TimeoutError):
            pass  # the client vanished or stalled; the close below says goodbye if it can
        finally:
            if not carrier.dropped:  # a dropped answer ends without a close frame (code 1006)
                ws_stream.close()


def _spoiled_upgrade(stream, fault) -> bool:
    """Carry out a connection-level fault at the upgrade; True when it took the connection.

    The device port learns a connection is a WebSocket only from its upgrade request, after
    TLS: `before_tls` and `after_tls` both mean "instead of 101" here."""
    if fault is None:
        return False
    if fault.refuse or fault.reset is not None:
        reset_socket(stream.sock)
        return True
    if fault.close is not None:
        return True  # the listener closes the TLS connection: close_notify, then FIN
    if fault.silent_s is not None:
        _stay_silent(stream, fault.silent_s)
        return True
    return False


def _stay_silent(stream, seconds: float) -> None:
    """Read and drop what the client sends, answer nothing, until it leaves or time is up."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        try:
            if not stream.recv(READ_CHUNK, left):
                return
        except (TimeoutError, OSError, SSL.Error):
            return


def _handshake(request: http.Request, subprotocols: Subprotocols):
    """(wsproto connection, chosen subprotocol), or the error Reply that refuses the upgrade."""
    if request.method != "GET":
        return error_reply(errors.METHOD_NOT_ALLOWED, f"a WebSocket upgrade is a GET, not {request.method}")
    ws = WSConnection(ConnectionType.SERVER)
    headers = [(name.encode("latin-1"), value.encode("latin-1")) for name, value in request.headers.items()]
    try:
        ws.initiate_upgrade_connection(headers, request.target)
        event = next(ws.events())
    except RemoteProtocolError as exc:
        hint = exc.event_hint
        status = getattr(hint, "status_code", 400)
        extra = {name.decode(): value.decode() for name, value in getattr(hint, "headers", [])}
        return error_reply(status * 1000, f"bad WebSocket handshake: {exc}; send an RFC 6455 upgrade "
                                          "(Connection: Upgrade, Upgrade: websocket, Sec-WebSocket-Key, "
                                          "Sec-WebSocket-Version: 13)", headers=extra)
    except (h11.LocalProtocolError, LocalProtocolError, StopIteration) as exc:
        return error_reply(errors.BAD_REQUEST, f"bad WebSocket handshake: {exc}")
    if not isinstance(event, UpgradeRequest):  # wsproto yields the request it accepted, nothing else
        return error_reply(errors.BAD_REQUEST, "bad WebSocket handshake")
    served = ", ".join(subprotocols.names()) or "none"
    if not event.subprotocols:
        return error_reply(errors.BAD_REQUEST, f"no WebSocket subprotocol offered; offer one of: {served}")
    name = subprotocols.choose(event.subprotocols)
    if name is None:
        offered = ", ".join(event.subprotocols)
        return error_reply(errors.BAD_REQUEST, f"WebSocket subprotocol {offered} not served here; "
                                               f"offer one of: {served}")
    return ws, name


def _refuse(stream, reply) -> None:
    try:
        stream.sendall(http.render_response(reply, keep_alive=False))
    except (OSError, SSL.Error):
        pass

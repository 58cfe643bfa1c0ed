"""The emulator's MQTT front end: DPS over MQTT 3.1.1 on TLS, driving the same `DeviceApi`.

Two layers, as for HTTPS:

- `DpsMqttSession` decides, per received packet, which packets go back and whether the
  connection ends. It does no I/O; the decision engine (`DeviceApi`) is called for the
  two DPS requests, with the chain the device presented in its TLS handshake.
- `serve_mqtt` is the only I/O loop: bytes from a `tls.TlsStream` through the codec into
  the session, answers back out. `start_mqtt_listener` puts it on a `tls.TlsListener`
  (thread per connection), so one client's garbage, silence or crash never touches another.

Authentication (decided here because MQTT refuses at CONNECT, before any request):

    no client certificate                         CONNACK 5 not authorized
    username not {scope}/registrations/{id}/...   CONNACK 4 bad user name or password
    client id != registration ID of the username  CONNACK 2 identifier rejected
    leaf CN  != registration ID                   CONNACK 5 not authorized
    protocol level != 4 (MQTT 3.1.1)              CONNACK 1 unacceptable protocol version
    certificate unknown / chain not verified      CONNACK 0, then `res/401` (errorCode 401002)
                                                  on register, exactly as HTTPS answers 401

IDs compare case-insensitively (DPS registration IDs are case-insensitive). A password
is ignored: X.509 devices send none and SAS is not emulated. Every protocol violation
(malformed or oversized packet, a packet before CONNECT, a second CONNECT, PUBLISH to a
topic that is not one of the two DPS requests, QoS 2, a server-to-client packet type)
closes that connection without an answer, as MQTT 3.1.1 prescribes; a SUBSCRIBE to a
filter other than `$dps/registrations/res/#` is answered with SUBACK failure (0x80).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

from cryptography import x509
from cryptography.x509.oid import NameOID
from OpenSSL import SSL

from device_sim.mqtt import topics
from device_sim.mqtt.codec import (
    DEFAULT_MAX_PACKET_SIZE,
    SUBACK_FAILURE,
    Connack,
    ConnackCode,
    Connect,
    Decoder,
    Disconnect,
    Packet,
    Pingreq,
    Pingresp,
    ProtocolError,
    Puback,
    Publish,
    Suback,
    Subscribe,
    encode,
)
from device_sim.stub.net.tls import Limits, TlsListener, device_context
from device_sim.common.errors import UserError

READ_CHUNK = 64 * 1024
# MQTT 3.1.1 §3.1.2.10: the server drops a client silent for one and a half keep-alives.
KEEP_ALIVE_FACTOR = 1.5
# A client that asked for no keep-alive (0) is still dropped after this much silence.
MAX_SILENCE = 300.0


class SessionClosed(Exception):
    """The session ended; `reason` says why (for the log, never sent to the client)."""

    def __init__(self, reason: str, answer: Sequence[Packet] = ()):
        super().__init__(reason)
        self.reason = reason
        self.answer = list(answer)


def leaf_common_name(chain: Sequence[x509.Certificate]) -> str | None:
    if not chain:
        return None
    names = chain[0].subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    value = names[0].value if names else None
    return value if isinstance(value, str) else None


def connect_decision(packet: Connect, chain: Sequence[x509.Certificate]) -> tuple[int, topics.Username | None]:
    """CONNACK return code for a CONNECT, and the parsed username when accepted."""
    if packet.protocol_name != "MQTT" or packet.protocol_level != 4:
        return ConnackCode.UNACCEPTABLE_PROTOCOL_VERSION, None
    if not chain:
        return ConnackCode.NOT_AUTHORIZED, None
    try:
        username = topics.parse_username(packet.username or "")
    except topics.TopicError:
        return ConnackCode.BAD_USERNAME_OR_PASSWORD, None
    registration_id = username.registration_id.casefold()
    if packet.client_id.casefold() != registration_id:
        return ConnackCode.IDENTIFIER_REJECTED, None
    if (leaf_common_name(chain) or "").casefold() != registration_id:
        return ConnackCode.NOT_AUTHORIZED, None
    return ConnackCode.ACCEPTED, username


def _header(headers: Mapping[str, str], name: str) -> str | None:
    for key, value in headers.items():
        if key.lower() == name:
            return value
    return None


def response_publish(reply, rid: str, qos: int, packet_id: int | None) -> Publish:
    """A `DeviceApi` reply as the PUBLISH DPS sends back: status and retry-after in the topic."""
    retry_after = topics.parse_retry_after(_header(reply.headers, "retry-after"))
    payload = b"" if reply.body is None else json.dumps(reply.body, separators=(",", ":")).encode()
    topic = topics.format_response(reply.status, rid, retry_after)
    return Publish(topic, payload, qos, packet_id if qos else None)


@dataclass
class DpsMqttSession:
    """One device connection's DPS-over-MQTT state; `receive(packet)` returns the answer packets.

    Raises SessionClosed when the connection must end (its `answer` is still sent first).
    """

    api: object  # device_api.DeviceApi (register / operation_status)
    chain: Sequence[x509.Certificate]
    username: topics.Username | None = None
    keep_alive: int = 0
    granted_qos: int | None = None  # QoS of the response subscription, None before SUBSCRIBE
    _next_packet_id: int = field(default=0, repr=False)

    @property
    def connected(self) -> bool:
        return self.username is not None

    def receive(self, packet: Packet) -> list[Packet]:
        if not self.connected:
            if not isinstance(packet, Connect):
                raise SessionClosed(f"{type(packet).__name__} before CONNECT")
            return self._connect(packet)
        match packet:
            case Publish():
                return self._publish(packet)
            case Subscribe():
                return [self._subscribe(packet)]
            case Puback():
                return []  # the device acknowledged one of our QoS 1 responses
            case Pingreq():
                return [Pingresp()]
            case Disconnect():
                raise SessionClosed("client disconnected")
        raise SessionClosed(f"unexpected {type(packet).__name__} from a client")

    def _connect(self, packet: Connect) -> list[Packet]:
        code, username = connect_decision(packet, self.chain)
        if code != ConnackCode.ACCEPTED:
            raise SessionClosed(f"CONNECT refused with code {int(code)}", [Connack(code)])
        self.username = username
        self.keep_alive = packet.keep_alive
        # DPS keeps no session state, so there is never a session present (C# insists on it).
        return [Connack(ConnackCode.ACCEPTED, session_present=False)]

    def _subscribe(self, packet: Subscribe) -> Suback:
        codes = []
        for topic_filter, qos in packet.topics:
            if topic_filter == topics.RESPONSE_FILTER:
                # DPS delivers at most with QoS 1; a repeated subscription replaces the earlier one.
                self.granted_qos = min(qos, 1)
                codes.append(self.granted_qos)
            else:
                codes.append(SUBACK_FAILURE)
        return Suback(packet.packet_id, tuple(codes))

    def _publish(self, packet: Publish) -> list[Packet]:
        if packet.qos == 2:
            raise SessionClosed("PUBLISH with QoS 2 (DPS supports 0 and 1)")
        try:
            request = topics.parse_request(packet.topic)
        except topics.TopicError as exc:
            raise SessionClosed(str(exc)) from None
        reply = self._call_api(request, packet.payload)
        answer: list[Packet] = [Puback(packet.packet_id)] if packet.qos == 1 else []
        if self.granted_qos is not None:  # like a broker: nothing is delivered without a subscription
            qos = self.granted_qos
            answer.append(response_publish(reply, request.rid, qos, self._packet_id() if qos else None))
        return answer

    def _call_api(self, request, payload: bytes):
        user = self.username
        if isinstance(request, topics.RegisterRequest):
            # C# sends an empty register payload; the core reads a blank body as `{}`.
            return self.api.register(user.id_scope, user.registration_id, user.api_version, self.chain, payload)
        return self.api.operation_status(
            user.id_scope, user.registration_id, request.operation_id, user.api_version, self.chain
        )

    def _packet_id(self) -> int:
        self._next_packet_id = self._next_packet_id % 0xFFFF + 1
        return self._next_packet_id


def serve_mqtt(stream, api, limits: Limits, max_packet_size: int = DEFAULT_MAX_PACKET_SIZE,
               log: Callable[[str], None] | None = None) -> None:
    """Run one device connection to its end; the caller closes the stream afterwards."""
    try:
        _serve(stream, DpsMqttSession(api, stream.presented_chain()), Decoder(max_packet_size), limits, log)
    except (OSError, SSL.Error):
        return  # the peer vanished mid-answer (reset, broken pipe): nothing left to tell it


def _serve(stream, session: DpsMqttSession, decoder: Decoder, limits: Limits, log) -> None:
    timeout = limits.request_timeout  # until CONNECT has arrived
    while True:
        try:
            data = stream.recv(READ_CHUNK, timeout)
        except TimeoutError:
            return  # keep-alive expired, or no CONNECT in time
        if not data:
            return
        decoder.receive_data(data)
        try:
            while (packet := decoder.next_packet()) is not None:
                stream.sendall(b"".join(encode(p) for p in session.receive(packet)))
        except ProtocolError as exc:
            _note(log, f"mqtt: closing connection: malformed packet: {exc}")
            return
        except SessionClosed as exc:
            if exc.answer:
                stream.sendall(b"".join(encode(p) for p in exc.answer))
            if exc.reason != "client disconnected":
                _note(log, f"mqtt: closing connection: {exc.reason}")
            return
        if session.connected:
            timeout = session.keep_alive * KEEP_ALIVE_FACTOR if session.keep_alive else MAX_SILENCE


def _note(log: Callable[[str], None] | None, message: str) -> None:
    if log is not None:
        log(message)


def mqtt_listener(api, context, host: str = "127.0.0.1", port: int = 8883, *,
                  limits: Limits | None = None, max_packet_size: int = DEFAULT_MAX_PACKET_SIZE,
                  url_host: str | None = None, log: Callable[[str], None] | None = None) -> TlsListener:
    """The DPS MQTT listener, bound but not started (port 0 picks a free port).

    `context` is the device-port pyOpenSSL context (`tls.device_context`); `.url` is
    `mqtts://host:port`; `.start()` / `.close()` run and stop it.
    """
    limits = limits or Limits()
    log = log or (lambda message: print(message, file=sys.stderr, flush=True))

    def handler(stream) -> None:
        serve_mqtt(stream, api, limits, max_packet_size, log)

    return TlsListener("mqtt", "mqtts", host, port, context, handler, limits=limits, url_host=url_host, log=log)


def start_mqtt_listener(api, identity, host: str = "127.0.0.1", port: int = 8883, **kwargs) -> TlsListener:
    """Bind and start the listener with the emulator's `tls.ServerIdentity`."""
    listener = mqtt_listener(api, device_context(identity), host, port, **kwargs)
    listener.start()
    return listener


# --------------------------------------------------------------------------- `stub serve` hook

DEFAULT_PORT = 8883  # the official SDKs always dial 8883


def add_serve_arguments(parser) -> None:
    """Options `device-sim stub serve` gains from this front end."""
    parser.add_argument("--mqtt-port", type=int, default=DEFAULT_PORT, metavar="PORT",
                        help=f"DPS MQTT (TLS) port; 0 picks a free one (default {DEFAULT_PORT}, "
                             "the port the Azure SDKs use)")
    parser.add_argument("--no-mqtt", action="store_true", help="do not serve MQTT")


def listener_factory(args):
    """The `server.ListenerFactory` for `stub serve`, or None with --no-mqtt."""
    if getattr(args, "no_mqtt", False):
        return None
    port = getattr(args, "mqtt_port", DEFAULT_PORT)
    if not 0 <= port <= 65535:
        raise UserError(f"--mqtt-port {port} is not a TCP port (0..65535)")

    def factory(app):
        try:
            listener = mqtt_listener(app.device_api, app.device_context(), app.host, port,
                                     limits=app.limits, url_host=app.url_host, log=app.log)
        except OSError as exc:
            # stub serve turns an OSError into its one-line "cannot listen" error.
            raise OSError(exc.errno, f"MQTT port {port}: {exc.strerror or exc} "
                                     "(--mqtt-port 0 picks a free port, --no-mqtt turns MQTT off)") from None
        return listener  # StubServer starts it with the others

    return factory

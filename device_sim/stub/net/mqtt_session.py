"""DPS over MQTT 3.1.1, sans-IO: per packet a device sends, the packets to answer.

`DpsMqttSession` does no I/O; the decision engine (`DeviceApi`) is called for the two DPS
requests, with the chain the device presented in its TLS handshake. The I/O loop is in
`net/mqtt.py`.

Authentication (decided here because MQTT refuses at CONNECT, before any request):

    no client certificate                         CONNACK 5 not authorized
    username not {scope}/registrations/{id}/...   CONNACK 4 bad user name or password
    client id != registration ID of the username  CONNACK 2 identifier rejected
    leaf CN  != registration ID                   CONNACK 5 not authorized
    protocol level != 4 (MQTT 3.1.1)              CONNACK 1 unacceptable protocol version
    certificate unknown / chain not verified      CONNACK 0, then `res/401` (errorCode 401002)
                                                  on register, exactly as HTTPS answers 401

IDs compare case-insensitively (DPS registration IDs are case-insensitive). A password
is ignored: X.509 devices send none and SAS is not emulated.

Every packet type a client may send, and its answer (MQTT 3.1.1 section in brackets):

    CONNECT (first)          CONNACK as above [3.2]
    CONNECT (again)          close [3.1.0-2]
    PUBLISH QoS 0 / 1        the DPS answer PUBLISH once subscribed; PUBACK first for QoS 1 [3.3.4]
    PUBLISH QoS 2            close: DPS takes no QoS 2, and a server that will not perform a
                             PUBLISH may close instead of acknowledging it [3.3.5]
    PUBLISH to another topic close (the same rule: not a DPS request)
    PUBACK                   nothing (the device acknowledged one of our QoS 1 answers) [3.4]
    PUBREC, PUBREL, PUBCOMP  close: they only follow a QoS 2 PUBLISH, and none was exchanged
                             (the codec refuses them as a protocol error) [4.8]
    SUBSCRIBE                SUBACK: QoS min(asked, 1) for `$dps/registrations/res/#`, 0x80
                             for any other filter [3.8.4, 3.9.3]; a reserved QoS value (3)
                             is a malformed packet and closes [3.8.3-4]
    UNSUBSCRIBE              UNSUBACK with its packet identifier, even for filters never
                             subscribed; the DPS answers stop once the response filter is
                             gone [3.10.4]
    PINGREQ                  PINGRESP [3.12.4]
    DISCONNECT               close, silently [3.14.4]
    CONNACK, SUBACK, UNSUBACK, PINGRESP (server-to-client types), reserved types 0 and 15,
    a packet before CONNECT, a malformed or oversized packet:  close without an answer
                             [4.8, 3.1.0-1]
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Mapping, Sequence

from cryptography import x509

from device_sim.common.x509util import common_name
from device_sim.stub.core.faults import fault_reply
from device_sim.mqtt import topics
from device_sim.mqtt.codec import (
    SUBACK_FAILURE,
    Connack,
    ConnackCode,
    Connect,
    Disconnect,
    Packet,
    Pingreq,
    Pingresp,
    Puback,
    Publish,
    Suback,
    Subscribe,
    Unsuback,
    Unsubscribe,
)


class SessionClosed(Exception):
    """The session ended; `reason` says why (for the log, never sent to the client)."""

    def __init__(self, reason: str, answer: Sequence[Packet] = (), reset: bool = False):
        super().__init__(reason)
        self.reason = reason
        self.answer = list(answer)
        self.reset = reset  # end with an RST, not a FIN (a fault plan's reset)


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
    if (common_name(chain[0]) or "").casefold() != registration_id:
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
    if isinstance(reply.body, bytes):  # a fault plan's non-JSON body
        payload = reply.body
    else:
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
    faults: object = None  # core.faults.Faults, asked once per DPS request
    # Seconds the I/O loop waits before sending the answer (a fault plan's latency); it
    # sets this back to 0 once waited.
    delay: float = 0.0
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
            case Unsubscribe():
                return [self._unsubscribe(packet)]
            case Puback():
                return []  # the device acknowledged one of our QoS 1 responses
            case Pingreq():
                return [Pingresp()]
            case Disconnect():
                raise SessionClosed("client disconnected")
            case Connect():
                raise SessionClosed("a second CONNECT")
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
        if any(qos > 2 for _, qos in packet.topics):
            raise SessionClosed("SUBSCRIBE asking for QoS 3 (malformed, MQTT 3.1.1 3.8.3-4)")
        codes = []
        for topic_filter, qos in packet.topics:
            if topic_filter == topics.RESPONSE_FILTER:
                # DPS delivers at most with QoS 1; a repeated subscription replaces the earlier one.
                self.granted_qos = min(qos, 1)
                codes.append(self.granted_qos)
            else:
                codes.append(SUBACK_FAILURE)
        return Suback(packet.packet_id, tuple(codes))

    def _unsubscribe(self, packet: Unsubscribe) -> Unsuback:
        if topics.RESPONSE_FILTER in packet.topics:
            self.granted_qos = None
        return Unsuback(packet.packet_id)

    def _publish(self, packet: Publish) -> list[Packet]:
        if packet.qos == 2:
            raise SessionClosed("PUBLISH with QoS 2 (DPS supports 0 and 1)")
        try:
            request = topics.parse_request(packet.topic)
        except topics.TopicError as exc:
            raise SessionClosed(str(exc)) from None
        action = None
        if self.faults is not None:
            operation = "register" if isinstance(request, topics.RegisterRequest) else "poll"
            action = self.faults.decide("mqtt", operation, self.username.registration_id)
        reply = fault_reply(action) or self._call_api(request, packet.payload, action)
        if action is not None:
            self.delay += action.latency_s
            if action.drops_after_request:
                raise SessionClosed("fault plan: connection dropped after the request",
                                    reset=action.reset == "after_request")
        answer: list[Packet] = [Puback(packet.packet_id)] if packet.qos == 1 else []
        if self.granted_qos is not None:  # like a broker: nothing is delivered without a subscription
            qos = self.granted_qos
            answer.append(response_publish(reply, request.rid, qos, self._packet_id() if qos else None))
        return answer

    def _call_api(self, request, payload: bytes, action=None):
        user = self.username
        if isinstance(request, topics.RegisterRequest):
            hold = {"hold": action.assigning_s} if action is not None and action.assigning_s else {}
            # C# sends an empty register payload; the core reads a blank body as `{}`.
            return self.api.register(user.id_scope, user.registration_id, user.api_version, self.chain,
                                     payload, **hold)
        return self.api.operation_status(
            user.id_scope, user.registration_id, request.operation_id, user.api_version, self.chain
        )

    def _packet_id(self) -> int:
        self._next_packet_id = self._next_packet_id % 0xFFFF + 1
        return self._next_packet_id

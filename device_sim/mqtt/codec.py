"""MQTT 3.1.1 packets as values, and bytes <-> packets without any I/O (sans-IO).

Only the packets the DPS MQTT API uses are modelled: CONNECT, CONNACK, SUBSCRIBE, SUBACK,
UNSUBSCRIBE, UNSUBACK, PUBLISH, PUBACK, PINGREQ, PINGRESP, DISCONNECT, both directions, so
the same code serves the emulator (decodes what devices send) and the device (decodes what
DPS sends). The QoS 2 packets (PUBREC, PUBREL, PUBCOMP) are refused as ProtocolError: DPS
never takes part in a QoS 2 exchange, so a peer that sends one broke the protocol.

We keep our own small codec because no maintained PyPI package offers a broker-free
MQTT 3.1.1 codec for both directions (mqtt-codec: last release 2019; amqtt and gmqtt tie
parsing to their asyncio streams; moat-lib-mqtt and mqtt5 speak MQTT 5 only).

    decoder = Decoder(max_packet_size=...)
    for packet in decoder.feed(data): ...   # raises ProtocolError on bad input
    wire = encode(Publish(topic, payload, qos=1, packet_id=7))
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

PROTOCOL_NAME = "MQTT"
PROTOCOL_LEVEL = 4  # MQTT 3.1.1
# The remaining-length field holds at most four 7-bit groups (MQTT 3.1.1 §2.2.3).
MAX_REMAINING_LENGTH = 268_435_455
# DPS documents a 96 KB message limit; the header is small, so this bounds a whole packet.
DEFAULT_MAX_PACKET_SIZE = 96 * 1024 + 1024


class ProtocolError(ValueError):
    """The bytes are not a well-formed MQTT 3.1.1 packet we accept."""


class PacketTooLarge(ProtocolError):
    """A packet announced a length above the decoder's limit (nothing of it is buffered)."""


class PacketType(IntEnum):
    CONNECT = 1
    CONNACK = 2
    PUBLISH = 3
    PUBACK = 4
    SUBSCRIBE = 8
    SUBACK = 9
    UNSUBSCRIBE = 10
    UNSUBACK = 11
    PINGREQ = 12
    PINGRESP = 13
    DISCONNECT = 14


class ConnackCode(IntEnum):
    """CONNACK return codes (MQTT 3.1.1 §3.2.2.3)."""

    ACCEPTED = 0
    UNACCEPTABLE_PROTOCOL_VERSION = 1
    IDENTIFIER_REJECTED = 2
    SERVER_UNAVAILABLE = 3
    BAD_USERNAME_OR_PASSWORD = 4
    NOT_AUTHORIZED = 5


SUBACK_FAILURE = 0x80


@dataclass(frozen=True)
class Will:
    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False


@dataclass(frozen=True)
class Connect:
    client_id: str
    username: str | None = None
    password: bytes | None = None
    keep_alive: int = 60
    clean_session: bool = True
    will: Will | None = None
    # Decoded as sent so a server can answer a wrong level with CONNACK 1 instead of a hang-up.
    protocol_name: str = PROTOCOL_NAME
    protocol_level: int = PROTOCOL_LEVEL


@dataclass(frozen=True)
class Connack:
    return_code: int = ConnackCode.ACCEPTED
    session_present: bool = False


@dataclass(frozen=True)
class Publish:
    topic: str
    payload: bytes = b""
    qos: int = 0
    packet_id: int | None = None  # present exactly when qos > 0
    retain: bool = False
    dup: bool = False


@dataclass(frozen=True)
class Puback:
    packet_id: int


@dataclass(frozen=True)
class Subscribe:
    packet_id: int
    topics: tuple[tuple[str, int], ...]  # (filter, requested QoS)


@dataclass(frozen=True)
class Suback:
    packet_id: int
    return_codes: tuple[int, ...]  # granted QoS 0..2, or SUBACK_FAILURE


@dataclass(frozen=True)
class Unsubscribe:
    packet_id: int
    topics: tuple[str, ...]


@dataclass(frozen=True)
class Unsuback:
    packet_id: int


@dataclass(frozen=True)
class Pingreq:
    pass


@dataclass(frozen=True)
class Pingresp:
    pass


@dataclass(frozen=True)
class Disconnect:
    pass


Packet = (Connect | Connack | Publish | Puback | Subscribe | Suback
          | Unsubscribe | Unsuback | Pingreq | Pingresp | Disconnect)


# ---------------------------------------------------------------- encoding


def _u16(value: int) -> bytes:
    if not 0 <= value <= 0xFFFF:
        raise ValueError(f"16-bit field out of range: {value}")
    return value.to_bytes(2, "big")


def _blob(data: bytes) -> bytes:
    return _u16(len(data)) + data


def _string(text: str) -> bytes:
    return _blob(text.encode("utf-8"))


def _packet_id(value: int | None) -> bytes:
    # Packet identifier 0 is reserved (MQTT 3.1.1 §2.3.1).
    if value is None or not 1 <= value <= 0xFFFF:
        raise ValueError(f"packet id must be 1..65535, got {value!r}")
    return _u16(value)


def encode_remaining_length(length: int) -> bytes:
    if not 0 <= length <= MAX_REMAINING_LENGTH:
        raise ValueError(f"remaining length out of range: {length}")
    out = bytearray()
    while True:
        byte, length = length % 128, length // 128
        out.append(byte | (0x80 if length else 0))
        if not length:
            return bytes(out)


def _frame(kind: PacketType, flags: int, body: bytes) -> bytes:
    return bytes([(kind << 4) | flags]) + encode_remaining_length(len(body)) + body


def _encode_connect(p: Connect) -> bytes:
    flags = 0x02 if p.clean_session else 0
    tail = _string(p.client_id)
    if p.will is not None:
        flags |= 0x04 | (p.will.qos << 3) | (0x20 if p.will.retain else 0)
        tail += _string(p.will.topic) + _blob(p.will.payload)
    if p.username is not None:
        flags |= 0x80
        tail += _string(p.username)
    if p.password is not None:
        flags |= 0x40
        tail += _blob(p.password)
    head = _string(p.protocol_name) + bytes([p.protocol_level, flags]) + _u16(p.keep_alive)
    return _frame(PacketType.CONNECT, 0, head + tail)


def _encode_publish(p: Publish) -> bytes:
    if p.qos not in (0, 1, 2):
        raise ValueError(f"QoS must be 0, 1 or 2, got {p.qos}")
    flags = (0x08 if p.dup else 0) | (p.qos << 1) | (0x01 if p.retain else 0)
    body = _string(p.topic)
    if p.qos:
        body += _packet_id(p.packet_id)
    return _frame(PacketType.PUBLISH, flags, body + p.payload)


def encode(packet: Packet) -> bytes:
    """The wire bytes of one packet; ValueError if a field cannot be represented."""
    match packet:
        case Connect():
            return _encode_connect(packet)
        case Connack():
            return _frame(PacketType.CONNACK, 0, bytes([int(packet.session_present), packet.return_code]))
        case Publish():
            return _encode_publish(packet)
        case Puback():
            return _frame(PacketType.PUBACK, 0, _packet_id(packet.packet_id))
        case Subscribe():
            body = b"".join(_string(f) + bytes([qos]) for f, qos in packet.topics)
            return _frame(PacketType.SUBSCRIBE, 0x02, _packet_id(packet.packet_id) + body)
        case Suback():
            return _frame(PacketType.SUBACK, 0, _packet_id(packet.packet_id) + bytes(packet.return_codes))
        case Unsubscribe():
            body = b"".join(_string(f) for f in packet.topics)
            return _frame(PacketType.UNSUBSCRIBE, 0x02, _packet_id(packet.packet_id) + body)
        case Unsuback():
            return _frame(PacketType.UNSUBACK, 0, _packet_id(packet.packet_id))
        case Pingreq():
            return _frame(PacketType.PINGREQ, 0, b"")
        case Pingresp():
            return _frame(PacketType.PINGRESP, 0, b"")
        case Disconnect():
            return _frame(PacketType.DISCONNECT, 0, b"")
    raise TypeError(f"not an MQTT packet: {packet!r}")


# ---------------------------------------------------------------- decoding


class _Reader:
    """Cursor over one packet body; every overrun is a ProtocolError, never an IndexError."""

    def __init__(self, data: bytes):
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise ProtocolError("packet ends inside a field")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int.from_bytes(self.take(2), "big")

    def blob(self) -> bytes:
        return self.take(self.u16())

    def string(self) -> str:
        raw = self.blob()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError("string is not valid UTF-8") from None
        if "\x00" in text:  # forbidden by MQTT 3.1.1 §1.5.3
            raise ProtocolError("string contains U+0000")
        return text

    def packet_id(self) -> int:
        value = self.u16()
        if value == 0:
            raise ProtocolError("packet id 0 is reserved")
        return value

    def rest(self) -> bytes:
        chunk = self.data[self.pos :]
        self.pos = len(self.data)
        return chunk

    def done(self) -> None:
        if self.pos != len(self.data):
            raise ProtocolError("trailing bytes after packet fields")


def _decode_connect(r: _Reader) -> Connect:
    name = r.string()
    level = r.u8()
    if name not in ("MQTT", "MQIsdp"):  # MQIsdp: MQTT 3.1
        raise ProtocolError(f"unknown protocol name {name!r}")
    if (name, level) != (PROTOCOL_NAME, PROTOCOL_LEVEL):
        # Another version lays out the rest differently (MQTT 5 adds properties): keep only
        # what a server needs to answer CONNACK 1 (unacceptable protocol version).
        r.rest()
        return Connect("", protocol_name=name, protocol_level=level)
    flags = r.u8()
    if flags & 0x01:
        raise ProtocolError("CONNECT reserved flag is set")
    keep_alive = r.u16()
    client_id = r.string()
    will = None
    will_qos = (flags >> 3) & 0x03
    if flags & 0x04:
        if will_qos == 3:
            raise ProtocolError("will QoS 3 is invalid")
        topic = r.string()
        will = Will(topic, r.blob(), will_qos, bool(flags & 0x20))
    elif will_qos or flags & 0x20:
        raise ProtocolError("will QoS/retain set without a will")
    username = r.string() if flags & 0x80 else None
    if flags & 0x40 and not flags & 0x80:
        raise ProtocolError("password without username")
    password = r.blob() if flags & 0x40 else None
    r.done()
    return Connect(client_id, username, password, keep_alive, bool(flags & 0x02), will, name, level)


def _decode_publish(flags: int, r: _Reader) -> Publish:
    qos = (flags >> 1) & 0x03
    dup = bool(flags & 0x08)
    if qos == 3:
        raise ProtocolError("PUBLISH QoS 3 is invalid")
    if dup and qos == 0:
        raise ProtocolError("PUBLISH DUP set at QoS 0")
    topic = r.string()
    if not topic or "+" in topic or "#" in topic:
        raise ProtocolError("PUBLISH topic is empty or holds a wildcard")
    packet_id = r.packet_id() if qos else None
    return Publish(topic, r.rest(), qos, packet_id, bool(flags & 0x01), dup)


def _decode_subscribe(r: _Reader) -> Subscribe:
    packet_id = r.packet_id()
    topics = []
    while r.pos < len(r.data):
        topic = r.string()
        qos = r.u8()
        if qos & 0xFC or not topic:
            raise ProtocolError("SUBSCRIBE entry has an empty filter or reserved QoS bits")
        topics.append((topic, qos))
    if not topics:
        raise ProtocolError("SUBSCRIBE without topic filters")
    return Subscribe(packet_id, tuple(topics))


def _decode_unsubscribe(r: _Reader) -> Unsubscribe:
    packet_id = r.packet_id()
    topics = []
    while r.pos < len(r.data):
        topic = r.string()
        if not topic:
            raise ProtocolError("UNSUBSCRIBE entry has an empty filter")
        topics.append(topic)
    if not topics:
        raise ProtocolError("UNSUBSCRIBE without topic filters")
    return Unsubscribe(packet_id, tuple(topics))


def _decode_suback(r: _Reader) -> Suback:
    packet_id = r.packet_id()
    codes = tuple(r.rest())
    if not codes or any(c not in (0, 1, 2, SUBACK_FAILURE) for c in codes):
        raise ProtocolError("SUBACK return codes missing or invalid")
    return Suback(packet_id, codes)


def _decode_connack(r: _Reader) -> Connack:
    ack_flags = r.u8()
    code = r.u8()
    r.done()
    if ack_flags & 0xFE:
        raise ProtocolError("CONNACK reserved flags set")
    return Connack(code, bool(ack_flags & 0x01))


def _decode_empty(packet: Packet, r: _Reader) -> Packet:
    r.done()
    return packet


# Fixed-header flag nibble every type except PUBLISH must carry (MQTT 3.1.1 §2.2.2).
_REQUIRED_FLAGS = {PacketType.SUBSCRIBE: 0x02, PacketType.UNSUBSCRIBE: 0x02}
# The packets whose body is exactly a packet identifier.
_ID_ONLY = {PacketType.PUBACK: Puback, PacketType.UNSUBACK: Unsuback}


def decode_packet(first_byte: int, body: bytes) -> Packet:
    """One packet from its first header byte and its body (after the remaining length)."""
    try:
        kind = PacketType(first_byte >> 4)
    except ValueError:
        raise ProtocolError(f"unsupported packet type {first_byte >> 4}") from None
    flags = first_byte & 0x0F
    r = _Reader(body)
    if kind is PacketType.PUBLISH:
        return _decode_publish(flags, r)
    if flags != _REQUIRED_FLAGS.get(kind, 0):
        raise ProtocolError(f"{kind.name} has invalid header flags {flags:#x}")
    if kind in _ID_ONLY:
        packet = _ID_ONLY[kind](r.packet_id())
        r.done()
        return packet
    match kind:
        case PacketType.CONNECT:
            return _decode_connect(r)
        case PacketType.CONNACK:
            return _decode_connack(r)
        case PacketType.SUBSCRIBE:
            return _decode_subscribe(r)
        case PacketType.UNSUBSCRIBE:
            return _decode_unsubscribe(r)
        case PacketType.SUBACK:
            return _decode_suback(r)
        case PacketType.PINGREQ:
            return _decode_empty(Pingreq(), r)
        case PacketType.PINGRESP:
            return _decode_empty(Pingresp(), r)
        case PacketType.DISCONNECT:
            return _decode_empty(Disconnect(), r)
    raise AssertionError(kind)  # pragma: no cover - every PacketType is handled above


class Decoder:
    """Turns a byte stream into packets; keeps partial input between `feed` calls.

    After a ProtocolError the stream is unusable (MQTT has no resynchronisation): the
    caller closes the connection.
    """

    def __init__(self, max_packet_size: int = DEFAULT_MAX_PACKET_SIZE):
        self.max_packet_size = max_packet_size
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[Packet]:
        """Every complete packet in the input so far (convenience over the two calls below)."""
        self.receive_data(data)
        packets = []
        while (packet := self.next_packet()) is not None:
            packets.append(packet)
        return packets

    def receive_data(self, data: bytes) -> None:
        self._buffer += data

    def next_packet(self) -> Packet | None:
        """The next complete packet, or None until more data arrives; ProtocolError if bad.

        Taking packets one at a time lets a server answer the good packets that precede a
        bad one in the same read.
        """
        buf = self._buffer
        if not buf:
            return None
        length, multiplier, index = 0, 1, 1
        while True:
            if index >= len(buf):
                return None  # header not complete yet
            byte = buf[index]
            length += (byte & 0x7F) * multiplier
            index += 1
            if not byte & 0x80:
                break
            if index > 4:
                raise ProtocolError("remaining length uses more than four bytes")
            multiplier *= 128
        if index + length > self.max_packet_size:
            raise PacketTooLarge(f"packet of {index + length} bytes exceeds limit {self.max_packet_size}")
        if len(buf) < index + length:
            return None
        first, body = buf[0], bytes(buf[index : index + length])
        del buf[: index + length]
        return decode_packet(first, body)

"""The MQTT codec: round trips, byte-exact known packets, malformed and oversized input, fuzzing."""

import pytest
from hypothesis import given, settings, strategies as st

from device_sim.mqtt.codec import (
    SUBACK_FAILURE,
    Connack,
    Connect,
    Decoder,
    Disconnect,
    PacketTooLarge,
    Pingreq,
    Pingresp,
    ProtocolError,
    Puback,
    Publish,
    Suback,
    Subscribe,
    Will,
    encode,
)

SAMPLES = [
    Connect("dev-1", "0ne001/registrations/dev-1/api-version=2021-06-01", None, 60, True),
    Connect("c", "u", b"secret", 0, False, Will("w/t", b"bye", 1, True)),
    Connack(0, False),
    Connack(5, False),
    Connack(0, True),
    Publish("$dps/registrations/PUT/iotdps-register/?$rid=1", b'{"registrationId":"dev-1"}', 1, 1),
    Publish("a/b", b"", 0),
    Publish("a/b", b"x" * 300, 2, 65535, retain=True, dup=True),
    Puback(42),
    Subscribe(7, (("$dps/registrations/res/#", 1), ("x/+", 0))),
    Suback(7, (1, SUBACK_FAILURE)),
    Pingreq(),
    Pingresp(),
    Disconnect(),
]


@pytest.mark.parametrize("packet", SAMPLES, ids=lambda p: type(p).__name__)
def test_round_trip(packet):
    assert Decoder().feed(encode(packet)) == [packet]


def test_known_bytes():
    # Byte layouts from the MQTT 3.1.1 specification's figures.
    assert encode(Pingreq()) == b"\xc0\x00"
    assert encode(Disconnect()) == b"\xe0\x00"
    assert encode(Connack(0, False)) == b"\x20\x02\x00\x00"
    assert encode(Puback(10)) == b"\x40\x02\x00\x0a"
    assert encode(Subscribe(1, (("a", 1),))) == b"\x82\x06\x00\x01\x00\x01a\x01"
    connect = encode(Connect("id", None, None, 10, True))
    assert connect == b"\x10\x0e\x00\x04MQTT\x04\x02\x00\x0a\x00\x02id"


@pytest.mark.parametrize(
    "wire, name, level",
    [
        # MQTT 5 CONNECT: properties (length 5: session expiry 0x11 = 60) before the client id
        (b"\x10\x15\x00\x04MQTT\x05\x02\x00\x3c\x05\x11\x00\x00\x00\x3c\x00\x03dev", "MQTT", 5),
        (b"\x10\x11\x00\x06MQIsdp\x03\x02\x00\x3c\x00\x03dev", "MQIsdp", 3),
    ],
)
def test_other_protocol_versions_decode_far_enough_to_be_refused(wire, name, level):
    (packet,) = Decoder().feed(wire)
    assert (packet.protocol_name, packet.protocol_level) == (name, level)


def test_byte_by_byte_and_several_per_chunk():
    wire = b"".join(encode(p) for p in SAMPLES)
    decoder = Decoder()
    got = []
    for i in range(len(wire)):
        got += decoder.feed(wire[i : i + 1])
    assert got == SAMPLES
    assert Decoder().feed(wire) == SAMPLES


def test_long_remaining_length():
    packet = Publish("t", b"y" * 20000, 0)
    wire = encode(packet)
    assert wire[1] & 0x80 and wire[2] & 0x80  # three length bytes
    assert Decoder().feed(wire) == [packet]


@pytest.mark.parametrize(
    "wire, why",
    [
        (b"\x00\x00", "type 0 reserved"),
        (b"\xf0\x00", "type 15 reserved"),
        (b"\x62\x02\x00\x01", "PUBREL is not supported"),
        (b"\xc1\x00", "PINGREQ with flags"),
        (b"\x80\x06\x00\x01\x00\x01a\x01", "SUBSCRIBE without the 0010 flags"),
        (b"\x82\x02\x00\x01", "SUBSCRIBE with no filter"),
        (b"\x82\x06\x00\x00\x00\x01a\x01", "packet id 0"),
        (b"\x82\x06\x00\x01\x00\x01a\x04", "reserved QoS bits in SUBSCRIBE"),
        (b"\x36\x05\x00\x01a\x00\x01", "PUBLISH QoS 3"),
        (b"\x38\x03\x00\x01a", "DUP at QoS 0"),
        (b"\x30\x03\x00\x01#", "wildcard in PUBLISH topic"),
        (b"\x30\x02\x00\x00", "empty PUBLISH topic"),
        (b"\x30\x03\x00\x05a", "string runs past the packet"),
        (b"\x30\x04\x00\x02\xff\xfe", "invalid UTF-8"),
        (b"\x30\x04\x00\x02a\x00", "U+0000 in a string"),
        (b"\x10\x0c\x00\x04HTTP\x04\x02\x00\x0a\x00\x00", "unknown protocol name"),
        (b"\x10\x0c\x00\x04MQTT\x04\x03\x00\x0a\x00\x00", "CONNECT reserved flag"),
        (b"\x10\x0c\x00\x04MQTT\x04\x42\x00\x0a\x00\x00", "password without username"),
        (b"\x10\x0c\x00\x04MQTT\x04\x1a\x00\x0a\x00\x00", "will QoS without will"),
        (b"\x10\x0d\x00\x04MQTT\x04\x02\x00\x0a\x00\x00\x00", "trailing bytes"),
        (b"\xc0\x01\x00", "PINGREQ with a body"),
        (b"\x20\x02\x02\x00", "CONNACK reserved flag"),
        (b"\x90\x03\x00\x01\x03", "SUBACK code 3"),
        (b"\x30\xff\xff\xff\xff\x7f", "five-byte remaining length"),
    ],
)
def test_malformed_input_is_a_protocol_error(wire, why):
    with pytest.raises(ProtocolError):
        Decoder(max_packet_size=1 << 30).feed(wire)


def test_oversized_packet_is_refused_from_its_header_alone():
    decoder = Decoder(max_packet_size=1000)
    # Only the fixed header of a 1 MB PUBLISH arrives: refused before any body is buffered.
    with pytest.raises(PacketTooLarge):
        decoder.feed(b"\x30\x80\x80\x40")


def test_encode_rejects_unrepresentable_fields():
    with pytest.raises(ValueError):
        encode(Puback(0))
    with pytest.raises(ValueError):
        encode(Publish("t", b"", 1, None))
    with pytest.raises(ValueError):
        encode(Connect("x" * 70000))


# ---------------------------------------------------------------- hypothesis

text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=40)
topic = text.filter(lambda t: t and "+" not in t and "#" not in t)
pid = st.integers(1, 0xFFFF)
blob = st.binary(max_size=200)


@st.composite
def publishes(draw):
    qos = draw(st.integers(0, 2))
    return Publish(draw(topic), draw(blob), qos, draw(pid) if qos else None, draw(st.booleans()), qos > 0 and draw(st.booleans()))


@st.composite
def connects(draw):
    username = draw(st.none() | text)
    password = draw(st.none() | blob) if username is not None else None
    will = draw(st.none() | st.builds(Will, topic, blob, st.integers(0, 2), st.booleans()))
    return Connect(draw(text), username, password, draw(st.integers(0, 0xFFFF)), draw(st.booleans()), will)


packets = st.one_of(
    connects(),
    publishes(),
    st.builds(Connack, st.integers(0, 5), st.booleans()),
    st.builds(Puback, pid),
    st.builds(Subscribe, pid, st.lists(st.tuples(text.filter(bool), st.integers(0, 2)), min_size=1, max_size=4).map(tuple)),
    st.builds(Suback, pid, st.lists(st.sampled_from([0, 1, 2, SUBACK_FAILURE]), min_size=1, max_size=4).map(tuple)),
    st.just(Pingreq()),
    st.just(Pingresp()),
    st.just(Disconnect()),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(packets, min_size=1, max_size=5), st.integers(1, 64))
def test_any_packet_sequence_round_trips_in_any_chunking(seq, chunk):
    wire = b"".join(encode(p) for p in seq)
    decoder = Decoder()
    got = []
    for i in range(0, len(wire), chunk):
        got += decoder.feed(wire[i : i + chunk])
    assert got == seq


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_decoder_never_fails_except_with_protocol_error(data):
    decoder = Decoder(max_packet_size=256)
    try:
        for packet in decoder.feed(data):
            # whatever it accepted must encode again
            encode(packet)
    except ProtocolError:
        pass


@settings(max_examples=300, deadline=None)
@given(packets, st.integers(0, 400), st.integers(0, 255))
def test_single_byte_corruption_never_escapes_as_another_exception(packet, index, value):
    wire = bytearray(encode(packet))
    wire[index % len(wire)] = value
    try:
        Decoder().feed(bytes(wire))
    except ProtocolError:
        pass

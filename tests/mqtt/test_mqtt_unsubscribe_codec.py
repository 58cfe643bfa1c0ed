"""UNSUBSCRIBE / UNSUBACK on the wire (MQTT 3.1.1 sections 3.10 and 3.11)."""

import pytest

from device_sim.mqtt.codec import Decoder, ProtocolError, Unsuback, Unsubscribe, encode


def test_unsubscribe_known_bytes_round_trip():
    wire = b"\xa2\x0a\x00\x07\x00\x06$dps/#"
    assert encode(Unsubscribe(7, ("$dps/#",))) == wire
    assert Decoder().feed(wire) == [Unsubscribe(7, ("$dps/#",))]


def test_unsuback_known_bytes_round_trip():
    assert encode(Unsuback(0x1234)) == b"\xb0\x02\x12\x34"
    assert Decoder().feed(b"\xb0\x02\x12\x34") == [Unsuback(0x1234)]


@pytest.mark.parametrize("wire", [
    b"\xa2\x02\x00\x01",            # no topic filter (3.10.3-2)
    b"\xa0\x05\x00\x01\x00\x01a",   # header flags must be 0010 (3.10.1-1)
    b"\xa2\x04\x00\x01\x00\x00",    # empty filter
    b"\xa2\x04\x00\x00\x00\x01",    # packet identifier 0, truncated filter
    b"\xb0\x03\x00\x01\x00",        # UNSUBACK with a trailing byte
])
def test_malformed_unsubscribe_is_a_protocol_error(wire):
    with pytest.raises(ProtocolError):
        Decoder().feed(wire)

"""Every MQTT 3.1.1 packet type a client may send, answered by the emulator as the spec says.

Over real TLS on loopback against the `stub serve` assembly with the real decision engine;
the table of answers is in `device_sim/stub/net/mqtt_session.py` and docs/mqtt.md.
"""

from __future__ import annotations

import queue
import ssl
import time

import paho.mqtt.client as mqtt
import pytest

from device_sim.mqtt import topics
from device_sim.mqtt.codec import (
    SUBACK_FAILURE,
    Connack,
    Connect,
    Pingreq,
    Pingresp,
    Puback,
    Publish,
    Suback,
    Subscribe,
    Unsuback,
    Unsubscribe,
    encode,
)
from device_sim.stub.net.listener import Limits
from device_sim.testing import Emulator

RES = topics.RESPONSE_FILTER
REGISTER = "$dps/registrations/PUT/iotdps-register/?$rid=1"


@pytest.fixture(scope="module")
def stub(tmp_path_factory, file_cas):
    limits = Limits(handshake_timeout=2.0, request_timeout=1.0, max_connections=32)
    stub = Emulator.in_process(tmp_path_factory.mktemp("mqtt-packets-home"), limits=limits)
    stub.admin.upload_ca("root", file_cas.root.cert_pem, verified=True)
    stub.admin.create_group("all-devices", cert_pem=file_cas.root.cert_pem)
    yield stub
    stub.stop()


@pytest.fixture
def dev_a(tmp_path, file_cas):
    return file_cas.inter2.issue_leaf("dev-a").write(tmp_path, "dev-a", [file_cas.inter2, file_cas.inter1, file_cas.root])


@pytest.fixture
def connect(stub, raw_clients, dev_a):
    def make(keep_alive=60):
        client = raw_clients(stub.mqtt_port, stub.ca_cert, dev_a)
        client.send(Connect("dev-a", topics.format_username(stub.id_scope, "dev-a", "2021-06-01", "t"),
                            keep_alive=keep_alive))
        assert client.receive() == Connack(0, False)
        return client
    return make


def test_unsubscribe_gets_unsuback_and_ends_the_answers(connect):
    client = connect()
    client.send(Subscribe(1, ((RES, 1),)))
    assert client.receive() == Suback(1, (1,))
    client.send(Unsubscribe(2, (RES,)))
    assert client.receive() == Unsuback(2)
    client.send(Publish(REGISTER, b'{"registrationId":"dev-a"}', 1, 3))
    assert client.receive() == Puback(3)
    assert still_silent(client, 0.5)  # no answer without a subscription
    client.send(Pingreq())
    assert client.receive() == Pingresp()  # and the connection is still up


def test_unsubscribe_of_a_filter_never_subscribed_still_gets_unsuback(connect):
    client = connect()
    client.send(Unsubscribe(9, ("devices/dev-a/messages/devicebound/#", RES)))
    assert client.receive() == Unsuback(9)


def test_publish_qos0_gets_no_puback_but_the_answer(connect):
    client = connect()
    client.send(Subscribe(1, ((RES, 0),)))
    assert client.receive() == Suback(1, (0,))
    client.send(Publish(REGISTER, b'{"registrationId":"dev-a"}', 0, None))
    answer = client.receive()
    assert isinstance(answer, Publish) and answer.qos == 0
    assert topics.parse_response(answer.topic).status in (200, 202)


def test_publish_qos1_gets_puback_then_the_answer(connect):
    client = connect()
    client.send(Subscribe(1, ((RES, 1),)))
    assert client.receive() == Suback(1, (1,))
    client.send(Publish(REGISTER, b'{"registrationId":"dev-a"}', 1, 77))
    assert client.receive() == Puback(77)
    answer = client.receive()
    assert isinstance(answer, Publish) and answer.qos == 1
    client.send(Puback(answer.packet_id))  # our acknowledgement is taken silently
    client.send(Pingreq())
    assert client.receive() == Pingresp()


def test_subscribe_mixes_grants_and_failures(connect):
    client = connect()
    client.send(Subscribe(4, ((RES, 2), ("$dps/#", 0), ("a/b", 1))))
    assert client.receive() == Suback(4, (1, SUBACK_FAILURE, SUBACK_FAILURE))


@pytest.mark.parametrize("wire", [
    encode(Publish(REGISTER, b"{}", 2, 5)),  # QoS 2: DPS takes none, the server may close (3.3.5)
    b"\x50\x02\x00\x01",  # PUBREC
    b"\x62\x02\x00\x01",  # PUBREL
    b"\x70\x02\x00\x01",  # PUBCOMP
    b"\xb0\x02\x00\x01",  # UNSUBACK, a server-to-client type
    b"\xd0\x00",  # PINGRESP, a server-to-client type
    b"\xf0\x00",  # reserved type 15
    b"\x00\x00",  # reserved type 0
    b"\x82\x06\x00\x01\x00\x01a\x03",  # SUBSCRIBE with QoS 3 is malformed (3.8.3-4)
    b"\xa2\x02\x00\x01",  # UNSUBSCRIBE without a filter (3.10.3-2)
    encode(Connect("dev-a", "x")),  # a second CONNECT (3.1.0-2)
], ids=["publish-qos2", "pubrec", "pubrel", "pubcomp", "unsuback", "pingresp", "reserved-15",
        "reserved-0", "subscribe-qos3", "empty-unsubscribe", "second-connect"])
def test_packets_a_server_must_refuse_close_the_connection(connect, wire):
    client = connect()
    client.send_raw(wire)
    assert client.receive() is None


def test_connect_trickled_byte_by_byte_is_cut_at_the_request_deadline(stub, raw_clients, dev_a):
    client = raw_clients(stub.mqtt_port, stub.ca_cert, dev_a)
    wire = encode(Connect("dev-a", topics.format_username(stub.id_scope, "dev-a", "2021-06-01", "t")))
    started = time.monotonic()
    for byte in wire[:-1]:  # never the last byte, so CONNECT is never complete
        try:
            client.send_raw(bytes([byte]))
        except OSError:
            break
        if not still_silent(client, 0.2):
            break  # the server closed the connection
    closed_after = time.monotonic() - started
    # request_timeout is 1 s in this fixture, however many bytes keep arriving meanwhile;
    # the whole trickle would take 0.2 s x len(wire) > 10 s.
    assert 0.8 < closed_after < 2.5


def still_silent(client, seconds: float) -> bool:
    """True when nothing arrives for `seconds` and the connection stays open."""
    try:
        client.receive(timeout=seconds)  # a packet, or None when the server closed
    except TimeoutError:
        return True
    return False


def test_paho_unsubscribe_gets_unsuback_and_disconnect_is_clean(stub, dev_a):
    events: queue.Queue = queue.Queue()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="dev-a", protocol=mqtt.MQTTv311)
    client.tls_set(ca_certs=str(stub.ca_cert), certfile=str(dev_a[0]), keyfile=str(dev_a[1]),
                   tls_version=ssl.PROTOCOL_TLS_CLIENT)
    client.username_pw_set(topics.format_username(stub.id_scope, "dev-a", "2019-03-31", "paho-test/1.0"))
    client.on_connect = lambda c, u, flags, reason, props: events.put(("connack", reason))
    client.on_subscribe = lambda c, u, mid, reasons, props: events.put(("suback", mid))
    client.on_unsubscribe = lambda c, u, mid, reasons, props: events.put(("unsuback", mid))
    client.on_disconnect = lambda c, u, flags, reason, props: events.put(("disconnect", reason))
    client.connect("127.0.0.1", stub.mqtt_port, keepalive=30)
    client.loop_start()
    try:
        kind, reason = events.get(timeout=10)
        assert (kind, reason.is_failure) == ("connack", False)
        _, sub_mid = client.subscribe(RES, qos=1)
        assert events.get(timeout=10) == ("suback", sub_mid)
        _, unsub_mid = client.unsubscribe(RES)
        assert events.get(timeout=10) == ("unsuback", unsub_mid)
        client.disconnect()
        kind, reason = events.get(timeout=10)
        assert (kind, reason.is_failure) == ("disconnect", False)
    finally:
        client.loop_stop()

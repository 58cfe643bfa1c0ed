"""The emulator's MQTT listener at the MQTT level: CONNECT decisions, subscriptions, bad input.

These cases are decided before the decision engine is asked anything, so the listener
runs with no DeviceApi at all (any call into it would fail the test).
"""

from __future__ import annotations

import time

import pytest

from device_sim.mqtt.codec import (
    SUBACK_FAILURE,
    Connack,
    Connect,
    Disconnect,
    Pingreq,
    Pingresp,
    Puback,
    Publish,
    Suback,
    Subscribe,
    encode,
)
from device_sim.stub.net.listener import Limits
from device_sim.stub.net.mqtt import start_mqtt_listener
from device_sim.stub.net.mqtt_session import response_publish
from device_sim.stub.core.errors import Reply


SCOPE = "0ne00TEST"
USER = f"{SCOPE}/registrations/dev-a/api-version=2021-06-01"
RES = "$dps/registrations/res/#"


@pytest.fixture(scope="module")
def listener(server_identity):
    logged: list[str] = []
    limits = Limits(handshake_timeout=2.0, request_timeout=1.0, max_connections=16)
    listener = start_mqtt_listener(None, server_identity, port=0, limits=limits, max_packet_size=4096,
                                   log=logged.append)
    listener.logged = logged
    yield listener
    listener.close()


@pytest.fixture
def dev_a(tmp_path, file_cas):
    return file_cas.inter2.issue_leaf("dev-a").write(tmp_path, "dev-a", [file_cas.inter2, file_cas.inter1, file_cas.root])


@pytest.fixture
def connect(listener, server_identity, raw_clients, dev_a):
    """A raw client that has been accepted (CONNACK 0) as dev-a."""
    def make(keep_alive=60):
        client = raw_clients(listener.port, server_identity.ca_cert, dev_a)
        client.send(Connect("dev-a", USER, keep_alive=keep_alive))
        assert client.receive() == Connack(0, False)
        return client
    return make


@pytest.mark.parametrize(
    "client_id, username, code",
    [
        ("dev-a", USER, 0),
        ("DEV-A", USER, 0),  # registration IDs are case-insensitive
        ("dev-a", f"{SCOPE}/registrations/dev-a/api-version=2019-03-31&ClientVersion=x%2F1", 0),
        ("dev-a", None, 4),
        ("dev-a", "dev-a", 4),
        ("dev-b", USER, 2),  # client id is not the username's registration ID
        ("dev-b", f"{SCOPE}/registrations/dev-b/api-version=2021-06-01", 5),  # leaf CN is dev-a
    ],
)
def test_connect_decisions(listener, server_identity, raw_clients, dev_a, client_id, username, code):
    client = raw_clients(listener.port, server_identity.ca_cert, dev_a)
    client.send(Connect(client_id, username))
    assert client.receive() == Connack(code, False)
    if code:
        assert client.receive() is None  # a refusal closes the connection


def test_no_client_certificate_is_not_authorized(listener, server_identity, raw_clients):
    client = raw_clients(listener.port, server_identity.ca_cert, None)
    client.send(Connect("dev-a", USER))
    assert client.receive() == Connack(5, False)
    assert client.receive() is None


@pytest.mark.parametrize("name, level", [("MQTT", 5), ("MQTT", 3), ("MQIsdp", 3)])
def test_wrong_protocol_level_gets_connack_1(connect, listener, server_identity, raw_clients, dev_a, name, level):
    client = raw_clients(listener.port, server_identity.ca_cert, dev_a)
    client.send(Connect("dev-a", USER, protocol_name=name, protocol_level=level))
    assert client.receive() == Connack(1, False)
    assert client.receive() is None


def test_session_is_never_present_even_if_asked_to_keep_one(listener, server_identity, raw_clients, dev_a):
    client = raw_clients(listener.port, server_identity.ca_cert, dev_a)
    client.send(Connect("dev-a", USER, clean_session=False))
    assert client.receive() == Connack(0, False)


def test_subscribe_grants_qos1_at_most_and_refuses_other_filters(connect):
    client = connect()
    client.send(Subscribe(3, ((RES, 2), ("devices/dev-a/messages/devicebound/#", 1), (RES, 0))))
    assert client.receive() == Suback(3, (1, SUBACK_FAILURE, 0))
    client.send(Pingreq())
    assert client.receive() == Pingresp()


@pytest.mark.parametrize(
    "packet",
    [
        Publish("devices/dev-a/messages/events/", b"{}", 1, 5),  # IoT Hub topic, not DPS
        Publish("$dps/registrations/PUT/iotdps-register/", b"{}", 1, 5),  # no $rid
        Publish("$dps/registrations/PUT/iotdps-register/?$rid=1", b"{}", 2, 5),  # QoS 2
        Connect("dev-a", USER),  # a second CONNECT
        Connack(0, False),  # a server-to-client packet
        Suback(1, (1,)),
    ],
    ids=["iothub-topic", "no-rid", "qos2", "second-connect", "connack", "suback"],
)
def test_protocol_violations_close_the_connection(connect, listener, packet):
    client = connect()
    logged_before = len(listener.logged)
    client.send(packet)
    assert client.receive() is None
    time.sleep(0.05)  # the log line is written after the socket closed
    assert any("closing connection" in line for line in listener.logged[logged_before:])


def test_packet_before_connect_closes_without_answer(listener, server_identity, raw_clients, dev_a):
    client = raw_clients(listener.port, server_identity.ca_cert, dev_a)
    client.send(Pingreq())
    assert client.receive() is None


@pytest.mark.parametrize("data", [b"\x00\x00", b"\x30\xff\xff\xff\xff\x7f", b"\x82\x02\x00\x01", b"\xc1\x00"],
                         ids=["reserved-type", "5-byte-length", "empty-subscribe", "flags"])
def test_malformed_packets_close_only_that_connection(connect, data):
    bystander = connect()
    client = connect()
    client.send_raw(data)
    assert client.receive() is None
    bystander.send(Pingreq())
    assert bystander.receive() == Pingresp()


def test_oversized_packet_is_refused_from_its_header(connect):
    client = connect()
    # Only the fixed header of a 1 MB PUBLISH: the limit is 4 KB, so the server hangs up at once.
    client.send_raw(b"\x30\x80\x80\x40")
    started = time.monotonic()
    assert client.receive(timeout=3) is None
    assert time.monotonic() - started < 1.0


def test_good_packets_before_a_bad_one_in_the_same_read_are_answered(connect):
    client = connect()
    client.send_raw(encode(Pingreq()) + b"\x00\x00")
    assert client.receive() == Pingresp()
    assert client.receive() is None


def test_disconnect_closes(connect):
    client = connect()
    client.send(Disconnect())
    assert client.receive() is None


def test_keep_alive_timeout_is_one_and_a_half_keep_alives(connect):
    client = connect(keep_alive=1)
    client.send(Pingreq())
    assert client.receive() == Pingresp()
    started = time.monotonic()
    assert client.receive(timeout=5) is None
    waited = time.monotonic() - started
    assert 1.2 < waited < 2.5


def test_silent_client_is_dropped_before_connect(listener, server_identity, raw_clients, dev_a):
    client = raw_clients(listener.port, server_identity.ca_cert, dev_a)
    started = time.monotonic()
    assert client.receive(timeout=5) is None  # request_timeout is 1 s in this fixture
    assert time.monotonic() - started < 3


def test_response_publish_maps_reply_to_dps_topic():
    reply = Reply(202, {"operationId": "op", "status": "assigning"}, {"Retry-After": "3"})
    packet = response_publish(reply, "rid-9", 1, 17)
    assert packet.topic == "$dps/registrations/res/202/?$rid=rid-9&retry-after=3"
    assert packet.payload == b'{"operationId":"op","status":"assigning"}'
    assert (packet.qos, packet.packet_id) == (1, 17)
    error = response_publish(Reply(401, {"errorCode": 401002}, {"x-ms-error-code": "401002"}), "1", 0, None)
    assert error.topic == "$dps/registrations/res/401/?$rid=1"
    assert (error.qos, error.packet_id) == (0, None)
    assert response_publish(Reply(204, None, {}), "1", 0, None).payload == b""

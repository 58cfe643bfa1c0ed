"""MQTT over WebSockets on the device HTTPS port, checked with a client we did not write:
paho-mqtt 2.x with transport="websockets" and a file-key client certificate, over real
TLS on loopback against the `stub serve` assembly (in process)."""

from __future__ import annotations

import json
import queue
import ssl

import paho.mqtt.client as mqtt
import pytest

from device_sim.mqtt import topics
from device_sim.testing import TestCA

from .ws_helpers import PATH, start


@pytest.fixture(scope="module")
def running(tmp_path_factory, file_cas):
    stub = start(tmp_path_factory.mktemp("ws-paho-home"))
    stub.enroll_group("ws-inter2", file_cas.inter2)
    yield stub
    stub.close()


class PahoOverWebSockets:
    def __init__(self, running, registration_id: str, identity):
        self.answers: queue.Queue = queue.Queue()
        self.connack: queue.Queue = queue.Queue()
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=registration_id,
                             protocol=mqtt.MQTTv311, transport="websockets")
        client.ws_set_options(path=PATH)
        client.tls_set(ca_certs=str(running.ca_cert), certfile=str(identity[0]), keyfile=str(identity[1]),
                       tls_version=ssl.PROTOCOL_TLS_CLIENT)
        client.username_pw_set(topics.format_username(running.ready["id_scope"], registration_id, "2019-03-31"))
        client.on_connect = lambda c, userdata, flags, reason, props: self.connack.put(reason)
        client.on_message = lambda c, userdata, message: self.answers.put(message)
        client.connect("localhost", running.port, keepalive=30)
        client.loop_start()
        self.client = client

    def request(self, topic: str, payload: bytes):
        self.client.publish(topic, payload, qos=1).wait_for_publish(timeout=10)
        message = self.answers.get(timeout=10)
        return topics.parse_response(message.topic), json.loads(message.payload or b"null")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_paho_registers_over_mqtt_over_websockets(running, file_cas, tmp_path):
    registration_id = "ws-paho-1"
    identity = file_cas.device(registration_id).write(tmp_path, registration_id)
    device = PahoOverWebSockets(running, registration_id, identity)
    try:
        assert device.connack.get(timeout=10) == 0
        result, _mid = device.client.subscribe(topics.RESPONSE_FILTER, qos=1)
        assert result == mqtt.MQTT_ERR_SUCCESS
        answer, document = device.request(topics.format_register("1"),
                                          json.dumps({"registrationId": registration_id}).encode())
        assert answer.status == 202 and document["status"] == "assigning"
        answer, document = device.request(topics.format_status("2", document["operationId"]), b"")
        assert answer.status == 200, document
        assert document["status"] == "assigned"
        assert document["registrationState"]["deviceId"] == registration_id
    finally:
        device.close()
    # The same core decided: the registration is on record for the service API.
    record = running.service("GET", f"/registrations/{registration_id}")
    assert record["registrationId"] == registration_id and record["status"] == "assigned"
    assert not [line for line in running.logged if "Traceback" in line or "failed" in line]


def test_a_stranger_certificate_gets_the_core_answer_401002(running, tmp_path):
    stranger = TestCA("ws-stranger-root")
    identity = stranger.issue_leaf("ws-stranger").write(tmp_path, "ws-stranger")
    device = PahoOverWebSockets(running, "ws-stranger", identity)
    try:
        assert device.connack.get(timeout=10) == 0
        device.client.subscribe(topics.RESPONSE_FILTER, qos=1)
        answer, document = device.request(topics.format_register("1"), b"{}")
        assert answer.status == 401 and document["errorCode"] == 401002
    finally:
        device.close()


def test_a_registration_id_other_than_the_cn_is_refused_at_connack(running, file_cas, tmp_path):
    identity = file_cas.device("ws-real").write(tmp_path, "ws-real")
    device = PahoOverWebSockets(running, "ws-claimed", identity)
    try:
        assert str(device.connack.get(timeout=10)) == "Not authorized"
    finally:
        device.close()

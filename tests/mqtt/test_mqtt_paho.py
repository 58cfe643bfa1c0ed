"""The emulator's MQTT API checked with a client we did not write: paho-mqtt 2.x, file keys.

Each test runs the DPS flow the way one of the official SDKs does (QoS, payload shapes,
$rid forms differ between them) against the real emulator assembly and decision engine.
"""

from __future__ import annotations

import json
import queue
import ssl
import uuid

import paho.mqtt.client as mqtt
import pytest

from device_sim.mqtt import topics
from device_sim.testing import Emulator, TestCA


@pytest.fixture(scope="module")
def stub(tmp_path_factory, file_cas):
    stub = Emulator.in_process(tmp_path_factory.mktemp("mqtt-paho-home"))
    stub.admin.upload_ca("root", file_cas.root.cert_pem, verified=True)
    stub.admin.create_group("all-devices", cert_pem=file_cas.root.cert_pem)
    yield stub
    stub.stop()


class PahoDevice:
    """paho in MQTT 3.1.1 mode, set up as the DPS docs describe for an X.509 device."""

    def __init__(self, stub, registration_id, identity, client_id=None, username=None):
        self.answers: queue.Queue = queue.Queue()
        self.connack: queue.Queue = queue.Queue()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id or registration_id,
                                  protocol=mqtt.MQTTv311, clean_session=True)
        self.client.tls_set(ca_certs=str(stub.ca_cert), certfile=str(identity[0]), keyfile=str(identity[1]),
                            tls_version=ssl.PROTOCOL_TLS_CLIENT)
        self.client.username_pw_set(username or topics.format_username(stub.id_scope, registration_id, "2019-03-31",
                                                                       "paho-test/1.0 (python)"))
        self.client.on_connect = lambda client, userdata, flags, reason, props: self.connack.put(reason)
        self.client.on_message = lambda client, userdata, message: self.answers.put(message)
        self.client.connect("127.0.0.1", stub.mqtt_port, keepalive=30)
        self.client.loop_start()

    def connected(self):
        reason = self.connack.get(timeout=10)
        return reason

    def subscribe(self):
        result, _mid = self.client.subscribe(topics.RESPONSE_FILTER, qos=1)
        assert result == mqtt.MQTT_ERR_SUCCESS

    def request(self, topic, payload, qos):
        self.client.publish(topic, payload, qos=qos).wait_for_publish(timeout=10)
        message = self.answers.get(timeout=10)
        return topics.parse_response(message.topic), json.loads(message.payload or b"null"), message

    def close(self):
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def paho_devices():
    made = []

    def make(*args, **kwargs):
        device = PahoDevice(*args, **kwargs)
        made.append(device)
        return device

    yield make
    for device in made:
        device.close()


@pytest.mark.parametrize(
    "style, qos, register_payload, poll_payload, rid",
    [
        ("python-sdk", 1, None, b" ", lambda n: str(uuid.uuid4())),
        ("csharp-sdk", 1, b"", b"", lambda n: str(n)),
        ("c-sdk", 0, None, b"", lambda n: str(n)),
    ],
)
def test_paho_provisions_like_each_sdk(stub, file_cas, tmp_path, paho_devices, style, qos, register_payload,
                                       poll_payload, rid):
    registration_id = f"paho-{style}"
    identity = file_cas.inter2.issue_leaf(registration_id).write(tmp_path, registration_id, [file_cas.inter2, file_cas.inter1, file_cas.root])
    device = paho_devices(stub, registration_id, identity)
    assert device.connected() == 0
    assert device.connack.empty()
    device.subscribe()

    body = register_payload if register_payload is not None else \
        json.dumps({"registrationId": registration_id, "payload": {"model": "x"}}).encode()
    first_rid = rid(1)
    answer, document, message = device.request(topics.format_register(first_rid), body, qos)
    assert (answer.status, answer.rid) == (202, first_rid)
    assert answer.retry_after == 0  # the stub runs with --retry-after 0
    assert document["status"] == "assigning"
    assert message.qos == 1  # DPS delivers with QoS 1

    poll_rid = rid(2)
    answer, document, _ = device.request(topics.format_status(poll_rid, document["operationId"]), poll_payload, qos)
    assert (answer.status, answer.rid) == (200, poll_rid)
    assert document["status"] == "assigned"
    state = document["registrationState"]
    assert state["registrationId"] == registration_id
    assert state["deviceId"] == registration_id
    assert state["assignedHub"]


def test_unknown_certificate_is_accepted_at_connect_then_401_on_register(stub, tmp_path, paho_devices):

    stranger_root = TestCA("stranger-root")
    identity = stranger_root.issue_leaf("stranger").write(tmp_path, "stranger", [stranger_root])
    device = paho_devices(stub, "stranger", identity)
    assert device.connected() == 0
    device.subscribe()
    answer, document, _ = device.request(topics.format_register("1"), b"{}", 1)
    assert answer.status == 401
    assert document["errorCode"] == 401002


def test_registration_id_other_than_the_certificate_cn_is_refused_at_connect(stub, file_cas, tmp_path, paho_devices):
    identity = file_cas.inter2.issue_leaf("real-cn").write(tmp_path, "real-cn", [file_cas.inter2, file_cas.inter1, file_cas.root])
    device = paho_devices(stub, "claimed-id", identity)
    # paho reports the MQTT 3.1.1 CONNACK code 5 by its name
    assert str(device.connected()) == "Not authorized"


def test_api_version_missing_gets_a_400_answer(stub, file_cas, tmp_path, paho_devices):
    identity = file_cas.inter2.issue_leaf("no-api").write(tmp_path, "no-api", [file_cas.inter2, file_cas.inter1, file_cas.root])
    device = paho_devices(stub, "no-api", identity, username=f"{stub.id_scope}/registrations/no-api/")
    assert device.connected() == 0
    device.subscribe()
    answer, document, _ = device.request(topics.format_register("7"), b"", 1)
    assert answer.status == 400
    assert document["errorCode"] // 1000 == 400


def test_mqtt5_client_is_told_the_protocol_version_is_unacceptable(stub, file_cas, tmp_path):
    identity = file_cas.inter2.issue_leaf("v5-dev").write(tmp_path, "v5-dev", [file_cas.inter2, file_cas.inter1, file_cas.root])
    reasons: queue.Queue = queue.Queue()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="v5-dev", protocol=mqtt.MQTTv5)
    client.tls_set(ca_certs=str(stub.ca_cert), certfile=str(identity[0]), keyfile=str(identity[1]))
    client.username_pw_set(topics.format_username(stub.id_scope, "v5-dev", "2021-06-01"))
    client.on_connect = lambda client, userdata, flags, reason, props: reasons.put(reason)
    client.on_disconnect = lambda client, userdata, flags, reason, props: reasons.put(reason)
    client.connect("127.0.0.1", stub.mqtt_port, keepalive=30)
    client.loop_start()
    try:
        reason = reasons.get(timeout=10)
    finally:
        client.disconnect()
        client.loop_stop()
    # MQTT 3.1.1 CONNACK 1; paho 5 reads the same byte as its own reason code 1
    print("PAHO5", repr(reason), reason.value)
    assert reason.is_failure or reason.value == 1, reason

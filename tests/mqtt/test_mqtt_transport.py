"""The device's MQTT transport against scripted servers: what each server misbehaviour becomes.

The servers are the emulator's own TLS listener (`TlsListener`, real TLS) running a
script written with our codec instead of the DPS session. The client key is a file key
here: these tests are about the MQTT edge, the token path is covered in test_mqtt_device.py.
"""

from __future__ import annotations

import json
import time

import pytest
from awscrt import io as crt_io

from device_sim.device import registration as reg
from device_sim.device.driver import run_registration
from device_sim.device.transport_https import CrtRuntime
from device_sim.device.transport_mqtt import MqttTransport
from device_sim.mqtt import topics
from device_sim.mqtt.codec import Connack, Decoder, Puback, Publish, Suback, Subscribe, encode
from device_sim.testing import pem
from device_sim.stub.net.listener import Limits, TlsListener
from device_sim.stub.net.tls_context import device_context

RUNTIME = CrtRuntime()  # the awscrt event loop every device of this module runs on

ASSIGNING = json.dumps({"operationId": "op-1", "status": "assigning"}).encode()
ASSIGNED = json.dumps({"operationId": "op-1", "status": "assigned",
                       "registrationState": {"assignedHub": "hub.example", "deviceId": "dev-t"}}).encode()


class Script:
    """Reads packets from one connection and lets a test answer them."""

    def __init__(self, stream):
        self.stream = stream
        self.decoder = Decoder()
        self.acks: list[int] = []

    def next(self, timeout=5.0):
        """The next packet from the client, skipping its PUBACKs of our QoS 1 answers."""
        while True:
            packet = self.decoder.next_packet()
            if isinstance(packet, Puback):
                self.acks.append(packet.packet_id)
            elif packet is not None:
                return packet
            else:
                data = self.stream.recv(65536, timeout)
                if not data:
                    return None
                self.decoder.receive_data(data)

    def send(self, *packets):
        self.stream.sendall(b"".join(encode(p) for p in packets))

    def accept(self):
        """CONNECT -> CONNACK 0, SUBSCRIBE -> SUBACK 1; returns the CONNECT."""
        connect = self.next()
        self.send(Connack(0))
        subscribe = self.next()
        assert isinstance(subscribe, Subscribe) and subscribe.topics == ((topics.RESPONSE_FILTER, 1),)
        self.send(Suback(subscribe.packet_id, (1,)))
        return connect

    def answer(self, status, body, retry_after=None):
        """Wait for the next request PUBLISH, PUBACK it and answer it on the response topic."""
        publish = self.next()
        assert isinstance(publish, Publish) and publish.qos == 1
        request = topics.parse_request(publish.topic)
        self.send(Puback(publish.packet_id),
                  Publish(topics.format_response(status, request.rid, retry_after), body, 1, 100))
        return publish


@pytest.fixture
def scripted(server_identity):
    listeners = []
    seen = []

    def start(script):
        def handler(stream):
            s = Script(stream)
            seen.append(s)
            script(s)
            time.sleep(0.2)  # let the client read the last packets before the close
        listener = TlsListener("script", "mqtts", "127.0.0.1", 0, device_context(server_identity),
                                   handler, limits=Limits(handshake_timeout=5), log=lambda m: None)
        listener.start()
        listeners.append(listener)
        return listener

    start.seen = seen
    yield start
    for listener in listeners:
        listener.close()


@pytest.fixture(scope="module")
def tls_context(file_cas, server_identity):
    leaf = file_cas.inter2.issue_leaf("dev-t")
    key = leaf.key.private_bytes(*_pkcs8())
    options = crt_io.TlsContextOptions.create_client_with_mtls(pem(*leaf.chain_to(2)), key)
    options.override_default_trust_store(server_identity.ca_cert.read_bytes())
    return crt_io.ClientTlsContext(options)


def _pkcs8():
    from cryptography.hazmat.primitives import serialization

    return serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()


def run(listener, tls_context, timeout=5.0):
    transport = MqttTransport("127.0.0.1", listener.port, "0ne0TEST", "dev-t", tls_context, runtime=RUNTIME)
    return run_registration(reg.RegistrationFlow("dev-t"), transport, timeout)[0]


def test_connect_subscribe_register_poll_as_dps_expects(scripted, tls_context):
    def script(s):
        connect = s.accept()
        s.connect_packet = connect
        s.register = s.answer(202, ASSIGNING, retry_after=0)
        s.poll = s.answer(200, ASSIGNED)

    listener = scripted(script)
    outcome = run(listener, tls_context)
    assert outcome.status == reg.ASSIGNED and outcome.assigned_hub == "hub.example"
    s = scripted.seen[0]
    assert s.connect_packet.client_id == "dev-t" and s.connect_packet.clean_session
    assert s.connect_packet.password is None
    username = topics.parse_username(s.connect_packet.username)
    assert (username.id_scope, username.registration_id, username.api_version) == ("0ne0TEST", "dev-t", "2021-06-01")
    assert json.loads(s.register.payload) == {"registrationId": "dev-t"}
    assert topics.parse_request(s.poll.topic).operation_id == "op-1"
    assert s.acks == [100]  # the register answer was acknowledged before the poll went out


def test_answers_for_other_rids_are_ignored(scripted, tls_context):
    def script(s):
        s.accept()
        publish = s.next()
        s.send(Puback(publish.packet_id),
               Publish(topics.format_response(200, "not-yours"), ASSIGNED, 1, 7),  # a stale answer
               Publish("$dps/registrations/res/garbage", b"x", 1, 8),  # not a DPS answer at all
               Publish(topics.format_response(401, topics.parse_request(publish.topic).rid),
                       json.dumps({"errorCode": 401002, "message": "Invalid certificate"}).encode(), 1, 9))

    outcome = run(scripted(script), tls_context)
    assert (outcome.status, outcome.error_code) == (reg.UNAUTHORIZED, 401002)


@pytest.mark.parametrize("code", [2, 4, 5])
def test_connack_refusal_is_reported_as_unauthorized(scripted, tls_context, code):
    outcome = run(scripted(lambda s: (s.next(), s.send(Connack(code)))), tls_context)
    assert (outcome.status, outcome.http_status) == (reg.UNAUTHORIZED, 401)
    assert "CONNACK" in outcome.error_message


def test_refused_subscription_is_a_protocol_error(scripted, tls_context):
    def script(s):
        s.next()
        s.send(Connack(0))
        subscribe = s.next()
        s.send(Suback(subscribe.packet_id, (0x80,)))

    outcome = run(scripted(script), tls_context)
    assert outcome.status == reg.PROTOCOL_ERROR and "subscription" in outcome.error_message


def test_server_that_never_answers_the_request_times_out(scripted, tls_context):
    def script(s):
        s.accept()
        s.next()  # the register PUBLISH; no PUBACK, no answer
        s.next(timeout=5)

    started = time.monotonic()
    outcome = run(scripted(script), tls_context, timeout=1.5)
    assert outcome.status == reg.TIMEOUT
    assert time.monotonic() - started < 4


def test_server_closing_during_every_request_is_retried_until_the_deadline(scripted, tls_context):
    def script(s):
        s.accept()
        s.next()  # read the register PUBLISH, then hang up without answering

    started = time.monotonic()
    outcome = run(scripted(script), tls_context, timeout=2.0)
    assert outcome.status == reg.PROTOCOL_ERROR, outcome
    assert "closed" in outcome.error_message
    # A dropped connection is ridden out: reconnect, subscribe, publish the request again.
    assert len(scripted.seen) >= 2
    assert 1.5 < time.monotonic() - started < 3.5  # at the deadline, not before, not long after

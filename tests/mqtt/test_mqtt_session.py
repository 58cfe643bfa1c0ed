"""The emulator's DPS-over-MQTT session (sans-IO) fed arbitrary packet sequences.

Real decision engine behind it (DeviceApi over a SQLite store in a temporary directory).
Whatever a client sends, the session either answers with packets that encode, obey the
DPS topic rules and echo the request's $rid, or ends the connection with SessionClosed.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from device_sim.mqtt import topics
from device_sim.mqtt.codec import Connack, Connect, Disconnect, Pingreq, Pingresp, Puback, Publish, Suback, Subscribe, Unsuback, Unsubscribe, encode
from device_sim.stub.core.config import StubConfig
from device_sim.stub.core.device_api import DeviceApi
from device_sim.stub.net.mqtt_session import DpsMqttSession, SessionClosed
from device_sim.stub.core.store import Store

SCOPE = "0ne00FUZZ"
USER = f"{SCOPE}/registrations/dev-a/api-version=2021-06-01"


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    store = Store(tmp_path_factory.mktemp("mqtt-session") / "stub.db")
    yield DeviceApi(store, StubConfig(id_scope=SCOPE))
    store.close()


@pytest.fixture(scope="module")
def chain(file_cas):
    return [file_cas.inter2.issue_leaf("dev-a").cert, file_cas.inter2.cert, file_cas.inter1.cert, file_cas.root.cert]


rids = st.one_of(st.integers(1, 10**6).map(str), st.uuids().map(str), st.text("abc%-_.", min_size=1, max_size=8))
request_topics = st.one_of(
    rids.map(topics.format_register),
    st.builds(topics.format_status, rids, st.text("0123456789abcdef.-", min_size=1, max_size=20)),
)
any_topics = st.one_of(request_topics, st.text(min_size=1, max_size=30).filter(lambda t: "+" not in t and "#" not in t))
payloads = st.one_of(st.just(b""), st.just(b" "), st.just(b'{"registrationId":"dev-a"}'),
                     st.just(b'{"registrationId":"dev-a","payload":{"a":1}}'), st.binary(max_size=40))


@st.composite
def publishes(draw):
    qos = draw(st.sampled_from([0, 1, 1, 2]))
    return Publish(draw(any_topics), draw(payloads), qos, draw(st.integers(1, 0xFFFF)) if qos else None)


packets = st.one_of(
    publishes(),
    st.builds(Subscribe, st.integers(1, 0xFFFF),
              st.lists(st.tuples(st.sampled_from([topics.RESPONSE_FILTER, "a/#", "$dps/#"]), st.integers(0, 2)),
                       min_size=1, max_size=3).map(tuple)),
    st.just(Pingreq()), st.just(Disconnect()), st.builds(Puback, st.integers(1, 0xFFFF)),
    st.just(Connect("dev-a", USER)), st.just(Connack(0)), st.just(Pingresp()),
    st.builds(Unsubscribe, st.integers(1, 0xFFFF),
              st.lists(st.sampled_from([topics.RESPONSE_FILTER, "a/#"]), min_size=1, max_size=2).map(tuple)),
    st.builds(Unsuback, st.integers(1, 0xFFFF)),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.booleans(), st.lists(packets, max_size=8))
def test_session_answers_or_closes_whatever_arrives(api, chain, connect_first, sequence):
    session = DpsMqttSession(api, chain)
    if connect_first:
        sequence = [Connect("dev-a", USER, keep_alive=30), *sequence]
    for packet in sequence:
        try:
            answer = session.receive(packet)
        except SessionClosed as closed:
            for out in closed.answer:
                encode(out)
            return
        for out in answer:
            encode(out)  # every answer is representable on the wire
        if isinstance(packet, Publish):
            request = topics.parse_request(packet.topic)  # anything else would have closed
            acks = [out for out in answer if isinstance(out, Puback)]
            assert acks == ([Puback(packet.packet_id)] if packet.qos == 1 else [])
            for out in answer:
                if isinstance(out, Publish):
                    response = topics.parse_response(out.topic)
                    assert response.rid == request.rid
                    assert out.qos == session.granted_qos
                    json.loads(out.payload)
        elif isinstance(packet, Subscribe):
            assert isinstance(answer[0], Suback) and len(answer[0].return_codes) == len(packet.topics)
        elif isinstance(packet, Pingreq):
            assert answer == [Pingresp()]
        elif isinstance(packet, Unsubscribe):
            assert answer == [Unsuback(packet.packet_id)]
            if topics.RESPONSE_FILTER in packet.topics:
                assert session.granted_qos is None
    assert session.connected or not sequence

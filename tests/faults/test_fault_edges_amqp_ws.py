"""Each fault action carried out by the AMQP edge (port 5671's loop, python-qpid-proton as
the device) and by WebSockets on the device port (MQTT inside, paho-mqtt as the device):
an in-process emulator, real TLS over loopback, clients we did not write."""

from __future__ import annotations

import json
import time

import pytest

from fault_stub import FaultStub

TRANSPORTS = ["amqp", "websocket"]


@pytest.fixture
def stub(tmp_path):
    created = []

    def make(plan=None, **options):
        created.append(FaultStub(tmp_path / f"home{len(created)}", plan, **options))
        return created[-1]

    yield make
    for s in created:
        s.close()
        assert not [line for line in s.logged if "Traceback" in line or "failed" in line], s.logged


def rules(*items) -> dict:
    return {"seed": 3, "rules": list(items)}


def test_no_plan_registers_normally_on_both(stub):
    s = stub()
    for transport in TRANSPORTS:
        answer = s.send(transport, f"plain-{transport}")
        assert answer.status == 202 and answer.json()["status"] == "assigning", answer


def test_amqp_status_is_a_rejection_with_the_dps_error_json_and_retry_after(stub):
    s = stub(rules({"match": {"transport": "amqp", "registration_id": "busy-*"},
                    "action": {"status": 503, "retry_after": 2}},
                   {"match": {"transport": "amqp", "registration_id": "slow-*"}, "action": {"status": 429}}))
    answer = s.amqp("busy-1")
    assert (answer.status, answer.retry_after, answer.condition) == (503, "2", "amqp:internal-error")
    assert answer.json()["errorCode"] == 503000 and "fault injected" in answer.json()["message"]
    answer = s.amqp("slow-1")
    assert (answer.status, answer.retry_after) == (429, None)
    assert answer.condition == "com.microsoft:device-container-throttled"
    assert s.register_count("busy-1") == 0 and s.register_count("slow-1") == 0  # refused before the core
    assert s.amqp("other-1").status == 202
    assert s.https("busy-2").status == 202  # the selector named amqp only


def test_websocket_status_is_the_mqtt_response_topic(stub):
    s = stub(rules({"match": {"transport": "websocket"}, "action": {"status": 503, "retry_after": 2}}))
    answer = s.websocket("busy-1")
    assert (answer.status, answer.retry_after) == (503, "2")
    assert answer.json()["errorCode"] == 503000
    assert s.mqtt("busy-2").status == 202  # MQTT on 8883 is not carried by a WebSocket


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_non_json_body(stub, transport):
    s = stub(rules({"match": {}, "action": {"non_json": True}}))
    answer = s.send(transport, "dev-1")
    assert answer.status == 200 and answer.body.startswith(b"<html>"), answer
    with pytest.raises(ValueError):
        answer.json()
    if transport == "amqp":
        assert "iotdps-status" not in answer.properties


def test_amqp_non_json_error_status_is_a_rejection_with_the_page(stub):
    s = stub(rules({"match": {"transport": "amqp"}, "action": {"status": 502, "non_json": True}}))
    answer = s.amqp("dev-1")
    assert answer.condition == "amqp:internal-error" and answer.body.startswith(b"<html>")


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_latency_fixed_and_uniform(stub, transport):
    s = stub(rules({"match": {"registration_id": "fixed-*"}, "action": {"latency_ms": 600}},
                   {"match": {"registration_id": "range-*"}, "action": {"latency_ms": [300, 400]}}))
    baseline = s.send(transport, "none-1")
    fixed = s.send(transport, "fixed-1")
    assert fixed.status == 202 and fixed.seconds >= 0.6
    ranged = s.send(transport, "range-1")
    assert ranged.status == 202 and ranged.seconds >= 0.3
    assert baseline.status == 202 and baseline.seconds < fixed.seconds - 0.3
    assert [r["fired"] for r in s.faults.report()["rules"]] == [1, 1]


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("kind", ["close", "reset"])
def test_drop_after_request_processes_the_request_and_loses_the_answer(stub, transport, kind):
    s = stub(rules({"match": {"operation": "register"}, "first": 1, "action": {kind: "after_request"}}))
    answer = s.send(transport, "dev-1")
    assert answer.dropped and answer.status is None, answer
    assert s.register_count("dev-1") == 1  # the core did register it
    assert s.send(transport, "dev-1").status == 202  # first: 1
    assert s.register_count("dev-1") == 2


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("action", [{"close": "before_tls"}, {"close": "after_tls"}, {"reset": "before_tls"},
                                    {"reset": "after_tls"}, {"refuse_connections": True}])
def test_connection_level_actions(stub, transport, action):
    s = stub(rules({"match": {"transport": transport}, "action": action}))
    answer = s.send(transport, "dev-1")
    assert answer.dropped and answer.status is None, answer
    assert s.register_count("dev-1") == 0
    # The selector kept the others clean: plain HTTPS shares the WebSocket's port.
    for other in ["https", "mqtt", *TRANSPORTS]:
        if other != transport:
            assert s.send(other, f"dev-{other}").status == 202, other
    rule = s.faults.report()["rules"][0]
    assert rule["fired"] == 1 and rule["firedByOperation"] == {"connection": 1}


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_silent_accepts_and_answers_nothing(stub, transport):
    s = stub(rules({"match": {"transport": transport}, "action": {"silent": 5}}))
    answer = s.send(transport, "dev-1", timeout=1.0)
    assert answer.silent or answer.dropped, answer
    assert answer.status is None and answer.seconds >= 0.9


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_assigning_hold_and_poll_selector(stub, transport):
    s = stub(rules({"match": {"operation": "register"}, "action": {"assigning_s": 1.5}},
                   {"match": {"operation": "poll", "registration_id": "polls-*"}, "action": {"status": 500}}))
    operation_id = s.send(transport, "dev-1").json()["operationId"]
    assert s.send(transport, "dev-1", "poll", operation_id=operation_id).json()["status"] == "assigning"
    time.sleep(1.6)
    assert s.send(transport, "dev-1", "poll", operation_id=operation_id).json()["status"] == "assigned"
    operation_id = s.send(transport, "polls-1").json()["operationId"]
    assert s.send(transport, "polls-1", "poll", operation_id=operation_id).status == 500


def test_amqp_status_lookup_selector(stub):
    s = stub(rules({"match": {"operation": "status_lookup"}, "action": {"status": 503}}))
    assert s.amqp("dev-1").status == 202
    assert s.amqp("dev-1", "status_lookup").status == 503


def test_mqtt_over_websockets_matches_websocket_and_mqtt_rules(stub):
    # A request inside a WebSocket matches rules naming the carrier and the inner protocol.
    s = stub(rules({"match": {"transport": "mqtt", "registration_id": "inner-*"}, "action": {"status": 503}},
                   {"match": {"transport": "websocket", "registration_id": "carrier-*"},
                    "action": {"status": 429}},
                   {"match": {"transport": "https"}, "action": {"status": 500}}))
    assert s.websocket("inner-1").status == 503
    assert s.websocket("carrier-1").status == 429
    assert s.websocket("other-1").status == 202  # the https rule is not the WebSocket's
    assert s.mqtt("carrier-2").status == 202
    assert s.https("inner-2").status == 500
    assert [r["matched"] for r in s.faults.report()["rules"]] == [1, 1, 1]


def test_a_rule_for_every_transport_meets_a_websocket_connection_once(stub):
    # The device port's listener decides for every connection (as https); the upgrade asks
    # only rules naming a transport, so a rule for all is not drawn twice.
    s = stub(rules({"match": {}, "first": 1, "action": {"close": "after_tls"}}))
    assert s.websocket("dev-1").dropped
    assert s.websocket("dev-1").status == 202
    assert s.faults.report()["rules"][0]["matched"] == 2


def test_window_outage_and_live_change(stub):
    s = stub()
    assert s.amqp("dev-1").status == 202
    from device_sim.stub.core.faults import parse_plan
    s.faults.set(parse_plan(json.dumps(rules({"match": {}, "window": {"start_s": 0, "duration_s": 1.0},
                                              "action": {"refuse_connections": True}}))))
    assert s.amqp("dev-2").dropped and s.websocket("dev-2").dropped
    time.sleep(1.1)
    assert s.amqp("dev-3").status == 202 and s.websocket("dev-3").status == 202

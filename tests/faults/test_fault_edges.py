"""Each fault action and selector carried out by the real edges, over HTTPS and MQTT:
an in-process emulator, real TLS over loopback, a client that reports what it got."""

from __future__ import annotations

import json

import pytest

from device_sim.stub.core.faults import parse_plan
from fault_stub import FaultStub

TRANSPORTS = ["https", "mqtt"]


@pytest.fixture
def stub(tmp_path):
    created = []

    def make(plan=None, **options):
        created.append(FaultStub(tmp_path / f"home{len(created)}", plan, **options))
        return created[-1]

    yield make
    for s in created:
        s.close()


def rules(*items) -> dict:
    return {"seed": 3, "rules": list(items)}


def test_no_plan_registers_normally_on_both(stub):
    s = stub()
    for transport in TRANSPORTS:
        answer = s.send(transport, f"plain-{transport}")
        assert answer.status == 202 and answer.json()["status"] == "assigning"


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_status_with_and_without_retry_after(stub, transport):
    s = stub(rules({"match": {"registration_id": "busy-*"}, "action": {"status": 503, "retry_after": 2}},
                   {"match": {"registration_id": "slow-*"}, "action": {"status": 429}}))
    answer = s.send(transport, "busy-1")
    assert (answer.status, answer.retry_after) == (503, "2")
    assert answer.json()["errorCode"] == 503000
    answer = s.send(transport, "slow-1")
    assert (answer.status, answer.retry_after) == (429, None)
    assert s.register_count("busy-1") == 0  # refused before the core saw it
    assert s.send(transport, "other-1").status == 202


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_non_json_body(stub, transport):
    s = stub(rules({"match": {}, "action": {"non_json": True}}))
    answer = s.send(transport, "dev-1")
    assert answer.status == 200 and answer.body.startswith(b"<html>")
    with pytest.raises(ValueError):
        answer.json()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_latency_fixed_and_uniform(stub, transport):
    s = stub(rules({"match": {"registration_id": "fixed-*"}, "action": {"latency_ms": 400}},
                   {"match": {"registration_id": "range-*"}, "action": {"latency_ms": [200, 300]}}))
    fixed = s.send(transport, "fixed-1")
    assert fixed.status == 202 and fixed.seconds >= 0.4
    ranged = s.send(transport, "range-1")
    assert ranged.status == 202 and 0.2 <= ranged.seconds
    assert s.send(transport, "none-1").seconds < 0.2 + fixed.seconds - 0.4 + 0.2


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("kind", ["close", "reset"])
def test_drop_after_request_processes_the_request_and_loses_the_answer(stub, transport, kind):
    s = stub(rules({"match": {"operation": "register"}, "first": 1, "action": {kind: "after_request"}}))
    answer = s.raw_register("dev-1") if transport == "https" else s.mqtt("dev-1")
    assert answer.dropped and answer.status is None
    assert answer.reset == (kind == "reset")  # a reset ends without TLS close_notify
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
    other = "mqtt" if transport == "https" else "https"
    assert s.send(other, "dev-2").status == 202  # the selector kept the other transport clean
    rule = s.faults.report()["rules"][0]
    assert rule["fired"] == 1 and rule["firedByOperation"] == {"connection": 1}


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_silent_accepts_and_answers_nothing(stub, transport):
    s = stub(rules({"match": {"transport": transport}, "action": {"silent": 5}}))
    answer = s.send(transport, "dev-1", timeout=0.8)
    assert answer.silent or answer.dropped
    assert answer.status is None and answer.seconds >= 0.7


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_assigning_hold_and_operation_selector(stub, transport):
    s = stub(rules({"match": {"operation": "register"}, "action": {"assigning_s": 1.5}},
                   {"match": {"operation": "poll", "registration_id": "polls-*"}, "action": {"status": 500}}))
    operation_id = s.send(transport, "dev-1").json()["operationId"]
    assert s.send(transport, "dev-1", "poll", operation_id=operation_id).json()["status"] == "assigning"
    import time
    time.sleep(1.6)
    assert s.send(transport, "dev-1", "poll", operation_id=operation_id).json()["status"] == "assigned"
    operation_id = s.send(transport, "polls-1").json()["operationId"]
    assert s.send(transport, "polls-1", "poll", operation_id=operation_id).status == 500


def test_status_lookup_selector_over_https(stub):
    s = stub(rules({"match": {"operation": "status_lookup"}, "action": {"status": 503}}))
    assert s.https("dev-1").status == 202
    assert s.https("dev-1", "status_lookup").status == 503


def test_service_operations_are_faulted_but_not_the_emulator_paths(stub):
    s = stub(rules({"match": {"operation": "service"}, "action": {"status": 503, "retry_after": 1}}))
    import requests
    from device_sim.stub.admin import Endpoint, ServiceClient
    from device_sim.stub.layout import StateLayout
    layout = StateLayout.of(s.server.options.home)
    client = ServiceClient(Endpoint(s.ready["service_url"], s.ready["ca_cert"], layout.service_key))
    response = client.call("GET", "/enrollmentGroups/all", ok=(503,))
    assert response.headers["Retry-After"] == "1"
    assert client.faults_show()["rules"][0]["fired"] == 1  # /emulator/faults itself answers
    client.faults_clear()
    assert client.call("GET", "/enrollmentGroups/all").status_code == 200
    assert s.https("dev-1").status == 202  # device operations were never selected
    del requests


def test_window_and_live_change(stub):
    s = stub()
    assert s.https("dev-1").status == 202
    s.faults.set(parse_plan(json.dumps(rules({"match": {}, "window": {"start_s": 0, "duration_s": 0.6},
                                              "action": {"refuse_connections": True}}))))
    assert s.https("dev-2").dropped and s.mqtt("dev-2").dropped
    import time
    time.sleep(0.7)
    assert s.https("dev-3").status == 202 and s.mqtt("dev-3").status == 202
    s.faults.set(None)
    assert s.https("dev-4").status == 202


def test_poll_quota_is_429_with_retry_after_on_both(stub):
    s = stub(quota_units=1)
    for transport in TRANSPORTS:
        operation_id = s.send(transport, f"q-{transport}").json()["operationId"]
        answers = [s.send(transport, f"q-{transport}", "poll", operation_id=operation_id) for _ in range(6)]
        assert [a.status for a in answers] == [200] * 5 + [429]
        assert 1 <= int(answers[-1].retry_after) <= 10
    assert s.server.ready["quota_units"] == 1
    assert s.service("GET", "/emulator/status").body["quotaUnits"] == 1

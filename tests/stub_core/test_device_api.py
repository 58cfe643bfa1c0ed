"""The device API against a real SQLite store, set up through the service API."""

import json

import pytest

from device_sim.stub.core.allocation import INITIAL, MIGRATED
from device_sim.stub.core.config import Hub
from device_sim.stub.core.device_api import DeviceApi

from .env import API, SCOPE, Env
from device_sim.testing import TestCA


@pytest.fixture
def env(tmp_path):
    return Env(tmp_path)


@pytest.fixture
def cas():
    root = TestCA("Test Root")
    inter = root.issue_intermediate("Int")
    return root, inter


def assert_error(reply, code):
    assert reply.status == code // 1000, reply
    assert reply.body["errorCode"] == code, reply
    assert reply.headers["x-ms-error-code"] == str(code)
    assert set(reply.body) >= {"errorCode", "trackingId", "message", "timestampUtc"}


def test_register_then_poll_assigned(env, cas):
    root, inter = cas
    env.upload_ca("root", root.cert)
    assert env.group("g1", ca_name="root").status == 200
    dev = inter.issue_leaf("Dev-1")
    first = env.register(dev, registration_id="dev-1",
                         body=json.dumps({"registrationId": "dev-1", "payload": {"a": 1}}).encode())
    assert first.status == 202
    assert first.body["status"] == "assigning" and first.body["operationId"]
    assert first.headers["Retry-After"] == "1"
    assert first.headers["Location"] == f"/{SCOPE}/registrations/dev-1/register"
    done = env.poll(dev, first.body["operationId"], registration_id="DEV-1")
    assert done.status == 200
    state = done.body["registrationState"]
    assert done.body["status"] == "assigned" == state["status"]
    assert state["x509"] == {} and state["deviceId"] == "Dev-1" and state["registrationId"] == "Dev-1"
    assert state["assignedHub"] in ("hub1.example", "hub2.example")
    assert state["substatus"] == INITIAL and state["etag"]
    assert "payload" not in state
    record = env.call("GET", "/registrations/dev-1").body
    assert record["devicePayload"] == {"a": 1} and record["assignedHub"] == state["assignedHub"]


def test_assignment_delay_keeps_assigning(tmp_path, cas):
    env = Env(tmp_path, assignment_delay=5, retry_after=3)
    root, inter = cas
    env.upload_ca("root", root.cert)
    env.group("g1", ca_name="root")
    dev = inter.issue_leaf("dev")
    first = env.register(dev)
    waiting = env.poll(dev, first.body["operationId"])
    assert waiting.status == 202 and waiting.body["status"] == "assigning"
    assert waiting.headers["Retry-After"] == "3"
    env.clock.now += 5
    assert env.poll(dev, first.body["operationId"]).status == 200


def test_disabled_and_unauthorized(env, cas):
    root, inter = cas
    env.upload_ca("root", root.cert)
    env.group("g1", ca_name="root", status="disabled")
    dev = inter.issue_leaf("dev")
    done = env.provision(dev)
    assert done.status == 200 and done.body["status"] == "disabled"
    assert done.body["registrationState"]["status"] == "disabled"
    stranger = TestCA("Other").issue_leaf("dev2")
    assert_error(env.provision(stranger), 401002)


def test_no_hub_gives_failed_400208(tmp_path, cas):
    env = Env(tmp_path, hubs=[Hub("h.example", apply_allocation_policy=False)])
    root, inter = cas
    env.upload_ca("root", root.cert)
    env.group("g1", ca_name="root")
    done = env.provision(inter.issue_leaf("dev"))
    assert done.status == 200 and done.body["status"] == "failed"
    assert done.body["registrationState"]["errorCode"] == 400208


def test_request_validation(env, cas):
    root, inter = cas
    env.upload_ca("root", root.cert)
    env.group("g1", ca_name="root")
    dev = inter.issue_leaf("dev")
    api = env.device
    assert_error(api.register(SCOPE, "dev", None, dev.chain, b""), 400001)
    assert_error(api.register("0neWRONG", "dev", API, dev.chain, b""), 404000)
    assert_error(api.register(SCOPE, "bad id!", API, dev.chain, b""), 400004)
    assert_error(api.register(SCOPE, "ends.", API, dev.chain, b""), 400004)
    assert_error(api.register(SCOPE, "x" * 129, API, dev.chain, b""), 400004)
    assert_error(api.register(SCOPE, "other", API, dev.chain, b""), 401002)
    assert_error(api.register(SCOPE, "dev", API, [], b""), 401002)
    assert_error(api.register(SCOPE, "dev", API, dev.chain, b"{nope"), 400000)
    assert_error(api.register(SCOPE, "dev", API, dev.chain, b"[1]"), 400000)
    assert_error(api.register(SCOPE, "dev", API, dev.chain, b'{"payload": 3}'), 400000)
    assert_error(api.register(SCOPE, "dev", API, dev.chain, b'{"registrationId": "x"}'), 400004)
    assert_error(api.register(SCOPE, "dev", API, dev.chain, b'{"csr": "AAAA"}'), 400000)
    big = b'{"payload": {"x": "' + b"a" * (96 * 1024) + b'"}}'
    assert_error(api.register(SCOPE, "dev", API, dev.chain, big), 413000)
    assert api.register(SCOPE, "dev", API, dev.chain, b" ").status == 202
    assert api.register(SCOPE, "DEV", API, dev.chain, b'{"payload": null}').status == 202


def test_operation_lookup_rules(env, cas):
    root, inter = cas
    env.upload_ca("root", root.cert)
    env.group("g1", ca_name="root")
    one, two = inter.issue_leaf("one"), inter.issue_leaf("two")
    op_one = env.register(one).body["operationId"]
    op_two = env.register(two).body["operationId"]
    assert_error(env.poll(one, "5.nope.nope"), 404203)
    assert_error(env.poll(one, op_two), 404203)
    twin = inter.issue_leaf("one")  # same CN, other key and certificate
    assert_error(env.poll(twin, op_one), 401002)
    assert_error(env.device.operation_status(SCOPE, "one", op_one, None, one.chain), 400001)
    assert env.poll(one, op_one).status == 200
    # a new registration replaces the earlier operation of the same device
    op_again = env.register(one).body["operationId"]
    assert_error(env.poll(one, op_one), 404203)
    assert env.poll(one, op_again).status == 200


def test_registration_status_lookup(env, cas):
    root, inter = cas
    env.upload_ca("root", root.cert)
    env.group("g1", ca_name="root")
    dev = inter.issue_leaf("dev")
    assert_error(env.device.registration_status(SCOPE, "dev", API, dev.chain, b""), 404202)
    env.provision(dev)
    found = env.device.registration_status(SCOPE, "dev", API, dev.chain, b'{"registrationId":"dev"}')
    assert found.status == 200 and found.body["status"] == "assigned" and found.body["x509"] == {}
    stranger = TestCA("Other").issue_leaf("dev")
    assert_error(env.device.registration_status(SCOPE, "dev", API, stranger.chain, b""), 401002)


def test_throttle_knob(tmp_path, cas):
    env = Env(tmp_path, throttle=2)
    root, inter = cas
    env.upload_ca("root", root.cert)
    env.group("g1", ca_name="root")
    dev = inter.issue_leaf("dev")
    for _ in range(2):
        reply = env.register(dev)
        assert_error(reply, 429001)
        assert reply.headers["Retry-After"] == "1"
    assert env.provision(dev).status == 200
    assert env.provision(inter.issue_leaf("other")).status == 429


def test_reprovision_moves_and_substatus(env, cas):
    root, inter = cas
    env.upload_ca("root", root.cert)
    env.group("g1", ca_name="root", iotHubs=["hub1.example"])
    dev = inter.issue_leaf("dev")
    first = env.provision(dev).body["registrationState"]
    assert (first["assignedHub"], first["substatus"]) == ("hub1.example", INITIAL)
    env.group("g1", ca_name="root", iotHubs=["hub2.example"])
    moved = env.provision(dev).body["registrationState"]
    assert (moved["assignedHub"], moved["substatus"]) == ("hub2.example", MIGRATED)
    assert moved["createdDateTimeUtc"] == first["createdDateTimeUtc"]
    assert moved["etag"] != first["etag"]
    env.group("g1", ca_name="root", iotHubs=["hub1.example"],
              reprovisionPolicy={"updateHubAssignment": False, "migrateDeviceData": True})
    stays = env.provision(dev).body["registrationState"]
    assert stays["assignedHub"] == "hub2.example"
    env.group("g1", ca_name="root", iotHubs=["hub1.example"])
    back = env.provision(dev).body["registrationState"]
    assert (back["assignedHub"], back["substatus"]) == ("hub1.example", "reprovisionedToInitialAssignment")


def test_individual_enrollment_device_id_and_self_signed(env):
    selfie = TestCA.self_signed_leaf("selfie")
    assert env.enroll(selfie, deviceId="my-device").status == 200
    done = env.provision(selfie)
    assert done.body["registrationState"]["deviceId"] == "my-device"


def test_state_survives_reopen(env, cas):
    root, inter = cas
    env.upload_ca("root", root.cert)
    env.group("g1", ca_name="root")
    dev = inter.issue_leaf("dev")
    op = env.register(dev).body["operationId"]
    env.reopen()
    done = env.poll(dev, op)
    assert done.status == 200 and done.body["status"] == "assigned"
    assert env.provision(inter.issue_leaf("dev2")).status == 200


def test_unexpected_failure_is_a_500_reply(env, cas):
    class Broken:
        def walk_view(self):
            raise RuntimeError("boom")
    api = DeviceApi(Broken(), env.config)
    dev = cas[1].issue_leaf("dev")
    reply = api.register(SCOPE, "dev", API, dev.chain, b"")
    assert reply.status == 500 and reply.body["errorCode"] == 500000


def test_five_device_example_through_the_apis(env):
    root = TestCA("Test Root")
    a, b = root.issue_intermediate("A"), root.issue_intermediate("B")
    devices = [a.issue_leaf(f"device-{i}") for i in (1, 2, 3)] + [b.issue_leaf(f"device-{i}") for i in (4, 5)]
    env.upload_ca("root", root.cert)
    env.group("root-group", ca_name="root")

    def outcomes():
        return [env.provision(d, chain=d.chain).body["status"] for d in devices]

    assert outcomes() == ["assigned"] * 5
    env.group("b-group", ca_cert=b.cert, status="disabled")
    assert outcomes() == ["assigned"] * 3 + ["disabled"] * 2
    env.enroll(devices[2], status="disabled")
    assert outcomes() == ["assigned", "assigned", "disabled", "disabled", "disabled"]
    env.call("DELETE", "/enrollmentGroups/b-group")
    assert outcomes() == ["assigned", "assigned", "disabled", "assigned", "assigned"]


def test_missing_intermediate_fails_full_chain_passes(env):
    root = TestCA("Test Root")
    int1 = root.issue_intermediate("Int1")
    int2 = int1.issue_intermediate("Int2")
    dev = int2.issue_leaf("dev")
    env.upload_ca("root", root.cert)
    env.group("g2", ca_cert=int2.cert)
    assert_error(env.provision(dev, chain=[dev.cert, int2.cert]), 401002)
    assert env.provision(dev, chain=[dev.cert, int2.cert, int1.cert]).body["status"] == "assigned"
    assert env.provision(dev, chain=[dev.cert, int2.cert, int1.cert, root.cert]).status == 200

"""Custom allocation in the core: the operation stays `assigning` until the webhook's
answer arrives through the `WebhookCaller` interface, and what each answer decides.

The caller here holds each call until the test answers it, the way the server's worker
pool answers later from another thread; the HTTP side is tested end to end in
tests/stub_server/test_webhook.py.
"""

import json

import pytest

from device_sim.stub.core.webhook import WebhookAnswer
from device_sim.testing import TestCA

from .env import Env

HOOK = {"webhookUrl": "https://hooks.example/allocate?code=key", "apiVersion": "2021-10-01"}


class HeldCaller:
    def __init__(self):
        self.calls = []

    def submit(self, call, done):
        self.calls.append((call, done))

    def answer(self, index=-1, status=200, body=None, **document):
        call, done = self.calls[index]
        raw = body if body is not None else json.dumps(document).encode()
        done(WebhookAnswer(status, raw))
        return call.document


@pytest.fixture
def env(tmp_path):
    env = Env(tmp_path)
    env.hooks = HeldCaller()
    env.device.webhooks = env.hooks
    return env


def custom_device(env, cn="dev-c", **extra):
    device = TestCA.self_signed_leaf(cn)
    reply = env.enroll(device, allocationPolicy="custom", customAllocationDefinition=HOOK, **extra)
    assert reply.status == 200, reply
    return device


def start(env, device, payload=None):
    body = json.dumps({"payload": payload}).encode() if payload is not None else b""
    first = env.register(device, body=body)
    assert first.status == 202 and first.body["status"] == "assigning"
    return first.body["operationId"]


def test_polls_read_assigning_until_the_webhook_answers(env):
    device = custom_device(env)
    operation = start(env, device, {"model": "m"})
    for _ in range(3):
        env.clock.now += 5  # however long it takes: no deadline of the core's own
        reply = env.poll(device, operation)
        assert (reply.status, reply.body["status"]) == (202, "assigning")
    request = env.hooks.answer(iotHubHostName="hub2.example", payload={"k": 1})
    assert request["deviceRuntimeContext"]["payload"] == {"model": "m"}
    assert request["individualEnrollment"]["customAllocationDefinition"]["webhookUrl"] == \
        "https://hooks.example/allocate?****"
    reply = env.poll(device, operation)
    assert reply.status == 200 and reply.body["status"] == "assigned"
    assert reply.body["registrationState"]["payload"] == {"k": 1}
    assert reply.body["registrationState"]["assignedHub"] == "hub2.example"


def test_an_operation_pending_when_the_process_stopped_ends_failed(env):
    device = custom_device(env)
    operation = start(env, device)
    env.reopen()  # a new DeviceApi: the webhook's answer went with the old process
    reply = env.poll(device, operation)
    assert reply.status == 200 and reply.body["status"] == "failed"
    assert reply.body["registrationState"]["errorCode"] == 400209
    assert "register again" in reply.body["registrationState"]["errorMessage"]


def test_without_a_webhook_client_the_registration_fails(env):
    env.device.webhooks = None
    device = custom_device(env)
    reply = env.poll(device, start(env, device))
    state = reply.body["registrationState"]
    assert (reply.body["status"], state["errorCode"]) == ("failed", 400209)
    assert "without a webhook client" in state["errorMessage"]


def test_linked_hubs_are_the_entry_hubs_and_the_answer_must_name_one(env):
    device = custom_device(env, iotHubs=["hub2.example"])
    operation = start(env, device)
    request = env.hooks.answer(iotHubHostName="HUB1.example")
    assert request["linkedHubs"] == ["hub2.example"]
    state = env.poll(device, operation).body["registrationState"]
    assert state["errorCode"] == 400209
    assert state["errorMessage"] == ("Custom allocation failed: the webhook chose IoT hub 'HUB1.example', "
                                     "which is not one of the linked hubs (hub2.example)")
    operation = start(env, device)
    env.hooks.answer(iotHubHostName="HUB2.EXAMPLE")  # host names compare without case
    assert env.poll(device, operation).body["registrationState"]["assignedHub"] == "hub2.example"


@pytest.mark.parametrize("body, words", [
    (b'{"iotHubHostName": "hub1.example", "payload": {"x": NaN}}', "not JSON"),
    (b'{"iotHubHostName": "hub1.example", "payload": ' + b'[' * 40 + b']' * 40 + b'}', "deeper than 32"),
    (b'["hub1.example"]', "not a JSON object"),
    (b'{"payload": {}}', "no iotHubHostName"),
    (b'{"iotHubHostName": "hub1.example", "payload": [1]}', "payload is not a JSON object"),
    (b'{"iotHubHostName": "hub1.example", "initialTwin": "x"}', "initialTwin is not a JSON object"),
])
def test_answers_the_store_could_not_keep_fail_cleanly(env, body, words):
    device = custom_device(env)
    operation = start(env, device)
    env.hooks.answer(body=body)
    reply = env.poll(device, operation)
    assert reply.status == 200 and reply.body["status"] == "failed"
    assert words in reply.body["registrationState"]["errorMessage"]


def test_a_newer_register_call_wins_over_a_late_answer(env):
    device = custom_device(env)
    older = start(env, device)
    newer = start(env, device)
    env.hooks.answer(0, iotHubHostName="hub1.example")  # the older call answers last-but-one
    assert env.poll(device, older).status == 404
    assert env.poll(device, newer).body["status"] == "assigning"
    env.hooks.answer(1, iotHubHostName="hub2.example")
    assert env.poll(device, newer).body["registrationState"]["assignedHub"] == "hub2.example"


def test_the_twin_goes_to_the_hub_on_first_assignment_and_on_a_resetting_move(env):
    enrollment_twin = {"tags": {"from": "enrollment"}}
    device = custom_device(env, initialTwin=enrollment_twin,
                           reprovisionPolicy={"updateHubAssignment": True, "migrateDeviceData": False})

    def register(hub, twin):
        operation = start(env, device)
        env.hooks.answer(iotHubHostName=hub, initialTwin=twin)
        state = env.poll(device, operation).body["registrationState"]
        record = env.call("GET", "/registrations/dev-c").body
        return state["substatus"], record.get("initialTwin")

    assert register("hub1.example", None) == ("initialAssignment", enrollment_twin)  # null: the entry's
    assert register("hub2.example", {"tags": {"n": 2}}) == ("deviceDataReset", {"tags": {"n": 2}})
    # same hub: the hub keeps the device's twin, the webhook's is ignored
    assert register("hub2.example", {"tags": {"n": 3}})[1] == {"tags": {"n": 2}}


def test_a_disabled_custom_entry_calls_no_webhook(env):
    device = custom_device(env, status="disabled")
    reply = env.poll(device, start(env, device))
    assert reply.body["status"] == "disabled" and env.hooks.calls == []


def test_a_csr_is_issued_once_the_webhook_has_chosen_the_hub(env, tmp_path):
    from device_sim.stub.issuing_ca import generated_issuer

    from .test_issuance import API as ISSUANCE_API, csr_b64

    env.device.issuer = generated_issuer(tmp_path / "issuing")
    device = custom_device(env, credentialPolicyName="default")
    body = json.dumps({"csr": csr_b64("dev-c")}).encode()
    first = env.register(device, body=body, api=ISSUANCE_API)
    assert first.status == 202
    operation = first.body["operationId"]
    assert env.poll(device, operation).body["status"] == "assigning"
    env.hooks.answer(iotHubHostName="hub1.example")
    state = env.poll(device, operation).body["registrationState"]
    assert state["assignedHub"] == "hub1.example" and len(state["issuedCertificateChain"]) >= 2
    assert "issuedCertificateChain" not in env.call("GET", "/registrations/dev-c").body

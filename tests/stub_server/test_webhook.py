"""Custom allocation end to end: the emulator as `stub serve` assembles it, devices over
mTLS HTTPS (`requests`) and MQTT (paho), and a real webhook on loopback over HTTPS (a
test CA the emulator is told to trust) and plain HTTP."""

from __future__ import annotations

import json
import queue
import ssl
import threading
import time

import paho.mqtt.client as mqtt
import pytest
import requests
from device_sim.mqtt import topics
from device_sim.stub import server
from device_sim.stub.core import sas
from device_sim.stub.core.config import Hub
from device_sim.stub.net.mqtt import listener_factory
from device_sim.stub.net.server_pki import ensure_server_identity
from device_sim.testing import pem

from .emulator_proc import API, cli
from .webhook_server import HUB_A, HUB_B, Webhook

TIMEOUT = 2.0  # the emulator's --webhook-timeout in these tests


def _pem(cert) -> str:
    return pem(cert).decode()


class Stub:
    def __init__(self, home, trust):
        options = server.ServeOptions(home=home, port=0, service_port=0, retry_after=0,
                                      hubs=[Hub(HUB_A), Hub(HUB_B)], webhook_trust=trust,
                                      webhook_timeout=TIMEOUT)
        self.logged: list[str] = []
        self.server = server.StubServer(options, [listener_factory(0)], log=self.logged.append)
        self.ready = self.server.start()
        self.home = home

    def service(self, method, path, doc=None, ok=True):
        api = self.server.app.service_api
        token = sas.make_token(self.server.app.config.service_host, api.service_key)
        body = json.dumps(doc).encode() if doc is not None else b""
        reply = api.handle(method, path, {"api-version": "2021-10-01"},
                           {"Authorization": token, "Content-Type": "application/json"}, body)
        if ok:
            assert reply.status < 300, (method, path, reply.status, reply.body)
        return reply

    def individual(self, registration_id, cert, webhook_url, **extra):
        self.service("PUT", f"/enrollments/{registration_id}", {
            "registrationId": registration_id,
            "attestation": {"type": "x509", "x509": {"clientCertificates": {"primary": {"certificate": _pem(cert)}}}},
            "allocationPolicy": "custom",
            "customAllocationDefinition": {"webhookUrl": webhook_url, "apiVersion": "2021-10-01"},
            **extra})

    def record(self, registration_id):
        return self.service("GET", f"/registrations/{registration_id}").body


@pytest.fixture(scope="module")
def webhook_tls(tmp_path_factory):
    return ensure_server_identity(tmp_path_factory.mktemp("webhook-tls"))


@pytest.fixture(scope="module")
def https_hook(webhook_tls):
    hook = Webhook((webhook_tls.cert, webhook_tls.key))
    yield hook
    hook.close()


@pytest.fixture(scope="module")
def http_hook():
    hook = Webhook()
    yield hook
    hook.close()


@pytest.fixture(scope="module")
def stub(tmp_path_factory, file_cas, webhook_tls, https_hook):
    stub = Stub(tmp_path_factory.mktemp("webhook-home"), webhook_tls.ca_cert)
    stub.service("PUT", "/certificates/root", {"properties": {"certificate": _pem(file_cas.root.cert),
                                                              "isVerified": True}})
    stub.service("PUT", "/enrollmentGroups/custom-line", {
        "enrollmentGroupId": "custom-line",
        "attestation": {"type": "x509", "x509": {"signingCertificates": {"primary": {
            "certificate": _pem(file_cas.inter2.cert)}}}},
        "allocationPolicy": "custom",
        "customAllocationDefinition": {"webhookUrl": https_hook.url("/choose"), "apiVersion": "2021-10-01"}})
    yield stub
    stub.server.close()


def identity(file_cas, tmp_path, registration_id):
    return file_cas.device(registration_id).write(tmp_path, registration_id)


def https_register(stub, registration_id, files, payload=None, deadline=15.0):
    """Register and poll until terminal; (final body, how many polls answered 202)."""
    url = f"{stub.ready['device_url']}/{stub.ready['id_scope']}/registrations/{registration_id}"
    body = {"registrationId": registration_id}
    if payload is not None:
        body["payload"] = payload
    polls = 0
    tls = {"cert": files, "verify": stub.ready["ca_cert"], "timeout": 10}  # per request: env vars
    with requests.Session() as session:                                   # override a session's
        response = session.put(f"{url}/register?api-version={API}", json=body, **tls)
        assert response.status_code == 202, response.text
        operation = response.json()["operationId"]
        end = time.monotonic() + deadline
        while time.monotonic() < end:
            response = session.get(f"{url}/operations/{operation}?api-version={API}", **tls)
            if response.status_code != 202:
                return response.json(), polls
            polls += 1
            time.sleep(0.05)
    raise AssertionError(f"{registration_id} still assigning after {deadline} s")


def mqtt_register(stub, registration_id, files, payload):
    answers: queue.Queue = queue.Queue()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=registration_id, protocol=mqtt.MQTTv311)
    client.tls_set(ca_certs=stub.ready["ca_cert"], certfile=str(files[0]), keyfile=str(files[1]),
                   tls_version=ssl.PROTOCOL_TLS_CLIENT)
    client.username_pw_set(topics.format_username(stub.ready["id_scope"], registration_id, API))
    client.on_message = lambda _client, _userdata, message: answers.put(message)
    port = int(stub.ready["mqtt_url"].rsplit(":", 1)[1])
    client.connect("127.0.0.1", port, keepalive=30)
    client.loop_start()
    try:
        client.subscribe(topics.RESPONSE_FILTER, qos=1)
        body = json.dumps({"registrationId": registration_id, "payload": payload}).encode()
        client.publish(topics.format_register("1"), body, qos=1)
        document = json.loads(answers.get(timeout=10).payload)
        for rid in range(2, 200):
            if document["status"] != "assigning":
                return document
            time.sleep(0.05)
            client.publish(topics.format_status(str(rid), document["operationId"]), b" ", qos=1)
            message = answers.get(timeout=10)
            assert topics.parse_response(message.topic).status in (200, 202)
            document = json.loads(message.payload)
        raise AssertionError("still assigning")
    finally:
        client.disconnect()
        client.loop_stop()


def test_webhook_chooses_the_hub_and_its_payload_reaches_the_device_over_https_and_mqtt(
        stub, file_cas, tmp_path, https_hook):
    body, _ = https_register(stub, "dev-hook-a", identity(file_cas, tmp_path, "dev-hook-a"), {"model": "m1"})
    assert body["status"] == "assigned", body
    state = body["registrationState"]
    assert state["assignedHub"] == HUB_A and state["substatus"] == "initialAssignment"
    assert state["payload"] == {"for": "dev-hook-a", "call": 1}

    body = mqtt_register(stub, "dev-hook-b", identity(file_cas, tmp_path, "dev-hook-b"), {"model": "m2"})
    assert body["status"] == "assigned", body
    assert body["registrationState"]["assignedHub"] == HUB_B
    assert body["registrationState"]["payload"] == {"for": "dev-hook-b", "call": 1}

    [(path, request)] = https_hook.received("dev-hook-a")
    assert path == "/choose"
    group = request["enrollmentGroup"]
    assert group["enrollmentGroupId"] == "custom-line" and group["allocationPolicy"] == "custom"
    # the function key in the URL's query is masked in the record the webhook sees
    assert group["customAllocationDefinition"]["webhookUrl"] == f"{https_hook.base}/choose?****"
    context = request["deviceRuntimeContext"]
    assert context["registrationId"] == "dev-hook-a" and context["payload"] == {"model": "m1"}
    assert "currentIotHubHostName" not in context and "currentDeviceId" not in context
    # the webhook sees the certificates the device presented
    assert context["x509"]["certificateInfo"]["subjectName"] == "CN=dev-hook-a"
    assert len(context["x509"]["certificateInfo"]["sha256Thumbprint"]) == 64
    assert context["x509"]["signingCertificateInfo"]["subjectName"] == "CN=stub-test-inter2"
    assert context["x509"]["enrollmentGroupId"] == "custom-line"
    assert sorted(request["linkedHubs"]) == sorted([HUB_A, HUB_B])
    assert "individualEnrollment" not in request

    record = stub.record("dev-hook-a")
    assert record["assignedHub"] == HUB_A and record["payload"] == {"for": "dev-hook-a", "call": 1}
    assert record["initialTwin"] == {"tags": {"chosenBy": "webhook"}, "properties": {"desired": {"call": 1}}}


def test_re_registration_tells_the_webhook_the_current_hub_and_device(stub, file_cas, tmp_path, https_hook):
    files = identity(file_cas, tmp_path, "dev-again-a")
    first, _ = https_register(stub, "dev-again-a", files)
    second, _ = https_register(stub, "dev-again-a", files)
    assert first["status"] == second["status"] == "assigned"
    assert second["registrationState"]["payload"] == {"for": "dev-again-a", "call": 2}
    (_, initial), (_, again) = https_hook.received("dev-again-a")
    assert "currentIotHubHostName" not in initial["deviceRuntimeContext"]
    assert again["deviceRuntimeContext"]["currentIotHubHostName"] == HUB_A
    assert again["deviceRuntimeContext"]["currentDeviceId"] == "dev-again-a"


def test_never_reprovision_keeps_the_hub_and_refreshes_the_payload(stub, file_cas, tmp_path, http_hook):
    leaf = file_cas.device("dev-never")
    stub.individual("dev-never", leaf.cert, http_hook.url("/flip"),
                    reprovisionPolicy={"updateHubAssignment": False, "migrateDeviceData": True})
    files = leaf.write(tmp_path, "dev-never")
    first, _ = https_register(stub, "dev-never", files)
    assert first["registrationState"]["assignedHub"] == HUB_A
    second, _ = https_register(stub, "dev-never", files)  # /flip now answers hub-b
    state = second["registrationState"]
    assert second["status"] == "assigned" and state["assignedHub"] == HUB_A
    assert state["payload"] == {"for": "dev-never", "call": 2}
    (_, initial), (_, again) = http_hook.received("dev-never")
    assert "individualEnrollment" in initial and sorted(initial["linkedHubs"]) == sorted([HUB_A, HUB_B])
    assert again["linkedHubs"] == [HUB_A]  # only the hub it stays on
    assert again["deviceRuntimeContext"]["currentIotHubHostName"] == HUB_A
    # the twin is the one from the first assignment: the hub kept the device's twin
    assert stub.record("dev-never")["initialTwin"]["properties"]["desired"]["call"] == 1


@pytest.mark.parametrize("path, message", [
    ("/status/500", "Custom allocation failed with status code: 500"),
    ("/status/401", "Custom allocation failed with status code: 401"),
    ("/notjson", "Custom allocation failed: the webhook's answer is not JSON"),
    ("/unlinked", "Custom allocation failed: the webhook chose IoT hub 'elsewhere.example.net', "
                  "which is not one of the linked hubs"),
    ("/slow/4", f"Custom allocation failed: the webhook did not answer within {TIMEOUT:g} s"),
    ("/trickle/0.3", f"Custom allocation failed: the webhook did not answer within {TIMEOUT:g} s"),
])
def test_each_webhook_failure_fails_the_registration_with_400209(stub, file_cas, tmp_path, http_hook, path, message):
    registration_id = "dev-fail-" + path.strip("/").replace("/", "-")
    leaf = file_cas.device(registration_id)
    stub.individual(registration_id, leaf.cert, http_hook.url(path))
    started = time.monotonic()
    body, _ = https_register(stub, registration_id,
                             leaf.write(tmp_path, registration_id))
    assert time.monotonic() - started < TIMEOUT + 1.5  # the trickle alone would take ~40 s
    assert body["status"] == "failed", body
    state = body["registrationState"]
    assert state["errorCode"] == 400209 and state["errorMessage"].startswith(message), state
    assert "assignedHub" not in state
    assert "function-key-secret" not in state["errorMessage"]
    record = stub.record(registration_id)
    assert (record["status"], record["errorCode"]) == ("failed", 400209)


def test_unreachable_or_untrusted_webhooks_fail_without_naming_the_key(stub, file_cas, tmp_path, webhook_tls):
    plain = Webhook()  # HTTPS asked of a plain HTTP server: the TLS handshake fails
    untrusted_tls = ensure_server_identity(tmp_path / "other-ca")
    untrusted = Webhook((untrusted_tls.cert, untrusted_tls.key))
    try:
        cases = {"dev-unreach-tls": plain.url("/choose").replace("http://", "https://"),
                 "dev-unreach-ca": untrusted.url("/choose"),
                 "dev-unreach-port": "http://127.0.0.1:9/choose?code=function-key-secret"}
        for registration_id, url in cases.items():
            leaf = file_cas.device(registration_id)
            stub.individual(registration_id, leaf.cert, url)
            body, _ = https_register(stub, registration_id, leaf.write(tmp_path, registration_id))
            state = body["registrationState"]
            assert (body["status"], state["errorCode"]) == ("failed", 400209), body
            assert state["errorMessage"].startswith("Custom allocation failed: ")
            assert "function-key-secret" not in state["errorMessage"]
        assert "--webhook-trust" in stub.record("dev-unreach-ca")["errorMessage"]
        assert not any("function-key-secret" in line for line in stub.logged)
    finally:
        plain.close()
        untrusted.close()


def test_devices_poll_while_a_slow_webhook_runs_and_others_are_not_held_up(stub, file_cas, tmp_path, http_hook):
    leaf = file_cas.device("dev-slow-a")
    stub.individual("dev-slow-a", leaf.cert, http_hook.url("/slow/1.2"))
    files = leaf.write(tmp_path, "dev-slow-a")
    outcome = {}
    worker = threading.Thread(target=lambda: outcome.update(result=https_register(stub, "dev-slow-a", files)))
    started = time.monotonic()
    worker.start()
    time.sleep(0.2)
    # another device (the group's fast webhook) is served while the slow one is called
    fast, _ = https_register(stub, "dev-fast-b", identity(file_cas, tmp_path, "dev-fast-b"))
    fast_done = time.monotonic() - started
    worker.join(15)
    body, polls = outcome["result"]
    assert fast["status"] == "assigned" and fast_done < 1.1, fast_done
    assert body["status"] == "assigned" and body["registrationState"]["assignedHub"] == HUB_A
    assert polls >= 5  # the device kept polling, answered 202 assigning each time


def test_enrollment_validation_of_custom_allocation(stub, file_cas):
    leaf = file_cas.device("dev-invalid")

    def put(**extra):
        return stub.service("PUT", "/enrollments/dev-invalid", {
            "registrationId": "dev-invalid", "allocationPolicy": "custom",
            "attestation": {"type": "x509", "x509": {"clientCertificates": {"primary": {
                "certificate": _pem(leaf.cert)}}}}, **extra}, ok=False)

    for extra, words in [({}, "customAllocationDefinition"),
                         ({"customAllocationDefinition": {"webhookUrl": "ftp://x/y", "apiVersion": "2021-10-01"}},
                          "http:// or https://"),
                         ({"customAllocationDefinition": {"webhookUrl": "https://x/y"}}, "apiVersion"),
                         ({"customAllocationDefinition": {"webhookUrl": "https://x/y", "apiVersion": "2018-04-01"}},
                          "2018-09-01")]:
        reply = put(**extra)
        assert (reply.status, reply.body["errorCode"]) == (400, 400000), reply
        assert words in reply.body["message"]
    reply = put(customAllocationDefinition={"webhookUrl": "https://x/y", "apiVersion": "2018-09-01-preview"})
    assert reply.status == 200 and reply.body["allocationPolicy"] == "custom"


def test_admin_verbs_create_custom_entries(stub, file_cas, tmp_path, http_hook):
    cert = tmp_path / "dev-cli.pem"
    cert.write_bytes(file_cas.device("dev-cli").cert_pem)
    result = cli("stub", "enroll", "create", "dev-cli", "--cert", cert, "--allocation", "custom",
                 "--webhook-url", http_hook.url("/choose"), "--json", "--home", stub.home)
    record = json.loads(result.stdout)
    assert record["allocationPolicy"] == "custom"
    assert record["customAllocationDefinition"] == {"webhookUrl": http_hook.url("/choose"), "apiVersion": "2021-10-01"}
    (tmp_path / "inter1.pem").write_bytes(file_cas.inter1.cert_pem)
    result = cli("stub", "group", "create", "cli-group", "--cert", tmp_path / "inter1.pem", "--allocation", "custom",
                 "--webhook-url", http_hook.url("/choose"), "--webhook-api-version", "2019-03-31", "--json",
                 "--home", stub.home)
    assert json.loads(result.stdout)["customAllocationDefinition"]["apiVersion"] == "2019-03-31"
    refused = cli("stub", "enroll", "create", "dev-cli", "--cert", cert, "--allocation", "custom",
                  "--home", stub.home, check=False)
    assert refused.returncode == 2 and "--webhook-url" in refused.stderr
    refused = cli("stub", "enroll", "create", "dev-cli", "--cert", cert, "--webhook-url", "http://x/",
                  "--home", stub.home, check=False)
    assert refused.returncode == 2 and "--allocation custom" in refused.stderr
    refused = cli("stub", "enroll", "create", "dev-cli", "--cert", cert, "--allocation", "custom",
                  "--webhook-url", "ftp://x/", "--home", stub.home, check=False)
    assert refused.returncode == 3 and "http:// or https://" in refused.stderr


def test_serve_refuses_a_bad_webhook_trust_file_or_timeout(tmp_path):
    (tmp_path / "not-a-cert.pem").write_text("hello")
    result = cli("stub", "serve", "--home", tmp_path / "home", "--webhook-trust", tmp_path / "not-a-cert.pem",
                 check=False)
    assert result.returncode == 2 and "--webhook-trust" in result.stderr and "Traceback" not in result.stderr
    result = cli("stub", "serve", "--home", tmp_path / "home", "--webhook-timeout", "0", check=False)
    assert result.returncode == 2 and "--webhook-timeout" in result.stderr

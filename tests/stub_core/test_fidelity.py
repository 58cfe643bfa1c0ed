"""Fidelity of the emulator's answers: the leaf CN is the registration ID of an individual
enrollment, disabled and 401 answers name the deciding entry, every reply has a request ID,
Location is absolute when the request named its host."""

import pytest

from device_sim.stub.core.device_api import location

from device_sim.testing import TestCA

from .env import API, SCOPE, Env, pem
from .test_device_api import assert_error


@pytest.fixture
def env(tmp_path):
    return Env(tmp_path)


def test_an_individual_enrollment_must_carry_its_own_certificate(env):
    other = TestCA.self_signed_leaf("someone-else")
    reply = env.enroll(other, registration_id="dev")
    assert_error(reply, 400000)
    assert "'someone-else'" in reply.body["message"] and "registration ID is its CN" in reply.body["message"]
    assert_error(env.call("GET", "/enrollments/dev"), 404201)
    mine = TestCA.self_signed_leaf("Dev")
    assert env.enroll(mine, registration_id="dev").status == 200   # IDs are case-insensitive
    body = env.call("GET", "/enrollments/dev").body
    body["attestation"]["x509"]["clientCertificates"]["secondary"] = {"certificate": pem(other.cert)}
    reply = env.call("PUT", "/enrollments/dev", body)
    assert_error(reply, 400000)
    assert "clientCertificates.secondary" in reply.body["message"]


def test_a_bulk_create_reports_a_foreign_certificate_per_item(env):
    other = TestCA.self_signed_leaf("other")
    item = {"registrationId": "dev", "attestation": {"type": "x509", "x509": {
        "clientCertificates": {"primary": {"certificate": pem(other.cert)}}}}}
    done = env.call("POST", "/enrollments", {"mode": "create", "enrollments": [item]})
    assert done.body["isSuccessful"] is False
    assert "registration ID is its CN" in done.body["errors"][0]["errorStatus"]


def test_disabled_answers_name_the_entry(env):
    root = TestCA("Test Root")
    inter = root.issue_intermediate("I")
    env.upload_ca("root", root.cert)
    env.group("line", ca_name="root", status="disabled")
    done = env.provision(inter.issue_leaf("dev-1"))
    assert done.status == 200 and done.body["status"] == "disabled"
    assert done.body["registrationState"]["errorMessage"] == "enrollment group 'line' is disabled"
    record = env.call("GET", "/registrations/dev-1").body
    assert record["errorMessage"] == "enrollment group 'line' is disabled"
    selfie = TestCA.self_signed_leaf("selfie")
    env.enroll(selfie, status="disabled")
    state = env.provision(selfie).body["registrationState"]
    assert state["errorMessage"] == "individual enrollment 'selfie' is disabled"


def test_a_401_names_the_entry_that_matched(env):
    root = TestCA("Test Root")
    inter = root.issue_intermediate("I")
    env.upload_ca("root", root.cert, verified=False)
    env.group("line", ca_name="root")
    reply = env.provision(inter.issue_leaf("dev"))
    assert_error(reply, 401002)
    assert "enrollment group 'line'" in reply.body["message"] and "verified" in reply.body["message"]
    nobody = env.provision(TestCA.self_signed_leaf("nobody"))
    assert_error(nobody, 401002)
    assert nobody.body["message"] and "no enrollment" in nobody.body["message"]


def test_every_reply_has_a_request_id(env):
    dev = TestCA.self_signed_leaf("dev")
    replies = [env.call("GET", "/certificates"), env.enroll(dev),
               env.call("POST", "/enrollments/query", {"query": "*"}),
               env.call("GET", "/nothing"), env.call("GET", "/certificates", token=False)]
    first = env.register(dev)
    replies += [first, env.poll(dev, first.body["operationId"]),
                env.device.registration_status(SCOPE, "dev", API, dev.chain, b""),
                env.register(dev, registration_id="other"),
                env.call("DELETE", "/registrations/dev")]
    ids = [r.headers.get("x-ms-request-id") for r in replies]
    assert all(ids) and len(set(ids)) == len(ids), replies
    error = env.call("GET", "/nothing")
    assert error.headers["x-ms-request-id"] == error.body["trackingId"]


def test_location_is_absolute_when_the_host_is_known(env):
    dev = TestCA.self_signed_leaf("dev")
    env.enroll(dev)
    reply = env.device.register(SCOPE, "dev", API, dev.chain, b"", host="localhost:8443")
    assert reply.headers["Location"] == f"https://localhost:8443/{SCOPE}/registrations/dev/register"
    assert env.register(dev).headers["Location"] == f"/{SCOPE}/registrations/dev/register"
    for host in ("evil.example\r\nX-Injected: 1", "a b", "x/y", "", "[::1]x"):
        assert location(host, "/p") == "/p", host
    assert location("[::1]:443", "/p") == "https://[::1]:443/p"
    assert location("127.0.0.3", "/p") == "https://127.0.0.3/p"

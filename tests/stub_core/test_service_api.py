"""The service API: SAS, routing, CA proof of possession, enrollments, registrations."""

import pytest

from device_sim.stub.core.sas import make_token

from device_sim.testing import TestCA

from .env import KEY, Env, b64_der, b64_pem, pem
from .test_device_api import assert_error


@pytest.fixture
def env(tmp_path):
    return Env(tmp_path)


def test_sas_required_and_checked(env):
    assert_error(env.call("GET", "/certificates", token=False), 401000)
    now = env.clock()
    bad = {
        "expired": make_token("localhost", KEY, ttl=-1, now=now),
        "other key": make_token("localhost", b"x" * 32, now=now),
        "other host": make_token("elsewhere", KEY, now=now),
        "other policy": make_token("localhost", KEY, policy="registration", now=now),
        "garbage": "Bearer abc",
    }
    for name, token in bad.items():
        reply = env.call("GET", "/certificates", headers={"Authorization": token}, token=False)
        assert reply.status == 401, name
    good = make_token("LOCALHOST/certificates", KEY, now=now)
    assert env.call("GET", "/certificates", headers={"Authorization": good}, token=False).status == 200
    assert env.call("PUT", "/enrollments/x", {}, headers={"Authorization": good},
                    token=False).status == 401
    env.clock.now += 7200
    assert env.call("GET", "/certificates", headers={"Authorization": good}, token=False).status == 401


def test_routing_and_bad_requests(env):
    assert_error(env.call("GET", "/nothing/here"), 404000)
    reply = env.call("PATCH", "/certificates/x")
    assert_error(reply, 405000)
    assert "PUT" in reply.headers["Allow"]
    assert_error(env.call("GET", "/certificates", query={}), 400001)
    assert_error(env.call("PUT", "/enrollments/dev", b"{not json"), 400000)
    assert_error(env.call("PUT", "/enrollments/dev", b"[]"), 400000)
    assert_error(env.call("PUT", "/enrollments/dev", b"x" * (97 * 1024)), 413000)
    assert_error(env.call("GET", "/enrollments/nobody"), 404201)
    assert_error(env.call("GET", "/registrations/nobody"), 404202)
    assert_error(env.call("GET", "/certificates/nobody"), 404204)


def test_certificate_formats(env):
    root = TestCA("Test Root")
    for i, text in enumerate([pem(root.cert), b64_pem(root.cert), b64_der(root.cert)]):
        reply = env.call("PUT", f"/certificates/c{i}", {"properties": {"certificate": text}})
        assert reply.status == 200, reply
        env.call("DELETE", f"/certificates/c{i}")
    for text in ["", "not a cert", "QUJD", 42, "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----"]:
        assert_error(env.call("PUT", "/certificates/bad", {"properties": {"certificate": text}}), 400000)
    leaf = root.issue_leaf("dev")
    assert_error(env.call("PUT", "/certificates/leaf", {"properties": {"certificate": pem(leaf.cert)}}), 400000)
    assert_error(env.call("PUT", "/certificates/bad name", {"properties": {"certificate": pem(root.cert)}}), 400000)


def test_proof_of_possession(env):
    root = TestCA("Test Root")
    reply = env.upload_ca("root", root.cert, verified=False)
    props = reply.body["properties"]
    assert props["isVerified"] is False and props["subject"] == "CN=Test Root"
    etag = reply.body["etag"]
    # verify before any code: refused
    assert_error(env.call("POST", "/certificates/root/verify",
                          {"certificate": pem(root.issue_leaf("whatever").cert)}), 400000)
    assert_error(env.call("POST", "/certificates/root/generateVerificationCode",
                          headers={"If-Match": "stale"}), 412002)
    coded = env.call("POST", "/certificates/root/generateVerificationCode", headers={"If-Match": etag})
    code = coded.body["properties"]["verificationCode"]
    assert code and coded.body["etag"] != etag
    wrong_cn = root.issue_leaf("not-the-code")
    assert_error(env.call("POST", "/certificates/root/verify", {"certificate": pem(wrong_cn.cert)}), 400000)
    other_key = TestCA("Test Root").issue_leaf(code)   # same issuer name, different key
    reply = env.call("POST", "/certificates/root/verify", {"certificate": pem(other_key.cert)})
    assert_error(reply, 400000)
    assert "private key" in reply.body["message"]
    good = root.issue_leaf(code)
    done = env.call("POST", "/certificates/root/verify", {"certificate": b64_der(good.cert)})
    assert done.status == 200 and done.body["properties"]["isVerified"] is True
    # the code is used up
    assert_error(env.call("POST", "/certificates/root/verify", {"certificate": pem(good.cert)}), 400000)
    assert env.call("GET", "/certificates/root").body["properties"]["isVerified"] is True
    assert [c["name"] for c in env.call("GET", "/certificates").body["value"]] == ["root"]


def test_verified_ca_admits_devices_only_after_verification(env):
    root = TestCA("Test Root")
    env.upload_ca("root", root.cert, verified=False)
    env.group("g", ca_name="root")
    dev = root.issue_intermediate("I").issue_leaf("dev")
    assert env.provision(dev).status == 401
    code = env.call("POST", "/certificates/root/generateVerificationCode").body["properties"]["verificationCode"]
    env.call("POST", "/certificates/root/verify", {"certificate": pem(root.issue_leaf(code).cert)})
    assert env.provision(dev).status == 200


def test_certificate_if_match_and_delete(env):
    root = TestCA("Test Root")
    first = env.upload_ca("root", root.cert)
    replace = {"properties": {"certificate": pem(root.cert), "isVerified": False}}
    assert_error(env.call("PUT", "/certificates/root", replace), 412002)
    assert_error(env.call("PUT", "/certificates/root", replace, headers={"If-Match": "nope"}), 412002)
    second = env.call("PUT", "/certificates/root", replace, headers={"If-Match": first.body["etag"]})
    assert second.status == 200 and second.body["properties"]["isVerified"] is False
    assert_error(env.call("PUT", "/certificates/copy", replace), 409000)
    env.group("g", ca_name="root")
    assert_error(env.call("DELETE", "/certificates/root"), 409000)
    env.call("DELETE", "/enrollmentGroups/g")
    assert_error(env.call("DELETE", "/certificates/root", headers={"If-Match": first.body["etag"]}), 412002)
    assert env.call("DELETE", "/certificates/root", headers={"If-Match": second.body["etag"]}).status == 204
    assert_error(env.call("DELETE", "/certificates/root"), 404204)


def test_enrollment_crud_etag_and_query(env):
    devices = [TestCA.self_signed_leaf(f"dev-{i}") for i in range(5)]
    for device in devices:
        assert env.enroll(device).status == 200
    got = env.call("GET", "/enrollments/DEV-1")
    assert got.status == 200 and got.body["registrationId"] == "dev-1"
    info = got.body["attestation"]["x509"]["clientCertificates"]["primary"]["info"]
    assert info["subjectName"] == "CN=dev-1" and len(info["sha256Thumbprint"]) == 64
    etag = got.body["etag"]
    body = dict(got.body, provisioningStatus="disabled")
    assert_error(env.call("PUT", "/enrollments/dev-1", body, headers={"If-Match": "old"}), 412002)
    updated = env.call("PUT", "/enrollments/dev-1", body, headers={"If-Match": f'"{etag}"'})
    assert updated.status == 200 and updated.body["etag"] != etag
    assert updated.body["createdDateTimeUtc"] == got.body["createdDateTimeUtc"]
    assert env.provision(devices[1]).body["status"] == "disabled"
    assert_error(env.call("PUT", "/enrollments/new-one", body, headers={"If-Match": "*"}), 412002)
    assert_error(env.call("PUT", "/enrollments/other", dict(body, registrationId="dev-1")), 400000)

    page = env.call("POST", "/enrollments/query", {"query": "*"}, headers={"x-ms-max-item-count": "2"})
    assert [e["registrationId"] for e in page.body] == ["dev-0", "dev-1"]
    assert page.headers["x-ms-item-type"] == "Enrollment"
    rest = env.call("POST", "/enrollments/query", {"query": "SELECT * FROM enrollments"},
                    headers={"x-ms-max-item-count": "10",
                             "x-ms-continuation": page.headers["x-ms-continuation"]})
    assert [e["registrationId"] for e in rest.body] == ["dev-2", "dev-3", "dev-4"]
    assert "x-ms-continuation" not in rest.headers
    assert_error(env.call("POST", "/enrollments/query", {"query": "SELECT * WHERE x"}), 400000)

    mech = env.call("POST", "/enrollments/dev-2/attestationmechanism")
    assert mech.status == 200 and mech.body["type"] == "x509"
    assert_error(env.call("DELETE", "/enrollments/dev-2", headers={"If-Match": "old"}), 412002)
    assert env.call("DELETE", "/enrollments/dev-2").status == 204
    assert env.provision(devices[2]).status == 401


def test_one_certificate_one_entry(env):
    root = TestCA("Test Root")
    inter = root.issue_intermediate("I")
    dev = TestCA.self_signed_leaf("dev")
    assert env.enroll(dev).status == 200
    assert_error(env.enroll(dev, registration_id="dev-copy"), 409000)
    assert env.enroll(dev).status == 200          # replacing the same entry is fine
    assert env.group("g1", ca_cert=inter.cert).status == 200
    assert_error(env.group("g2", ca_cert=inter.cert), 409000)
    env.upload_ca("root", root.cert)
    assert env.group("g3", ca_name="root").status == 200
    assert_error(env.group("g4", ca_cert=root.cert), 409000)
    assert_error(env.group("g5", ca_name="root"), 409000)
    env.call("DELETE", "/enrollmentGroups/g3")
    assert env.group("g4", ca_cert=root.cert).status == 200


def test_enrollment_validation(env):
    root = TestCA("Test Root")
    dev = root.issue_leaf("dev")
    assert_error(env.enroll(dev, provisioningStatus="maybe"), 400000)
    assert_error(env.enroll(dev, iotHubs=["unknown.example"]), 400000)
    assert_error(env.enroll(dev, allocationPolicy="custom"), 400000)
    assert_error(env.enroll(dev, allocationPolicy="static"), 400000)
    assert env.enroll(dev, allocationPolicy="static", iotHubs=["hub2.example"]).status == 200
    assert_error(env.enroll(dev, reprovisionPolicy={"updateHubAssignment": "yes"}), 400000)
    assert_error(env.enroll(dev, initialTwin=[1]), 400000)
    tpm = {"registrationId": "t", "attestation": {"type": "tpm", "tpm": {"endorsementKey": "x"}}}
    assert_error(env.call("PUT", "/enrollments/t", tpm), 400000)
    signing = {"registrationId": "s", "attestation": {"type": "x509", "x509": {
        "signingCertificates": {"primary": {"certificate": pem(root.cert)}}}}}
    assert_error(env.call("PUT", "/enrollments/s", signing), 400000)
    assert_error(env.group("g", ca_cert=dev.cert), 400000)      # a leaf cannot sign a group
    assert_error(env.group("g", ca_name="missing"), 400000)
    assert_error(env.group("g", ca_cert=root.cert, deviceId="x"), 400000)
    assert_error(env.call("PUT", "/enrollments/bad!id", {}), 400004)


def test_static_entry_lands_on_its_hub(env):
    dev = TestCA.self_signed_leaf("dev")
    env.enroll(dev, allocationPolicy="static", iotHubs=["hub2.example"])
    assert env.provision(dev).body["registrationState"]["assignedHub"] == "hub2.example"


def test_registrations_get_delete_and_group_query(env):
    root = TestCA("Test Root")
    inter = root.issue_intermediate("I")
    env.upload_ca("root", root.cert)
    env.group("g", ca_name="root")
    for i in range(3):
        env.provision(inter.issue_leaf(f"dev-{i}"))
    listed = env.call("POST", "/registrations/g/query", headers={"x-ms-max-item-count": "2"})
    assert [r["registrationId"] for r in listed.body] == ["dev-0", "dev-1"]
    assert listed.headers["x-ms-continuation"]
    assert_error(env.call("POST", "/registrations/none/query"), 404201)
    record = env.call("GET", "/registrations/dev-0")
    assert record.status == 200 and record.body["status"] == "assigned"
    assert_error(env.call("DELETE", "/registrations/dev-0", headers={"If-Match": "x"}), 412002)
    assert env.call("DELETE", "/registrations/dev-0",
                    headers={"If-Match": record.body["etag"]}).status == 204
    assert_error(env.call("GET", "/registrations/dev-0"), 404202)


def test_bulk_operations(env):
    devices = [TestCA.self_signed_leaf(f"b-{i}") for i in range(3)]
    items = [{"registrationId": f"b-{i}", "attestation": {"type": "x509", "x509": {
        "clientCertificates": {"primary": {"certificate": pem(d.cert)}}}}}
        for i, d in enumerate(devices)]
    done = env.call("POST", "/enrollments", {"mode": "create", "enrollments": items})
    assert done.body == {"isSuccessful": True, "errors": []}
    again = env.call("POST", "/enrollments", {"mode": "create", "enrollments": items[:1]})
    assert again.body["isSuccessful"] is False and again.body["errors"][0]["errorCode"] == 409000
    stale = dict(items[0], etag="stale")
    upd = env.call("POST", "/enrollments", {"mode": "updateIfMatchETag", "enrollments": [stale]})
    assert upd.body["errors"][0]["errorCode"] == 412002
    gone = env.call("POST", "/enrollments", {"mode": "delete", "enrollments": items})
    assert gone.body["isSuccessful"] is True
    assert_error(env.call("POST", "/enrollments", {"mode": "create", "enrollments": items * 4}), 400000)


def test_everything_persists_after_reopen(env):
    root = TestCA("Test Root")
    inter = root.issue_intermediate("I")
    env.upload_ca("root", root.cert, verified=False)
    code = env.call("POST", "/certificates/root/generateVerificationCode").body["properties"]["verificationCode"]
    selfie = TestCA.self_signed_leaf("selfie")
    env.enroll(selfie, status="disabled")
    env.reopen()
    env.call("POST", "/certificates/root/verify", {"certificate": pem(root.issue_leaf(code).cert)})
    env.group("g", ca_name="root")
    dev = inter.issue_leaf("dev")
    assert env.provision(dev).status == 200
    env.reopen()
    assert env.call("GET", "/registrations/dev").body["status"] == "assigned"
    assert env.call("GET", "/enrollments/selfie").body["provisioningStatus"] == "disabled"
    assert env.provision(selfie).body["status"] == "disabled"
    assert env.provision(dev).status == 200


def test_unexpected_failure_is_a_500_reply(env, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("boom")
    monkeypatch.setattr(env.store, "list_cas", boom)
    reply = env.call("GET", "/certificates")
    assert reply.status == 500 and reply.body["errorCode"] == 500000

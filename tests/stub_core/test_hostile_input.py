"""No client input yields a traceback or a 500 from the core: bodies bounded in depth,
the store refusing what it could not read back, malformed certificates answered 401
(device path) or 400 (service path), one certificate per enrollment slot."""

import json

import pytest
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from device_sim.stub.core.cert_input import parse_certificate
from device_sim.stub.core.enrollment_walk import INDIVIDUAL
from device_sim.stub.core.errors import DpsError
from device_sim.stub.core.json_body import MAX_DEPTH, deeper_than, json_object, text_deeper_than
from device_sim.stub.core.store import MAX_STORED_DEPTH

from device_sim.testing import LeafCert, TestCA

from .env import API, SCOPE, Env, pem
from .test_device_api import assert_error


@pytest.fixture
def env(tmp_path):
    return Env(tmp_path)


def nested(depth: int, inner: str = "1") -> bytes:
    return ("[" * depth + inner + "]" * depth).encode()


def enrollment_body(device, **extra) -> dict:
    return {"registrationId": "dev", "attestation": {"type": "x509", "x509": {
        "clientCertificates": {"primary": {"certificate": pem(device.cert)}}}}, **extra}


# -- certificates cryptography loads but cannot read whole ----------------------------------


def _resign(cert: x509.Certificate, key, change) -> bytes:
    """`cert` with its TBS changed by `change(tbs)`, signed again by `key` (EC)."""
    parsed = asn1_x509.Certificate.load(cert.public_bytes(Encoding.DER))
    tbs = parsed["tbs_certificate"]
    change(tbs)
    signature = key.sign(tbs.dump(force=True), ec.ECDSA(hashes.SHA256()))
    return asn1_x509.Certificate({"tbs_certificate": tbs,
                                  "signature_algorithm": parsed["signature_algorithm"],
                                  "signature_value": signature}).dump(force=True)


def with_duplicate_extension(cert, key) -> x509.Certificate:
    def twice(tbs):
        extensions = list(tbs["extensions"])
        tbs["extensions"] = asn1_x509.Extensions(extensions + [extensions[0]])
    return x509.load_der_x509_certificate(_resign(cert, key, twice))


def version5_der(cert, key) -> bytes:
    def v5(tbs):
        tbs["version"] = 4
    return _resign(cert, key, v5)


def b64(der: bytes) -> str:
    import base64
    return base64.b64encode(der).decode()


# -- JSON depth -------------------------------------------------------------------------------


def test_a_5000_deep_body_is_a_400_everywhere(env):
    deep = nested(5000)
    reply = env.call("PUT", "/enrollments/dev", deep)
    assert_error(reply, 400000)
    assert f"deeper than {MAX_DEPTH}" in reply.body["message"]
    objects = ('{"a":' * 5000 + "1" + "}" * 5000).encode()
    assert_error(env.call("POST", "/enrollments", objects), 400000)
    dev = TestCA.self_signed_leaf("dev")
    assert_error(env.register(dev, body=b'{"payload":' + nested(5000) + b"}"), 400000)
    assert_error(env.device.registration_status(SCOPE, "dev", API, dev.chain, deep), 400000)


def test_brackets_inside_strings_do_not_count():
    text = json.dumps({"s": "[" * 1000 + "{" * 1000 + '\\"['})
    assert not text_deeper_than(text, 2)
    assert json_object(text.encode())["s"].startswith("[[")
    assert text_deeper_than("[" * 3 + "]" * 3, 2) and not text_deeper_than("[[]]", 2)


@pytest.mark.parametrize("body", [b'{"a": NaN}', b'{"a": Infinity}', b'{"a": -Infinity}',
                                  b'{"a": 1e999}', b'{"a": ' + b"9" * 5000 + b"}",
                                  b"\xff\xfe\x00", b'{"a": "\xed\xa0\x80"}'])
def test_numbers_and_bytes_json_cannot_carry_are_a_400(body):
    with pytest.raises(DpsError) as info:
        json_object(body)
    assert info.value.code == 400000


def test_depth_limit_is_exact(env):
    dev = TestCA.self_signed_leaf("dev")
    for depth, ok in ((MAX_DEPTH - 1, True), (MAX_DEPTH, False)):
        twin = {"tags": json.loads(nested(depth - 1))} if depth > 1 else {}
        body = json.dumps(enrollment_body(dev, initialTwin=twin)).encode()
        # the body adds the outer object and initialTwin's object to the list's depth
        reply = env.call("PUT", "/enrollments/dev", body)
        assert (reply.status == 200) is ok, (depth, reply)


def test_a_980_deep_enrollment_is_refused_and_the_store_keeps_working(env):
    dev = TestCA.self_signed_leaf("dev")
    text = json.dumps(enrollment_body(dev, initialTwin={"tags": "DEEP"}))
    body = text.replace('"DEEP"', nested(975).decode()).encode()
    assert_error(env.call("PUT", "/enrollments/dev", body), 400000)
    assert_error(env.call("GET", "/enrollments/dev"), 404201)
    assert env.enroll(dev).status == 200
    assert env.provision(dev).status == 200
    env.reopen()
    assert env.provision(dev).status == 200
    assert env.call("DELETE", "/enrollments/dev").status == 204


def test_the_store_refuses_what_it_could_not_read_back(env):
    deep = json.loads(nested(MAX_STORED_DEPTH + 1))
    with pytest.raises(DpsError) as info:
        env.store.put_entry(INDIVIDUAL, "dev", {"registrationId": "dev", "x": deep}, "e", [], True)
    assert info.value.code == 400000 and "read back" in info.value.message
    with pytest.raises(DpsError):
        env.store.put_entry(INDIVIDUAL, "dev", {"registrationId": "dev", "x": float("nan")},
                            "e", [], True)
    assert env.store.get_entry(INDIVIDUAL, "dev") is None
    assert deeper_than(deep, MAX_STORED_DEPTH) and not deeper_than(deep, MAX_STORED_DEPTH + 1)


_json = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=5),
                     lambda inner: st.lists(inner, max_size=3)
                     | st.dictionaries(st.text(max_size=3), inner, max_size=3), max_leaves=20)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.one_of(st.binary(max_size=300), _json.map(lambda v: json.dumps(v).encode()),
                      st.integers(0, 3000).map(nested)),
       path=st.sampled_from(["/enrollments/dev", "/enrollmentGroups/g", "/enrollments",
                             "/certificates/c", "/certificates/c/verify", "/enrollments/query",
                             "/emulator/registrations/query"]),
       method=st.sampled_from(["PUT", "POST"]))
def test_no_service_body_gets_a_500(env, body, path, method):
    reply = env.call(method, path, body)
    assert reply.status < 500, reply
    assert "x-ms-request-id" in reply.headers
    if reply.status >= 400:
        assert reply.body["errorCode"] // 1000 == reply.status and reply.body["message"]


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.one_of(st.binary(max_size=300), _json.map(lambda v: json.dumps(v).encode()),
                      st.integers(0, 3000).map(lambda n: b'{"payload":' + nested(n) + b"}")))
def test_no_device_body_gets_a_500(env, body):
    dev = TestCA.self_signed_leaf("dev")
    for reply in (env.register(dev, body=body),
                  env.device.registration_status(SCOPE, "dev", API, dev.chain, body)):
        assert reply.status < 500, reply
        if reply.status >= 400:
            assert reply.body["errorCode"] // 1000 == reply.status and reply.body["message"]


# -- malformed certificates ---------------------------------------------------------------------


def test_duplicate_extensions_on_the_device_path_are_a_401(env):
    root = TestCA("Test Root")
    inter = root.issue_intermediate("I")
    env.upload_ca("root", root.cert)
    env.group("g", ca_name="root")
    leaf = inter.issue_leaf("dev")
    bad_leaf = with_duplicate_extension(leaf.cert, inter.key)
    bad_inter = with_duplicate_extension(inter.cert, root.key)
    for chain in ([bad_leaf, inter.cert, root.cert], [leaf.cert, bad_inter, root.cert]):
        reply = env.register(leaf, chain=chain)
        assert_error(reply, 401002)
        assert "cannot be read" in reply.body["message"] and "Duplicate" in reply.body["message"]
        assert_error(env.device.registration_status(SCOPE, "dev", API, chain, b""), 401002)
    assert env.provision(leaf).status == 200  # the good chain still works


def test_duplicate_extensions_on_the_service_path_are_a_400(env):
    root = TestCA("Test Root")
    bad_root = with_duplicate_extension(root.cert, root.key)
    assert_error(env.call("PUT", "/certificates/bad", {"properties": {"certificate": pem(bad_root)}}),
                 400000)
    assert_error(env.group("g", ca_cert=bad_root), 400000)
    dev = TestCA.self_signed_leaf("dev")
    reply = env.call("PUT", "/enrollments/dev", enrollment_body(LeafCert(
        with_duplicate_extension(dev.cert, dev.key), dev.key, None)))
    assert_error(reply, 400000)
    assert "readable" in reply.body["message"]


def test_a_version_5_certificate_is_a_400(env):
    dev = TestCA.self_signed_leaf("dev")
    der = version5_der(dev.cert, dev.key)
    with pytest.raises(DpsError) as info:
        parse_certificate(b64(der), "the slot")
    assert info.value.code == 400000 and "the slot" in info.value.message
    body = {"registrationId": "dev", "attestation": {"type": "x509", "x509": {
        "clientCertificates": {"primary": {"certificate": b64(der)}}}}}
    assert_error(env.call("PUT", "/enrollments/dev", body), 400000)
    assert_error(env.call("PUT", "/certificates/v5", {"properties": {"certificate": b64(der)}}),
                 400000)


def test_an_enrollment_slot_takes_exactly_one_certificate(env):
    root = TestCA("Test Root")
    dev = root.issue_leaf("dev")
    chain = "".join(pem(root.issue_leaf(f"c{i}").cert) for i in range(49)) + pem(dev.cert)
    body = enrollment_body(dev)
    body["attestation"]["x509"]["clientCertificates"]["primary"]["certificate"] = pem(dev.cert) + chain
    reply = env.call("PUT", "/enrollments/dev", body)
    assert_error(reply, 400000)
    assert "holds 51 certificates" in reply.body["message"]
    assert "clientCertificates.primary" in reply.body["message"]
    assert_error(env.group("g", ca_cert=None, ca_name=None), 400000)
    two = pem(root.cert) + pem(root.issue_intermediate("I").cert)
    group = {"enrollmentGroupId": "g", "attestation": {"type": "x509", "x509": {
        "signingCertificates": {"primary": {"certificate": two}}}}}
    assert "holds 2 certificates" in env.call("PUT", "/enrollmentGroups/g", group).body["message"]
    assert "holds 2 certificates" in env.call(
        "PUT", "/certificates/two", {"properties": {"certificate": two}}).body["message"]

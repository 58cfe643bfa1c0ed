"""Certificate issuance in the core: csr checks, policy lookup, the chain in the terminal
result only (docs/certificate-issuance.md)."""

from __future__ import annotations

import base64
import json

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from device_sim.stub.core import issuance
from device_sim.stub.issuing_ca import generated_issuer

from device_sim.testing import TestCA

from .env import SCOPE, Env

API = "2025-07-01-preview"


def csr_b64(cn: str, key=None, *, tamper: bool = False) -> str:
    key = key or ec.generate_private_key(ec.SECP384R1())
    request = (x509.CertificateSigningRequestBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
               .sign(key, hashes.SHA384()))
    der = bytearray(request.public_bytes(serialization.Encoding.DER))
    if tamper:
        der[-3] ^= 0x01  # inside the signature value
    return base64.b64encode(bytes(der)).decode()


@pytest.fixture
def env(tmp_path):
    env = Env(tmp_path)
    env.device.issuer = generated_issuer(tmp_path / "issuing")
    root = TestCA("Issuance Root")
    env.upload_ca("root", root.cert)
    env.root = root
    return env


def body(rid: str, csr: str) -> bytes:
    return json.dumps({"registrationId": rid, "csr": csr}).encode()


def test_issued_chain_rides_the_terminal_result_only(env, tmp_path):
    device = env.root.issue_leaf("dev-issue")
    assert env.enroll(device, credentialPolicyName="default").status == 200
    key = ec.generate_private_key(ec.SECP384R1())
    reply = env.provision(device, body=body("dev-issue", csr_b64("dev-issue", key)), api=API)
    assert reply.status == 200, reply.body
    state = reply.body["registrationState"]
    assert state["status"] == "assigned"
    chain = [x509.load_der_x509_certificate(base64.b64decode(c))
             for c in state["issuedCertificateChain"]]
    assert len(chain) == 3  # leaf, issuing CA, root
    leaf, issuing, root = chain
    leaf.verify_directly_issued_by(issuing)
    issuing.verify_directly_issued_by(root)
    assert leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "dev-issue"
    pub = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    assert leaf.public_key().public_bytes(*pub) == key.public_key().public_bytes(*pub)
    lookup = env.device.registration_status(SCOPE, "dev-issue", API, device.chain, b"")
    assert lookup.status == 200 and "issuedCertificateChain" not in lookup.body


@pytest.mark.parametrize("make_csr, code, words", [
    (lambda: csr_b64("dev-issue", rsa.generate_private_key(65537, 2048)),
     issuance.CSR_KEY_UNSUPPORTED, "EC P-384"),
    (lambda: csr_b64("dev-issue", ec.generate_private_key(ec.SECP256R1())),
     issuance.CSR_KEY_UNSUPPORTED, "secp256r1"),
    (lambda: csr_b64("someone-else"), issuance.CSR_CN_MISMATCH, "must equal"),
    (lambda: csr_b64("dev-issue", tamper=True), issuance.CSR_INVALID, "signature"),
    (lambda: "-----BEGIN CERTIFICATE REQUEST-----", issuance.CSR_INVALID, "PEM"),
    (lambda: "not base64!", issuance.CSR_INVALID, "base64"),
])
def test_bad_csr_is_a_400_with_its_own_code(env, make_csr, code, words):
    device = env.root.issue_leaf("dev-issue")
    env.enroll(device, credentialPolicyName="default")
    reply = env.register(device, body=body("dev-issue", make_csr()), api=API)
    assert reply.status == 400 and reply.body["errorCode"] == code, reply.body
    assert words in reply.body["message"]


def test_csr_without_credential_policy_is_refused(env):
    device = env.root.issue_leaf("dev-plain")
    env.enroll(device)
    reply = env.register(device, body=body("dev-plain", csr_b64("dev-plain")), api=API)
    assert reply.status == 400 and reply.body["errorCode"] == issuance.NO_CREDENTIAL_POLICY
    assert "credentialPolicyName" in reply.body["message"]
    # and without csr the same device registers as before, with no chain
    plain = env.provision(device, api=API)
    assert plain.body["status"] == "assigned"
    assert "issuedCertificateChain" not in plain.body["registrationState"]


def test_unknown_policy_and_group_policy(env):
    device = env.root.issue_leaf("dev-group")
    env.group("line", ca_name="root", credentialPolicyName="nope")
    reply = env.register(device, body=body("dev-group", csr_b64("dev-group")), api=API)
    assert reply.status == 400 and "'nope'" in reply.body["message"]
    env.group("line", ca_name="root", credentialPolicyName="default")
    ok = env.provision(device, body=body("dev-group", csr_b64("dev-group")), api=API)
    assert len(ok.body["registrationState"]["issuedCertificateChain"]) == 3


def test_csr_in_status_lookup_is_a_400(env):
    device = env.root.issue_leaf("dev-issue")
    env.enroll(device, credentialPolicyName="default")
    reply = env.device.registration_status(SCOPE, "dev-issue", API, device.chain,
                                           body("dev-issue", csr_b64("dev-issue")))
    assert reply.status == 400 and "status lookup" in reply.body["message"]


def test_generated_issuing_ca_is_kept(tmp_path):
    first = generated_issuer(tmp_path / "issuing")
    again = generated_issuer(tmp_path / "issuing")
    assert first.chain == again.chain
    assert (tmp_path / "issuing" / "ca.key").stat().st_mode & 0o077 == 0

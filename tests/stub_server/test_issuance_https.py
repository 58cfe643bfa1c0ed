"""Certificate issuance over real HTTPS with `requests` against `stub serve`: the chain in
the final poll only, and each refusal as a 400 with its errorCode (docs/certificate-issuance.md)."""

from __future__ import annotations

import base64

import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from device_sim.testing import Emulator

from .emulator_proc import stub_admin

API = "2025-07-01-preview"


@pytest.fixture(scope="module")
def emulator(tmp_path_factory, file_cas):
    running = Emulator.spawn(tmp_path_factory.mktemp("issuing-home"), "--retry-after", "0")
    files = tmp_path_factory.mktemp("issuing-files")
    (files / "root.pem").write_bytes(file_cas.root.cert_pem)
    stub_admin(running, "ca", "upload", "root", files / "root.pem", "--verified")
    stub_admin(running, "group", "create", "issuing", "--ca-ref", "root", "--credential-policy", "default")
    yield running
    running.stop()


def csr_text(cn, key=None, tamper=False):
    key = key or ec.generate_private_key(ec.SECP384R1())
    der = bytearray(x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])).sign(key, hashes.SHA384())
        .public_bytes(serialization.Encoding.DER))
    if tamper:
        der[-3] ^= 1
    return base64.b64encode(bytes(der)).decode()


def call(emulator, rid, files, body, method="put"):
    base = f"{emulator.device_url}/{emulator.ready['id_scope']}/registrations/{rid}"
    url = f"{base}/register?api-version={API}" if method == "put" else f"{base}?api-version={API}"
    with requests.Session() as session:
        response = getattr(session, method)(url, json=body, cert=files, verify=emulator.ready["ca_cert"],
                                            timeout=10)
        for _ in range(50):
            if response.status_code != 202:
                break
            response = session.get(f"{base}/operations/{response.json()['operationId']}?api-version={API}",
                                   cert=files, verify=emulator.ready["ca_cert"], timeout=10)
    return response.status_code, response.json()


def device(file_cas, tmp_path, rid):
    return file_cas.inter2.issue_leaf(rid).write(tmp_path, rid)


def test_issued_chain_over_https(emulator, file_cas, tmp_path):
    files = device(file_cas, tmp_path, "https-issue")
    key = ec.generate_private_key(ec.SECP384R1())
    status, body = call(emulator, "https-issue", files, {"registrationId": "https-issue",
                                                         "csr": csr_text("https-issue", key)})
    assert status == 200 and body["status"] == "assigned", body
    chain = [x509.load_der_x509_certificate(base64.b64decode(c))
             for c in body["registrationState"]["issuedCertificateChain"]]
    for child, parent in zip(chain, chain[1:]):
        child.verify_directly_issued_by(parent)
    assert chain[-1].subject == chain[-1].issuer  # ends at the root
    assert chain[0].public_key().public_numbers() == key.public_key().public_numbers()
    status, lookup = call(emulator, "https-issue", files, {"registrationId": "https-issue"}, method="post")
    assert status == 200 and "issuedCertificateChain" not in lookup


@pytest.mark.parametrize("csr, code", [
    (lambda: csr_text("https-refused", rsa.generate_private_key(65537, 2048)), 400011),
    (lambda: csr_text("someone-else"), 400012),
    (lambda: csr_text("https-refused", tamper=True), 400000),
])
def test_refusals_over_https(emulator, file_cas, tmp_path, csr, code):
    files = device(file_cas, tmp_path, "https-refused")
    status, body = call(emulator, "https-refused", files, {"registrationId": "https-refused", "csr": csr()})
    assert (status, body["errorCode"]) == (400, code), body


def test_entry_without_credential_policy_over_https(emulator, file_cas, tmp_path):
    files = device(file_cas, tmp_path, "https-plain")
    leaf = files[0].read_bytes().split(b"-----END CERTIFICATE-----")[0] + b"-----END CERTIFICATE-----\n"
    (tmp_path / "leaf.pem").write_bytes(leaf)
    stub_admin(emulator, "enroll", "create", "https-plain", "--cert", tmp_path / "leaf.pem")
    status, body = call(emulator, "https-plain", files, {"registrationId": "https-plain",
                                                         "csr": csr_text("https-plain")})
    assert (status, body["errorCode"]) == (400, 400013) and "individual enrollment 'https-plain'" in body["message"]

"""`device-sim register --issue-cert` end to end: a real emulator process issuing over HTTPS
and MQTT to a SoftHSM device, the chain checked with `cryptography` and read back from the
token (docs/certificate-issuance.md)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID
from pkcs11 import Attribute, ObjectClass

from device_sim.common.x509util import load_certificate_file
from device_sim.testing import TokenPki
from hsm_setup import tokens
from hsm_setup.key_types import key_spec
from hsm_setup.uri import Pkcs11Uri

TOKEN = "issuance"
SPKI = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo


def cli(*argv, env, timeout=60):
    result = subprocess.run([sys.executable, "-m", "device_sim.cli", *map(str, argv)], env=env,
                            capture_output=True, text=True, timeout=timeout)
    assert "Traceback" not in result.stderr, result.stderr
    return result


@pytest.fixture(scope="module")
def devices(tmp_path_factory):
    """A state directory of its own: new issuance keys and device records stay out of the
    session's shared token PKI."""
    pki = TokenPki(tmp_path_factory.mktemp("issuance-pki"), device_token=TOKEN)
    pki.ca("root")
    pki.ca("intermediate", parent="root")
    for rid in ("issue-https", "issue-mqtt", "issue-plain"):
        pki.device(rid, ca="intermediate")
    return pki


@pytest.fixture(scope="module")
def emulator(tmp_path_factory, devices):
    home = tmp_path_factory.mktemp("issuing-stub")
    env = devices.env()
    process = subprocess.Popen([sys.executable, "-m", "device_sim.cli", "stub", "serve", "--home", str(home),
                                "--retry-after", "0", "--port", "0", "--service-port", "0", "--mqtt-port", "0"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = process.stdout.readline()
        assert line, process.stderr.read()
        ready = json.loads(line)
        ready["home"] = home
        for argv in (("ca", "upload", "--verified", "root", devices.cas["root"].pem_path),
                     ("enroll", "create", "issue-https", "--cert", devices.devices["issue-https"].cert_path,
                      "--credential-policy", "default"),
                     ("enroll", "create", "issue-mqtt", "--cert", devices.devices["issue-mqtt"].cert_path,
                      "--credential-policy", "default"),
                     ("enroll", "create", "issue-plain", "--cert", devices.devices["issue-plain"].cert_path)):
            result = cli("stub", *argv, "--home", home, env=env)
            assert result.returncode == 0, result.stderr
        yield ready
    finally:
        process.terminate()
        process.wait(timeout=10)


def register(devices, ready, rid, *extra, transport="https"):
    endpoint = ready["device_url"] if transport == "https" else ready["mqtt_url"]
    return cli("register", "--home", devices.home, f"pkcs11:token={TOKEN};object={rid}", "--transport", transport,
               "--endpoint", endpoint, "--id-scope", ready["id_scope"], "--trust", ready["ca_cert"],
               "--json", *extra, env=devices.env())


def issuing_chain(ready) -> list[x509.Certificate]:
    return load_certificate_file(ready["home"] / "stub" / "issuing" / "ca.pem")


def token_objects(devices, label):
    session = tokens.session(devices.lib(), TOKEN, devices.pin)
    found = {}
    for obj in session.get_objects({Attribute.LABEL: label}):
        found.setdefault(obj[Attribute.CLASS], []).append(obj)
    return found


@pytest.mark.parametrize("transport", ["https", "mqtt"])
def test_issued_certificate_lands_on_the_token(devices, emulator, transport):
    rid = f"issue-{transport}"
    result = register(devices, emulator, rid, "--issue-cert", transport=transport)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    issued = out["issued_certificate"]
    uri = Pkcs11Uri.parse(issued["uri"])
    assert uri.token == TOKEN and uri.object == f"{rid}.issued"
    assert issued["subject"] == f"CN={rid}" and "issuing CA" in issued["issuer"]
    assert issued["chain_length"] == 3 and issued["not_before"] < issued["not_after"]

    objects = token_objects(devices, f"{rid}.issued")
    (private,), (public,), (cert_obj,) = (objects[c] for c in (ObjectClass.PRIVATE_KEY, ObjectClass.PUBLIC_KEY,
                                                               ObjectClass.CERTIFICATE))
    assert private[Attribute.ID] == public[Attribute.ID] == cert_obj[Attribute.ID] == uri.id
    assert private[Attribute.SENSITIVE] is True and private[Attribute.EXTRACTABLE] is False
    assert private[Attribute.KEY_TYPE] is not None
    leaf = x509.load_der_x509_certificate(cert_obj[Attribute.VALUE])
    issuing, root = issuing_chain(emulator)
    leaf.verify_directly_issued_by(issuing)
    issuing.verify_directly_issued_by(root)
    assert leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == rid
    assert leaf.public_key().curve.name == "secp384r1"
    from hsm_setup.keys import public_key_info
    assert public_key_info(public, key_spec("ec-p384")).dump() == leaf.public_key().public_bytes(*SPKI)
    # the CA certificates of the chain are on the token too
    ca_subjects = {x509.load_der_x509_certificate(o[Attribute.VALUE]).subject
                   for o in tokens.session(devices.lib(), TOKEN, devices.pin).get_objects(
                       {Attribute.CLASS: ObjectClass.CERTIFICATE})}
    assert {issuing.subject, root.subject} <= ca_subjects


def test_a_second_issuance_replaces_the_first(devices, emulator):
    first = json.loads(register(devices, emulator, "issue-https", "--issue-cert").stdout)["issued_certificate"]
    second = json.loads(register(devices, emulator, "issue-https", "--issue-cert").stdout)["issued_certificate"]
    assert first["uri"] != second["uri"]
    objects = token_objects(devices, "issue-https.issued")
    assert sum(len(v) for v in objects.values()) == 3  # one key pair and its leaf


def test_no_credential_policy_refused_and_no_key_left(devices, emulator):
    result = register(devices, emulator, "issue-plain", "--issue-cert")
    assert result.returncode == 8, result.stderr
    out = json.loads(result.stdout)
    assert out["status"] == "rejected" and out["error"]["code"] == 400013
    assert "credentialPolicyName" in out["error"]["message"]
    assert out["issued_certificate"] is None
    assert token_objects(devices, "issue-plain.issued") == {}


def test_without_the_flag_nothing_changes(devices, emulator):
    result = register(devices, emulator, "issue-plain")
    assert result.returncode == 0, result.stderr
    assert "issued_certificate" not in json.loads(result.stdout)


def test_issuing_ca_key_in_a_token(devices, tmp_path):
    """--issuing-ca-key pkcs11:...: the emulator signs every leaf inside the CA token. The
    emulator's state directory is the one holding the tokens (SoftHSM is configured there)."""
    home = devices.home
    pin_file = tmp_path / "ca.pin"
    pin_file.write_text(devices.pin + "\n")
    key_uri = f"pkcs11:token=ca;object=intermediate?pin-source={pin_file}"
    env = {k: v for k, v in devices.env().items() if k != "PKCS11_PIN"}  # the PIN comes from the URI
    process = subprocess.Popen([sys.executable, "-m", "device_sim.cli", "stub", "serve", "--home", str(home),
                                "--retry-after", "0", "--port", "0", "--service-port", "0", "--no-mqtt",
                                "--issuing-ca-cert", devices.cas["intermediate"].chain_path,
                                "--issuing-ca-key", key_uri],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = process.stdout.readline()
        assert line, process.stderr.read()
        ready = json.loads(line) | {"home": home}
        assert devices.pin not in line
        for argv in (("ca", "upload", "--verified", "root", devices.cas["root"].pem_path),
                     ("enroll", "create", "issue-https", "--cert", devices.devices["issue-https"].cert_path,
                      "--credential-policy", "default")):
            assert cli("stub", *argv, "--home", home, env=devices.env()).returncode == 0
        result = register(devices, ready, "issue-https", "--issue-cert")
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["issued_certificate"]["issuer"] == "CN=intermediate"
        (cert_obj,) = token_objects(devices, "issue-https.issued")[ObjectClass.CERTIFICATE]
        leaf = x509.load_der_x509_certificate(cert_obj[Attribute.VALUE])
        intermediate = x509.load_der_x509_certificate(devices.cas["intermediate"].certificate)
        leaf.verify_directly_issued_by(intermediate)
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_bad_issuing_ca_options_are_one_line(devices, tmp_path):
    result = cli("stub", "serve", "--home", tmp_path / "bad", "--no-mqtt",
                 "--issuing-ca-cert", devices.cas["root"].pem_path, env=devices.env())
    assert result.returncode == 2 and "--issuing-ca-key" in result.stderr
    result = cli("stub", "serve", "--home", tmp_path / "bad", "--no-mqtt",
                 "--issuing-ca-cert", devices.devices["issue-plain"].cert_path, "--issuing-ca-key", tmp_path / "none.pem",
                 env=devices.env())
    assert result.returncode == 2 and "issuing CA" in result.stderr

"""Bring-your-own PKI on real SoftHSM tokens: `device csr` -> `ca sign-csr` (or an outside
CA) -> `device import-cert`, `device adopt` of pkcs11-tool objects, and registering the
results against a real emulator subprocess."""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import subprocess
import sys

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from pkcs11 import Attribute, ObjectClass

from hsm_setup import byo, devices
from device_sim.testing import Emulator
from stub_server.emulator_proc import REPO, stub_admin

PKCS11_TOOL = shutil.which("pkcs11-tool")
needs_pkcs11_tool = pytest.mark.skipif(PKCS11_TOOL is None, reason="pkcs11-tool (Debian package opensc) missing")


# --- helpers ---------------------------------------------------------------------

class FileCa:
    """A CA whose key is a Python object: the "factory PKI" of the tests."""

    def __init__(self, name: str, days: int = 365):
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.timezone.utc)
        subject = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, name)])
        self.cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
                     .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                     .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
                     .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                     .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                                    critical=True)
                     .add_extension(x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False)
                     .sign(self.key, hashes.SHA256()))

    def issue(self, public_key, cn: str) -> x509.Certificate:
        now = dt.datetime.now(dt.timezone.utc)
        return (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, cn)]))
                .issuer_name(self.cert.subject).public_key(public_key)
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=30))
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .sign(self.key, hashes.SHA256()))

    def write(self, path):
        path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        return path


def write_pem(path, cert: x509.Certificate):
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def env_for(h) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PKCS11_MODULE"}
    env.update(DEVICE_SIM_HOME=str(h.home), SOFTHSM2_CONF=str(h.home / "softhsm2.conf"),
               PKCS11_PIN=h.pin, PKCS11_SO_PIN=h.so_pin)
    return env


def run(h, program, *args, check=True):
    done = subprocess.run([sys.executable, "-m", program, *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, env=env_for(h), timeout=120)
    if check and done.returncode != 0:
        raise AssertionError(f"{program} {' '.join(map(str, args))}: {done.stderr}")
    return done


def hsm(h, *args, **kw):
    return run(h, "device_sim.cli.hsm_setup", *args, **kw)


def pkcs11_tool(h, *args):
    done = subprocess.run([PKCS11_TOOL, "--module", h.module_path, "--token-label", "devices", *map(str, args)],
                          capture_output=True, text=True, env=env_for(h), timeout=60)
    assert done.returncode == 0, done.stderr
    return done


def objects(h, label):
    return sorted((int(o[Attribute.CLASS]), o[Attribute.LABEL], bytes(o[Attribute.ID] or b""))
                  for o in h.session(label).get_objects())


def one_line_error(result, *words):
    assert result.code == 2 and result.out == "", result
    lines = result.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hsm-setup: error: "), result.err
    for word in words:
        assert word in lines[0], lines[0]


def register_on_emulator(h, registration_id, ca_pem):
    """Emulator on the same state directory, the CA uploaded verified with a group on it."""
    emulator = Emulator.spawn(h.home, "--assignment-delay", "0")
    try:
        stub_admin(emulator, "ca", "upload", "byo-ca", ca_pem, "--verified")
        stub_admin(emulator, "group", "create", "byo", "--ca-ref", "byo-ca")
        result = run(h, "device_sim.cli", "register", registration_id, "--emulator", "--json",
                     "--timeout", "20", check=False)
        assert result.returncode == 0, result.stderr
        outcome = json.loads(result.stdout)
        assert outcome["status"] == "assigned" and outcome["device_id"] == registration_id
        fleet = run(h, "device_sim.cli", "fleet", "run", "--emulator", "--no-progress", "--prefix",
                    registration_id, check=False)
        assert fleet.returncode == 0 and "assigned 1" in fleet.stdout, fleet.stdout + fleet.stderr
    finally:
        emulator.stop()


@pytest.fixture
def byo_home(softhsm_home):
    h = softhsm_home
    h.init_token("ca")
    h.init_token("devices")
    assert h.cli("ca", "create", "root").code == 0
    return h


# --- device csr -----------------------------------------------------------------------

def test_csr_makes_a_pending_key_and_a_csr_signed_in_the_token(byo_home, tmp_path):
    h = byo_home
    out = tmp_path / "dev.csr"
    result = h.cli("device", "csr", "dev-byo", "--key", "ec-p384", "--out", out)
    assert result.code == 0, result.err
    request = x509.load_pem_x509_csr(out.read_bytes())
    assert request.is_signature_valid
    assert request.subject.rfc4514_string() == "CN=dev-byo"
    pending = byo.find_pending(h.home, "DEV-BYO")
    assert pending.key_type == "ec-p384" and pending.token_label == "devices"
    assert devices.find_device(h.home, "dev-byo") is None  # not a registry device yet
    assert h.cli("device", "list").out.strip() == "(no devices)"
    assert {(c, lab) for c, lab, _ in objects(h, "devices")} == {
        (int(ObjectClass.PUBLIC_KEY), "dev-byo"), (int(ObjectClass.PRIVATE_KEY), "dev-byo")}
    again = h.cli("device", "csr", "dev-byo")  # same key, same CSR: nothing new on the token
    assert again.code == 0 and "pending already" in again.err
    assert x509.load_pem_x509_csr(again.out.encode()).public_key() == request.public_key()
    assert len(objects(h, "devices")) == 2


def test_csr_refusals(byo_home):
    h = byo_home
    assert h.cli("device", "create", "dev-1", "--ca", "root").code == 0
    one_line_error(h.cli("device", "csr", "dev-1"), "exists already")
    one_line_error(h.cli("device", "csr", "bad id!"), "invalid registration ID")
    one_line_error(h.cli("device", "csr", "dev-2", "--token", "nope"), "unknown token 'nope'")


# --- ca sign-csr + import-cert -------------------------------------------------------------

def test_token_ca_signs_the_csr_and_import_completes_the_identity(byo_home, tmp_path):
    h = byo_home
    csr_file, cert_file = tmp_path / "dev.csr", tmp_path / "dev.pem"
    assert h.cli("device", "csr", "dev-byo", "--out", csr_file).code == 0
    signed = h.cli("ca", "sign-csr", "root", "--csr", csr_file, "--days", "30", "--out", cert_file)
    assert signed.code == 0, signed.err
    leaf = x509.load_pem_x509_certificate(cert_file.read_bytes())
    assert leaf.subject.rfc4514_string() == "CN=dev-byo"
    assert leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value[0].dotted_string == "1.3.6.1.5.5.7.3.2"
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert (leaf.not_valid_after_utc - leaf.not_valid_before_utc).days == 30

    imported = h.cli("device", "import-cert", "dev-byo", "--cert", cert_file, "--json")
    assert imported.code == 0, imported.err
    record = devices.lookup_device(h.home, "dev-byo")
    assert record.ca_name == "root" and record.certificate_x509() == leaf
    assert byo.find_pending(h.home, "dev-byo") is None
    pending_key = record.key_id
    on_token = objects(h, "devices")
    assert (int(ObjectClass.CERTIFICATE), "dev-byo", pending_key) in on_token  # beside the key
    assert (int(ObjectClass.CERTIFICATE), "root", h_ca_key_id(h)) in on_token  # the CA, as device create does
    one_line_error(h.cli("device", "import-cert", "dev-byo", "--cert", cert_file), "complete already")

    register_on_emulator(h, "dev-byo", h.home / "pki" / "ca" / "root" / "cert.pem")


def h_ca_key_id(h) -> bytes:
    from hsm_setup import ca
    return ca.load_ca(h.home, "root").key_id


def test_import_refuses_another_key_or_another_cn_and_writes_nothing(byo_home, tmp_path):
    h = byo_home
    csr_file = tmp_path / "dev.csr"
    assert h.cli("device", "csr", "dev-byo", "--out", csr_file).code == 0
    factory = FileCa("factory")
    request = x509.load_pem_x509_csr(csr_file.read_bytes())
    other_key = write_pem(tmp_path / "other-key.pem", factory.issue(ec.generate_private_key(ec.SECP256R1()).public_key(), "dev-byo"))
    other_cn = write_pem(tmp_path / "other-cn.pem", factory.issue(request.public_key(), "dev-other"))
    chain = factory.write(tmp_path / "factory.pem")
    before = objects(h, "devices")
    one_line_error(h.cli("device", "import-cert", "dev-byo", "--cert", other_key, "--chain", chain),
                   "for another key")
    one_line_error(h.cli("device", "import-cert", "dev-byo", "--cert", other_cn, "--chain", chain),
                   "CN=dev-other", "not for 'dev-byo'")
    right = write_pem(tmp_path / "right.pem", factory.issue(request.public_key(), "dev-byo"))
    one_line_error(h.cli("device", "import-cert", "dev-byo", "--cert", right), "--chain FILE")
    one_line_error(h.cli("device", "import-cert", "dev-nope", "--cert", right), "no pending identity")
    assert objects(h, "devices") == before
    assert devices.list_devices(h.home) == [] and byo.find_pending(h.home, "dev-byo") is not None
    assert not devices.pem_dir(h.home).exists() or not any(devices.pem_dir(h.home).iterdir())

    assert h.cli("device", "import-cert", "dev-byo", "--cert", right, "--chain", chain).code == 0
    record = devices.lookup_device(h.home, "dev-byo")
    assert record.ca_name == "external:CN=factory"
    assert record.chain_x509() == [factory.cert]  # from the chain file: no CA registry entry


def test_sign_csr_refusals_and_clamped_days(byo_home, tmp_path):
    h = byo_home
    key = ec.generate_private_key(ec.SECP256R1())

    def csr(cn):
        return (x509.CertificateSigningRequestBuilder()
                .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, cn)]))
                .sign(key, hashes.SHA256()))

    good = tmp_path / "good.csr"
    good.write_bytes(csr("ext-1").public_bytes(serialization.Encoding.PEM))
    der = bytearray(csr("ext-1").public_bytes(serialization.Encoding.DER))
    der[-5] ^= 0x01  # inside the signature
    tampered = tmp_path / "tampered.csr"
    tampered.write_bytes(bytes(der))
    bad_cn = tmp_path / "bad-cn.csr"
    bad_cn.write_bytes(csr("no spaces allowed").public_bytes(serialization.Encoding.PEM))

    one_line_error(h.cli("ca", "sign-csr", "root", "--csr", tampered), "does not verify")
    one_line_error(h.cli("ca", "sign-csr", "root", "--csr", bad_cn), "not a valid registration ID")
    one_line_error(h.cli("ca", "sign-csr", "root", "--csr", tmp_path / "missing.csr"), "cannot read CSR")
    one_line_error(h.cli("ca", "sign-csr", "nope", "--csr", good), "unknown CA 'nope'")
    one_line_error(h.cli("ca", "sign-csr", "root", "--csr", good, "--days", "0"), "--days")

    signed = h.cli("ca", "sign-csr", "root", "--csr", good, "--days", "100000")
    assert signed.code == 0, signed.err
    assert "note:" in signed.err and "ends with the CA" in signed.err
    leaf = x509.load_pem_x509_certificate(signed.out.encode())
    root = x509.load_pem_x509_certificate((h.home / "pki" / "ca" / "root" / "cert.pem").read_bytes())
    assert leaf.not_valid_after_utc == root.not_valid_after_utc
    assert leaf.public_key() == key.public_key()


# --- device adopt -----------------------------------------------------------------------

def pkcs11_tool_identity(h, tmp_path, label, factory):
    """What a factory station leaves on a token: key pair and certificate, id 01, one label."""
    pkcs11_tool(h, "--login", "--pin", h.pin, "--keypairgen", "--key-type", "EC:prime256v1",
                "--label", label, "--id", "01")
    public_der = tmp_path / "pub.der"
    pkcs11_tool(h, "--read-object", "--type", "pubkey", "--id", "01", "--output-file", public_der)
    public_key = serialization.load_der_public_key(public_der.read_bytes())
    cert_der = tmp_path / "cert.der"
    cert_der.write_bytes(factory.issue(public_key, label).public_bytes(serialization.Encoding.DER))
    pkcs11_tool(h, "--login", "--pin", h.pin, "--write-object", cert_der, "--type", "cert",
                "--id", "01", "--label", label)


@needs_pkcs11_tool
def test_adopt_a_pkcs11_tool_identity_then_register_it(softhsm_home, tmp_path):
    h = softhsm_home
    h.init_token("devices")
    factory = FileCa("factory-ca")
    pkcs11_tool_identity(h, tmp_path, "X", factory)
    chain = factory.write(tmp_path / "factory.pem")
    h.lib(fresh=True)  # see the objects the other process wrote
    before = objects(h, "devices")
    one_line_error(h.cli("device", "adopt", "pkcs11:token=devices;object=X"), "--chain FILE")
    adopted = h.cli("device", "adopt", "pkcs11:token=devices;object=X", "--chain", chain, "--json")
    assert adopted.code == 0, adopted.err
    data = json.loads(adopted.out)
    assert data["registration_id"] == "X" and data["key_id"] == "01" and data["label"] == "X"
    assert data["ca"] == "external:CN=factory-ca" and data["key_type"] == "ec-p256"
    assert objects(h, "devices") == before  # adopt only reads the token
    one_line_error(h.cli("device", "adopt", "pkcs11:token=devices;object=X", "--chain", chain), "exists already")
    one_line_error(h.cli("device", "adopt", "pkcs11:token=devices;object=Y"), "no private key")
    one_line_error(h.cli("device", "adopt", "pkcs11:object=X"), "must name the token")
    register_on_emulator(h, "X", chain)


@needs_pkcs11_tool
def test_adopt_refuses_a_key_whose_certificate_is_missing_or_foreign(softhsm_home, tmp_path):
    h = softhsm_home
    h.init_token("devices")
    pkcs11_tool(h, "--login", "--pin", h.pin, "--keypairgen", "--key-type", "EC:prime256v1",
                "--label", "lonely", "--id", "02")
    factory = FileCa("factory-ca")
    foreign = tmp_path / "foreign.der"
    foreign.write_bytes(factory.issue(ec.generate_private_key(ec.SECP256R1()).public_key(), "lonely")
                        .public_bytes(serialization.Encoding.DER))
    h.lib(fresh=True)
    one_line_error(h.cli("device", "adopt", "pkcs11:token=devices;id=%02"), "no certificate of this key")
    pkcs11_tool(h, "--login", "--pin", h.pin, "--write-object", foreign, "--type", "cert", "--id", "02",
                "--label", "lonely")
    h.lib(fresh=True)
    one_line_error(h.cli("device", "adopt", "pkcs11:token=devices;id=%02", "--chain",
                         factory.write(tmp_path / "f.pem")), "no certificate of this key")
    assert devices.list_devices(h.home) == []


def test_a_registry_without_the_pending_table_still_opens(byo_home):
    h = byo_home
    assert h.cli("device", "create", "dev-1", "--ca", "root").code == 0
    assert byo.find_pending(h.home, "dev-1") is None  # adds the table to the existing registry
    assert h.cli("device", "csr", "dev-2").code == 0
    assert [r.registration_id for r in devices.list_devices(h.home)] == ["dev-1"]


def test_sign_csr_on_a_ca_token_that_lost_its_signing_mechanism(byo_home, tmp_path):
    h = byo_home
    assert h.cli("device", "csr", "dev-byo", "--out", tmp_path / "dev.csr").code == 0
    conf = h.home / "softhsm2.conf"
    conf.write_text(conf.read_text().replace("slots.mechanisms = ALL", "slots.mechanisms = CKM_EC_KEY_PAIR_GEN"))
    h.lib(fresh=True)  # SoftHSM reads its configuration at C_Initialize
    one_line_error(h.cli("ca", "sign-csr", "root", "--csr", tmp_path / "dev.csr"), "mechanism ECDSA missing")


@needs_pkcs11_tool
def test_adopt_finds_the_ca_on_the_token_and_wants_a_unique_label(softhsm_home, tmp_path):
    h = softhsm_home
    h.init_token("devices")
    factory = FileCa("factory-ca")
    pkcs11_tool_identity(h, tmp_path, "dev-7", factory)
    ca_der = tmp_path / "ca.der"
    ca_der.write_bytes(factory.cert.public_bytes(serialization.Encoding.DER))
    pkcs11_tool(h, "--login", "--pin", h.pin, "--write-object", ca_der, "--type", "cert", "--id", "a0",
                "--label", "factory-ca")
    pkcs11_tool(h, "--login", "--pin", h.pin, "--keypairgen", "--key-type", "EC:prime256v1",
                "--label", "dev-7", "--id", "03")  # a second key under the same label
    h.lib(fresh=True)
    one_line_error(h.cli("device", "adopt", "pkcs11:token=devices;id=%01"), "2 private keys", "unique")
    pkcs11_tool(h, "--login", "--pin", h.pin, "--delete-object", "--type", "privkey", "--id", "03")
    h.lib(fresh=True)
    result = h.cli("device", "adopt", "pkcs11:token=devices;id=%01")  # no --chain: the CA is on the token
    assert result.code == 0, result.err
    assert devices.lookup_device(h.home, "dev-7").chain_x509() == [factory.cert]

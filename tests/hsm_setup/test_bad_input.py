"""Bad input: one-line error, non-zero exit, nothing half-written (no orphan objects)."""

import pytest
from cryptography import x509
from pkcs11 import Attribute, ObjectClass

from hsm_setup import certificates, devices
from device_sim.common.errors import UserError


@pytest.fixture
def small(softhsm_home):
    """A state dir with tokens 'ca' and 'devices', a root CA and one device."""
    h = softhsm_home
    h.init_token("ca")
    h.init_token("devices")
    assert h.cli("ca", "create", "root").code == 0
    assert h.cli("device", "create", "dev-1", "--ca", "root").code == 0
    return h


def token_objects(h, label):
    """(class, label) of every object on a token, to compare before/after a refusal."""
    return sorted((int(o[Attribute.CLASS]), o[Attribute.LABEL]) for o in h.session(label).get_objects())


def snapshot(h):
    pems = sorted(p.name for p in devices.pem_dir(h.home).iterdir())
    return token_objects(h, "ca"), token_objects(h, "devices"), pems, \
        [r.registration_id for r in devices.list_devices(h.home)]


def assert_one_line_error(result, *words):
    assert result.code != 0
    assert result.out == ""
    lines = result.err.strip().splitlines()
    assert len(lines) == 1, result.err
    assert lines[0].startswith("hsm-setup: error: ")
    for word in words:
        assert word in lines[0]


def check_refused(h, argv, *words):
    before = snapshot(h)
    assert_one_line_error(h.cli(*argv), *words)
    assert snapshot(h) == before


def test_wrong_pin(small, tmp_path):
    pin_file = tmp_path / "wrong.pin"
    pin_file.write_text("wrong-pin-xyz\n")
    before = snapshot(small)
    result = small.cli("device", "create", "dev-2", "--ca", "root", "--pin-file", pin_file)
    assert_one_line_error(result, "wrong user PIN")
    assert "wrong-pin-xyz" not in result.err
    assert snapshot(small) == before


def test_unknown_token(small):
    check_refused(small, ["device", "create", "dev-2", "--ca", "root", "--token", "nope"],
                  "unknown token 'nope'")


def test_unknown_ca(small):
    check_refused(small, ["device", "create", "dev-2", "--ca", "nope"], "unknown CA 'nope'")
    check_refused(small, ["ca", "create", "sub", "--parent", "nope"], "unknown CA 'nope'")


def test_missing_module(small):
    check_refused(small, ["device", "create", "dev-2", "--ca", "root", "--module", "/no/such/module.so"],
                  "PKCS#11 module not found")


def test_wrong_module(small, tmp_path):
    fake = tmp_path / "libfake.so"
    fake.write_bytes(b"this is not a shared object")
    check_refused(small, ["device", "create", "dev-2", "--ca", "root", "--module", fake],
                  "cannot load PKCS#11 module")


@pytest.mark.parametrize("bad", ["dev 2", "dev.", "x" * 65, "dév"])
def test_invalid_registration_id(small, bad):
    check_refused(small, ["device", "create", bad, "--ca", "root"], "invalid registration ID")


def test_duplicate_registration_id_is_case_insensitive(small):
    check_refused(small, ["device", "create", "DEV-1", "--ca", "root"], "exists already")


def test_duplicate_label_on_token_outside_registry(small):
    # An object created by another tool with the same label, on a token we never used:
    # refused before anything (not even the CA chain) is written to it.
    small.init_token("fresh")
    small.session("fresh").create_object({Attribute.CLASS: ObjectClass.DATA, Attribute.TOKEN: True,
                                          Attribute.LABEL: "dev-9", Attribute.VALUE: b"x"})
    before = token_objects(small, "fresh")
    check_refused(small, ["device", "create", "dev-9", "--ca", "root", "--token", "fresh"],
                  "already holds objects")
    assert token_objects(small, "fresh") == before


def test_device_named_as_ca(small):
    check_refused(small, ["device", "create", "dev-2", "--ca", "dev-1"], "is a device identity, not a CA")


def test_ca_whose_certificate_is_not_a_ca(small):
    # Tamper with the registry: the 'CA' certificate is a device leaf.
    (small.home / "pki" / "ca" / "root" / "cert.pem").write_bytes(
        devices.lookup_device(small.home, "dev-1").cert_path.read_bytes())
    check_refused(small, ["device", "create", "dev-2", "--ca", "root"], "is not a CA")
    check_refused(small, ["ca", "create", "sub", "--parent", "root"], "is not a CA")


def test_duplicate_ca(small):
    check_refused(small, ["ca", "create", "root"], "exists already")


def test_unknown_key_type_is_a_usage_error(small):
    result = small.cli("device", "create", "dev-2", "--ca", "root", "--key", "ed448")
    assert result.code == 2 and "invalid choice" in result.err


def test_key_type_the_token_lacks(softhsm_home):
    h = softhsm_home
    conf = h.home / "softhsm2.conf"
    conf.write_text(conf.read_text().replace("slots.mechanisms = ALL",
                                             "slots.mechanisms = CKM_EC_KEY_PAIR_GEN,CKM_ECDSA"))
    h.init_token("ca")
    h.init_token("devices")
    assert h.cli("ca", "create", "root").code == 0
    before = token_objects(h, "devices")
    assert_one_line_error(h.cli("device", "create", "dev-rsa", "--ca", "root", "--key", "rsa-2048"),
                          "does not support rsa-2048")
    assert token_objects(h, "devices") == before
    assert_one_line_error(h.cli("ca", "create", "rsa-root", "--key", "rsa-3072"), "does not support rsa-3072")


def test_failure_after_key_generation_leaves_no_orphans(small, monkeypatch):
    # Fault injection in our own code (the token is real): issuing fails after keygen.
    def broken_issue(**kwargs):
        raise UserError("injected failure while issuing")
    monkeypatch.setattr(certificates, "issue", broken_issue)
    check_refused(small, ["device", "create", "dev-2", "--ca", "root"], "injected failure")
    check_refused(small, ["ca", "create", "sub", "--parent", "root"], "injected failure")
    assert not (small.home / "pki" / "ca" / "sub").exists()


def test_no_pin_and_no_terminal(small, monkeypatch):
    monkeypatch.delenv("PKCS11_PIN")
    check_refused(small, ["device", "create", "dev-2", "--ca", "root"], "no user PIN", "--pin-file")


def test_pin_file_is_used(small, monkeypatch):
    monkeypatch.delenv("PKCS11_PIN")
    result = small.cli("device", "create", "dev-2", "--ca", "root", "--pin-file", small.pin_file)
    assert result.code == 0, result.err
    assert small.pin not in result.err


def test_separate_ca_pin(softhsm_home, monkeypatch, tmp_path):
    h = softhsm_home
    from hsm_setup import tokens
    tokens.init_token(h.lib(), "ca", so_pin=h.so_pin, user_pin="ca-pin-777")
    h.init_token("devices")
    ca_pin = tmp_path / "ca.pin"
    ca_pin.write_text("ca-pin-777\n")
    assert h.cli("ca", "create", "root", "--ca-pin-file", ca_pin).code == 0
    assert_one_line_error(h.cli("device", "create", "d1", "--ca", "root"), "wrong user PIN for token 'ca'")
    monkeypatch.setenv("PKCS11_CA_PIN", "ca-pin-777")
    assert h.cli("device", "create", "d1", "--ca", "root").code == 0


def test_token_init_refuses_existing_label(small):
    assert_one_line_error(small.cli("token", "init", "ca"), "exists already")
    assert_one_line_error(small.cli("token", "init", "x" * 33), "1..32 bytes")


def test_bad_verification_code(small):
    assert_one_line_error(small.cli("ca", "verification-cert", "root", "--code", "a b\n"),
                          "invalid verification code")


def test_device_chain_still_valid_after_refusals(small):
    leaf = devices.lookup_device(small.home, "dev-1").certificate_x509()
    assert isinstance(leaf, x509.Certificate)

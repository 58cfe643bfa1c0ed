"""hsm-setup on a TPM token (tpm2-pkcs11): CAs and devices of every key type the TPM offers,
a one-line refusal for what it does not, and the token quirks hsm_setup.keys works around
(docs/token-quirks.md), each pinned down so a module upgrade that changes them shows up."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pkcs11
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11.util.ec import encode_named_curve_parameters

from device_sim.testing import Emulator
from hsm_setup import keys, tokens
from device_sim.common.errors import UserError
from hsm_setup.key_types import KEY_TYPES, KeySpec, key_spec

BIN = Path(sys.executable).parent


def _objects(session, label: str) -> list:
    return list(session.get_objects({Attribute.LABEL: label}))


def _offered(h, spec: KeySpec) -> bool:
    try:
        keys.check_key_support(tokens.find_token(h.lib(), h.tpm.token_label), spec)
    except UserError:
        return False
    return True


def _assert_one_line_error(result, *fragments):
    assert result.code == 2, result
    assert "Traceback" not in result.err
    lines = [line for line in result.err.splitlines() if line.startswith("hsm-setup: ")]
    assert len(lines) == 1, result.err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.mark.parametrize("key", list(KEY_TYPES))
def test_ca_create_and_device_create_on_the_tpm(tpm_home, key):
    h = tpm_home
    spec = key_spec(key)
    ca_name, device = f"tpm-root-{key}", f"tpm-dev-{key}"
    created = h.cli("ca", "create", ca_name, "--token", "tpm", "--key", key)
    if not _offered(h, spec):
        _assert_one_line_error(created, key)
        assert _objects(h.session(), ca_name) == []
        return
    assert created.code == 0, created.err
    made = h.cli("device", "create", device, "--ca", ca_name, "--token", "tpm", "--key", key)
    assert made.code == 0, made.err
    assert f"pkcs11:token=tpm;object={device};id=" in made.out

    session = h.session()
    for label in (ca_name, device):
        found = {o[Attribute.CLASS]: o for o in _objects(session, label)}
        assert set(found) == {ObjectClass.PRIVATE_KEY, ObjectClass.PUBLIC_KEY, ObjectClass.CERTIFICATE}
        private = found[ObjectClass.PRIVATE_KEY]
        assert private[Attribute.SENSITIVE] is True and private[Attribute.EXTRACTABLE] is False
        assert private[Attribute.ALWAYS_SENSITIVE] is True and private[Attribute.NEVER_EXTRACTABLE] is True
        assert private[Attribute.PRIVATE] is True and private[Attribute.SIGN] is True
        assert len({o[Attribute.ID] for o in found.values()}) == 1

    ca_cert = x509.load_pem_x509_certificate((h.home / "pki/ca" / ca_name / "cert.pem").read_bytes())
    ca_cert.verify_directly_issued_by(ca_cert)  # self-signed inside the TPM
    leaf = x509.load_pem_x509_certificate((h.home / "pki/devices" / f"{device}.pem").read_bytes())
    leaf.verify_directly_issued_by(ca_cert)     # issued inside the TPM
    on_token = [o for o in _objects(session, device) if o[Attribute.CLASS] == ObjectClass.CERTIFICATE]
    assert on_token[0][Attribute.VALUE] == leaf.public_bytes(Encoding.DER)


def test_a_key_size_the_tpm_lacks_is_refused_in_one_line(tpm_home):
    h = tpm_home
    rsa4096 = KeySpec("rsa-4096", KeyType.RSA, 4096, None, "sha256", "sha256_rsa",
                      Mechanism.RSA_PKCS_KEY_PAIR_GEN, Mechanism.SHA256_RSA_PKCS)
    token = tokens.find_token(h.lib(), "tpm")
    with pytest.raises(UserError, match=r"does not support rsa-4096 keys \(RSA sizes 1024\.\.3072\)"):
        keys.check_key_support(token, rsa4096)
    # Asked anyway (a module whose mechanism info is silent): still a UserError, nothing left.
    with pytest.raises(UserError, match=r"^token 'tpm' cannot generate rsa-4096 keys \(AttributeValueInvalid\)"):
        keys.generate_keypair(h.session(), rsa4096, key_id=b"rsa-4096", label="tpm-rsa-4096")
    assert _objects(h.session(), "tpm-rsa-4096") == []


def test_a_private_key_that_is_not_sensitive_is_destroyed_and_refused(tpm_home, monkeypatch):
    # tpm2-pkcs11 makes a key with CKA_SENSITIVE false when the template does not ask for
    # true (while CKA_ALWAYS_SENSITIVE reads true): the read-back check must catch that.
    h = tpm_home
    # DEFAULT, not a missing key: python-pkcs11 would put its own CKA_SENSITIVE true back.
    template = {**keys.PRIVATE_KEY_TEMPLATE, Attribute.SENSITIVE: pkcs11.constants.DEFAULT}
    monkeypatch.setattr(keys, "PRIVATE_KEY_TEMPLATE", template)
    with pytest.raises(UserError, match=r"ec-p256 private key that is not CKA_SENSITIVE: refusing"):
        keys.generate_keypair(h.session(), key_spec("ec-p256"), key_id=b"loose", label="tpm-loose")
    assert _objects(h.session(), "tpm-loose") == []


def test_quirk_tpm2_pkcs11_refuses_verify_on_the_public_key_with_decrypt_off(tpm_home):
    # The template hsm_setup used before: CKR_GENERAL_ERROR, module log
    # "User specified and TPM specified attr mismatch: 0x10a" (0x10a = CKA_VERIFY).
    session = tpm_home.session()
    with pytest.raises(pkcs11.GeneralError):
        session.generate_keypair(
            KeyType.EC, store=True, label="tpm-old-template",
            public_template={Attribute.VERIFY: True, Attribute.ENCRYPT: False, Attribute.WRAP: False,
                             Attribute.PRIVATE: False,
                             Attribute.EC_PARAMS: encode_named_curve_parameters("secp256r1")},
            private_template={Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False,
                              Attribute.SIGN: True, Attribute.DECRYPT: False, Attribute.UNWRAP: False,
                              Attribute.DERIVE: False})
    assert _objects(session, "tpm-old-template") == []


def test_quirk_tpm2_pkcs11_makes_no_session_keys_and_keys_falls_back_to_token_keys(tpm_home):
    h = tpm_home
    spec = key_spec("ec-p256")
    drop = {a: pkcs11.constants.DEFAULT for a in (Attribute.VERIFY, Attribute.ENCRYPT, Attribute.WRAP)}
    with pytest.raises(pkcs11.AttributeValueInvalid):  # "Expected attr 0x1 to be 0, got 1"
        h.session().generate_keypair(KeyType.EC, store=False, label="tpm-session-key",
                                     public_template={**drop, Attribute.EC_PARAMS: spec.ec_params()})
    public, private = keys.generate_keypair(h.session(), spec, key_id=b"throwaway",
                                            label="tpm-throwaway", store=False)
    assert private[Attribute.TOKEN] is True  # what the caller must destroy
    keys.destroy_quietly(public, private)
    assert _objects(h.session(), "tpm-throwaway") == []


def test_registration_through_the_emulator_with_tpm_keys(tpm_home, tmp_path):
    """The demo flow: CA and device keys in the TPM, proof of possession signed there,
    mTLS registration with the device key in the TPM (awscrt's PKCS#11 TLS)."""
    h = tpm_home
    assert h.cli("ca", "create", "tpm-demo-root", "--token", "tpm").code == 0
    assert h.cli("ca", "create", "tpm-demo-int", "--parent", "tpm-demo-root", "--token", "tpm").code == 0
    assert h.cli("device", "create", "tpm-demo-dev", "--ca", "tpm-demo-int", "--token", "tpm").code == 0
    env = dict(os.environ)

    def device_sim(*argv, check=True):
        done = subprocess.run([str(BIN / "device-sim"), *map(str, argv)], env=env, text=True,
                              capture_output=True, timeout=120)
        assert not check or done.returncode == 0, done.stderr
        return done

    with Emulator.spawn(h.home, "--no-mqtt", "--no-amqp", env=env):
        root_pem = h.home / "pki/ca/tpm-demo-root/cert.pem"
        device_sim("stub", "ca", "upload", "tpm-demo-root", root_pem)
        code = device_sim("stub", "ca", "code", "tpm-demo-root").stdout.strip()
        proof = tmp_path / "verify.pem"
        made = h.cli("ca", "verification-cert", "tpm-demo-root", "--code", code, "--out", proof)
        assert made.code == 0, made.err
        assert _objects(h.session(), "verification") == []  # the throw-away key is gone
        device_sim("stub", "ca", "verify", "tpm-demo-root", proof)
        device_sim("stub", "group", "create", "tpm-demo", "--ca-ref", "tpm-demo-root")
        lint = device_sim("chain", "lint", "tpm-demo-dev", "--verified", root_pem)
        assert "ok:" in lint.stdout
        registered = device_sim("register", "tpm-demo-dev", "--emulator", "--json", "--timeout", "60",
                                check=False)
        assert registered.returncode == 0, registered.stderr
        assert json.loads(registered.stdout)["status"] == "assigned"

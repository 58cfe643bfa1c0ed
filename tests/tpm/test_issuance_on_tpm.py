"""Certificate issuance to a device whose token is a TPM (tpm2-pkcs11): the new P-384 key
pair is made in the TPM, the CSR signed there, the issued chain stored beside it. Only token
objects on this module, and few key pairs per process (docs/token-quirks.md): one issuance."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from device_sim.common.x509util import load_certificate_file
from device_sim.testing import Emulator

BIN = Path(sys.executable).parent
READ_BACK = """
import json, sys
from pkcs11 import Attribute, ObjectClass
from hsm_setup import tokens
from hsm_setup.context import Pkcs11Context
from hsm_setup.key_types import key_spec
from hsm_setup.keys import public_key_info
path, label, pin, name = sys.argv[1:]
session = tokens.session(Pkcs11Context(".").library(path), label, pin)
found = {o[Attribute.CLASS]: o for o in session.get_objects({Attribute.LABEL: name})}
private = found[ObjectClass.PRIVATE_KEY]
print(json.dumps({
    "private": {"sensitive": private[Attribute.SENSITIVE], "extractable": private[Attribute.EXTRACTABLE]},
    "public": public_key_info(found[ObjectClass.PUBLIC_KEY], key_spec("ec-p384")).dump().hex(),
    "certificate": found[ObjectClass.CERTIFICATE][Attribute.VALUE].hex(),
}))
"""


def test_issue_cert_to_a_tpm_device(tpm_home, tmp_path):
    h = tpm_home
    assert h.cli("ca", "create", "tpm-iss-root", "--token", "tpm").code == 0
    assert h.cli("device", "create", "tpm-iss-dev", "--ca", "tpm-iss-root", "--token", "tpm").code == 0
    env = dict(os.environ)

    def device_sim(*argv, check=True):
        done = subprocess.run([str(BIN / "device-sim"), *map(str, argv)], env=env, text=True,
                              capture_output=True, timeout=120)
        assert "Traceback" not in done.stderr, done.stderr
        assert not check or done.returncode == 0, done.stderr
        return done

    with Emulator.spawn(h.home, "--no-mqtt", "--no-amqp", "--retry-after", "0", env=env):
        device_sim("stub", "ca", "upload", "--verified", "tpm-iss-root", h.home / "pki/ca/tpm-iss-root/cert.pem")
        device_sim("stub", "group", "create", "tpm-iss", "--ca-ref", "tpm-iss-root", "--credential-policy", "default")
        done = device_sim("register", "tpm-iss-dev", "--emulator", "--issue-cert", "--json", "--timeout", "90",
                          check=False)
        assert done.returncode == 0, done.stderr
        issued = json.loads(done.stdout)["issued_certificate"]
        assert issued["subject"] == "CN=tpm-iss-dev" and issued["chain_length"] == 3

    # tpm2-pkcs11 reads a token's objects once per C_Initialize: objects the register process
    # made are read back by a process of their own.
    objects = json.loads(subprocess.run([sys.executable, "-c", READ_BACK, h.tpm.module_path, h.tpm.token_label,
                                         h.pin, "tpm-iss-dev.issued"], env=env, capture_output=True, text=True,
                                        timeout=60, check=True).stdout)
    assert objects["private"] == {"sensitive": True, "extractable": False}
    cert_der, public_spki = bytes.fromhex(objects["certificate"]), bytes.fromhex(objects["public"])
    leaf = x509.load_der_x509_certificate(cert_der)
    issuing, root = load_certificate_file(h.home / "stub/issuing/ca.pem")
    leaf.verify_directly_issued_by(issuing)
    issuing.verify_directly_issued_by(root)
    assert leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "tpm-iss-dev"
    spki = leaf.public_key().public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo)
    assert public_spki == spki

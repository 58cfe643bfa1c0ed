"""The software TPM itself: the token is there, signs with a key generated inside it, goes
away when the emulator dies, and start-up failures leave no process behind."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap

import pkcs11
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, utils
from pkcs11 import Attribute, KeyType, Mechanism, TokenFlag
from pkcs11.constants import DEFAULT
from pkcs11.util.ec import encode_ec_public_key, encode_named_curve_parameters

from device_sim.testing import tpm as tpm_mod
from device_sim.testing.tpm import SoftwareTpm, TpmStartError

from .conftest import TEST_PIN, TEST_SO_PIN

# Exactly what is written here reaches C_GenerateKeyPair: python-pkcs11's default usage
# flags are dropped with DEFAULT (tpm2-pkcs11 refuses some of them, see docs/token-quirks.md).
NO_DEFAULT_FLAGS = {a: DEFAULT for a in (Attribute.ENCRYPT, Attribute.WRAP, Attribute.VERIFY,
                                         Attribute.DECRYPT, Attribute.UNWRAP, Attribute.DERIVE)}
PRIVATE = {**NO_DEFAULT_FLAGS, Attribute.PRIVATE: True, Attribute.SENSITIVE: True,
           Attribute.EXTRACTABLE: False, Attribute.SIGN: True}


def _open(token, pin):
    """A logged-in session; the login is per application, so another test may hold it."""
    try:
        return token.open(rw=True, user_pin=pin)
    except pkcs11.UserAlreadyLoggedIn:
        return token.open(rw=True)


def test_the_token_is_visible_with_its_label(software_tpm):
    lib = pkcs11.lib(software_tpm.module_path)
    token = lib.get_token(token_label=software_tpm.token_label)
    assert token.flags & TokenFlag.TOKEN_INITIALIZED
    assert token.flags & TokenFlag.USER_PIN_INITIALIZED
    assert token.flags & TokenFlag.LOGIN_REQUIRED
    assert "TPM" in token.model
    assert software_tpm.startup_seconds < 30
    assert set(software_tpm.pids()) == {"dbus-daemon", "swtpm", "tpm2-abrmd"}
    with _open(token, software_tpm.user_pin) as session:
        assert list(session.get_objects({Attribute.LABEL: "no-such-object"})) == []


def test_a_p256_key_from_a_minimal_template_signs_and_cryptography_verifies(software_tpm):
    token = pkcs11.lib(software_tpm.module_path).get_token(token_label=software_tpm.token_label)
    with _open(token, software_tpm.user_pin) as session:
        public, private = session.generate_keypair(
            KeyType.EC, store=True, label="minimal-p256", id=b"minimal-p256",
            public_template={**NO_DEFAULT_FLAGS, Attribute.EC_PARAMS: encode_named_curve_parameters("secp256r1")},
            private_template=PRIVATE)
        try:
            assert private[Attribute.SENSITIVE] is True
            assert private[Attribute.EXTRACTABLE] is False
            assert private[Attribute.ALWAYS_SENSITIVE] is True
            assert private[Attribute.NEVER_EXTRACTABLE] is True
            data = b"signed inside the TPM"
            raw = private.sign(hashlib.sha256(data).digest(), mechanism=Mechanism.ECDSA)
            assert len(raw) == 64
            signature = utils.encode_dss_signature(int.from_bytes(raw[:32], "big"),
                                                   int.from_bytes(raw[32:], "big"))
            verifier = serialization.load_der_public_key(encode_ec_public_key(public))
            verifier.verify(signature, data, ec.ECDSA(hashes.SHA256()))
            with pytest.raises(InvalidSignature):
                verifier.verify(signature, data + b"!", ec.ECDSA(hashes.SHA256()))
        finally:
            private.destroy()
            public.destroy()


# Runs in a subprocess: this process's libtpm2_pkcs11.so belongs to the session TPM.
_KILL_CHILD = textwrap.dedent("""
    import hashlib, sys, pkcs11
    from pkcs11 import Attribute, KeyType, Mechanism
    from pkcs11.constants import DEFAULT
    from pkcs11.util.ec import encode_named_curve_parameters
    module, label, pin = sys.argv[1:4]
    drop = {a: DEFAULT for a in (Attribute.ENCRYPT, Attribute.WRAP, Attribute.VERIFY,
                                 Attribute.DECRYPT, Attribute.UNWRAP, Attribute.DERIVE)}
    session = pkcs11.lib(module).get_token(token_label=label).open(rw=True, user_pin=pin)
    public, private = session.generate_keypair(
        KeyType.EC, store=True, label="doomed",
        public_template={**drop, Attribute.EC_PARAMS: encode_named_curve_parameters("secp256r1")},
        private_template={**drop, Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False,
                          Attribute.SIGN: True})
    digest = hashlib.sha256(b"x").digest()
    private.sign(digest, mechanism=Mechanism.ECDSA)
    print("ready", flush=True)
    sys.stdin.readline()          # the parent kills the TPM now
    try:
        private.sign(digest, mechanism=Mechanism.ECDSA)
    except pkcs11.PKCS11Error as exc:
        print("failed", type(exc).__name__, flush=True)
    else:
        print("signed after all", flush=True)
""")


def test_kill_tpm_makes_the_next_operation_fail_with_a_pkcs11_error(fresh_tpm):
    child = subprocess.Popen(
        [sys.executable, "-c", _KILL_CHILD, fresh_tpm.module_path, fresh_tpm.token_label, TEST_PIN],
        env={**os.environ, **fresh_tpm.env}, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready", child.stderr.read()
        fresh_tpm.kill_tpm()
        assert "swtpm" not in fresh_tpm.pids()
        out, err = child.communicate("go\n", timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    # tpm2-pkcs11 answers a vanished TPM with CKR_GENERAL_ERROR ("Esys_Sign: tcti:IO failure").
    assert out.split() == ["failed", "GeneralError"], err
    assert child.returncode == 0, err


_LIMIT_CHILD = textwrap.dedent("""
    import sys, pkcs11
    from pkcs11 import Attribute, KeyType
    from pkcs11.constants import DEFAULT
    from pkcs11.util.ec import encode_named_curve_parameters
    module, label, pin = sys.argv[1:4]
    drop = {a: DEFAULT for a in (Attribute.ENCRYPT, Attribute.WRAP, Attribute.VERIFY,
                                 Attribute.DECRYPT, Attribute.UNWRAP, Attribute.DERIVE)}
    session = pkcs11.lib(module).get_token(token_label=label).open(rw=True, user_pin=pin)
    for made in range(100):
        try:
            public, private = session.generate_keypair(
                KeyType.EC, store=True, label="limit",
                public_template={**drop, Attribute.EC_PARAMS: encode_named_curve_parameters("secp256r1")},
                private_template={**drop, Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False,
                                  Attribute.SIGN: True})
        except pkcs11.PKCS11Error as exc:
            print(made, type(exc).__name__)
            break
        public.destroy()
        private.destroy()     # does not unload it from the TPM
    else:
        print(made + 1, "none")
""")


def test_quirk_one_c_initialize_generates_about_13_key_pairs_under_default_abrmd(fresh_tpm):
    # tpm2-pkcs11 1.9 keeps two TPM objects loaded per generated key pair until C_Finalize
    # (destroying the objects does not unload them); tpm2-abrmd allows 27 per client:
    # "Esys_LoadExternal: rmt:warn(2.0): out of memory for object contexts", CKR_GENERAL_ERROR.
    done = subprocess.run(
        [sys.executable, "-c", _LIMIT_CHILD, fresh_tpm.module_path, fresh_tpm.token_label, TEST_PIN],
        env={**os.environ, **fresh_tpm.env}, capture_output=True, text=True, timeout=120)
    made, error = done.stdout.split()
    assert error == "GeneralError", done.stderr
    assert 10 <= int(made) <= 20, done.stdout


def test_stop_ends_every_process_it_started(tmp_path):
    tpm = SoftwareTpm.launch(tmp_path / "t", label="short", user_pin=TEST_PIN, so_pin=TEST_SO_PIN)
    pids = tpm.pids()
    assert set(pids) == {"dbus-daemon", "swtpm", "tpm2-abrmd"}
    tpm.stop()
    tpm.stop()  # idempotent
    assert tpm.pids() == {}
    for pid in pids.values():
        assert not _running(pid)


def test_a_failing_step_ends_what_was_started_and_names_the_program(tmp_path, monkeypatch):
    started = []
    real_init = tpm_mod._Process.__init__

    def recording_init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        started.append(self.popen.pid)

    real_find = tpm_mod._find_program
    monkeypatch.setattr(tpm_mod._Process, "__init__", recording_init)
    monkeypatch.setattr(tpm_mod, "_find_program",
                        lambda name: "/bin/false" if name == "tpm2_ptool" else real_find(name))
    with pytest.raises(TpmStartError) as failure:
        SoftwareTpm.launch(tmp_path / "t", user_pin=TEST_PIN, so_pin=TEST_SO_PIN)
    assert str(failure.value).startswith("tpm2_ptool init failed")
    assert "\n" not in str(failure.value)
    assert len(started) == 3  # dbus-daemon, swtpm, tpm2-abrmd were up before tpm2_ptool ran
    for pid in started:
        assert not _running(pid)


def test_a_missing_program_names_the_debian_package(tmp_path, monkeypatch):
    monkeypatch.setitem(tpm_mod.PROGRAMS, "swtpm-not-installed", "swtpm")
    with pytest.raises(TpmStartError, match=r"^swtpm-not-installed not found: install the Debian package swtpm"):
        SoftwareTpm.launch(tmp_path / "t")


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie nobody reaped still answers kill(0); it is not running.
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False

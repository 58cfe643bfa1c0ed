"""`hsm-setup token probe` on real SoftHSM tokens: a full one, and ones whose
mechanisms are cut down in softhsm2.conf (as a restricted HSM or a TPM would be).
SoftHSM 2.6.1 ignores the documented "-CKM_..." exclusion form: lists name what stays."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from pkcs11 import Attribute

from hsm_setup import module

ALL_KEY_TYPES = ["ec-p256", "ec-p384", "rsa-2048", "rsa-3072"]


def restrict_mechanisms(h, value):
    conf = h.home / "softhsm2.conf"
    conf.write_text(conf.read_text().replace("slots.mechanisms = ALL", f"slots.mechanisms = {value}"))


def token_objects(h, label):
    """Every object the logged-in user sees (session objects of this process included)."""
    return sorted((int(o[Attribute.CLASS]), o[Attribute.LABEL]) for o in h.session(label).get_objects())


def probe_json(h, *argv):
    result = h.cli("token", "probe", "--json", *argv)
    assert "Traceback" not in result.err
    return result.code, json.loads(result.out)


def test_full_softhsm_token_is_usable_and_left_as_it_was(softhsm_home):
    h = softhsm_home
    h.init_token("devices")
    h.init_token("ca")
    assert h.cli("ca", "create", "root").code == 0
    before = token_objects(h, "ca")
    code, report = probe_json(h, "--token", "ca")
    assert code == 0, report
    assert report["token"] == "ca" and report["module"] == h.module_path
    assert report["usable_for_dps"] is True and report["problems"] == []
    assert report["key_types"] == ALL_KEY_TYPES
    assert report["non_extractable"] is True
    assert isinstance(report["sign_ms"], float) and 0 < report["sign_ms"] < 1000
    assert {"ECDSA", "EC_KEY_PAIR_GEN", "RSA_PKCS", "SHA256_RSA_PKCS"} <= set(report["mechanisms"])
    assert "LOGIN_REQUIRED" in report["flags"] and "max_sessions" in report
    detail = report["key_type_details"]["ec-p256"]
    assert detail["sensitive"] and not detail["extractable"]
    assert detail["always_sensitive"] and detail["never_extractable"]
    assert token_objects(h, "ca") == before  # the CA key and certificate, nothing more


def test_text_report_and_default_token(softhsm_home):
    h = softhsm_home
    h.init_token("only-token")
    result = h.cli("token", "probe")  # the module's only token
    assert result.code == 0, result.err
    assert "token:       only-token" in result.out
    assert "ec-p256   yes" in result.out and "verdict:     usable" in result.out


def test_token_without_signing_mechanisms_is_not_usable(softhsm_home):
    h = softhsm_home
    restrict_mechanisms(h, "CKM_EC_KEY_PAIR_GEN,CKM_RSA_PKCS_KEY_PAIR_GEN")
    h.init_token("devices")
    before = token_objects(h, "devices")
    code, report = probe_json(h)
    assert code == 1
    assert report["usable_for_dps"] is False and report["key_types"] == []
    assert report["sign_ms"] is None
    assert "ECDSA" not in report["mechanisms"] and "EC_KEY_PAIR_GEN" in report["mechanisms"]
    assert len(report["problems"]) == 1
    assert "no key type can be generated and sign" in report["problems"][0]
    assert "ec-p256: mechanism ECDSA missing" in report["problems"][0]
    assert "rsa-2048: mechanism SHA256_RSA_PKCS, RSA_PKCS missing" in report["problems"][0]
    # The keys were generated (their protection read back) even though they cannot sign.
    assert report["key_type_details"]["ec-p256"]["sensitive"] is True
    assert token_objects(h, "devices") == before


def test_token_without_ecdsa_offers_only_rsa(softhsm_home):
    h = softhsm_home
    restrict_mechanisms(h, "CKM_EC_KEY_PAIR_GEN,CKM_RSA_PKCS_KEY_PAIR_GEN,CKM_RSA_PKCS,CKM_SHA256_RSA_PKCS")
    h.init_token("devices")
    code, report = probe_json(h, "--token", "devices")
    assert code == 0 and report["usable_for_dps"] is True
    assert report["key_types"] == ["rsa-2048", "rsa-3072"]
    assert "ECDSA missing" in report["key_type_details"]["ec-p384"]["reason"]
    assert report["sign_ms"] > 0  # of rsa-2048, the first usable type


def test_token_without_key_generation_tries_nothing(softhsm_home):
    h = softhsm_home
    restrict_mechanisms(h, "CKM_SHA256")
    h.init_token("devices")
    code, report = probe_json(h)
    assert code == 1 and report["key_types"] == [] and report["non_extractable"] is False
    assert report["key_type_details"]["rsa-2048"]["sensitive"] is None  # never generated


def test_wrong_pin_is_one_line_and_exit_2(softhsm_home, tmp_path):
    h = softhsm_home
    h.init_token("devices")
    wrong = tmp_path / "wrong.pin"
    wrong.write_text("999999\n")
    result = h.cli("token", "probe", "--pin-file", wrong)
    assert result.code == 2 and result.out == ""
    lines = result.err.strip().splitlines()
    assert len(lines) == 1 and "wrong user PIN for token 'devices'" in lines[0]
    assert "999999" not in result.err


def test_unknown_token_is_one_line(softhsm_home):
    h = softhsm_home
    h.init_token("devices")
    result = h.cli("token", "probe", "--token", "nope")
    assert result.code == 2 and len(result.err.strip().splitlines()) == 1
    assert "unknown token 'nope'" in result.err


SPY = next((p for p in ("/usr/lib/x86_64-linux-gnu/pkcs11/pkcs11-spy.so",
                        "/usr/lib/aarch64-linux-gnu/pkcs11/pkcs11-spy.so",
                        "/usr/lib/pkcs11/pkcs11-spy.so") if Path(p).is_file()), None)


@pytest.mark.skipif(SPY is None, reason="OpenSC's pkcs11-spy.so is not installed")
@pytest.mark.parametrize("pin_ok", [True, False])
def test_one_login_and_every_session_key_destroyed_through_another_module(softhsm_home, tmp_path, pin_ok):
    h = softhsm_home
    h.init_token("devices")
    spy_log = tmp_path / "spy.log"
    env = dict(os.environ, PKCS11_MODULE=SPY, PKCS11SPY=h.module_path, PKCS11SPY_OUTPUT=str(spy_log),
               SOFTHSM2_CONF=str(h.home / module.SOFTHSM_CONF_NAME))
    if not pin_ok:
        env["PKCS11_PIN"] = "999999"
    done = subprocess.run([sys.executable, "-m", "device_sim.cli.hsm_setup", "token", "probe", "--json"],
                          env=env, capture_output=True, text=True, timeout=120)
    calls = spy_log.read_text(errors="replace")
    assert calls.count("C_Login") == 1
    if not pin_ok:
        assert done.returncode == 2 and "wrong user PIN" in done.stderr
        assert "C_GenerateKeyPair" not in calls
        return
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["module"] == SPY and report["usable_for_dps"] is True
    assert calls.count("C_GenerateKeyPair") == 4 and calls.count("C_DestroyObject") == 8


def test_keys_an_interrupted_probe_left_are_removed(softhsm_home):
    from hsm_setup import keys
    from hsm_setup.key_types import key_spec
    h = softhsm_home
    h.init_token("devices")
    before = token_objects(h, "devices")
    keys.generate_keypair(h.session("devices"), key_spec("ec-p256"), key_id=b"\x01", label="hsm-setup-probe")
    assert token_objects(h, "devices") != before
    code, _ = probe_json(h)
    assert code == 0 and token_objects(h, "devices") == before

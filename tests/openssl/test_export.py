"""`hsm-setup export openssl`: what it writes, and that OpenSSL reads the token key from it."""

from __future__ import annotations

import base64
import subprocess

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat, load_pem_public_key

from hsm_setup.openssl_export import PEM_LABEL, URI_DESCRIPTION, ProviderUri, key_pem

from .conftest import clean_env, hsm_setup, sourced


def test_key_pem_is_the_provider_structure():
    lines = key_pem("pkcs11:token=t;object=k;type=private").decode().splitlines()
    # asn1crypto's unarmor does not take '#' in a label; OpenSSL's PEM reader does
    assert lines[0] == f"-----BEGIN {PEM_LABEL}-----" and lines[-1] == f"-----END {PEM_LABEL}-----"
    parsed = ProviderUri.load(base64.b64decode("".join(lines[1:-1])))
    assert parsed["desc"].native == URI_DESCRIPTION and parsed["uri"].native == "pkcs11:token=t;object=k;type=private"


def test_export_writes_the_four_files_and_openssl_loads_the_token_key(exported, token_pki, pin_file):
    out = exported("device-ec-p256")
    cnf = (out / "openssl.cnf").read_text()
    assert "pkcs11-module-quirks = no-deinit" in cnf and f"pkcs11-module-token-pin = file:{pin_file}" in cnf
    assert "pkcs11-module-load-behavior = early" in cnf  # tests/openssl/test_several_tokens.py says why
    env_text = (out / "env").read_text()
    assert "export OPENSSL_CONF=" in env_text and "export SOFTHSM2_CONF=" in env_text
    for name in ("key.pem", "cert.pem", "openssl.cnf", "env"):
        assert token_pki.pin not in (out / name).read_text()  # the PIN is referenced, never copied
    certs = x509.load_pem_x509_certificates((out / "cert.pem").read_bytes())
    assert [c.subject.rfc4514_string() for c in certs] == ["CN=device-ec-p256", "CN=intermediate", "CN=root"]

    env = sourced(out / "env", clean_env(token_pki))
    public = subprocess.run(["openssl", "pkey", "-in", out / "key.pem", "-pubout"], capture_output=True,
                            env=env, timeout=30)
    assert public.returncode == 0, public.stderr
    from_token = load_pem_public_key(public.stdout).public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    assert from_token == certs[0].public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


def test_unknown_device_is_refused_in_one_line_and_nothing_is_written(token_pki, tmp_path):
    result = hsm_setup("export", "openssl", "no-such-device", "--out", tmp_path / "out",
                       env=clean_env(token_pki), check=False)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "unknown device 'no-such-device'" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()


def test_include_pin_puts_the_pin_in_env_only_and_openssl_signs_with_it(token_pki, tmp_path, provider_installed):
    out = tmp_path / "with-pin"
    hsm_setup("export", "openssl", "device-rsa-2048", "--out", out, "--include-pin", env=token_pki.env())
    assert (out / "env").stat().st_mode & 0o077 == 0
    assert f"PKCS11_PIN={token_pki.pin}" in (out / "env").read_text()
    assert token_pki.pin not in (out / "openssl.cnf").read_text()
    env = sourced(out / "env", clean_env(token_pki))
    data = tmp_path / "data"
    data.write_bytes(b"signed inside the token")
    signed = subprocess.run(["openssl", "dgst", "-sha256", "-sign", out / "key.pem", "-out", tmp_path / "sig",
                             data], capture_output=True, env=env, timeout=30)
    assert signed.returncode == 0, signed.stderr
    cert = x509.load_pem_x509_certificates((out / "cert.pem").read_bytes())[0]
    public = tmp_path / "pub.pem"
    public.write_bytes(cert.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo))
    verified = subprocess.run(["openssl", "dgst", "-sha256", "-verify", public, "-signature", tmp_path / "sig",
                               data], capture_output=True, env=env, timeout=30)
    assert verified.returncode == 0 and b"Verified OK" in verified.stdout

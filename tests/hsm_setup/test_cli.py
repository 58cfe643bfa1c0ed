"""The CLI surface on the session PKI: list/show/export/uri, JSON output, --help."""

import json

import pytest
from cryptography import x509

from device_sim.cli.hsm_setup import build_parser


def test_export_device_cert_and_chain(token_pki, run_hsm_setup):
    home = ["--home", token_pki.home]
    record = token_pki.devices["device-ec-p256"]
    code, out, err = run_hsm_setup("export", "cert", "--device", "device-ec-p256", *home)
    assert code == 0, err
    assert x509.load_pem_x509_certificates(out.encode()) == [record.certificate_x509()]
    code, out, _ = run_hsm_setup("export", "chain", "--device", "DEVICE-EC-P256", *home)
    assert x509.load_pem_x509_certificates(out.encode()) == [record.certificate_x509(), *record.chain_x509()]
    code, out, _ = run_hsm_setup("export", "chain", "--device", "device-line-1", "--no-root", *home)
    subjects = [c.subject.rfc4514_string() for c in x509.load_pem_x509_certificates(out.encode())]
    assert subjects == ["CN=device-line-1", "CN=line", "CN=intermediate"]


def test_export_bundles(token_pki, run_hsm_setup, tmp_path):
    home = ["--home", token_pki.home]
    out_file = tmp_path / "bundle.pem"
    assert run_hsm_setup("export", "bundle", "--out", out_file, *home).code == 0
    names = {c.subject.rfc4514_string() for c in x509.load_pem_x509_certificates(out_file.read_bytes())}
    assert names == {"CN=root", "CN=intermediate", "CN=line"}
    _, out, _ = run_hsm_setup("export", "bundle", "--roots-only", *home)
    assert [c.subject.rfc4514_string() for c in x509.load_pem_x509_certificates(out.encode())] == ["CN=root"]
    _, out, _ = run_hsm_setup("export", "chain", "--ca", "line", *home)
    assert len(x509.load_pem_x509_certificates(out.encode())) == 3


def test_export_needs_exactly_one_subject(token_pki, run_hsm_setup):
    result = run_hsm_setup("export", "cert", "--home", token_pki.home)
    assert result.code == 2 and "exactly one of --device ID or --ca NAME" in result.err


def test_lists_and_show_as_json(token_pki, run_hsm_setup):
    home = ["--home", token_pki.home]
    _, out, _ = run_hsm_setup("device", "list", "--json", *home)
    ids = [d["registration_id"] for d in json.loads(out)]
    assert ids == sorted(token_pki.devices)
    _, out, _ = run_hsm_setup("device", "show", "device-rsa-2048", "--json", *home)
    shown = json.loads(out)
    assert shown["key_type"] == "rsa-2048" and shown["uri"] == token_pki.devices["device-rsa-2048"].uri
    _, out, _ = run_hsm_setup("ca", "list", "--json", *home)
    assert {c["name"]: c["parent"] for c in json.loads(out)} == {
        "root": None, "intermediate": "root", "line": "intermediate"}


def test_token_list(token_pki, run_hsm_setup, monkeypatch):
    monkeypatch.setenv("PKCS11_PIN", token_pki.pin)
    _, out, err = run_hsm_setup("token", "list", "--json", "--home", token_pki.home)
    assert {"ca", "devices"} <= {t["label"] for t in json.loads(out)}, err


def test_uri_show_hides_pin(run_hsm_setup):
    code, out, _ = run_hsm_setup("uri", "show", "pkcs11:token=t;object=o;id=%0A?pin-value=s3cret", "--json")
    assert code == 0
    assert json.loads(out)["id"] == "0a"
    assert "s3cret" not in out


def test_verification_cert_command(token_pki, run_hsm_setup, monkeypatch, tmp_path):
    monkeypatch.setenv("PKCS11_PIN", token_pki.pin)
    out_file = tmp_path / "verify.pem"
    code, _, err = run_hsm_setup("ca", "verification-cert", "root", "--code", "DEADBEEF01",
                                 "--out", out_file, "--home", token_pki.home)
    assert code == 0, err
    cert = x509.load_pem_x509_certificate(out_file.read_bytes())
    assert cert.subject.rfc4514_string() == "CN=DEADBEEF01"
    cert.verify_directly_issued_by(token_pki.root.x509())


@pytest.mark.parametrize("argv", [[], ["token"], ["ca"], ["device"], ["fleet"], ["uri"],
                                  ["ca", "create"], ["device", "create"], ["fleet", "create"],
                                  ["export"], ["ca", "verification-cert"]])
def test_help_everywhere(argv, capsys):
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args([*argv, "--help"])
    assert info.value.code == 0
    assert "usage: hsm-setup" in capsys.readouterr().out

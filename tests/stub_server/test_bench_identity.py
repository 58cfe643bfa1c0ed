"""A bench's own server identity: supplied certificates are used and never replaced, the
generated one names the --host address, and a busy port is named in the error.

Real TLS over loopback: clients are CPython `ssl` with hostname checking on.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import socket
import ssl

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from device_sim.stub import server
from device_sim.stub.net.server_pki import ServerIdentityError, ensure_server_identity

from device_sim.testing import Emulator, LeafCert, TestCA

from .emulator_proc import cli


def server_leaf(issuer: TestCA, names=("localhost", "127.0.0.1"), days: int = 2) -> LeafCert:
    """A TLS server certificate from a lab CA (what a bench brings)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    san = []
    for name in names:
        try:
            san.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            san.append(x509.DNSName(name))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(issuer.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=3))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(issuer.key, hashes.SHA256())
    )
    return LeafCert(cert, key, issuer)


def verified_leaf(host: str, port: int, cafile) -> x509.Certificate:
    """The server certificate, after a handshake that verified it and its name against `cafile`."""
    context = ssl.create_default_context(cafile=str(cafile))
    with socket.create_connection((host, port), timeout=5) as raw:
        with context.wrap_socket(raw, server_hostname=host) as sock:
            return x509.load_der_x509_certificate(sock.getpeercert(binary_form=True))


def test_supplied_files_in_the_tls_directory_are_kept_across_starts(tmp_path, file_cas):
    tls_dir = tmp_path / "stub" / "tls"
    tls_dir.mkdir(parents=True)
    leaf = server_leaf(file_cas.inter1)
    (tls_dir / "server.pem").write_bytes(leaf.cert_pem + file_cas.inter1.cert_pem)
    (tls_dir / "server.key").write_bytes(leaf.key_pem)
    (tls_dir / "ca.pem").write_bytes(file_cas.root.cert_pem)  # the lab's trust anchor, without its key
    before = {p.name: p.read_bytes() for p in tls_dir.iterdir()}
    for _ in range(2):
        identity = ensure_server_identity(tls_dir, ["stub.example.test"])
        assert {p.name: p.read_bytes() for p in tls_dir.iterdir()} == before  # nothing written
    assert identity.cert == tls_dir / "server.pem"
    assert identity.ca_cert is None  # ca.pem did not issue the leaf directly


def test_supplied_files_with_their_issuing_ca_pem_name_it_as_trust_anchor(tmp_path, file_cas):
    tls_dir = tmp_path / "tls"
    tls_dir.mkdir()
    leaf = server_leaf(file_cas.root)
    (tls_dir / "server.pem").write_bytes(leaf.cert_pem)
    (tls_dir / "server.key").write_bytes(leaf.key_pem)
    (tls_dir / "ca.pem").write_bytes(file_cas.root.cert_pem)
    assert ensure_server_identity(tls_dir).ca_cert == tls_dir / "ca.pem"


def test_mismatched_supplied_files_are_refused_not_replaced(tmp_path, file_cas):
    tls_dir = tmp_path / "tls"
    tls_dir.mkdir()
    (tls_dir / "server.pem").write_bytes(server_leaf(file_cas.inter1).cert_pem)
    (tls_dir / "server.key").write_bytes(server_leaf(file_cas.inter1).key_pem)  # another key
    before = {p.name: p.read_bytes() for p in tls_dir.iterdir()}
    with pytest.raises(ServerIdentityError, match="is not the key of"):
        ensure_server_identity(tls_dir)
    assert {p.name: p.read_bytes() for p in tls_dir.iterdir()} == before


def test_expired_supplied_certificate_is_refused(tmp_path, file_cas):
    tls_dir = tmp_path / "tls"
    tls_dir.mkdir()
    leaf = server_leaf(file_cas.inter1, days=-1)
    (tls_dir / "server.pem").write_bytes(leaf.cert_pem)
    (tls_dir / "server.key").write_bytes(leaf.key_pem)
    with pytest.raises(ServerIdentityError, match="outside its validity"):
        ensure_server_identity(tls_dir)


def test_a_ca_pem_without_its_key_is_never_overwritten(tmp_path, file_cas):
    tls_dir = tmp_path / "tls"
    tls_dir.mkdir()
    (tls_dir / "ca.pem").write_bytes(file_cas.root.cert_pem)
    with pytest.raises(ServerIdentityError, match="no ca.key"):
        ensure_server_identity(tls_dir)
    assert (tls_dir / "ca.pem").read_bytes() == file_cas.root.cert_pem
    assert sorted(p.name for p in tls_dir.iterdir()) == ["ca.pem"]


def test_generated_identity_is_still_renewed_for_new_names(tmp_path):
    tls_dir = tmp_path / "tls"
    first = ensure_server_identity(tls_dir)
    ca_before, cert_before = first.ca_cert.read_bytes(), first.cert.read_bytes()
    ensure_server_identity(tls_dir, ["127.0.0.9"])
    assert first.ca_cert.read_bytes() == ca_before and first.cert.read_bytes() != cert_before


def test_generated_certificate_names_the_host_address(tmp_path):
    stub = server.StubServer(server.ServeOptions(home=tmp_path, host="127.0.0.3"), log=lambda m: None)
    ready = stub.start()
    try:
        assert ready["device_url"].startswith("https://127.0.0.3:")
        port = int(ready["device_url"].rsplit(":", 1)[1])
        leaf = verified_leaf("127.0.0.3", port, ready["ca_cert"])  # hostname check passes
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert ipaddress.ip_address("127.0.0.3") in san.get_values_for_type(x509.IPAddress)
    finally:
        stub.close()


def test_serve_with_a_supplied_certificate_presents_it_and_names_the_chain(tmp_path, file_cas):
    leaf = server_leaf(file_cas.inter2)
    files = tmp_path / "bench"
    files.mkdir()
    (files / "server.pem").write_bytes(leaf.cert_pem)
    (files / "server.key").write_bytes(leaf.key_pem)
    (files / "chain.pem").write_bytes(file_cas.inter2.cert_pem + file_cas.inter1.cert_pem + file_cas.root.cert_pem)
    emulator = Emulator.spawn(tmp_path / "home", "--tls-cert", str(files / "server.pem"),
                              "--tls-key", str(files / "server.key"), "--tls-chain", str(files / "chain.pem"))
    try:
        assert emulator.ready["ca_cert"] == str(files / "chain.pem")
        port = int(emulator.device_url.rsplit(":", 1)[1])
        # A client trusting only the lab root verifies: the intermediates were sent.
        (tmp_path / "root.pem").write_bytes(file_cas.root.cert_pem)
        assert verified_leaf("localhost", port, tmp_path / "root.pem") == leaf.cert
        assert not (tmp_path / "home" / "stub" / "tls" / "server.pem").exists()
    finally:
        assert emulator.stop() == 0
    assert (files / "server.pem").read_bytes() == leaf.cert_pem


def test_relative_paths_are_made_absolute_in_the_identity(tmp_path, file_cas, monkeypatch):
    from device_sim.stub.net.server_pki import supplied_identity

    leaf = server_leaf(file_cas.root)
    (tmp_path / "s.pem").write_bytes(leaf.cert_pem)
    (tmp_path / "s.key").write_bytes(leaf.key_pem)
    (tmp_path / "c.pem").write_bytes(file_cas.root.cert_pem)
    monkeypatch.chdir(tmp_path)
    identity = supplied_identity("s.pem", "s.key", "c.pem")
    assert identity.ca_cert == tmp_path / "c.pem" and identity.cert.is_absolute() and identity.key.is_absolute()


def test_serve_without_a_chain_has_no_ca_cert(tmp_path, file_cas):
    leaf = server_leaf(file_cas.root)
    (tmp_path / "s.pem").write_bytes(leaf.cert_pem)
    (tmp_path / "s.key").write_bytes(leaf.key_pem)
    emulator = Emulator.spawn(tmp_path / "home", "--tls-cert", str(tmp_path / "s.pem"), "--tls-key", str(tmp_path / "s.key"))
    try:
        assert emulator.ready["ca_cert"] is None
        assert json.loads((tmp_path / "home" / "stub" / "endpoint.json").read_text())["ca_cert"] is None
    finally:
        emulator.stop()


@pytest.mark.parametrize("args, message", [
    (["--tls-cert", "x.pem"], "--tls-cert and --tls-key go together"),
    (["--tls-chain", "c.pem"], "--tls-chain belongs to --tls-cert"),
    (["--tls-cert", "missing.pem", "--tls-key", "missing.key"], "missing.pem"),
])
def test_bad_tls_options_are_one_line_errors(tmp_path, args, message):
    result = cli("stub", "serve", "--home", tmp_path, "--mqtt-port", "0", "--no-amqp", *args, check=False)
    assert result.returncode == 2 and message in result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_busy_port_is_named_in_the_error(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        result = cli("stub", "serve", "--home", tmp_path, "--port", port, "--mqtt-port", "0", "--no-amqp", check=False)
    assert result.returncode == 2
    assert f"port {port} is in use: cannot listen on 127.0.0.1:{port}; --port 0 picks a free port" in result.stderr
    assert result.stderr.count("\n") == 1

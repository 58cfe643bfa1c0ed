"""Test helpers for the MQTT tests: a file-key PKI and a raw MQTT client (our codec over CPython ssl).

Keys are files here where a test checks the emulator (paho, raw clients); the device
side's tests use a real SoftHSM token key.
"""

from __future__ import annotations

import datetime
import socket
import ssl
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from device_sim.mqtt.codec import Decoder, Packet, encode


@dataclass
class Cert:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    def issue(self, cn: str, ca: bool = False) -> "Cert":
        return issue(cn, self, ca)


def issue(cn: str, issuer: Cert | None = None, ca: bool = True) -> Cert:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer.cert.subject if issuer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False), True)
    else:
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False)
    return Cert(builder.sign((issuer or Cert(None, key)).key, hashes.SHA256()), key)


def pem(*certs: Cert) -> bytes:
    return b"".join(c.cert.public_bytes(serialization.Encoding.PEM) for c in certs)


def write_identity(directory: Path, name: str, leaf: Cert, *chain: Cert) -> tuple[Path, Path]:
    """(chain file: leaf first then `chain`, key file) as paho and ssl load them."""
    chain_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
    chain_path.write_bytes(pem(leaf, *chain))
    key_path.write_bytes(leaf.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                serialization.NoEncryption()))
    return chain_path, key_path


@dataclass
class Pki:
    root: Cert
    inter1: Cert
    inter2: Cert


class RawClient:
    """An MQTT client that is only our codec over CPython ssl: sends exactly what a test says."""

    def __init__(self, port: int, ca_cert: Path, identity: tuple[Path, Path] | None, timeout: float = 5.0):
        context = ssl.create_default_context(cafile=str(ca_cert))
        if identity is not None:
            context.load_cert_chain(str(identity[0]), str(identity[1]))
        raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock = context.wrap_socket(raw, server_hostname="localhost")
        self.decoder = Decoder(max_packet_size=1 << 24)
        self.pending: list[Packet] = []

    def send(self, *packets: Packet) -> None:
        self.sock.sendall(b"".join(encode(p) for p in packets))

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def receive(self, timeout: float = 5.0) -> Packet | None:
        """The next packet, or None when the server closed the connection."""
        deadline = time.monotonic() + timeout
        while not self.pending:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data = self.sock.recv(65536)
            except (ConnectionResetError, ssl.SSLEOFError):
                return None
            if not data:
                return None
            self.pending += self.decoder.feed(data)
        return self.pending.pop(0)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

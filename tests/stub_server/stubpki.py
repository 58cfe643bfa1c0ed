"""File-key test PKI for the emulator's server tests: root -> intermediates -> leaf.

Keys live in files here because these tests exercise the emulator's TLS termination and
HTTP front end, not the token; token-key identities are covered in the hsm_setup and
device areas.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass
class Issued:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    def issue(self, cn: str, ca: bool = False) -> "Issued":
        return issue(cn, self, ca=ca)


def issue(cn: str, issuer: Issued | None = None, ca: bool = True) -> Issued:
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
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if issuer:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()), critical=False
        )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True
        )
    else:
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    cert = builder.sign(issuer.key if issuer else key, hashes.SHA256())
    return Issued(cert, key)


def write_identity(directory: Path, name: str, leaf: Issued, *extra: Issued) -> tuple[Path, Path]:
    """Write `leaf` + `extra` (in this order) as a chain file and the leaf key; returns both paths."""
    directory.mkdir(parents=True, exist_ok=True)
    chain = directory / f"{name}.chain.pem"
    key = directory / f"{name}.key"
    chain.write_bytes(b"".join(item.pem for item in (leaf, *extra)))
    key.write_bytes(leaf.key_pem)
    return chain, key


@dataclass
class Pki:
    """root -> inter1 -> inter2 -> devices, the shape of the docs' group example."""

    root: Issued
    inter1: Issued
    inter2: Issued

    @classmethod
    def create(cls) -> "Pki":
        root = issue("stub-test-root")
        inter1 = root.issue("stub-test-inter1", ca=True)
        inter2 = inter1.issue("stub-test-inter2", ca=True)
        return cls(root, inter1, inter2)

    def device(self, cn: str) -> Issued:
        return self.inter2.issue(cn)

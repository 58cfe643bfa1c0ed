"""A tiny test PKI with file keys (fast): roots, intermediates, device leaves."""

from __future__ import annotations

import base64
import datetime as dt

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

NOW = dt.datetime.now(dt.timezone.utc)
_KEYS: list[ec.EllipticCurvePrivateKey] = []


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


class Issuer:
    """A CA certificate and its key; issues intermediates, leaves and verification certs."""

    def __init__(self, cert: x509.Certificate, key, parent: "Issuer | None" = None):
        self.cert = cert
        self.key = key
        self.parent = parent

    @classmethod
    def root(cls, cn: str = "Test Root", path_length: int | None = None) -> "Issuer":
        key = _key()
        cert = _build(_name(cn), _name(cn), key.public_key(), key, ca=True,
                      path_length=path_length)
        return cls(cert, key)

    def intermediate(self, cn: str, path_length: int | None = None, ca: bool = True,
                     key_cert_sign: bool = True) -> "Issuer":
        key = _key()
        cert = _build(_name(cn), self.cert.subject, key.public_key(), self.key, ca=ca,
                      path_length=path_length, key_cert_sign=key_cert_sign)
        return Issuer(cert, key, self)

    def leaf(self, cn: str, **kw) -> "Device":
        key = _key()
        cert = _build(_name(cn), self.cert.subject, key.public_key(), self.key, ca=False, **kw)
        return Device(cert, key, self)

    def chain_to_root(self) -> list[x509.Certificate]:
        """This CA and its ancestors, lowest first."""
        out, node = [], self
        while node is not None:
            out.append(node.cert)
            node = node.parent
        return out


class Device:
    def __init__(self, cert, key, issuer: Issuer | None):
        self.cert = cert
        self.key = key
        self.issuer = issuer

    @classmethod
    def self_signed(cls, cn: str) -> "Device":
        key = _key()
        cert = _build(_name(cn), _name(cn), key.public_key(), key, ca=False)
        return cls(cert, key, None)

    def chain(self, depth: int | None = None) -> list[x509.Certificate]:
        """Leaf + issuers; `depth` = how many issuers to include (None = all)."""
        above = self.issuer.chain_to_root() if self.issuer else []
        return [self.cert] + (above if depth is None else above[:depth])


def _build(subject, issuer, public_key, signing_key, *, ca: bool, path_length=None,
           key_cert_sign: bool = True, not_before=None, not_after=None) -> x509.Certificate:
    builder = (x509.CertificateBuilder()
               .subject_name(subject).issuer_name(issuer).public_key(public_key)
               .serial_number(x509.random_serial_number())
               .not_valid_before(not_before or NOW - dt.timedelta(days=1))
               .not_valid_after(not_after or NOW + dt.timedelta(days=365))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=path_length if ca else None),
                              critical=True))
    if ca:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=key_cert_sign,
            crl_sign=key_cert_sign, encipher_only=False, decipher_only=False), critical=True)
    else:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    return builder.sign(signing_key, hashes.SHA256())


def pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode("ascii")


def b64_pem(cert: x509.Certificate) -> str:
    return base64.b64encode(pem(cert).encode()).decode()


def b64_der(cert: x509.Certificate) -> str:
    return base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()


def leaf_with_validity(issuer: Issuer, cn: str, not_before, not_after) -> Device:
    key = _key()
    cert = _build(_name(cn), issuer.cert.subject, key.public_key(), issuer.key, ca=False,
                  not_before=not_before, not_after=not_after)
    return Device(cert, key, issuer)

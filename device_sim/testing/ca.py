"""File-key test certificates: a CA whose keys live in memory, for tests that need many
certificates fast or certificates a real CA would refuse to make.

    >>> from device_sim.testing import TestCA
    >>> root = TestCA("root")
    >>> factory = root.issue_intermediate("factory", path_length=0)
    >>> device = factory.issue_leaf("device-1")
    >>> [c.subject.rfc4514_string() for c in device.chain]
    ['CN=device-1', 'CN=factory', 'CN=root']
    >>> device.chain_pem.startswith(b"-----BEGIN CERTIFICATE-----")
    True

Certificates the emulator must refuse are made with the same calls:

    >>> not_a_ca = root.issue_intermediate("not-a-ca", ca=False)           # CA:FALSE issuer
    >>> no_sign = root.issue_intermediate("no-sign", key_cert_sign=False)  # no keyCertSign
    >>> import datetime as dt
    >>> expired = factory.issue_leaf("old", not_after=dt.datetime(2020, 1, 1, tzinfo=dt.timezone.utc),
    ...                              not_before=dt.datetime(2019, 1, 1, tzinfo=dt.timezone.utc))
    >>> loner = TestCA.self_signed_leaf("loner")                          # no issuer at all
    >>> loner.chain == [loner.cert]
    True

Keys are EC P-256 unless `key_type` says "ec-p384" or "rsa-2048" (the names hsm-setup uses).
Token-held keys are `device_sim.testing.TokenPki`'s job (docs/testing.md).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path
from typing import Iterable

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_KEY_TYPE = "ec-p256"
CA_DAYS = 3650
LEAF_DAYS = 365


def new_key(key_type: str = DEFAULT_KEY_TYPE):
    """A fresh private key of one of hsm-setup's key types."""
    if key_type == "ec-p256":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "ec-p384":
        return ec.generate_private_key(ec.SECP384R1())
    if key_type.startswith("rsa-"):
        return rsa.generate_private_key(public_exponent=65537, key_size=int(key_type[4:]))
    raise ValueError(f"unknown key type {key_type!r}: use ec-p256, ec-p384 or rsa-N")


def pem(*certs: x509.Certificate) -> bytes:
    """The certificates as one PEM text, in the order given."""
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def key_pem(key) -> bytes:
    """A private key as unencrypted PKCS#8 PEM (test keys only)."""
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _key_usage(*, digital_signature=True, key_encipherment=False, key_cert_sign=False) -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=digital_signature, content_commitment=False,
                         key_encipherment=key_encipherment, data_encipherment=False, key_agreement=False,
                         key_cert_sign=key_cert_sign, crl_sign=key_cert_sign, encipher_only=False,
                         decipher_only=False)


def _build(cn: str, public_key, *, issuer: "TestCA | None", ca: bool, path_length: int | None,
           not_before: dt.datetime | None, not_after: dt.datetime | None, days: int,
           extensions: dict, signing_key=None) -> x509.Certificate:
    start = not_before or _now() - dt.timedelta(hours=1)
    end = not_after or start + dt.timedelta(days=days)
    wanted: dict[type, tuple[x509.ExtensionType, bool]] = {
        x509.BasicConstraints: (x509.BasicConstraints(ca=ca, path_length=path_length if ca else None), True),
        x509.SubjectKeyIdentifier: (x509.SubjectKeyIdentifier.from_public_key(public_key), False),
    }
    if ca:
        wanted[x509.KeyUsage] = (_key_usage(key_cert_sign=True), True)
    else:
        wanted[x509.ExtendedKeyUsage] = (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False)
    if issuer is not None:
        wanted[x509.AuthorityKeyIdentifier] = (
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()), False)
    for kind, value in extensions.items():  # overrides: None drops a default
        if value is None:
            wanted.pop(kind, None)
        else:
            wanted[kind] = value if isinstance(value, tuple) else (value, False)
    builder = (x509.CertificateBuilder()
               .subject_name(_name(cn))
               .issuer_name(issuer.cert.subject if issuer is not None else _name(cn))
               .public_key(public_key)
               .serial_number(x509.random_serial_number())
               .not_valid_before(start)
               .not_valid_after(end))
    for extension, critical in wanted.values():
        builder = builder.add_extension(extension, critical=critical)
    signer = signing_key if issuer is None else issuer.key
    algorithm = None if _is_eddsa(signer) else hashes.SHA256()
    return builder.sign(signer, algorithm)


def _is_eddsa(key) -> bool:
    return type(key).__name__.startswith(("Ed25519", "Ed448"))


class LeafCert:
    """A certificate, its key and the chain above it (leaf first, root last)."""

    def __init__(self, cert: x509.Certificate, key, issuer: "TestCA | None"):
        self.cert = cert
        self.key = key
        self.issuer = issuer

    @property
    def chain(self) -> list[x509.Certificate]:
        return [self.cert] + (self.issuer.chain if self.issuer is not None else [])

    @property
    def cert_pem(self) -> bytes:
        return pem(self.cert)

    @property
    def key_pem(self) -> bytes:
        return key_pem(self.key)

    @property
    def chain_pem(self) -> bytes:
        return pem(*self.chain)

    def chain_to(self, issuers: int) -> list[x509.Certificate]:
        """The leaf and the first `issuers` certificates above it."""
        return self.chain[:1 + issuers]

    def write(self, directory: str | Path, name: str, above=None) -> tuple[Path, Path]:
        """Write `name.chain.pem` and `name.key`; returns both paths, as
        `ssl.SSLContext.load_cert_chain` takes them. The chain file holds this certificate,
        then `above` (certificates or `TestCA`s, in that order; default: every issuer)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        chain_path, key_path = directory / f"{name}.chain.pem", directory / f"{name}.key"
        rest = self.chain[1:] if above is None else [getattr(c, "cert", c) for c in above]
        chain_path.write_bytes(pem(self.cert, *rest))
        key_path.write_bytes(self.key_pem)
        return chain_path, key_path


class TestCA(LeafCert):
    """A certificate authority with an in-memory key: a root, or an intermediate below one.

    `TestCA(name)` is a self-signed root; `issue_intermediate` and `issue_leaf` sign below
    it. `ca=False`, `key_cert_sign=False`, `path_length`, validity dates and `extensions`
    (extension class -> extension, (extension, critical) or None to drop a default)
    make the broken certificates negative tests need.
    """

    __test__ = False  # not a pytest test class despite its name

    def __init__(self, name: str = "root", *, key_type: str = DEFAULT_KEY_TYPE, path_length: int | None = None,
                 not_before: dt.datetime | None = None, not_after: dt.datetime | None = None,
                 extensions: dict | None = None, _issuer: "TestCA | None" = None, _ca: bool = True,
                 _key_cert_sign: bool = True):
        key = new_key(key_type)
        overrides = dict(extensions or {})
        if not _key_cert_sign:
            overrides.setdefault(x509.KeyUsage, (_key_usage(), True))
        cert = _build(name, key.public_key(), issuer=_issuer, ca=_ca, path_length=path_length,
                      not_before=not_before, not_after=not_after, days=CA_DAYS, extensions=overrides, signing_key=key)
        super().__init__(cert, key, _issuer)
        self.name = name

    @classmethod
    def from_pem(cls, cert_pem: bytes, key_pem: bytes) -> "TestCA":
        """A CA from its certificate and unencrypted key (e.g. written by `write`)."""
        ca = cls.__new__(cls)
        cert = x509.load_pem_x509_certificate(cert_pem)
        LeafCert.__init__(ca, cert, serialization.load_pem_private_key(key_pem, None), None)
        names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        ca.name = names[0].value if names else ""
        return ca

    def issue_intermediate(self, name: str, *, path_length: int | None = None, ca: bool = True,
                           key_cert_sign: bool = True, key_type: str = DEFAULT_KEY_TYPE,
                           not_before: dt.datetime | None = None, not_after: dt.datetime | None = None,
                           extensions: dict | None = None) -> "TestCA":
        return TestCA(name, key_type=key_type, path_length=path_length, not_before=not_before,
                      not_after=not_after, extensions=extensions, _issuer=self, _ca=ca,
                      _key_cert_sign=key_cert_sign)

    def issue_leaf(self, cn: str, *, not_before: dt.datetime | None = None, not_after: dt.datetime | None = None,
                   key_type: str = DEFAULT_KEY_TYPE, public_key=None, days: int = LEAF_DAYS,
                   extensions: dict | None = None) -> LeafCert:
        """A client certificate for `cn` (the DPS registration ID). `public_key` certifies a
        key made elsewhere (e.g. in a token); the result then has no `.key`."""
        key = None if public_key is not None else new_key(key_type)
        cert = _build(cn, public_key or key.public_key(), issuer=self, ca=False, path_length=None,
                      not_before=not_before,
                      not_after=not_after, days=days, extensions=dict(extensions or {}))
        return LeafCert(cert, key, self)

    def issue_server(self, host: str = "localhost", *, addresses: Iterable[str] = ("127.0.0.1",)) -> LeafCert:
        """A TLS server certificate for `host` and the IP `addresses`."""
        names = [x509.DNSName(host)] + [x509.IPAddress(ipaddress.ip_address(a)) for a in addresses]
        return self.issue_leaf(host, extensions={
            x509.SubjectAlternativeName: x509.SubjectAlternativeName(names),
            x509.ExtendedKeyUsage: x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
        })

    def verification_certificate(self, code: str) -> bytes:
        """DPS proof of possession: a certificate for CN=`code` signed by this CA (PEM)."""
        return self.issue_leaf(code).cert_pem

    @staticmethod
    def self_signed_leaf(cn: str, *, key_type: str = DEFAULT_KEY_TYPE) -> LeafCert:
        """A leaf that signs itself (CA:FALSE): what a device made without any CA presents."""
        key = new_key(key_type)
        cert = _build(cn, key.public_key(), issuer=None, ca=False, path_length=None, not_before=None,
                      not_after=None, days=LEAF_DAYS, extensions={}, signing_key=key)
        return LeafCert(cert, key, None)

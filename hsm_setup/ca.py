"""Certificate authorities whose private keys live in a token, and their registry.

Registry layout (under <home>/pki/ca/<NAME>/):
  ca.json   name, parent, token label/serial, CKA_ID, key type, URI
  cert.pem  the CA certificate (the only copy of it outside the token)
  chain.pem this certificate followed by its parents up to the root

A root has no parent (self-signed); an intermediate is signed inside its parent's
token; any depth works (manufacturer -> factory -> production line).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from asn1crypto import pem
from asn1crypto import x509 as asn1_x509
from cryptography import x509

from hsm_setup import certificates, keys, tokens
from device_sim.common.errors import UserError
from device_sim.common.suggest import did_you_mean
from hsm_setup.key_types import KeySpec, key_spec
from hsm_setup.signing import TokenSigner
from hsm_setup.uri import Pkcs11Uri

PKI_DIR = "pki"
CA_DIR = "ca"
DEFAULT_CA_TOKEN = "ca"
DEFAULT_CA_DAYS = 3650

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")


@dataclasses.dataclass(frozen=True)
class CaRecord:
    name: str
    parent: str | None
    token_label: str
    token_serial: str
    key_id: bytes
    key_type: str
    uri: str
    certificate: bytes      # DER
    pem_path: Path          # cert.pem
    chain_path: Path        # chain.pem (this CA up to the root)

    @property
    def label(self) -> str:
        """CKA_LABEL of the CA's key and certificate objects."""
        return self.name

    @property
    def is_root(self) -> bool:
        return self.parent is None

    def x509(self) -> x509.Certificate:
        return x509.load_der_x509_certificate(self.certificate)

    def asn1(self) -> asn1_x509.Certificate:
        return asn1_x509.Certificate.load(self.certificate)

    def spec(self) -> KeySpec:
        return key_spec(self.key_type)

    def as_dict(self) -> dict:
        return {
            "name": self.name, "parent": self.parent, "token": self.token_label,
            "token_serial": self.token_serial, "key_id": self.key_id.hex(),
            "key_type": self.key_type, "uri": self.uri, "certificate": str(self.pem_path),
            "chain": str(self.chain_path),
            "subject": self.x509().subject.rfc4514_string(),
        }


def ca_root_dir(home: Path) -> Path:
    return Path(home) / PKI_DIR / CA_DIR


def validate_ca_name(name: str) -> str:
    if not _NAME.match(name or ""):
        raise UserError(f"invalid CA name {name!r}: 1..64 letters, digits, '.', '_' or '-', "
                        "starting with a letter or digit")
    return name


def load_ca(home: Path, name: str) -> CaRecord:
    """The registered CA `name`; UserError if unknown."""
    validate_ca_name(name)
    folder = ca_root_dir(home) / name
    meta_path = folder / "ca.json"
    if not meta_path.is_file():
        known = [c.name for c in list_cas(home)]
        raise UserError(f"unknown CA {name!r}{did_you_mean(name, known)}: create it with "
                        f"'hsm-setup ca create {name}' (known: {', '.join(known) or 'none'})")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    pem_path = folder / "cert.pem"
    der = _read_single_pem(pem_path)
    return CaRecord(
        name=meta["name"], parent=meta.get("parent"), token_label=meta["token"],
        token_serial=meta.get("token_serial", ""), key_id=bytes.fromhex(meta["key_id"]),
        key_type=meta["key_type"], uri=meta["uri"], certificate=der, pem_path=pem_path,
        chain_path=folder / "chain.pem",
    )


def list_cas(home: Path) -> list[CaRecord]:
    root = ca_root_dir(home)
    if not root.is_dir():
        return []
    return [load_ca(home, p.name) for p in sorted(root.iterdir()) if (p / "ca.json").is_file()]


def chain_of(home: Path, record: CaRecord) -> list[CaRecord]:
    """`record` followed by its parents up to the root."""
    chain, seen = [record], {record.name}
    while chain[-1].parent:
        parent = load_ca(home, chain[-1].parent)
        if parent.name in seen:
            raise UserError(f"CA registry loop at {parent.name!r}")
        seen.add(parent.name)
        chain.append(parent)
    return chain


def require_ca_certificate(record: CaRecord) -> None:
    """UserError unless the record's certificate really is a CA certificate."""
    cert = record.asn1()
    constraints = cert.basic_constraints_value
    usage = cert.key_usage_value
    if not (constraints and constraints["ca"].native):
        raise UserError(f"{record.name!r} is not a CA: its certificate lacks basicConstraints CA:true")
    if usage is not None and "key_cert_sign" not in usage.native:
        raise UserError(f"{record.name!r} is not a CA: its certificate lacks keyUsage keyCertSign")


@dataclasses.dataclass
class Issuer:
    """A CA ready to sign: its record, certificate, chain and a token signer."""

    record: CaRecord
    certificate: asn1_x509.Certificate
    chain: list[CaRecord]   # the CA itself first, root last
    signer: TokenSigner

    def chain_der(self) -> list[bytes]:
        return [c.certificate for c in self.chain]


def open_issuer(lib, home: Path, name: str, pin: str, *, what: str = "CA") -> Issuer:
    """Load CA `name`, check it is a CA, log in to its token and find its key (once)."""
    record = _load_ca_or_explain(home, name, what=what)
    require_ca_certificate(record)
    chain = chain_of(home, record)
    session = tokens.session(lib, record.token_label, pin)
    private_key = keys.find_private_key(session, record.key_id)
    return Issuer(record=record, certificate=record.asn1(), chain=chain,
                  signer=TokenSigner(private_key, record.spec()))


def create_ca(lib, home: Path, name: str, *, parent: str | None, spec: KeySpec, days: int,
              token_label: str, pin: str, parent_pin: str | None = None) -> CaRecord:
    """Generate the CA key in `token_label` and issue its certificate (self- or parent-signed)."""
    validate_ca_name(name)
    if (ca_root_dir(home) / name / "ca.json").exists():
        raise UserError(f"CA {name!r} exists already")
    if days < 1:
        raise UserError("--days must be at least 1")
    issuer = open_issuer(lib, home, parent, parent_pin or pin, what="parent CA") if parent else None
    token = tokens.find_token(lib, token_label)
    keys.check_key_support(token, spec)
    session = tokens.session(lib, token_label, pin)
    key_id = keys.new_key_id()
    public, private = keys.generate_keypair(session, spec, key_id=key_id, label=name)
    cert_object = None
    try:
        spki = keys.public_key_info(public, spec)
        signer = issuer.signer if issuer else TokenSigner(private, spec)
        cert = certificates.issue(
            signer=signer, issuer=issuer.certificate if issuer else None, subject_cn=name,
            public_key=spki, profile=certificates.CA_PROFILE, days=days)
        cert_object = certificates.store_on_token(session, cert, key_id=key_id, label=name)
        info = tokens.token_info(token)
        uri = Pkcs11Uri(token=token_label, object=name, id=key_id)
        parents = [c.certificate for c in issuer.chain] if issuer else []
        _write_record(home, name, {
            "name": name, "parent": parent, "token": token_label, "token_serial": info.serial,
            "key_id": key_id.hex(), "key_type": spec.name, "uri": str(uri),
        }, cert.dump(), parents)
    except BaseException:
        keys.destroy_quietly(cert_object, public, private)
        raise
    return load_ca(home, name)


def _load_ca_or_explain(home: Path, name: str, *, what: str) -> CaRecord:
    try:
        return load_ca(home, name)
    except UserError:
        # A common mistake: naming a device identity where a CA is expected.
        from hsm_setup import devices
        if devices.find_device(home, name) is not None:
            raise UserError(f"{what} {name!r} is a device identity, not a CA "
                            "(see 'hsm-setup ca list')") from None
        raise


def _write_record(home: Path, name: str, meta: dict, cert_der: bytes, parents: list[bytes]) -> None:
    """Write the CA folder atomically: a reader sees all of it or none."""
    root = ca_root_dir(home)
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=root))
    try:
        (staging / "cert.pem").write_bytes(certificates.to_pem(cert_der))
        (staging / "chain.pem").write_bytes(certificates.to_pem(cert_der, *parents))
        (staging / "ca.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        os.rename(staging, root / name)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _read_single_pem(path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read CA certificate {path}: {exc.strerror}") from None
    if not pem.detect(data):
        raise UserError(f"{path} is not a PEM certificate")
    _, _, der = pem.unarmor(data)
    return der

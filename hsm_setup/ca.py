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
import datetime as dt
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from asn1crypto import x509 as asn1_x509
from cryptography import x509

from device_sim.common import x509util
from device_sim.common.errors import UserError
from device_sim.common.suggest import did_you_mean
from hsm_setup import certificates, keys, tokens
from hsm_setup.context import Pkcs11Library
from hsm_setup.key_types import KeySpec, key_spec
from hsm_setup.signing import TokenSigner
from hsm_setup.uri import Pkcs11Uri

PKI_DIR = "pki"
CA_DIR = "ca"
DEFAULT_CA_TOKEN = "ca"
DEFAULT_CA_DAYS = 3650

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")


class UnknownCa(UserError):
    """No CA of that name in the registry; `name` and `what` let a caller explain more
    (the CLI says when the name is a device identity's)."""

    def __init__(self, message: str, *, name: str, what: str = "CA"):
        super().__init__(message)
        self.name, self.what = name, what


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

    @property
    def not_before(self) -> dt.datetime:
        return self.x509().not_valid_before_utc

    @property
    def not_after(self) -> dt.datetime:
        return self.x509().not_valid_after_utc

    def as_dict(self) -> dict:
        return {
            "name": self.name, "parent": self.parent, "token": self.token_label,
            "token_serial": self.token_serial, "key_id": self.key_id.hex(),
            "key_type": self.key_type, "uri": self.uri, "certificate": str(self.pem_path),
            "chain": str(self.chain_path),
            "subject": self.x509().subject.rfc4514_string(),
            "not_before": f"{self.not_before:%Y-%m-%dT%H:%M:%SZ}",
            "not_after": f"{self.not_after:%Y-%m-%dT%H:%M:%SZ}",
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
        raise UnknownCa(f"unknown CA {name!r}{did_you_mean(name, known)}: create it with "
                        f"'hsm-setup ca create {name}' (known: {', '.join(known) or 'none'})", name=name)
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
    problem = x509util.ca_problem(record.x509())
    if problem:
        raise UserError(f"{record.name!r} is not a CA: its certificate {problem}")


@dataclasses.dataclass
class Issuer:
    """A CA ready to sign: its record, certificate, chain, token session and signer."""

    record: CaRecord
    certificate: asn1_x509.Certificate
    chain: list[CaRecord]   # the CA itself first, root last
    signer: TokenSigner
    library: Pkcs11Library  # the module holding the CA token (may differ from the devices')
    session: object         # logged-in session on the CA token

    def chain_der(self) -> list[bytes]:
        return [c.certificate for c in self.chain]

    def clamped(self, days: int, now: dt.datetime | None = None) -> bool:
        """True when `days` from now ends more than a day after this CA's certificate:
        certificates it issues end with it (see certificates.issue), so the caller may warn.
        (A day of slack: a CA made with the same --days as its parent ends minutes later.)"""
        now = now or dt.datetime.now(dt.timezone.utc)
        return now + dt.timedelta(days=days) > self.record.not_after + dt.timedelta(days=1)


def open_issuer(library: Pkcs11Library, home: Path, name: str, pin: str, *,
                what: str = "CA") -> Issuer:
    """Load CA `name`, check it is a CA that its token can sign with, log in (once per
    token and run) and find its key."""
    try:
        record = load_ca(home, name)
    except UnknownCa as exc:
        exc.what = what
        raise
    require_ca_certificate(record)
    chain = chain_of(home, record)
    spec = record.spec()
    token = tokens.find_token(library, record.token_label)
    if spec.sign_mechanism not in set(token.slot.get_mechanisms()):
        raise UserError(f"token {record.token_label!r} cannot sign with {what} {name!r}'s "
                        f"{spec.name} key (mechanism {spec.sign_mechanism.name} missing): "
                        "check the CA token's module (--ca-module) and its mechanisms")
    session = tokens.session(library, record.token_label, pin)
    private_key = keys.find_private_key(session, record.key_id)
    return Issuer(record=record, certificate=record.asn1(), chain=chain,
                  signer=TokenSigner(private_key, spec), library=library, session=session)


def create_ca(library: Pkcs11Library, home: Path, name: str, *, parent: str | None, spec: KeySpec,
              days: int, token_label: str, pin: str, parent_pin: str | None = None,
              parent_library: Pkcs11Library | None = None) -> CaRecord:
    """Generate the CA key in `token_label` and issue its certificate (self- or parent-signed).

    The parent's token may be in another module (`parent_library`, default `library`)."""
    validate_ca_name(name)
    if (ca_root_dir(home) / name / "ca.json").exists():
        raise UserError(f"CA {name!r} exists already")
    if days < 1:
        raise UserError("--days must be at least 1")
    issuer = open_issuer(parent_library or library, home, parent, parent_pin or pin,
                         what="parent CA") if parent else None
    token = tokens.find_token(library, token_label)
    keys.check_key_support(token, spec)
    session = tokens.session(library, token_label, pin)
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
    return x509util.to_der(x509util.load_certificate_file(path)[0])

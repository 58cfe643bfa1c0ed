"""Bring-your-own PKI on the device side: identities whose certificate comes from elsewhere.

- `request_certificate` (`device csr`): key pair in the token, CSR signed inside it; the
  identity waits in the registry's `pending_devices` table until its certificate comes.
- `import_certificate` (`device import-cert`): the certificate for a pending key is checked,
  stored on the token beside the key with its CA certificates, and the identity becomes
  an ordinary registry device.
- `adopt` (`device adopt`): a key and certificate another tool put on a token become a
  registry device; the token is only read.

Pending identities live in their own table, so every reader of `devices` (fleet runs,
`register ID`, `device list`) sees only identities that can register. Issuers that are
not CAs of this registry are recorded as `devices.EXTERNAL_CA_PREFIX` + subject and their
certificates kept in the device's chain file. See docs/byo-pki.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sqlite3
from pathlib import Path

import pkcs11
from asn1crypto import keys as asn1_keys
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from pkcs11 import Attribute, ObjectClass

from device_sim.common.errors import UserError
from device_sim.common.registration_id import (normalize_registration_id, registration_id_problem,
                                               validate_registration_id)
from device_sim.common.x509util import (ca_problem, common_name, describe, is_self_issued, issued_by,
                                        load_certificate_file, to_der, to_pem)
from hsm_setup import certificates, csr, devices, keys, tokens
from hsm_setup.key_types import KEY_TYPES, KeySpec, key_spec
from hsm_setup.signing import TokenSigner
from hsm_setup.uri import Pkcs11Uri

# Only what the token cannot tell again: the key's CKA_LABEL is the registration ID, and
# the token's serial and slot are read when the certificate comes.
_PENDING_SCHEMA = """
CREATE TABLE IF NOT EXISTS pending_devices (
    registration_id TEXT NOT NULL PRIMARY KEY COLLATE NOCASE,
    token_label     TEXT NOT NULL,
    key_id          BLOB NOT NULL,
    key_type        TEXT NOT NULL,
    csr             BLOB NOT NULL,
    created         TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%SZ', 'now'))
);
"""
_PENDING_COLUMNS = ("registration_id", "token_label", "key_id", "key_type", "csr")


@dataclasses.dataclass(frozen=True)
class PendingIdentity:
    """A token key (CKA_LABEL = registration ID) with a CSR out, waiting for its certificate."""

    registration_id: str
    token_label: str
    key_id: bytes
    key_type: str
    csr: bytes  # DER

    def csr_pem(self) -> bytes:
        return x509.load_der_x509_csr(self.csr).public_bytes(serialization.Encoding.PEM)

    def as_dict(self) -> dict:
        return {"registration_id": self.registration_id, "token": self.token_label,
                "key_id": self.key_id.hex(), "key_type": self.key_type, "state": "pending"}


@contextlib.contextmanager
def token_failures(what: str):
    """A PKCS#11 failure no check foresaw becomes a one-line UserError naming the step."""
    try:
        yield
    except pkcs11.PKCS11Error as exc:
        raise UserError(f"{what}: the token failed ({type(exc).__name__}{': ' + str(exc) if str(exc) else ''})") from None


# --- the pending table -------------------------------------------------------------

def _connect(home: Path) -> sqlite3.Connection:
    conn = devices.connect(home, create=True)
    conn.executescript(_PENDING_SCHEMA)
    return conn


def find_pending(home: Path, registration_id: str) -> PendingIdentity | None:
    if not devices.db_path(home).exists():  # no registry yet: a lookup creates nothing
        return None
    conn = _connect(home)
    try:
        row = conn.execute(f"SELECT {', '.join(_PENDING_COLUMNS)} FROM pending_devices "
                           "WHERE registration_id = ?", (registration_id,)).fetchone()
    finally:
        conn.close()
    if row is None:
        return None
    values = dict(zip(_PENDING_COLUMNS, row))
    values["key_id"], values["csr"] = bytes(values["key_id"]), bytes(values["csr"])
    return PendingIdentity(**values)


def _require_new_id(home: Path, registration_id: str) -> None:
    validate_registration_id(registration_id)
    if devices.find_device(home, registration_id) is not None:
        raise UserError(f"registration ID {registration_id!r} exists already "
                        "(IDs compare case-insensitively)")


# --- device csr ----------------------------------------------------------------------

@token_failures("device csr")
def request_certificate(lib, home: Path, registration_id: str, *, token_label: str, spec: KeySpec,
                        pin: str) -> tuple[PendingIdentity, bool]:
    """A pending identity with its CSR; (identity, False) when it was pending already."""
    _require_new_id(home, registration_id)
    pending = find_pending(home, registration_id)
    if pending is not None:
        if pending.token_label != token_label:
            raise UserError(f"{registration_id!r} is pending on token {pending.token_label!r} already: "
                            "import its certificate with 'hsm-setup device import-cert'")
        return pending, False
    token = tokens.find_token(lib, token_label)
    keys.check_key_support(token, spec)
    session = tokens.session(lib, token_label, pin)
    if _label_taken(session, registration_id):
        raise UserError(f"token {token_label!r} already holds objects labelled {registration_id!r}")
    key_id = keys.new_key_id()
    public, private = keys.generate_keypair(session, spec, key_id=key_id, label=registration_id)
    try:
        spki = keys.public_key_info(public, spec)
        request = csr.build_csr(TokenSigner(private, spec), spki, registration_id)
        if not x509.load_der_x509_csr(request.dump()).is_signature_valid:
            raise UserError("the token produced an invalid CSR signature: check the PKCS#11 module")
        pending = PendingIdentity(registration_id, token_label, key_id, spec.name, request.dump())
        conn = _connect(home)
        try:
            with conn:
                conn.execute(f"INSERT INTO pending_devices ({', '.join(_PENDING_COLUMNS)}) "
                             f"VALUES ({', '.join('?' * len(_PENDING_COLUMNS))})",
                             dataclasses.astuple(pending))
        finally:
            conn.close()
    except BaseException:
        keys.destroy_quietly(public, private)
        raise
    return pending, True


def _label_taken(session, label: str) -> bool:
    found = session.get_objects({Attribute.LABEL: label})
    try:
        return next(found, None) is not None
    finally:
        found.close()  # ends the C_FindObjects operation now


# --- device import-cert --------------------------------------------------------------

@token_failures("device import-cert")
def import_certificate(lib, home: Path, registration_id: str, *, cert_file: str,
                       chain_file: str | None, pin: str) -> devices.DeviceRecord:
    """Check the certificate against the pending key and ID, then store and register it."""
    pending = find_pending(home, registration_id)
    if pending is None and devices.find_device(home, registration_id) is not None:
        raise UserError(f"device {registration_id!r} is complete already (see 'hsm-setup device show')")
    if pending is None:
        raise UserError(f"no pending identity {registration_id!r}: make its key and CSR with "
                        f"'hsm-setup device csr {registration_id}'")
    leaf, *extra = load_certificate_file(cert_file)
    if chain_file:
        extra += load_certificate_file(chain_file)
    if normalize_registration_id(common_name(leaf) or "") != normalize_registration_id(registration_id):
        raise UserError(f"{cert_file}: the certificate {describe(leaf)} is not for {registration_id!r} "
                        "(its CN must be the registration ID)")
    spec = key_spec(pending.key_type)
    info = tokens.token_info(tokens.find_token(lib, pending.token_label))
    session = tokens.session(lib, pending.token_label, pin)
    private = keys.find_private_key(session, pending.key_id)
    if not _key_matches(private, spec, leaf):
        raise UserError(f"{cert_file}: the certificate {describe(leaf)} is for another key than the "
                        f"one made for {registration_id!r} on token {pending.token_label!r}")
    ca_name, chain = _issuer_chain(home, leaf, extra, source=cert_file)
    for ca_cert in chain:
        ca_id, ca_label = _ca_object_names(home, ca_name, ca_cert)
        certificates.ensure_on_token(session, _asn1(ca_cert), key_id=ca_id, label=ca_label)
    cert_object = certificates.store_on_token(session, _asn1(leaf), key_id=pending.key_id,
                                              label=pending.registration_id)
    try:
        row = _row(home, leaf, chain, token_label=pending.token_label, token_serial=info.serial,
                   slot_id=info.slot_id, key_id=pending.key_id, label=pending.registration_id,
                   spec=spec, ca_name=ca_name)
        _register(home, row, pending=pending.registration_id)
    except BaseException:
        keys.destroy_quietly(cert_object)
        raise
    return devices.lookup_device(home, row["registration_id"])


# --- device adopt ----------------------------------------------------------------------

@token_failures("device adopt")
def adopt(lib, home: Path, uri_text: str, *, chain_file: str | None, pin: str) -> devices.DeviceRecord:
    """Enter a key and certificate already on a token into the registry (the token is only read)."""
    uri = Pkcs11Uri.parse(uri_text)
    if not uri.token or not (uri.object or uri.id):
        raise UserError("adopt: the URI must name the token and the key (token=...;object=... or id=...)")
    if uri.type not in (None, "private", "cert"):
        raise UserError(f"the URI names a {uri.type!r} object: name the device's private key")
    token = tokens.find_token(lib, uri.token)
    session = tokens.session(lib, uri.token, uri.pin_value or pin)
    private = _one_private_key(session, uri)
    key_id, label = bytes(private[Attribute.ID] or b""), private[Attribute.LABEL] or ""
    if not key_id or not label:
        raise UserError(f"{uri_text}: the key needs a CKA_ID and a CKA_LABEL (the TLS stack selects "
                        "it by label, its certificate is found by CKA_ID)")
    if uri.id:  # found by id: its label must still name it alone
        _one_private_key(session, Pkcs11Uri(token=uri.token, object=label))
    leaf, spec = _token_certificate(session, private, key_id, uri_text)
    registration_id = common_name(leaf) or ""
    problem = registration_id_problem(registration_id)
    if problem:
        raise UserError(f"the certificate {describe(leaf)} cannot register: its CN is not a valid "
                        f"registration ID ({problem})")
    _require_new_id(home, registration_id)
    if find_pending(home, registration_id) is not None:
        raise UserError(f"{registration_id!r} is pending (device csr): import its certificate instead")
    pool = load_certificate_file(chain_file) if chain_file else []
    ca_name, chain = _issuer_chain(home, leaf, pool + _token_ca_certificates(session), source=uri_text)
    info = tokens.token_info(token)
    row = _row(home, leaf, chain, token_label=uri.token, token_serial=info.serial, slot_id=info.slot_id,
               key_id=key_id, label=label, spec=spec, ca_name=ca_name)
    _register(home, row)
    return devices.lookup_device(home, registration_id)


def _one_private_key(session, uri: Pkcs11Uri):
    found = keys.private_keys(session, key_id=uri.id, label=uri.object)
    if len(found) != 1:
        what = "no private key" if not found else f"{len(found)} private keys"
        raise UserError(f"{what} on token {uri.token!r} match{'es' if not found else ''} "
                        f"{str(uri)}: name one key (object= and id=; the TLS stack selects a key "
                        "by its label alone, so that must be unique)")
    return found[0]


def _token_certificate(session, private, key_id: bytes, source: str) -> tuple[x509.Certificate, KeySpec]:
    """The certificate with the key's CKA_ID whose public key is the token key."""
    for obj in certificates.find_certificate_objects(session, key_id):
        try:
            cert = x509.load_der_x509_certificate(bytes(obj[Attribute.VALUE]))
        except (ValueError, pkcs11.PKCS11Error):
            continue
        spec = _spec_of(cert)
        if spec is not None and _key_matches(private, spec, cert):
            return cert, spec
    raise UserError(f"{source}: no certificate of this key on the token (a certificate object with the "
                    f"key's CKA_ID {key_id.hex()} and its public key): write it there first")


def _token_ca_certificates(session) -> list[x509.Certificate]:
    out = []
    for obj in session.get_objects({Attribute.CLASS: ObjectClass.CERTIFICATE}):
        try:
            cert = x509.load_der_x509_certificate(bytes(obj[Attribute.VALUE]))
        except (ValueError, pkcs11.PKCS11Error):
            continue
        if ca_problem(cert) is None:
            out.append(cert)
    return out


# --- shared checks and writes ------------------------------------------------------------

def _spec_of(cert: x509.Certificate) -> KeySpec | None:
    """The --key type of a certificate's public key; None when hsm-setup has no such type."""
    public = cert.public_key()
    if isinstance(public, ec.EllipticCurvePublicKey):
        name = {"secp256r1": "ec-p256", "secp384r1": "ec-p384"}.get(public.curve.name)
    elif isinstance(public, rsa.RSAPublicKey):
        name = f"rsa-{public.key_size}"
    else:
        name = None
    return KEY_TYPES.get(name) if name else None


def _key_matches(private, spec: KeySpec, cert: x509.Certificate) -> bool:
    """True when the token key signs what the certificate's public key verifies.

    A CSR over the certificate's SubjectPublicKeyInfo, signed inside the token, verifies
    only if the two halves belong together; this needs no public key object on the token.
    """
    if _spec_of(cert) != spec:
        return False
    spki = asn1_keys.PublicKeyInfo.load(cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo))
    try:
        request = csr.build_csr(TokenSigner(private, spec), spki, "key-check")
    except pkcs11.PKCS11Error as exc:
        raise UserError(f"the token key cannot sign ({type(exc).__name__}): check its CKA_SIGN "
                        "and the token's mechanisms") from None
    return x509.load_der_x509_csr(request.dump()).is_signature_valid


def _issuer_chain(home: Path, leaf: x509.Certificate, pool: list[x509.Certificate], *,
                  source: str) -> tuple[str, list[x509.Certificate]]:
    """(ca_name, CA certificates from the issuer up): a registry CA when one issued the leaf,
    else the issuers found in `pool`."""
    from hsm_setup import ca  # the CA registry imports devices: imported late, as devices does
    for record in ca.list_cas(home):
        if issued_by(leaf, record.x509()):
            return record.name, [r.x509() for r in ca.chain_of(home, record)]
    chain, current = [], leaf
    while not is_self_issued(current):
        parent = next((c for c in pool if c not in chain and issued_by(current, c)), None)
        if parent is None:
            break
        problem = ca_problem(parent, issued_below=len(chain))
        if problem:
            raise UserError(f"{source}: the issuer {describe(parent)} {problem}")
        chain.append(parent)
        current = parent
    if not chain:
        raise UserError(f"{source}: the issuer of {describe(leaf)} ({leaf.issuer.rfc4514_string()}) is "
                        "neither a registered CA nor in the given certificates: pass --chain FILE "
                        "with the issuing CA (and its parents)")
    return devices.EXTERNAL_CA_PREFIX + leaf.issuer.rfc4514_string(), chain


def _ca_object_names(home: Path, ca_name: str, ca_cert: x509.Certificate) -> tuple[bytes, str]:
    """CKA_ID and CKA_LABEL for a CA certificate stored on a device token."""
    if not ca_name.startswith(devices.EXTERNAL_CA_PREFIX):
        from hsm_setup import ca
        for record in ca.list_cas(home):
            if record.certificate == to_der(ca_cert):
                return record.key_id, record.label  # as `device create` stores them
    try:
        key_id = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    except x509.ExtensionNotFound:
        key_id = x509.SubjectKeyIdentifier.from_public_key(ca_cert.public_key()).digest
    return key_id, common_name(ca_cert) or "ca"


def _asn1(cert: x509.Certificate) -> asn1_x509.Certificate:
    return asn1_x509.Certificate.load(to_der(cert))


def _row(home: Path, leaf: x509.Certificate, chain: list[x509.Certificate], *, token_label: str,
         token_serial: str, slot_id: int | None, key_id: bytes, label: str, spec: KeySpec,
         ca_name: str) -> dict:
    registration_id = common_name(leaf)
    cert_path, chain_path = devices.pem_paths(home, registration_id)
    return {
        "registration_id": registration_id, "token_label": token_label, "token_serial": token_serial,
        "slot_id": slot_id, "key_id": key_id, "label": label, "key_type": spec.name,
        "ca_name": ca_name, "uri": str(Pkcs11Uri(token=token_label, object=label, id=key_id)),
        "certificate": to_der(leaf), "cert_path": str(cert_path), "chain_path": str(chain_path),
        "_pem": (to_pem([leaf]), to_pem([leaf, *chain])),
    }


def _register(home: Path, row: dict, *, pending: str | None = None) -> None:
    """Write the PEM files and the registry row (dropping the pending row in the same commit)."""
    cert_path, chain_path = Path(row["cert_path"]), Path(row["chain_path"])
    cert_path.parent.mkdir(parents=True, exist_ok=True)
    leaf_pem, chain_pem = row.pop("_pem")
    conn = _connect(home)
    try:
        cert_path.write_bytes(leaf_pem)
        chain_path.write_bytes(chain_pem)
        with conn:
            devices.insert(conn, row)
            if pending is not None:
                conn.execute("DELETE FROM pending_devices WHERE registration_id = ?", (pending,))
    except BaseException:
        cert_path.unlink(missing_ok=True)
        chain_path.unlink(missing_ok=True)
        raise
    finally:
        conn.close()

"""Device identities: key pair in the device token -> CSR signed there -> leaf issued by
a CA inside its token -> leaf (and the CA chain) stored back on the device token.

One `IdentityFactory` serves one command: the CA key handle, device-token sessions
and "chain already on this token" facts are looked up once, so per device only the
token work that cannot be avoided remains (key generation, two signatures, one
certificate object). A failure removes what this device got so far: no key is left
without its certificate.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from cryptography import x509
from pkcs11 import Attribute, ObjectClass

from device_sim.common.errors import UserError
from device_sim.common.files import write_atomic
from device_sim.common.registration_id import validate_registration_id
from hsm_setup import certificates, csr, devices, keys, tokens
from hsm_setup.ca import Issuer
from hsm_setup.context import Pkcs11Library
from hsm_setup.key_types import KeySpec
from hsm_setup.signing import TokenSigner
from hsm_setup.uri import Pkcs11Uri

DEFAULT_DEVICE_TOKEN = "devices"
DEFAULT_DEVICE_DAYS = 365


@dataclasses.dataclass
class _TokenState:
    token: object
    session: object
    info: tokens.TokenInfo
    chain_stored: bool = False


class IdentityFactory:
    """Creates device identities issued by one CA with one key type, on any device token."""

    def __init__(self, library: Pkcs11Library, home: Path, issuer: Issuer, spec: KeySpec, *,
                 days: int, pin: str):
        if days < 1:
            raise UserError("--days must be at least 1")
        self.library, self.home, self.issuer, self.spec = library, Path(home), issuer, spec
        self.days, self._pin = days, pin
        self._tokens: dict[str, _TokenState] = {}
        self._chain_pem = certificates.to_pem(*issuer.chain_der())

    def open_token(self, label: str) -> _TokenState:
        """Log in and check the key type (once per token); writes nothing."""
        state = self._tokens.get(label)
        if state is None:
            token = tokens.find_token(self.library, label)
            keys.check_key_support(token, self.spec)
            session = tokens.session(self.library, label, self._pin)
            state = self._tokens[label] = _TokenState(token, session, tokens.token_info(token))
        return state

    def prepare_token(self, label: str) -> _TokenState:
        """open_token, and put the CA chain on the token (once per token)."""
        state = self.open_token(label)
        if not state.chain_stored:
            for ca_record in self.issuer.chain:
                certificates.ensure_on_token(state.session, ca_record.asn1(), key_id=ca_record.key_id,
                                             label=ca_record.label)
            state.chain_stored = True
        return state

    def label_taken(self, label: str, registration_id: str) -> bool:
        """An object labelled `registration_id` on the token (exact match: PKCS#11 compares bytes)."""
        session = self.open_token(label).session
        found = session.get_objects({Attribute.LABEL: registration_id})
        try:
            return next(found, None) is not None
        finally:
            found.close()  # ends the C_FindObjects operation now, not at garbage collection

    def remove_leftovers(self, label: str, registration_ids: set[str]) -> int:
        """Destroy objects on token `label` labelled with one of `registration_ids` (which
        have no registry row): what a process killed mid-identity left. Returns how many."""
        session = self.open_token(label).session
        found = session.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY})
        try:
            ids = {bytes(o[Attribute.ID]) for o in found if o[Attribute.LABEL] in registration_ids}
        finally:
            found.close()
        stale = [o for key_id in ids for o in session.get_objects({Attribute.ID: key_id})]
        keys.destroy_quietly(*stale)
        return len(stale)

    def create(self, registration_id: str, token_label: str) -> dict:
        """Create one identity; returns the registry row (not yet inserted)."""
        validate_registration_id(registration_id)
        state = self.prepare_token(token_label)
        key_id = keys.new_key_id()
        cert_path, chain_path = devices.pem_paths(self.home, registration_id)
        cert_path.parent.mkdir(parents=True, exist_ok=True)
        public, private = keys.generate_keypair(state.session, self.spec, key_id=key_id,
                                                label=registration_id)
        cert_object = None
        try:
            spki = keys.public_key_info(public, self.spec)
            request = csr.build_csr(TokenSigner(private, self.spec), spki, registration_id)
            _check_csr(request)
            leaf = certificates.issue(
                signer=self.issuer.signer, issuer=self.issuer.certificate,
                subject_cn=registration_id, public_key=spki,
                profile=certificates.LEAF_PROFILE, days=self.days)
            cert_object = certificates.store_on_token(state.session, leaf, key_id=key_id,
                                                      label=registration_id)
            leaf_pem = certificates.to_pem(leaf)
            write_atomic(cert_path, leaf_pem)
            write_atomic(chain_path, leaf_pem + self._chain_pem)
        except BaseException:
            keys.destroy_quietly(cert_object, public, private)
            cert_path.unlink(missing_ok=True)
            chain_path.unlink(missing_ok=True)
            raise
        uri = Pkcs11Uri(token=token_label, object=registration_id, id=key_id)
        return {
            "registration_id": registration_id, "token_label": token_label,
            "token_serial": state.info.serial, "slot_id": state.info.slot_id, "key_id": key_id,
            "label": registration_id, "key_type": self.spec.name,
            "ca_name": self.issuer.record.name, "uri": str(uri), "certificate": leaf.dump(),
            "cert_path": str(cert_path), "chain_path": str(chain_path),
            "_objects": (cert_object, public, private),
        }

    def remove(self, row: dict) -> None:
        """Undo `create` for a row that could not be registered."""
        keys.destroy_quietly(*row.get("_objects", ()))
        Path(row["cert_path"]).unlink(missing_ok=True)
        Path(row["chain_path"]).unlink(missing_ok=True)


def register(conn, factory: IdentityFactory, row: dict) -> None:
    """Insert the row; on failure undo the token objects so nothing is orphaned."""
    try:
        devices.insert(conn, row)
    except BaseException:
        factory.remove(row)
        raise


def _check_csr(request) -> None:
    # The CA side of a real PKI would check proof of possession; we do too, so a
    # broken signature path in a token shows up here rather than at DPS.
    parsed = x509.load_der_x509_csr(request.dump())
    if not parsed.is_signature_valid:
        raise UserError("the token produced an invalid CSR signature: check the PKCS#11 module")


def create_device(library: Pkcs11Library, home: Path, registration_id: str, *, issuer: Issuer,
                  spec: KeySpec, token_label: str, pin: str,
                  days: int = DEFAULT_DEVICE_DAYS) -> devices.DeviceRecord:
    """`hsm-setup device create`: one identity, every check before anything is written.

    `library` holds the device token; the issuer's CA token may be in another module."""
    validate_registration_id(registration_id)
    if devices.find_device(home, registration_id) is not None:
        raise UserError(f"registration ID {registration_id!r} exists already "
                        "(IDs compare case-insensitively)")
    factory = IdentityFactory(library, home, issuer, spec, days=days, pin=pin)
    factory.open_token(token_label)
    if factory.label_taken(token_label, registration_id):
        raise UserError(f"token {token_label!r} already holds objects labelled {registration_id!r}")
    conn = devices.connect(home, create=True)
    try:
        row = factory.create(registration_id, token_label)
        with conn:
            register(conn, factory, row)
    finally:
        conn.close()
    return devices.lookup_device(home, registration_id)

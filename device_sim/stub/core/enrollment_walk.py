"""The X.509 decision: which enrollment entry (if any) admits the chain a device presented.

`decide(chain, view, now)` is a pure function of the presented chain, a read-only view of
the enrollments and CA certificates, and the time. The rules (design.md section 3,
dps-protocol.md section 5):

1. The chain is taken exactly as sent, leaf first: each certificate must be issued by the
   next one (name and signature), every certificate must be inside its validity period,
   every issuer must be a CA (basicConstraints CA, keyCertSign when keyUsage is present,
   pathLenConstraint respected). A chain out of order fails; nothing is re-ordered or
   completed from certificates the emulator knows.
2. Walk from the leaf upward: an individual enrollment whose primary or secondary
   certificate is the leaf (SHA-256 thumbprint), then an enrollment group whose signing
   certificate (or referenced CA certificate) is the first intermediate, the next, ... up
   to the last certificate sent. The first entry found decides; none found -> 401002.
3. The entry found only authenticates when the chain reaches a *verified* CA certificate
   at or above the entry's own certificate: either a verified CA appears in the presented
   chain at that position or higher, or the last certificate sent is signed by a verified
   CA certificate of the store (so the root itself need not be sent: leaf + intermediate2 +
   intermediate1 is enough when the root is verified, leaf + intermediate2 is not). An
   individual enrollment whose enrolled leaf is self-signed needs no CA. A group's
   certificate must be one the device actually sent: a group on the root only matches when
   the root is in the chain.
4. Authenticated + enabled -> assign (device ID: the individual entry's deviceId, else the
   leaf CN); authenticated + disabled -> disabled, even when an enabled entry exists
   higher up; not authenticated -> 401002.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from .cert_input import common_name, sha256_thumbprint

ASSIGN = "assign"
DISABLED = "disabled"
UNAUTHORIZED = "unauthorized"

INDIVIDUAL = "individual"
GROUP = "group"


@dataclass(frozen=True)
class Entry:
    """An enrollment entry as the walk sees it."""

    kind: str          # INDIVIDUAL or GROUP
    id: str            # registrationId or enrollmentGroupId, as created
    enabled: bool
    doc: dict = field(default_factory=dict, compare=False)  # the stored JSON record
    etag: str = ""


class StoreView(Protocol):
    def individual_for(self, thumbprint: str) -> Entry | None: ...
    def group_for(self, thumbprint: str) -> Entry | None: ...
    def is_verified_ca(self, thumbprint: str) -> bool: ...
    def verified_cas_named(self, subject: x509.Name) -> Sequence[x509.Certificate]: ...


@dataclass
class MemoryView:
    """A StoreView from plain dicts: for tests and for callers without a database."""

    individuals: dict[str, Entry] = field(default_factory=dict)   # leaf thumbprint -> entry
    groups: dict[str, Entry] = field(default_factory=dict)        # CA thumbprint -> entry
    verified: list[x509.Certificate] = field(default_factory=list)

    def individual_for(self, thumbprint):
        return self.individuals.get(thumbprint)

    def group_for(self, thumbprint):
        return self.groups.get(thumbprint)

    def is_verified_ca(self, thumbprint):
        return any(sha256_thumbprint(c) == thumbprint for c in self.verified)

    def verified_cas_named(self, subject):
        return [c for c in self.verified if c.subject == subject]


@dataclass(frozen=True)
class Decision:
    outcome: str                  # ASSIGN, DISABLED or UNAUTHORIZED
    reason: str                   # why, in words (the 401 message, logs)
    registration_id: str | None = None   # leaf CN
    entry: Entry | None = None
    device_id: str | None = None
    leaf_thumbprint: str | None = None


# Signature checks of CA-to-CA links repeat for every device of a fleet: remember them.
# Keyed by both thumbprints, so the memo never changes an answer.
_link_memo: dict[tuple[str, str], bool] = {}
_LINK_MEMO_MAX = 4096


def _signed_by(child: x509.Certificate, parent: x509.Certificate,
               memo_key: tuple[str, str] | None = None) -> bool:
    if memo_key is not None and memo_key in _link_memo:
        return _link_memo[memo_key]
    try:
        child.verify_directly_issued_by(parent)
        ok = True
    except (ValueError, TypeError, InvalidSignature):
        ok = False
    if memo_key is not None:
        if len(_link_memo) >= _LINK_MEMO_MAX:
            _link_memo.clear()
        _link_memo[memo_key] = ok
    return ok


def _label(cert: x509.Certificate, index: int) -> str:
    return f"certificate {index} ({common_name(cert) or cert.subject.rfc4514_string()})"


def _in_validity(cert: x509.Certificate, now: datetime) -> bool:
    return cert.not_valid_before_utc <= now <= cert.not_valid_after_utc


def ca_problem(cert: x509.Certificate, issued_below: int) -> str | None:
    """Why `cert` may not issue a chain with `issued_below` CA certificates under it."""
    try:
        basic = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return "is not a CA certificate (no basicConstraints)"
    if not basic.ca:
        return "is not a CA certificate (basicConstraints CA:FALSE)"
    if basic.path_length is not None and basic.path_length < issued_below:
        return f"has pathLenConstraint {basic.path_length} but {issued_below} CA(s) below it"
    try:
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return None
    if not usage.key_cert_sign:
        return "is not allowed to sign certificates (keyUsage lacks keyCertSign)"
    return None


def chain_problem(chain: Sequence[x509.Certificate], thumbprints: Sequence[str],
                  now: datetime) -> str | None:
    """The first reason the presented chain is not a valid chain as sent, else None."""
    for index, cert in enumerate(chain):
        if not _in_validity(cert, now):
            return f"{_label(cert, index)} is outside its validity period"
    for index in range(len(chain) - 1):
        child, parent = chain[index], chain[index + 1]
        problem = ca_problem(parent, index)
        if problem:
            return f"{_label(parent, index + 1)} {problem}"
        if child.issuer != parent.subject:
            return (f"{_label(child, index)} was not issued by the next certificate sent "
                    "(send the chain leaf first, in issuing order)")
        memo = (thumbprints[index], thumbprints[index + 1]) if index else None
        if not _signed_by(child, parent, memo):
            return f"{_label(child, index)} signature does not verify with its issuer"
    top = chain[-1]
    if _self_issued(top):
        key = (thumbprints[-1], thumbprints[-1])
        if not _signed_by(top, top, key if len(chain) > 1 else None):
            return f"{_label(top, len(chain) - 1)} self-signature does not verify"
    return None


def _self_issued(cert: x509.Certificate) -> bool:
    return cert.issuer == cert.subject


def _store_signer_verified(top: x509.Certificate, top_thumbprint: str, view: StoreView,
                           depth: int, now: datetime) -> bool:
    """True when a verified CA certificate of the store (not sent) issued the top cert."""
    if _self_issued(top):
        return False
    for ca in view.verified_cas_named(top.issuer):
        if not _in_validity(ca, now) or ca_problem(ca, depth):
            continue
        if _signed_by(top, ca, (top_thumbprint, sha256_thumbprint(ca)) if depth else None):
            return True
    return False


def reaches_verified_ca(chain: Sequence[x509.Certificate], thumbprints: Sequence[str],
                        view: StoreView, now: datetime, position: int) -> bool:
    """True when a verified CA sits in the chain at index >= max(position, 1), or a
    verified CA certificate of the store issued the last certificate sent."""
    for index in range(max(position, 1), len(chain)):
        if view.is_verified_ca(thumbprints[index]):
            return True
    return _store_signer_verified(chain[-1], thumbprints[-1], view, len(chain) - 1, now)


def decide(presented_chain: Sequence[x509.Certificate], store_view: StoreView,
           now: datetime) -> Decision:
    """Apply the walk to the chain a device presented (leaf first, as sent)."""
    chain = list(presented_chain)
    if not chain:
        return Decision(UNAUTHORIZED, "no client certificate was presented")
    leaf = chain[0]
    cn = common_name(leaf)
    if not cn:
        return Decision(UNAUTHORIZED, "the leaf certificate has no single subject CN")
    thumbprints = [sha256_thumbprint(c) for c in chain]
    base = dict(registration_id=cn, leaf_thumbprint=thumbprints[0])
    problem = chain_problem(chain, thumbprints, now)
    if problem:
        return Decision(UNAUTHORIZED, problem, **base)

    found, position = store_view.individual_for(thumbprints[0]), 0
    if found is None:
        for index in range(1, len(chain)):
            found = store_view.group_for(thumbprints[index])
            if found is not None:
                position = index
                break
    if found is None:
        return Decision(UNAUTHORIZED, "no enrollment matches the presented chain", **base)

    self_signed_leaf = position == 0 and len(chain) == 1 and _self_issued(leaf)
    if not self_signed_leaf:
        if not reaches_verified_ca(chain, thumbprints, store_view, now, position):
            return Decision(UNAUTHORIZED, "the presented chain does not reach a verified CA "
                            "certificate at or above the enrollment's certificate",
                            entry=found, **base)
    if not found.enabled:
        return Decision(DISABLED, f"enrollment {found.kind} {found.id!r} is disabled",
                        entry=found, **base)
    device_id = cn
    if found.kind == INDIVIDUAL and found.doc.get("deviceId"):
        device_id = found.doc["deviceId"]
    return Decision(ASSIGN, f"admitted by {found.kind} {found.id!r}", entry=found,
                    device_id=device_id, **base)

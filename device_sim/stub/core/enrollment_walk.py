"""The X.509 decision: which enrollment entry (if any) admits the chain a device presented.

`decide(chain, view, now)` is a pure function of the presented chain, a read-only view of
the enrollments and CA certificates, and the time. The rules are those of
docs/x509-rules.md ("The chain a device sends", "Which entry decides"):

1. The chain is taken exactly as sent, leaf first: each certificate must be issued by the
   next one (name and signature), every certificate must be inside its validity period,
   every issuer must be a CA (basicConstraints CA, keyCertSign when keyUsage is present,
   pathLenConstraint respected). A chain out of order fails; nothing is re-ordered or
   completed from certificates the emulator knows. A certificate whose parts cannot be
   decoded fails the chain (401), it never raises.
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
   higher up; not authenticated -> 401002. Every reason names the entry that decided.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

from cryptography import x509

from device_sim.common import dps, x509util
from device_sim.common.x509util import (ca_problem, common_name, in_validity, is_self_issued,
                                        sha256_thumbprint, signature_verifies)

ASSIGN = "assign"
DISABLED = dps.DISABLED
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

    @property
    def label(self) -> str:
        """How messages name the entry: "enrollment group 'line'"."""
        what = "individual enrollment" if self.kind == INDIVIDUAL else "enrollment group"
        return f"{what} {self.id!r}"


class SignatureCache:
    """Signature checks of CA-to-CA links repeat for every device of a fleet: remember them.
    Keyed by both thumbprints, so a remembered answer is the one a check would give."""

    def __init__(self, max_entries: int = 4096):
        self.max_entries = max_entries
        self._known: dict[tuple[str, str], bool] = {}

    def verifies(self, child: x509.Certificate, parent: x509.Certificate,
                 key: tuple[str, str] | None = None) -> bool:
        """`signature_verifies(child, parent)`, remembered under `key` when one is given
        (leaves are not remembered: each is seen once or twice)."""
        if key is None:
            return signature_verifies(child, parent)
        known = self._known.get(key)
        if known is None:
            known = signature_verifies(child, parent)
            if len(self._known) >= self.max_entries:
                self._known.clear()
            self._known[key] = known
        return known


class StoreView(Protocol):
    signatures: SignatureCache

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
    signatures: SignatureCache = field(default_factory=SignatureCache)

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


def chain_problem(chain: Sequence[x509.Certificate], thumbprints: Sequence[str],
                  now: datetime, signatures: SignatureCache) -> str | None:
    """The first reason the presented chain is not a valid chain as sent, else None: the
    rules of `x509util.chain_problem` (which `chain lint` applies too), with CA-to-CA links
    remembered (a leaf's own signature is checked each time)."""
    leaf = chain[0] if chain else None
    index_of = {id(cert): index for index, cert in enumerate(chain)}

    def signed_by(child: x509.Certificate, parent: x509.Certificate) -> bool:
        if child is leaf:
            return signatures.verifies(child, parent)
        return signatures.verifies(child, parent, (thumbprints[index_of[id(child)]],
                                                   thumbprints[index_of[id(parent)]]))

    return x509util.chain_problem(chain, now, signed_by=signed_by)


def _store_signer_verified(top: x509.Certificate, top_thumbprint: str, view: StoreView,
                           depth: int, now: datetime) -> bool:
    """True when a verified CA certificate of the store (not sent) issued the top cert."""
    if is_self_issued(top):
        return False
    for ca in view.verified_cas_named(top.issuer):
        if not in_validity(ca, now) or ca_problem(ca, depth):
            continue
        key = (top_thumbprint, sha256_thumbprint(ca)) if depth else None
        if view.signatures.verifies(top, ca, key):
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
    problem = chain_problem(chain, thumbprints, now, store_view.signatures)
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

    self_signed_leaf = position == 0 and len(chain) == 1 and is_self_issued(leaf)
    if not self_signed_leaf:
        if not reaches_verified_ca(chain, thumbprints, store_view, now, position):
            return Decision(UNAUTHORIZED, f"{found.label} matches, but the presented chain "
                            "does not reach a verified CA certificate at or above its "
                            "certificate", entry=found, **base)
    if not found.enabled:
        return Decision(DISABLED, f"{found.label} is disabled", entry=found, **base)
    device_id = cn
    if found.kind == INDIVIDUAL and found.doc.get("deviceId"):
        device_id = found.doc["deviceId"]
    return Decision(ASSIGN, f"admitted by {found.label}", entry=found,
                    device_id=device_id, **base)

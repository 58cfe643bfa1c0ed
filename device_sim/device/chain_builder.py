"""Assemble, leaf first, the certificate chain a device presents.

DPS must be able to walk from the leaf to a certificate that is verified in the service
(docs/device.md, "The chain"), so the device sends every intermediate and, by default, the
root too (sending the root is harmless and covers a verified root). `build_chain` is a
pure function over certificates; `gather_candidates` collects the CA certificates a
device can draw from: its registry record, the state directory's CAs, files. The
certificate facts (who issued whom, names, reading files) are `device_sim.common.x509util`'s.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from cryptography import x509

from device_sim.common.errors import UserError
from device_sim.common.x509util import (common_name, describe, is_self_signed, issued_by,
                                        load_certificate_file, sha256_thumbprint)
# device/identity.py and fleet/identities.py (helper hsm's) still take these from here;
# x509util is their home, and these two lines go once those modules import it directly.
from device_sim.common.x509util import load_certificate_file as load_pem_file  # noqa: F401
from device_sim.common.x509util import to_pem  # noqa: F401

ROOT = "root"
LEAF = "leaf"


@dataclass(frozen=True)
class NamedCert:
    """A candidate CA certificate and the names it may be called by on the command line."""

    cert: x509.Certificate
    names: tuple[str, ...] = ()


def build_chain(leaf: x509.Certificate, candidates: Iterable[NamedCert | x509.Certificate],
                chain_to: str = ROOT) -> list[x509.Certificate]:
    """Leaf first, each next certificate the issuer of the previous one.

    `chain_to`: "root" (up to and including the root, or as far as the candidates go),
    "leaf" (the leaf alone), or a CA's name / subject CN: stop after that certificate.
    Raises UserError when the named CA is not on the leaf's issuing path.
    """
    pool = [c if isinstance(c, NamedCert) else NamedCert(c, ()) for c in candidates]
    chain = [leaf]
    if chain_to.lower() == LEAF:
        return chain
    wanted = None if chain_to.lower() == ROOT else chain_to.lower()
    seen = {sha256_thumbprint(leaf)}
    current = leaf
    while not is_self_signed(current):
        issuer = next((c for c in pool if sha256_thumbprint(c.cert) not in seen and issued_by(current, c.cert)), None)
        if issuer is None:
            break
        chain.append(issuer.cert)
        seen.add(sha256_thumbprint(issuer.cert))
        current = issuer.cert
        if wanted and _called(issuer, wanted):
            return chain
    if wanted:
        known = ", ".join(describe(c) for c in chain[1:]) or "no CA certificate found"
        raise UserError(f"--chain-to {chain_to}: that CA is not on the issuing path of "
                        f"{describe(leaf)} (path: {known})")
    return chain


def _called(named: NamedCert, wanted: str) -> bool:
    names = [n.lower() for n in named.names]
    cn = common_name(named.cert)
    if cn:
        names.append(cn.lower())
    return wanted in names


def gather_candidates(home: Path | None, *, files: Sequence[str | Path] = (),
                      extra: Sequence[x509.Certificate] = ()) -> list[NamedCert]:
    """CA certificates to build from: `extra` (the device record's / token's), files, the state dir."""
    pool: list[NamedCert] = [NamedCert(c) for c in extra]
    for path in files:
        pool += [NamedCert(c, (Path(path).stem,)) for c in load_certificate_file(path)]
    if home is not None:
        from hsm_setup.ca import list_cas  # the state directory's CA registry (hsm_setup area)

        try:
            pool += [NamedCert(ca.x509(), (ca.name,)) for ca in list_cas(home)]
        except UserError:
            pass  # a damaged CA registry must not stop a device that brings its own chain
    unique, seen = [], set()
    for named in pool:
        fp = sha256_thumbprint(named.cert)
        if fp in seen:
            # Keep the first occurrence but remember every name it goes by.
            for i, other in enumerate(unique):
                if sha256_thumbprint(other.cert) == fp:
                    unique[i] = NamedCert(other.cert, other.names + named.names)
            continue
        seen.add(fp)
        unique.append(named)
    return unique

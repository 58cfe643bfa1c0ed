"""Assemble, leaf first, the certificate chain a device presents.

DPS must be able to walk from the leaf to a certificate that is verified in the service
(dps-protocol.md section 5.1), so the device sends every intermediate and, by default, the
root too (sending the root is harmless and covers a verified root). `build_chain` is a
pure function over certificates; `gather_candidates` collects the CA certificates a
device can draw from: its registry record, the state directory's CAs, files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization

from device_sim.common.errors import UserError

ROOT = "root"
LEAF = "leaf"


@dataclass(frozen=True)
class NamedCert:
    """A candidate CA certificate and the names it may be called by on the command line."""

    cert: x509.Certificate
    names: tuple[str, ...] = ()


def common_name(cert: x509.Certificate) -> str | None:
    values = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    return str(values[0].value) if values else None


def fingerprint(cert: x509.Certificate) -> bytes:
    return cert.fingerprint(hashes.SHA256())


def is_self_signed(cert: x509.Certificate) -> bool:
    return cert.subject == cert.issuer and issued_by(cert, cert)


def issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    """True when `issuer`'s name and key made `cert`'s signature."""
    if cert.issuer != issuer.subject:
        return False
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


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
    seen = {fingerprint(leaf)}
    current = leaf
    while not is_self_signed(current):
        issuer = next((c for c in pool if fingerprint(c.cert) not in seen and issued_by(current, c.cert)), None)
        if issuer is None:
            break
        chain.append(issuer.cert)
        seen.add(fingerprint(issuer.cert))
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


def describe(cert: x509.Certificate) -> str:
    cn = common_name(cert)
    return f"CN={cn}" if cn else cert.subject.rfc4514_string() or "(empty subject)"


def load_pem_file(path: str | Path) -> list[x509.Certificate]:
    """All certificates in a PEM (or single DER) file; UserError naming the file otherwise."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read certificate file {path}: {exc.strerror}") from None
    try:
        if b"-----BEGIN" in data:
            certs = x509.load_pem_x509_certificates(data)
        else:
            certs = [x509.load_der_x509_certificate(data)]
    except ValueError:
        raise UserError(f"{path} holds no X.509 certificate (no readable X.509 PEM or DER in it)") from None
    return certs


def to_pem(certs: Sequence[x509.Certificate]) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def gather_candidates(home: Path | None, *, files: Sequence[str | Path] = (),
                      extra: Sequence[x509.Certificate] = ()) -> list[NamedCert]:
    """CA certificates to build from: `extra` (the device record's / token's), files, the state dir."""
    pool: list[NamedCert] = [NamedCert(c) for c in extra]
    for path in files:
        pool += [NamedCert(c, (Path(path).stem,)) for c in load_pem_file(path)]
    if home is not None:
        from hsm_setup.ca import list_cas  # the state directory's CA registry (hsm_setup area)

        try:
            pool += [NamedCert(ca.x509(), (ca.name,)) for ca in list_cas(home)]
        except UserError:
            pass  # a damaged CA registry must not stop a device that brings its own chain
    unique, seen = [], set()
    for named in pool:
        fp = fingerprint(named.cert)
        if fp in seen:
            # Keep the first occurrence but remember every name it goes by.
            for i, other in enumerate(unique):
                if fingerprint(other.cert) == fp:
                    unique[i] = NamedCert(other.cert, other.names + named.names)
            continue
        seen.add(fp)
        unique.append(named)
    return unique

"""Check a device chain against what DPS needs before it will provision the device.

`lint_chain` is a pure function: certificates in, findings out. An "error" finding names
something that makes DPS refuse the device (HTTP 401 / 400) or the TLS handshake fail;
a "warning" is a convention DPS does not enforce; "info" just describes the chain.
Rules (docs/device.md, "The chain"; docs/x509-rules.md):

- links:      each certificate is issued (name and signature) by the next one
- order:      a chain whose issuers are all present but out of order
- duplicates: the same certificate twice
- ca-flags:   every certificate above the leaf is a CA (basicConstraints CA:TRUE, keyCertSign,
              path length respected); the leaf is not a CA
- key-usage:  the leaf may sign (digitalSignature) and, if it has an EKU, clientAuth is in it
- cn:         the leaf CN is a valid registration ID (<= 64 characters for an X.509 CN)
- validity:   every certificate is valid now
- verified:   (with --verified) the chain reaches the CA verified in DPS; without it, a
              CA-signed leaf sent alone is refused (nothing in it can reach a verified CA)
- as-sent:    the emulator's own verdict on the chain as sent (`x509util.chain_problem`),
              so lint never says "ok" to a chain the emulator refuses for what it contains
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Sequence

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from device_sim.common.registration_id import registration_id_problem
from device_sim.common.x509util import (ca_problem, chain_problem, common_name, describe, in_validity,
                                        is_self_issued, is_self_signed, issued_by, sha256_thumbprint)

ERROR = "error"
WARNING = "warning"
INFO = "info"


@dataclass(frozen=True)
class Finding:
    level: str
    rule: str
    message: str

    def as_dict(self) -> dict:
        return {"level": self.level, "rule": self.rule, "message": self.message}


def has_errors(findings: Sequence[Finding]) -> bool:
    return any(f.level == ERROR for f in findings)


def _extension(cert: x509.Certificate, kind):
    try:
        return cert.extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None


def lint_chain(chain: Sequence[x509.Certificate], *, verified: Sequence[x509.Certificate] = (),
               now: datetime.datetime | None = None) -> list[Finding]:
    now = now or datetime.datetime.now(datetime.timezone.utc)
    if not chain:
        return [Finding(ERROR, "links", "the chain is empty: a device must present at least its leaf")]
    findings: list[Finding] = []
    findings += _duplicates(chain)
    findings += _links(chain)
    findings += _leaf_rules(chain[0])
    for depth, cert in enumerate(chain[1:], start=1):
        findings += _ca_rules(cert, depth, chain)
    for cert in chain:
        findings += _validity(cert, now)
    findings += _top(chain)
    if verified:
        findings += _reaches_verified(chain, verified)
    elif len(chain) == 1 and not is_self_issued(chain[0]):
        findings += _leaf_alone(chain[0])
    problem = chain_problem(chain, now)
    if problem and not has_errors(findings):
        findings.append(Finding(ERROR, "as-sent", f"DPS refuses the chain as sent: {problem}"))
    return findings


def _duplicates(chain) -> list[Finding]:
    seen, out = set(), []
    for cert in chain:
        fp = sha256_thumbprint(cert)
        if fp in seen:
            out.append(Finding(ERROR, "duplicates", f"{describe(cert)} appears more than once in the chain"))
        seen.add(fp)
    return out


def _links(chain) -> list[Finding]:
    out = []
    for i in range(len(chain) - 1):
        cert, nxt = chain[i], chain[i + 1]
        if sha256_thumbprint(cert) == sha256_thumbprint(nxt) or issued_by(cert, nxt):
            continue
        elsewhere = [c for j, c in enumerate(chain) if j not in (i, i + 1) and issued_by(cert, c)]
        if elsewhere:
            out.append(Finding(ERROR, "order", f"{describe(cert)} is followed by {describe(nxt)}, but its "
                               f"issuer {describe(elsewhere[0])} is elsewhere: present the chain leaf first, "
                               "each certificate followed by its issuer"))
        elif cert.issuer == nxt.subject:
            out.append(Finding(ERROR, "links", f"the signature of {describe(cert)} does not verify with the key of "
                               f"{describe(nxt)} (same name, different key)"))
        else:
            out.append(Finding(ERROR, "links", f"{describe(cert)} is issued by "
                               f"{cert.issuer.rfc4514_string()}, not by the next certificate "
                               f"{describe(nxt)}: an intermediate is missing"))
    return out


def _leaf_rules(leaf) -> list[Finding]:
    out = []
    cn = common_name(leaf)
    if cn is None:
        out.append(Finding(ERROR, "cn", "the leaf has no subject CN: DPS takes the registration ID from it"))
    else:
        problem = registration_id_problem(cn)
        if problem:
            out.append(Finding(ERROR, "cn", f"the leaf CN {cn!r} is not a valid registration ID: {problem}"))
    constraints = _extension(leaf, x509.BasicConstraints)
    if constraints is not None and constraints.ca:
        out.append(Finding(ERROR, "ca-flags", f"the leaf {describe(leaf)} is a CA certificate (CA:TRUE): "
                           "DPS expects an end-entity certificate"))
    usage = _extension(leaf, x509.KeyUsage)
    if usage is not None and not usage.digital_signature:
        out.append(Finding(ERROR, "key-usage", "the leaf's keyUsage lacks digitalSignature: it cannot sign "
                           "the TLS handshake"))
    eku = _extension(leaf, x509.ExtendedKeyUsage)
    if eku is not None and ExtendedKeyUsageOID.CLIENT_AUTH not in eku:
        out.append(Finding(ERROR, "key-usage", "the leaf's extendedKeyUsage lacks clientAuth: TLS client "
                           "authentication is not allowed for it"))
    if eku is None:
        out.append(Finding(WARNING, "key-usage", "the leaf has no extendedKeyUsage (tooling convention: clientAuth)"))
    return out


def _ca_rules(cert, depth, chain) -> list[Finding]:
    problem = ca_problem(cert, depth - 1)  # depth - 1 CA certificates between it and the leaf
    if problem is None:
        return []
    return [Finding(ERROR, "ca-flags", f"{describe(cert)} signs another certificate of the chain but {problem}")]


def _validity(cert, now) -> list[Finding]:
    if in_validity(cert, now):
        return []
    if now < cert.not_valid_before_utc:
        return [Finding(ERROR, "validity", f"{describe(cert)} is not valid before "
                        f"{cert.not_valid_before_utc:%Y-%m-%d %H:%M:%SZ}")]
    return [Finding(ERROR, "validity", f"{describe(cert)} expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M:%SZ}")]


def _top(chain) -> list[Finding]:
    top = chain[-1]
    if len(chain) > 1 and is_self_signed(top):
        return [Finding(INFO, "links", f"the chain ends with the root {describe(top)}")]
    if len(chain) == 1 and is_self_signed(top):
        return [Finding(INFO, "links", "a self-signed leaf: only an individual enrollment can admit it")]
    return [Finding(INFO, "links", f"the chain ends at {describe(top)}, issued by {top.issuer.rfc4514_string()} "
                    "(not included)")]


def _leaf_alone(leaf) -> list[Finding]:
    return [Finding(ERROR, "verified", f"the chain is the leaf alone, issued by {leaf.issuer.rfc4514_string()}: "
                    "no certificate in it can reach a verified CA, so DPS answers 401 unless that issuer is "
                    "itself verified (then say so with --verified); send the chain (--chain-to root)")]


def _reaches_verified(chain, verified) -> list[Finding]:
    chain_fps = [sha256_thumbprint(c) for c in chain]
    for ca in verified:
        if sha256_thumbprint(ca) in chain_fps:
            return [Finding(INFO, "verified", f"the chain contains the verified CA {describe(ca)}")]
        if issued_by(chain[-1], ca):
            return [Finding(WARNING, "verified", f"the chain stops just below the verified CA {describe(ca)}: "
                            "DPS documents the chain up to and including a verified certificate; "
                            "add it (--chain-to root)")]
    names = ", ".join(describe(c) for c in verified)
    return [Finding(ERROR, "verified", f"the chain does not reach the verified CA ({names}): DPS cannot walk "
                    "from the leaf to a verified certificate and answers 401; add the missing "
                    "intermediates (--chain-to root)")]

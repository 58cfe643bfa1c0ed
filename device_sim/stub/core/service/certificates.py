"""CA certificate resources: upload, verification code, proof of possession
(docs/x509-rules.md, "CA certificates and proof of possession").

Resources have the ARM shape (`{id, name, type, etag, properties}`). Choices where the
service is silent or the emulator is smaller:
- A CA certificate must be a CA certificate (basicConstraints CA:TRUE, keyCertSign when
  keyUsage is present); at most 25; one certificate may be uploaded under one name only;
  a CA named by a group's caReferences cannot be deleted (409) until the group changes.
- A verification code is used up by a successful verify; a failed attempt leaves it.
"""

from __future__ import annotations

import base64
import email.utils
import re
import secrets
from datetime import datetime, timezone

from device_sim.common.x509util import (ca_problem, common_name, in_validity, issued_by,
                                        sha256_thumbprint, to_der)

from .. import errors
from ..cert_input import parse_certificate
from ..device_api import new_etag
from ..errors import DpsError, Reply
from ..json_body import json_object
from ..store import CaCertificateRow, Store
from .preconditions import check_if_match

MAX_CA_CERTIFICATES = 25
_CERT_NAME = re.compile(r"^[A-Za-z0-9._-]{1,256}$")
_CA_TYPE = "Microsoft.Devices/ProvisioningServices/Certificates"


def rfc1123(moment: datetime) -> str:
    return email.utils.format_datetime(moment.astimezone(timezone.utc), usegmt=True)


class CaCertificates:
    def __init__(self, store: Store, clock):
        self.store = store
        self.clock = clock

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self.clock(), timezone.utc)

    def view(self, row: CaCertificateRow, code: str | None = None) -> dict:
        cert = row.certificate()
        properties = {
            "subject": cert.subject.rfc4514_string(),
            "expiry": rfc1123(cert.not_valid_after_utc),
            "thumbprint": row.thumbprint,
            "isVerified": row.is_verified,
            "certificate": base64.b64encode(row.der).decode("ascii"),
            "created": row.created,
            "updated": row.updated,
        }
        if code:
            properties["verificationCode"] = code
        return {"id": f"/certificates/{row.name}", "name": row.name,
                "type": _CA_TYPE, "etag": row.etag, "properties": properties}

    def _or_404(self, name: str) -> CaCertificateRow:
        row = self.store.get_ca(name)
        if row is None:
            raise DpsError(errors.CERTIFICATE_NOT_FOUND, f"no CA certificate named {name!r}")
        return row

    def list(self, *, headers, body) -> Reply:
        return Reply(200, {"value": [self.view(r) for r in self.store.list_cas()]}, {})

    def get(self, name, *, headers, body) -> Reply:
        return Reply(200, self.view(self._or_404(name)), {})

    def put(self, name, *, headers, body) -> Reply:
        if not _CERT_NAME.match(name):
            raise DpsError(errors.BAD_REQUEST, "a certificate name may contain only letters, "
                           "digits and - . _ (no spaces)")
        data = json_object(body)
        properties = data.get("properties", data)
        if not isinstance(properties, dict):
            raise DpsError(errors.BAD_REQUEST, "properties must be a JSON object")
        cert = parse_certificate(properties.get("certificate"), "properties.certificate")
        problem = ca_problem(cert, 0)
        if problem:
            raise DpsError(errors.BAD_REQUEST, f"the uploaded certificate {problem}; upload a "
                           "root or intermediate CA certificate")
        verified = properties.get("isVerified", False)
        if not isinstance(verified, bool):
            raise DpsError(errors.BAD_REQUEST, "properties.isVerified must be true or false")
        thumbprint = sha256_thumbprint(cert)
        now = rfc1123(self._now())
        with self.store.transaction():
            existing = self.store.get_ca(name)
            if existing is not None:
                check_if_match(headers, existing.etag, required=True)
            elif headers.get("if-match") not in (None, ""):
                check_if_match(headers, None)
            others = self.store.list_cas()
            for other in others:
                if other.thumbprint == thumbprint and other.name.lower() != name.lower():
                    raise DpsError(errors.CONFLICT, f"this certificate is already uploaded as "
                                   f"{other.name!r}")
            if existing is None and len(others) >= MAX_CA_CERTIFICATES:
                raise DpsError(errors.CONFLICT, f"at most {MAX_CA_CERTIFICATES} CA "
                               "certificates per instance; delete one first")
            row = CaCertificateRow(existing.name if existing else name, to_der(cert),
                                   thumbprint, verified, None, new_etag(),
                                   existing.created if existing else now, now)
            self.store.put_ca(row)
        return Reply(200, self.view(row), {})

    def delete(self, name, *, headers, body) -> Reply:
        with self.store.transaction():
            row = self._or_404(name)
            check_if_match(headers, row.etag)
            users = self.store.groups_referencing(name)
            if users:
                raise DpsError(errors.CONFLICT, f"CA certificate {name!r} is referenced by "
                               f"enrollment group(s) {', '.join(users)}; change them first")
            self.store.delete_ca(name)
        return Reply(204, None, {})

    def generate_code(self, name, *, headers, body) -> Reply:
        with self.store.transaction():
            row = self._or_404(name)
            check_if_match(headers, row.etag)
            code = secrets.token_hex(24).upper()
            row = CaCertificateRow(row.name, row.der, row.thumbprint, row.is_verified,
                                   code, new_etag(), row.created, rfc1123(self._now()))
            self.store.put_ca(row)
        return Reply(200, self.view(row, code), {})

    def verify(self, name, *, headers, body) -> Reply:
        data = json_object(body)
        text = data.get("certificate")
        if text is None and isinstance(data.get("properties"), dict):
            text = data["properties"].get("certificate")
        proof = parse_certificate(text, "certificate")
        with self.store.transaction():
            row = self._or_404(name)
            check_if_match(headers, row.etag)
            if not row.verification_code:
                raise DpsError(errors.BAD_REQUEST, "no verification code is pending for this "
                               "certificate: call generateVerificationCode first")
            cn = common_name(proof) or ""
            if cn.upper() != row.verification_code:
                raise DpsError(errors.BAD_REQUEST, "the verification certificate's subject CN "
                               "is not the current verification code")
            now = self._now()
            if not in_validity(proof, now):
                raise DpsError(errors.BAD_REQUEST, "the verification certificate is outside "
                               "its validity period")
            if not issued_by(proof, row.certificate()):
                raise DpsError(errors.BAD_REQUEST, "the verification certificate is not signed "
                               "by this CA certificate's private key")
            row = CaCertificateRow(row.name, row.der, row.thumbprint, True, None,
                                   new_etag(), row.created, rfc1123(now))
            self.store.put_ca(row)
        return Reply(200, self.view(row), {})

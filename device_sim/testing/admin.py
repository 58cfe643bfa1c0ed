"""The service API of a running emulator, as tests use it: CAs, enrollments, registrations.

It talks HTTPS to the emulator found under its state directory (the endpoint file
`stub serve` writes, docs/emulator.md), like `device-sim stub ca|group|enroll` do.

    >>> emu.admin.upload_ca("root", root.cert_pem)              # doctest: +SKIP
    >>> emu.admin.verify_ca("root", root)                       # proof of possession
    >>> emu.admin.create_group("line-1", ca_ref="root")
    >>> emu.admin.create_enrollment("device-7", leaf.cert_pem, device_id="dev-7")
    >>> emu.admin.set_enabled("group", "line-1", False)

`verify_ca` asks the emulator for a verification code and answers with a certificate
whose CN is that code, signed by the CA's key: `ca` is anything with
`verification_certificate(code) -> PEM bytes` (a `TestCA`, or a `TokenCa`, whose key
signs inside the token).
"""

from __future__ import annotations

import _ssl
import ctypes
from pathlib import Path

from device_sim.stub import admin as service

KINDS = {"group": "enrollmentGroups", "enrollment": "enrollments"}


def _text(pem: bytes | str) -> str:
    return pem.decode("ascii") if isinstance(pem, bytes) else pem


def _clear_openssl_errors() -> None:
    # SoftHSM (OpenSSL inside) can leave an error such as "no such engine" on this
    # thread's OpenSSL error queue; CPython's ssl then takes it for the next handshake's
    # failure. Tests run token operations and admin calls on one thread: start clean.
    try:
        ctypes.CDLL(_ssl.__file__).ERR_clear_error()
    except (OSError, AttributeError):
        pass


class _ServiceClient(service.ServiceClient):
    def call(self, *args, **kwargs):
        _clear_openssl_errors()
        return super().call(*args, **kwargs)


class EmulatorAdmin:
    def __init__(self, home: Path):
        self.client = _ServiceClient(service.find_endpoint(Path(home)))

    def close(self) -> None:
        self.client.close()

    # -- CA certificates

    def upload_ca(self, name: str, cert_pem: bytes | str, verified: bool = False) -> dict:
        return self.client.ca_upload(name, _text(cert_pem), verified)

    def verification_code(self, name: str) -> str:
        return self.client.ca_code(name)["properties"]["verificationCode"]

    def verify_ca(self, name: str, ca) -> dict:
        """Prove possession of `ca`'s key for the uploaded CA `name`; it becomes verified."""
        proof = ca.verification_certificate(self.verification_code(name))
        return self.client.ca_verify(name, _text(proof))

    def get_ca(self, name: str) -> dict:
        return self.client.ca_get(name)

    # -- enrollments

    def create_group(self, group_id: str, *, cert_pem: bytes | str | None = None, ca_ref: str | None = None,
                     enabled: bool = True, hubs: list[str] = ()) -> dict:
        """An enrollment group attested by a CA certificate (`cert_pem`) or an uploaded
        CA's name (`ca_ref`): exactly one of both."""
        if (cert_pem is None) == (ca_ref is None):
            raise ValueError("create_group: pass exactly one of cert_pem= and ca_ref=")
        record = service.group_record(group_id, ca_ref, None if cert_pem is None else _text(cert_pem),
                                      not enabled, list(hubs))
        return self.client.put_record(KINDS["group"], group_id, record)

    def create_enrollment(self, registration_id: str, cert_pem: bytes | str, *, device_id: str | None = None,
                          enabled: bool = True, hubs: list[str] = ()) -> dict:
        record = service.enrollment_record(registration_id, _text(cert_pem), device_id, not enabled, list(hubs))
        return self.client.put_record(KINDS["enrollment"], registration_id, record)

    def set_enabled(self, kind: str, entry_id: str, enabled: bool) -> dict:
        """Enable or disable a "group" or an "enrollment"."""
        if kind not in KINDS:
            raise ValueError(f"set_enabled: kind {kind!r} is not one of {sorted(KINDS)}")
        return self.client.set_provisioning_status(KINDS[kind], entry_id, "enabled" if enabled else "disabled")

    def get(self, kind: str, entry_id: str) -> dict:
        return self.client.get_record(KINDS[kind], entry_id)

    # -- registrations

    def get_registration(self, registration_id: str) -> dict:
        return self.client.registration_get(registration_id)

    def delete_registration(self, registration_id: str) -> None:
        self.client.registration_delete(registration_id)

"""DPS wire constants the device and the emulator both speak (docs/device.md, docs/emulator.md).

Only names and values of the protocol: API versions, the registration and provisioning
statuses, and the Retry-After rule. No behaviour of either side lives here.
"""

from __future__ import annotations

DEVICE_API_VERSION = "2021-06-01"  # the device API the Azure C SDK and the HTTPS how-to use
# Certificate issuance at registration (`csr` in, `issuedCertificateChain` out) is in this
# preview only (docs/certificate-issuance.md).
ISSUANCE_API_VERSION = "2025-07-01-preview"
SERVICE_API_VERSION = "2021-10-01"  # the service (enrollments, certificates) API
# Devices registering with this version or older keep their first hub on re-registration
# unless the entry says otherwise (docs/x509-rules.md, "Re-registration").
LEGACY_API_VERSION = "2018-04-01"

# `status` of a registration operation / registration state.
ASSIGNED = "assigned"
ASSIGNING = "assigning"
FAILED = "failed"
DISABLED = "disabled"
UNASSIGNED = "unassigned"

# `provisioningStatus` of an enrollment or enrollment group.
ENABLED = "enabled"
PROVISIONING_STATUSES = (ENABLED, DISABLED)


def parse_retry_after(value: str | None) -> int | None:
    """Retry-After (HTTP header or MQTT topic property) as integer seconds, else None.

    Only the delta-seconds form: the HTTP-date form is ignored, as the DPS SDKs do.
    """
    if value is None:
        return None
    text = str(value).strip()
    if text.startswith("-") and text[1:].isascii() and text[1:].isdigit():
        return 0  # a negative delay means "now"
    return int(text) if text.isascii() and text.isdigit() else None

"""One registration of a token identity with a running emulator, as `device-sim register`
does it (awscrt TLS with the key in the token, then the registration flow).

    >>> from device_sim.testing import register                          # doctest: +SKIP
    >>> outcome = register(pki.device("device-7", ca="root"), emu, transport="mqtt")
    >>> outcome.status, outcome.device_id
    ('assigned', 'device-7')

The outcome is `device_sim.device.registration.Outcome` (`.status`, `.assigned_hub`,
`.device_id`, `.substatus`, `.error_code`, ...; docs/device.md) with the run's
`Timings` at `.timings` of the returned `Registration`.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

from device_sim.device.driver import Timings, run_registration
from device_sim.device.registration import Outcome, RegistrationFlow
from device_sim.device.transport_https import CrtRuntime, HttpsTransport, TlsIdentity, client_tls_context
from device_sim.device.transport_mqtt import MqttTransport

TRANSPORTS = {"https": HttpsTransport, "mqtt": MqttTransport}
_RUNTIMES: list[CrtRuntime] = []


def _runtime() -> CrtRuntime:
    # One event loop for every registration of a test run, as a fleet shares one.
    if not _RUNTIMES:
        _RUNTIMES.append(CrtRuntime())
    return _RUNTIMES[0]


@dataclass(frozen=True)
class Registration:
    """An `Outcome` with the timings of the run; outcome fields read through."""

    outcome: Outcome
    timings: Timings

    def __getattr__(self, name):
        return getattr(self.outcome, name)


def register(identity, emulator, transport: str = "https", *, timeout: float = 20.0, payload=None,
             registration_id: str | None = None, chain_pem: bytes | None = None) -> Registration:
    """Register `identity` (a `TokenDevice`) with `emulator` (an `Emulator`) over `transport`
    ("https" or "mqtt"); `chain_pem` replaces the chain the device presents."""
    if transport not in TRANSPORTS:
        raise ValueError(f"transport {transport!r} is not one of {sorted(TRANSPORTS)}")
    pki = identity.pki
    pki.lib()  # this identity's token directory
    tls_identity = TlsIdentity(pki.module_path, identity.label, chain_pem or identity.chain_pem, pki.pin,
                               token_label=identity.token_label)
    runtime = _runtime()
    context = client_tls_context(tls_identity, emulator.ca_cert.read_bytes(), runtime)
    url = urlsplit(emulator.mqtt_url if transport == "mqtt" else emulator.device_url)
    rid = registration_id or identity.registration_id
    channel = TRANSPORTS[transport](url.hostname, url.port, emulator.id_scope, rid, context, runtime=runtime)
    outcome, timings = run_registration(RegistrationFlow(rid, payload), channel, timeout)
    return Registration(outcome, timings)

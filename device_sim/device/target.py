"""Where a device registers: endpoint, ID scope, transport, server trust, request options.

`resolve_target` turns what the user asked for (an endpoint, or "the local emulator of the
state directory") into a `Target` every device of a run uses (docs/device.md, "Where and
how to register"). It reads the emulator's `endpoint.json` and the trust file, and raises
`TargetError` naming what is wrong; the CLI adds the flag names.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from device_sim.common import x509util
from device_sim.common.dps import DEVICE_API_VERSION
from device_sim.common.errors import UserError

GLOBAL_ENDPOINT = "global.azure-devices-provisioning.net"

HTTPS = "https"
MQTT = "mqtt"
TRANSPORTS = (HTTPS, MQTT)
_SCHEMES = {HTTPS: ("https", 443), MQTT: ("mqtts", 8883)}

# The emulator's ready line, kept in its state directory while it runs. Until the emulator
# publishes its state-directory names (stub/layout.py), the path is spelled here.
ENDPOINT_FILE = Path("stub") / "endpoint.json"

# What a TargetError is about, so a CLI can name its own option.
ENDPOINT = "endpoint"
EMULATOR = "emulator"
EMULATOR_MQTT = "emulator_mqtt"
ID_SCOPE = "id_scope"
PAYLOAD = "payload"


class TargetError(UserError):
    """The run's target cannot be resolved; `about` says which input is at fault."""

    def __init__(self, about: str, message: str):
        super().__init__(message)
        self.about = about


@dataclass(frozen=True)
class Target:
    """The DPS endpoint and request options every device of a run uses."""

    host: str
    port: int
    id_scope: str
    transport: str  # HTTPS or MQTT
    trust_file: str | None
    trust_pem: bytes | None  # None: the system trust store (real DPS)
    api_version: str = DEVICE_API_VERSION
    payload: dict | None = None

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"

    def new_transport(self, registration_id: str, tls_context, runtime):
        """A transport for one device, on the caller's awscrt runtime."""
        if self.transport == MQTT:
            from device_sim.device.transport_mqtt import MqttTransport as transport_class
        else:
            from device_sim.device.transport_https import HttpsTransport as transport_class
        return transport_class(self.host, self.port, self.id_scope, registration_id, tls_context,
                               api_version=self.api_version, runtime=runtime)


def parse_endpoint(text: str, transport: str = HTTPS) -> tuple[str, int]:
    """`host`, `host:port` or `scheme://host[:port]` -> (host, port); the scheme and the
    default port are the transport's (https 443, mqtts 8883)."""
    scheme, default_port = _SCHEMES[transport]
    parsed = urlparse(text if "://" in text else f"{scheme}://{text}")
    if parsed.scheme != scheme or not parsed.hostname:
        raise TargetError(ENDPOINT, f"{text!r}: expected HOST[:PORT] or {scheme}://HOST[:PORT]")
    try:
        return parsed.hostname, parsed.port or default_port
    except ValueError:
        raise TargetError(ENDPOINT, f"{text!r}: the port is not a number") from None


def endpoint_file(home: Path) -> Path:
    return home / ENDPOINT_FILE


def emulator_endpoint(home: Path) -> dict:
    """The running emulator's ready line (device URLs, ID scope, CA certificate)."""
    path = endpoint_file(home)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise TargetError(EMULATOR, f"no running emulator found ({path} is missing)") from None


def emulator_url(ready: dict, transport: str = HTTPS) -> str:
    """The device URL of `transport` from the emulator's ready line."""
    url = ready.get("mqtt_url") if transport == MQTT else ready.get("device_url")
    if not url:
        raise TargetError(EMULATOR_MQTT if transport == MQTT else EMULATOR,
                          f"the running emulator serves no {transport.upper()}")
    return url


def read_trust(path: str | None) -> bytes | None:
    """The CA certificates of a trust file as PEM, or None for the system trust store."""
    if path is None:
        return None
    return x509util.to_pem(x509util.load_certificate_file(path))


def parse_payload(text: str | None):
    """The custom payload: a JSON object, or None."""
    if text is None:
        return None
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise TargetError(PAYLOAD, f"is not valid JSON ({exc.msg} at position {exc.pos})") from None
    if not isinstance(value, dict):
        raise TargetError(PAYLOAD, "must be a JSON object ({...}): DPS forwards it as an object")
    return value


def resolve_target(home: Path, *, transport: str = HTTPS, emulator: bool = False,
                   endpoint: str | None = None, id_scope: str | None = None, trust_file: str | None = None,
                   api_version: str = DEVICE_API_VERSION, payload: dict | None = None) -> Target:
    """The target asked for; with `emulator` the missing pieces come from its endpoint.json."""
    if transport not in TRANSPORTS:
        raise TargetError(ENDPOINT, f"unknown transport {transport!r}")
    if emulator:
        ready = emulator_endpoint(home)
        endpoint = endpoint or emulator_url(ready, transport)
        id_scope = id_scope or ready["id_scope"]
        trust_file = trust_file or ready["ca_cert"]
    host, port = parse_endpoint(endpoint or GLOBAL_ENDPOINT, transport)
    if not id_scope:
        raise TargetError(ID_SCOPE, "no ID scope")
    return Target(host, port, id_scope, transport, trust_file, read_trust(trust_file), api_version, payload)

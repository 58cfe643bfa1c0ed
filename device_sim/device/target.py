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
from device_sim.stub.layout import StateLayout

GLOBAL_ENDPOINT = "global.azure-devices-provisioning.net"

HTTPS = "https"
MQTT = "mqtt"
MQTT_WS = "mqtt-ws"
AMQP = "amqp"
AMQP_WS = "amqp-ws"
TRANSPORTS = (HTTPS, MQTT, MQTT_WS, AMQP, AMQP_WS)
# awscrt carries these (its HTTP and MQTT clients take the PKCS#11 TLS context); the AMQP
# ones run over CPython `ssl` with pkcs11-provider instead: awscrt's Python API has no raw
# TLS stream to run AMQP over (docs/device.md, "Transports").
AWSCRT_TRANSPORTS = (HTTPS, MQTT, MQTT_WS)
OPENSSL_TRANSPORTS = (AMQP, AMQP_WS)
# Accepted URL schemes and the default port of each transport. The WebSocket transports use
# the device HTTPS port, so the emulator's `device_url` (https://) names them too.
_SCHEMES = {HTTPS: (("https",), 443), MQTT: (("mqtts",), 8883), MQTT_WS: (("wss", "https"), 443),
            AMQP: (("amqps",), 5671), AMQP_WS: (("wss", "https"), 443)}
# Which URL of the emulator's ready line each transport dials.
_READY_URL = {HTTPS: "device_url", MQTT: "mqtt_url", MQTT_WS: "device_url", AMQP: "amqp_url",
              AMQP_WS: "device_url"}

# What a TargetError is about, so a CLI can name its own option.
ENDPOINT = "endpoint"
EMULATOR = "emulator"
EMULATOR_MQTT = "emulator_mqtt"
EMULATOR_AMQP = "emulator_amqp"
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
    transport: str  # one of TRANSPORTS
    trust_file: str | None
    trust_pem: bytes | None  # None: the system trust store (real DPS)
    api_version: str = DEVICE_API_VERSION
    payload: dict | None = None

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"

    def new_transport(self, registration_id: str, tls_context, runtime):
        """A transport for one device: on the caller's awscrt runtime with an awscrt
        `ClientTlsContext`, or for the AMQP transports with an `ssl.SSLContext` (runtime unused)."""
        where = (self.host, self.port, self.id_scope, registration_id, tls_context)
        if self.transport in OPENSSL_TRANSPORTS:
            from device_sim.device.transport_amqp import AmqpTransport

            return AmqpTransport(*where, api_version=self.api_version, websocket=self.transport == AMQP_WS)
        if self.transport in (MQTT, MQTT_WS):
            from device_sim.device.transport_mqtt import MqttTransport

            return MqttTransport(*where, api_version=self.api_version, runtime=runtime,
                                 websocket=self.transport == MQTT_WS)
        from device_sim.device.transport_https import HttpsTransport

        return HttpsTransport(*where, api_version=self.api_version, runtime=runtime)


def parse_endpoint(text: str, transport: str = HTTPS) -> tuple[str, int]:
    """`host`, `host:port` or `scheme://host[:port]` -> (host, port); the schemes and the
    default port are the transport's (https 443, mqtts 8883, amqps 5671, wss or https 443)."""
    schemes, default_port = _SCHEMES[transport]
    parsed = urlparse(text if "://" in text else f"{schemes[0]}://{text}")
    if parsed.scheme not in schemes or not parsed.hostname:
        urls = " or ".join(f"{scheme}://HOST[:PORT]" for scheme in schemes)
        raise TargetError(ENDPOINT, f"{text!r}: expected HOST[:PORT] or {urls}")
    try:
        return parsed.hostname, parsed.port or default_port
    except ValueError:
        raise TargetError(ENDPOINT, f"{text!r}: the port is not a number") from None


def endpoint_file(home: Path) -> Path:
    return StateLayout.of(home).endpoint


def emulator_endpoint(home: Path) -> dict:
    """The running emulator's ready line (device URLs, ID scope, CA certificate)."""
    path = endpoint_file(home)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise TargetError(EMULATOR, f"no running emulator found ({path} is missing)") from None


def emulator_url(ready: dict, transport: str = HTTPS) -> str:
    """The device URL of `transport` from the emulator's ready line (the WebSocket
    transports use its device HTTPS port, AMQP its `amqp_url`)."""
    url = ready.get(_READY_URL[transport])
    if not url:
        about = {MQTT: EMULATOR_MQTT, AMQP: EMULATOR_AMQP}.get(transport, EMULATOR)
        raise TargetError(about, f"the running emulator serves no {transport.upper()}")
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

"""A running emulator (HTTPS + service API + MQTT, the `stub serve` assembly) and its enrollments.

Enrollments are made through the emulator's own service API (in process, with a SAS
token), so the tests use the same rules as `device-sim stub group/enroll`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from device_sim.stub import server
from device_sim.stub.core import sas
from device_sim.stub.net.mqtt import listener_factory

SERVICE_API_VERSION = "2021-10-01"


def _pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


@dataclass
class Stub:
    server: server.StubServer
    ready: dict

    @property
    def app(self) -> server.StubApp:
        return self.server.app

    @property
    def id_scope(self) -> str:
        return self.ready["id_scope"]

    @property
    def ca_cert(self) -> Path:
        return Path(self.ready["ca_cert"])

    @property
    def mqtt_port(self) -> int:
        return int(self.ready["mqtt_url"].rsplit(":", 1)[1])

    def service(self, method: str, path: str, doc: dict | None = None) -> dict | None:
        app = self.app
        token = sas.make_token(app.config.service_host, app.service_api.service_key)
        body = json.dumps(doc).encode() if doc is not None else b""
        reply = app.service_api.handle(method, path, {"api-version": SERVICE_API_VERSION},
                                       {"Authorization": token, "Content-Type": "application/json"}, body)
        assert reply.status < 300, (method, path, reply.status, reply.body)
        return reply.body

    def upload_ca(self, name: str, cert: x509.Certificate, verified: bool = True) -> None:
        self.service("PUT", f"/certificates/{name}", {"properties": {"certificate": _pem(cert), "isVerified": verified}})

    def group(self, group_id: str, cert: x509.Certificate, enabled: bool = True) -> None:
        self.service("PUT", f"/enrollmentGroups/{group_id}", {
            "enrollmentGroupId": group_id,
            "attestation": {"type": "x509", "x509": {"signingCertificates": {"primary": {"certificate": _pem(cert)}}}},
            "provisioningStatus": "enabled" if enabled else "disabled",
        })

    def individual(self, registration_id: str, cert: x509.Certificate, enabled: bool = True,
                   device_id: str | None = None) -> None:
        doc = {
            "registrationId": registration_id,
            "attestation": {"type": "x509", "x509": {"clientCertificates": {"primary": {"certificate": _pem(cert)}}}},
            "provisioningStatus": "enabled" if enabled else "disabled",
        }
        if device_id:
            doc["deviceId"] = device_id
        self.service("PUT", f"/enrollments/{registration_id}", doc)

    def close(self) -> None:
        self.server.close()


def start_stub(home: Path, **options) -> Stub:
    """The emulator as `stub serve` assembles it, every port picked free; polls wait 0 s."""
    options.setdefault("retry_after", 0)
    serve = server.ServeOptions(home=home, port=0, service_port=0, **options)
    factory = listener_factory(0)
    stub_server = server.StubServer(serve, [factory], log=lambda message: None)
    return Stub(stub_server, stub_server.start())

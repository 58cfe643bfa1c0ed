"""One emulator core on a real SQLite file, with a controllable clock and a service client."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from device_sim.common.x509util import common_name
from device_sim.stub.core.config import Hub, StubConfig
from device_sim.stub.core.device_api import DeviceApi
from device_sim.stub.core.sas import make_token
from device_sim.stub.core.service import SERVICE_API_VERSION, ServiceApi
from device_sim.stub.core.store import Store
from device_sim.testing import pem as pem_bytes

SCOPE = "0ne00000001"
API = "2021-06-01"
KEY = b"0123456789abcdef0123456789abcdef"


def pem(cert: x509.Certificate) -> str:
    """A certificate as the service API's JSON carries it."""
    return pem_bytes(cert).decode("ascii")


def b64_pem(cert: x509.Certificate) -> str:
    return base64.b64encode(pem_bytes(cert)).decode()


def b64_der(cert: x509.Certificate) -> str:
    return base64.b64encode(cert.public_bytes(Encoding.DER)).decode()


class Clock:
    def __init__(self):
        self.now = time.time()

    def __call__(self):
        return self.now


class Env:
    def __init__(self, tmp_path: Path, **config):
        config.setdefault("hubs", [Hub("hub1.example"), Hub("hub2.example")])
        self.path = tmp_path / "stub.db"
        self.config = StubConfig(id_scope=SCOPE, **config)
        self.clock = Clock()
        self.open()

    def open(self):
        self.store = Store(self.path)
        self.device = DeviceApi(self.store, self.config, clock=self.clock)
        self.service = ServiceApi(self.store, self.config, KEY, clock=self.clock)

    def reopen(self):
        self.store.close()
        self.open()

    # -- service API -------------------------------------------------------------------

    def call(self, method, path, body=None, headers=None, token=True, query=None):
        all_headers = {}
        if token:
            all_headers["Authorization"] = make_token("localhost", KEY, now=self.clock())
        all_headers.update(headers or {})
        raw = body if isinstance(body, bytes) else (json.dumps(body).encode() if body is not None else b"")
        return self.service.handle(method, path, {"api-version": SERVICE_API_VERSION} if query is None else query,
                                   all_headers, raw)

    def upload_ca(self, name, cert, verified=True):
        reply = self.call("PUT", f"/certificates/{name}",
                          {"properties": {"certificate": pem(cert), "isVerified": verified}})
        assert reply.status == 200, reply
        return reply

    def enroll(self, device, registration_id=None, status="enabled", **extra):
        rid = registration_id or device_cn(device.cert)
        body = {"registrationId": rid, "provisioningStatus": status,
                "attestation": {"type": "x509", "x509": {"clientCertificates": {
                    "primary": {"certificate": pem(device.cert)}}}}, **extra}
        return self.call("PUT", f"/enrollments/{rid}", body)

    def group(self, group_id, ca_cert=None, ca_name=None, status="enabled", **extra):
        x509 = ({"signingCertificates": {"primary": {"certificate": pem(ca_cert)}}}
                if ca_cert is not None else {"caReferences": {"primary": ca_name}})
        body = {"enrollmentGroupId": group_id, "provisioningStatus": status,
                "attestation": {"type": "x509", "x509": x509}, **extra}
        return self.call("PUT", f"/enrollmentGroups/{group_id}", body)

    # -- device API --------------------------------------------------------------------

    def register(self, device, chain=None, registration_id=None, body=b"", api=API):
        rid = registration_id or device_cn(device.cert)
        return self.device.register(SCOPE, rid, api, device.chain if chain is None else chain, body)

    def poll(self, device, operation_id, chain=None, registration_id=None):
        rid = registration_id or device_cn(device.cert)
        return self.device.operation_status(SCOPE, rid, operation_id, API,
                                            device.chain if chain is None else chain)

    def provision(self, device, chain=None, body=b"", api=API):
        """Register + poll once; the terminal Reply (200) or the first error."""
        first = self.register(device, chain, body=body, api=api)
        if first.status != 202:
            return first
        return self.poll(device, first.body["operationId"], chain)


def device_cn(cert):
    return common_name(cert)

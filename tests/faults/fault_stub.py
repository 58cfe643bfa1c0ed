"""An in-process emulator (the `stub serve` assembly: HTTPS, service API, MQTT) with a
fault plan, file-key devices enrolled in one group, and a client per transport that sends
one DPS request and reports what came back (an answer, a drop, a reset, a timeout)."""

from __future__ import annotations

import datetime
import json
import socket
import ssl
import time
from dataclasses import dataclass
from pathlib import Path

import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from device_sim.mqtt import topics
from device_sim.mqtt.codec import Connect, Decoder, Publish, Subscribe, encode
from device_sim.stub import server
from device_sim.stub.core import sas
from device_sim.stub.core.faults import parse_plan
from device_sim.stub.net.mqtt import listener_factory

API = "2021-06-01"
SERVICE_API = "2021-10-01"


def _certificate(cn: str, key, issuer=None, issuer_key=None, ca: bool = False) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    builder = (x509.CertificateBuilder().subject_name(name)
               .issuer_name(issuer.subject if issuer else name).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=2))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if not ca:
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False)
    return builder.sign(issuer_key or key, hashes.SHA256())


def _pem(cert) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


class Devices:
    """A root CA and leaf certificates (CN = registration ID) written as chain + key files."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.root_key = ec.generate_private_key(ec.SECP256R1())
        self.root = _certificate("faults-root", self.root_key, ca=True)

    def identity(self, registration_id: str) -> tuple[str, str]:
        chain, key_path = self.directory / f"{registration_id}.pem", self.directory / f"{registration_id}.key"
        if not chain.exists():
            key = ec.generate_private_key(ec.SECP256R1())
            leaf = _certificate(registration_id, key, self.root, self.root_key)
            chain.write_bytes(_pem(leaf) + _pem(self.root))
            key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                   serialization.NoEncryption()))
        return str(chain), str(key_path)


@dataclass
class Answer:
    """What one request got: `status` and `body` (bytes), or `dropped` / `reset` / `silent`."""

    status: int | None = None
    body: bytes = b""
    retry_after: str | None = None
    dropped: bool = False
    reset: bool = False
    silent: bool = False
    seconds: float = 0.0

    def json(self) -> dict:
        return json.loads(self.body)


class FaultStub:
    def __init__(self, home: Path, plan: dict | None = None, **options):
        options.setdefault("retry_after", 0)
        serve = server.ServeOptions(home=home, port=0, service_port=0,
                                    faults=parse_plan(json.dumps(plan)) if plan else None, **options)
        self.server = server.StubServer(serve, [listener_factory(0)], log=lambda message: None)
        self.ready = self.server.start()
        self.devices = Devices(home)
        self.service("PUT", "/certificates/root", {"properties": {
            "certificate": _pem(self.devices.root).decode(), "isVerified": True}})
        self.service("PUT", "/enrollmentGroups/all", {
            "enrollmentGroupId": "all",
            "attestation": {"type": "x509", "x509": {"caReferences": {"primary": "root"}}}})

    @property
    def faults(self):
        return self.server.app.device_api.faults

    def port(self, name: str) -> int:
        return int(self.ready[f"{name}_url"].rsplit(":", 1)[1])

    def service(self, method: str, path: str, doc=None):
        app = self.server.app
        token = sas.make_token(app.config.service_host, app.service_api.service_key)
        reply = app.service_api.handle(method, path, {"api-version": SERVICE_API},
                                       {"Authorization": token, "Content-Type": "application/json"},
                                       json.dumps(doc).encode() if doc is not None else b"")
        return reply

    def register_count(self, registration_id: str) -> int:
        row = self.server.app.store.get_registration(registration_id)
        return 0 if row is None else row.internal["registerRequests"]

    def close(self) -> None:
        self.server.close()

    # -- clients

    def https(self, registration_id: str, operation: str = "register", operation_id: str = "x",
              timeout: float = 5.0) -> Answer:
        scope = self.ready["id_scope"]
        base = f"{self.ready['device_url']}/{scope}/registrations/{registration_id}"
        url, method, body = {
            "register": (f"{base}/register", "PUT", {"registrationId": registration_id}),
            "poll": (f"{base}/operations/{operation_id}", "GET", None),
            "status_lookup": (base, "POST", {"registrationId": registration_id}),
        }[operation]
        started = time.monotonic()
        try:
            response = requests.request(method, url, params={"api-version": API}, json=body, timeout=timeout,
                                        cert=self.devices.identity(registration_id), verify=self.ready["ca_cert"])
        except requests.exceptions.ReadTimeout:
            return Answer(silent=True, seconds=time.monotonic() - started)
        except requests.exceptions.ConnectionError as exc:
            text = repr(exc)
            return Answer(dropped=True, reset="reset by peer" in text or "ECONNRESET" in text,
                          silent="timed out" in text, seconds=time.monotonic() - started)
        return Answer(response.status_code, response.content, response.headers.get("Retry-After"),
                      seconds=time.monotonic() - started)

    def _tls(self, port: int, registration_id: str, timeout: float) -> ssl.SSLSocket:
        """A TLS socket that tells an end without close_notify (an RST) from a clean close."""
        context = ssl.create_default_context(cafile=self.ready["ca_cert"])
        context.load_cert_chain(*self.devices.identity(registration_id))
        raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        return context.wrap_socket(raw, server_hostname="localhost", suppress_ragged_eofs=False)

    def raw_register(self, registration_id: str, timeout: float = 5.0) -> Answer:
        """PUT register over HTTPS by hand, to see how the connection ended."""
        sock = self._tls(self.port("device"), registration_id, timeout)
        body = json.dumps({"registrationId": registration_id}).encode()
        sock.sendall(f"PUT /{self.ready['id_scope']}/registrations/{registration_id}/register?api-version={API} "
                     f"HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        try:
            data = sock.recv(65536)
        except (ConnectionResetError, ssl.SSLEOFError):
            return Answer(dropped=True, reset=True)
        finally:
            sock.close()
        return Answer(dropped=True) if not data else Answer(int(data.split(b" ")[1]), data)

    def mqtt(self, registration_id: str, operation: str = "register", operation_id: str = "x",
             timeout: float = 5.0) -> Answer:
        started = time.monotonic()
        try:
            sock = self._tls(self.port("mqtt"), registration_id, timeout)
        except ConnectionResetError:
            return Answer(dropped=True, reset=True, seconds=time.monotonic() - started)
        except (ssl.SSLError, OSError) as exc:
            return Answer(dropped=True, silent=isinstance(exc, TimeoutError), seconds=time.monotonic() - started)
        decoder = Decoder()
        username = topics.format_username(self.ready["id_scope"], registration_id, API)
        topic = topics.format_register("1") if operation == "register" else topics.format_status("1", operation_id)
        payload = json.dumps({"registrationId": registration_id}).encode()
        try:
            sock.sendall(encode(Connect(registration_id, username)) + encode(Subscribe(1, ((topics.RESPONSE_FILTER, 0),)))
                         + encode(Publish(topic, payload)))
            while True:
                data = sock.recv(65536)
                if not data:
                    return Answer(dropped=True, seconds=time.monotonic() - started)
                for packet in decoder.feed(data):
                    if isinstance(packet, Publish):
                        response = topics.parse_response(packet.topic)
                        retry = None if response.retry_after is None else str(response.retry_after)
                        return Answer(response.status, packet.payload, retry, seconds=time.monotonic() - started)
        except (ConnectionResetError, ssl.SSLEOFError):
            return Answer(dropped=True, reset=True, seconds=time.monotonic() - started)
        except (TimeoutError, socket.timeout):
            return Answer(silent=True, seconds=time.monotonic() - started)
        except (ssl.SSLError, OSError):
            return Answer(dropped=True, seconds=time.monotonic() - started)
        finally:
            sock.close()

    def send(self, transport: str, registration_id: str, operation: str = "register", **kw) -> Answer:
        return (self.https if transport == "https" else self.mqtt)(registration_id, operation, **kw)

"""An in-process emulator (the `stub serve` assembly: HTTPS, service API, MQTT, AMQP, and
WebSockets on the device port) with a fault plan, file-key devices enrolled in one group,
and a client per transport that sends one DPS request and reports what came back (an
answer, a drop, a reset, a timeout). The AMQP client is python-qpid-proton's, the
WebSocket one paho-mqtt over `transport="websockets"`: clients we did not write."""

from __future__ import annotations

import datetime
import json
import queue
import socket
import ssl
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as paho

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
from device_sim.stub.net import amqp
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
    condition: str | None = None  # AMQP: the rejection's error condition
    properties: dict = field(default_factory=dict)  # AMQP: the reply's application properties

    def json(self) -> dict:
        return json.loads(self.body)


class FaultStub:
    def __init__(self, home: Path, plan: dict | None = None, **options):
        options.setdefault("retry_after", 0)
        serve = server.ServeOptions(home=home, port=0, service_port=0,
                                    faults=parse_plan(json.dumps(plan)) if plan else None, **options)
        self.logged: list[str] = []
        self.server = server.StubServer(serve, [listener_factory(0), amqp.listener_factory(0)],
                                        log=self.logged.append)
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

    def amqp(self, registration_id: str, operation: str = "register", operation_id: str = "x",
             timeout: float = 5.0) -> Answer:
        """One request as the SDKs send it over AMQP (receiver and sender link on the
        registration's address), with proton's BlockingConnection over its own TLS."""
        from proton import Delivery, Message, SSLDomain
        from proton.utils import BlockingConnection

        started = time.monotonic()
        chain, key = self.devices.identity(registration_id)
        domain = SSLDomain(SSLDomain.MODE_CLIENT)
        domain.set_trusted_ca_db(self.ready["ca_cert"])
        domain.set_peer_authentication(SSLDomain.VERIFY_PEER_NAME)
        domain.set_credentials(chain, key, None)
        address = f"{self.ready['id_scope']}/registrations/{registration_id}"
        kinds = {"register": "iotdps-register", "poll": "iotdps-get-operationstatus",
                 "status_lookup": "iotdps-get-registration"}
        properties = {"iotdps-operation-type": kinds[operation]}
        if operation == "poll":
            properties["iotdps-operation-id"] = operation_id
        request = Message(body=json.dumps({"registrationId": registration_id}).encode(), inferred=True,
                          correlation_id=str(uuid.uuid4()), properties=properties)
        connection = None
        try:
            connection = BlockingConnection(self.ready["amqp_url"], ssl_domain=domain, sasl_enabled=False,
                                            timeout=timeout)
            receiver = connection.create_receiver(address)
            delivery = connection.create_sender(address).send(request, error_states=[])
            if delivery.remote_state == Delivery.REJECTED:
                condition = delivery.remote.condition
                code = json.loads(condition.description)["errorCode"] if condition.description.startswith("{") \
                    else None
                info = condition.info or {}
                return Answer(None if code is None else code // 1000, condition.description.encode(),
                              info.get("retry-after"), condition=condition.name, seconds=time.monotonic() - started)
            reply = receiver.receive(timeout=timeout)
            receiver.accept()
        except Exception as exc:  # proton's Timeout, ConnectionException, LinkDetached ...
            name = type(exc).__name__
            return Answer(dropped=name != "Timeout", silent=name == "Timeout", seconds=time.monotonic() - started)
        finally:
            if connection is not None:
                try:
                    connection.close()
                except Exception:
                    pass
        props = dict(reply.properties or {})
        body = bytes(reply.body)
        status = 202 if props.get("iotdps-status") == "assigning" and operation == "register" else 200
        return Answer(status, body, props.get("retry-after"), properties=props, seconds=time.monotonic() - started)

    def websocket(self, registration_id: str, operation: str = "register", operation_id: str = "x",
                  timeout: float = 5.0) -> Answer:
        """One request over MQTT over WebSockets on the device port, with paho-mqtt."""
        started = time.monotonic()
        connack: queue.Queue = queue.Queue()
        answers: queue.Queue = queue.Queue()
        gone: queue.Queue = queue.Queue()
        client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=registration_id,
                             protocol=paho.MQTTv311, transport="websockets", reconnect_on_failure=False)
        client.ws_set_options(path="/$iothub/websocket")
        chain, key = self.devices.identity(registration_id)
        client.tls_set(ca_certs=self.ready["ca_cert"], certfile=chain, keyfile=key, tls_version=ssl.PROTOCOL_TLS_CLIENT)
        client.username_pw_set(topics.format_username(self.ready["id_scope"], registration_id, API))
        client.on_connect = lambda c, userdata, flags, reason, props: connack.put(reason)
        client.on_message = lambda c, userdata, message: answers.put(message)
        client.on_disconnect = lambda c, userdata, flags, reason, props: gone.put(reason)
        port = self.port("device")

        def ended(**kw) -> Answer:
            return Answer(seconds=time.monotonic() - started, **kw)

        try:
            client.connect("localhost", port, keepalive=30)
        except (ConnectionResetError, ssl.SSLEOFError) as exc:
            return ended(dropped=True, reset=isinstance(exc, ConnectionResetError))
        except (TimeoutError, socket.timeout):
            return ended(silent=True)
        except (OSError, ssl.SSLError, paho.WebsocketConnectionError):
            return ended(dropped=True)
        client.loop_start()
        try:
            deadline = time.monotonic() + timeout

            def take(source):
                """(next item of `source`, None), or (None, the ending) once the connection is
                gone or the deadline passed."""
                while True:
                    try:
                        return source.get(timeout=0.05), None
                    except queue.Empty:
                        if not gone.empty():
                            return None, ended(dropped=True)
                        if time.monotonic() > deadline:
                            return None, ended(silent=True)

            _, ending = take(connack)
            if ending is not None:
                return ending
            client.subscribe(topics.RESPONSE_FILTER, qos=1)
            topic = topics.format_register("1") if operation == "register" else topics.format_status("1", operation_id)
            client.publish(topic, json.dumps({"registrationId": registration_id}).encode(), qos=1)
            message, ending = take(answers)
            if ending is not None:
                return ending
            response = topics.parse_response(message.topic)
            retry = None if response.retry_after is None else str(response.retry_after)
            return ended(status=response.status, body=message.payload, retry_after=retry)
        finally:
            client.disconnect()
            client.loop_stop()

    def send(self, transport: str, registration_id: str, operation: str = "register", **kw) -> Answer:
        clients = {"https": self.https, "mqtt": self.mqtt, "amqp": self.amqp, "websocket": self.websocket}
        return clients[transport](registration_id, operation, **kw)

"""The emulator's AMQP device API checked with a client we did not write: python-qpid-proton.

The device is proton's own client (BlockingConnection, its TLS with a file-key client
certificate, with and without SASL) doing what the Azure SDKs do: a receiver and a sender
link on {idScope}/registrations/{registrationId}, a register message, polls with
get-operationstatus. The emulator is the `stub serve` assembly in process, with the real
decision engine and store.
"""

from __future__ import annotations

import json
import selectors
import socket
import ssl
import threading
import time
import uuid

import pytest
from proton import Delivery, Message, SSLDomain, symbol
from proton.reactor import LinkOption
from proton.utils import BlockingConnection, LinkDetached

from device_sim.stub.net.amqp_session import link_api_version, parse_address
from device_sim.stub.net.listener import Limits

from device_sim.testing import Emulator, TestCA

API_VERSION = "2021-06-01"


def start(home, **options) -> Emulator:
    """The `stub serve` assembly in process with the AMQP front end (device_sim.testing)."""
    return Emulator.in_process(home, mqtt=False, amqp=True, **options)


def link_address(emulator, registration_id: str) -> str:
    return f"{emulator.id_scope}/registrations/{registration_id}"


@pytest.fixture(scope="module")
def emulator(tmp_path_factory, file_cas):
    emulator = start(tmp_path_factory.mktemp("amqp-home"), assignment_delay=0.3)
    emulator.admin.upload_ca("root", file_cas.root.cert_pem, verified=True)
    emulator.admin.create_group("all-devices", cert_pem=file_cas.root.cert_pem)
    emulator.line_2 = file_cas.root.issue_intermediate("amqp-line-2-ca")
    emulator.admin.create_group("line-2", cert_pem=emulator.line_2.cert_pem, enabled=False)  # met before the root's group
    yield emulator
    emulator.stop()
    assert not [line for line in emulator.logged if "Traceback" in line or "failed" in line], emulator.logged


class DpsLinkProperties(LinkOption):
    """The attach properties the C# and Node SDKs put on both links."""

    def apply(self, link) -> None:
        link.properties = {symbol("com.microsoft:api-version"): API_VERSION,
                           symbol("com.microsoft:client-version"): "proton-test/1.0"}


def device(emulator, tmp_path, leaf, *chain, sasl: bool = False) -> BlockingConnection:
    cert, key = leaf.write(tmp_path, leaf.cert.subject.rfc4514_string()[3:], above=chain)
    domain = SSLDomain(SSLDomain.MODE_CLIENT)
    domain.set_trusted_ca_db(emulator.ready["ca_cert"])
    domain.set_peer_authentication(SSLDomain.VERIFY_PEER_NAME)
    domain.set_credentials(str(cert), str(key), None)
    return BlockingConnection(emulator.ready["amqp_url"], ssl_domain=domain, sasl_enabled=sasl, timeout=10)


def register_message(registration_id: str, correlation_id: str) -> Message:
    return Message(body=json.dumps({"registrationId": registration_id}).encode(), inferred=True,
                   correlation_id=correlation_id,
                   properties={"iotdps-operation-type": "iotdps-register", "iotdps-forceRegistration": False})


def status_message(operation_id: str, correlation_id: str) -> Message:
    # C# sends the operation type as an AMQP value body; the emulator ignores a poll's body.
    return Message(body="iotdps-get-operationstatus", correlation_id=correlation_id,
                   properties={"iotdps-operation-type": "iotdps-get-operationstatus",
                               "iotdps-operation-id": operation_id})


def request(sender, receiver, message: Message) -> tuple[Message, dict]:
    sender.send(message)
    reply = receiver.receive(timeout=10)
    receiver.accept()
    assert reply.correlation_id == message.correlation_id
    return reply, json.loads(bytes(reply.body))


def provision(connection, address: str, registration_id: str) -> tuple[list[Message], dict]:
    """Register, then poll while assigning, as the SDKs do; every reply and the last body."""
    options = DpsLinkProperties()
    receiver = connection.create_receiver(address, options=options)
    sender = connection.create_sender(address, options=options)
    correlation_id = str(uuid.uuid4())
    reply, body = request(sender, receiver, register_message(registration_id, correlation_id))
    replies = [reply]
    for _ in range(50):
        if body["status"] not in ("assigning", "unassigned"):
            break
        time.sleep(max(0.05, int(reply.properties.get("retry-after", "0"))))
        reply, body = request(sender, receiver, status_message(body["operationId"], correlation_id))
        replies.append(reply)
    return replies, body


@pytest.mark.parametrize("sasl", [False, True], ids=["no-sasl", "sasl"])
def test_register_and_poll_until_assigned(emulator, tmp_path, file_cas, sasl):
    registration_id = f"amqp-dev-{int(sasl)}"
    leaf = file_cas.inter2.issue_leaf(registration_id)
    connection = device(emulator, tmp_path, leaf, file_cas.inter2, file_cas.inter1, file_cas.root, sasl=sasl)
    try:
        replies, body = provision(connection, link_address(emulator, registration_id), registration_id)
    finally:
        connection.close()
    first = replies[0]
    assert json.loads(bytes(first.body))["status"] == "assigning"
    assert first.properties["iotdps-status"] == "assigning" and first.properties["retry-after"] == "0"
    assert len(replies) >= 2, "assignment_delay keeps the first poll assigning"
    assert body["status"] == "assigned" and replies[-1].properties["iotdps-status"] == "assigned"
    assert body["registrationState"]["registrationId"] == registration_id


def test_c_sdk_address_form_with_host(emulator, tmp_path, file_cas):
    registration_id = "amqp-c-style"
    leaf = file_cas.root.issue_leaf(registration_id)
    connection = device(emulator, tmp_path, leaf, file_cas.root)
    try:
        address = f"amqps://localhost/{link_address(emulator, registration_id)}"
        _replies, body = provision(connection, address, registration_id)
    finally:
        connection.close()
    assert body["status"] == "assigned"
    assert body["registrationState"]["assignedHub"] == "stub-hub-1.azure-devices.net"


def test_disabled_enrollment_answers_disabled(emulator, tmp_path, file_cas):
    registration_id = "amqp-disabled"
    leaf = emulator.line_2.issue_leaf(registration_id)
    connection = device(emulator, tmp_path, leaf, emulator.line_2, file_cas.root)
    try:
        _replies, body = provision(connection, link_address(emulator, registration_id), registration_id)
    finally:
        connection.close()
    assert body["status"] == "disabled"
    assert "line-2" in body["registrationState"]["errorMessage"]


def test_unknown_certificate_is_rejected_with_the_401_error_json(emulator, tmp_path):
    stranger_root = TestCA("stranger-root")
    leaf = stranger_root.issue_leaf("amqp-stranger")
    connection = device(emulator, tmp_path, leaf, stranger_root)
    try:
        address = link_address(emulator, "amqp-stranger")
        connection.create_receiver(address)
        sender = connection.create_sender(address)
        delivery = sender.send(register_message("amqp-stranger", "c-1"), error_states=[])
    finally:
        connection.close()
    assert delivery.remote_state == Delivery.REJECTED
    condition = delivery.remote.condition
    assert condition.name == "amqp:unauthorized-access"
    error = json.loads(condition.description)
    assert error["errorCode"] == 401002 and error["errorCode"] // 1000 == 401
    assert error["trackingId"] and error["message"].startswith("Invalid certificate")


def test_registration_id_other_than_the_certificate_cn_is_rejected(emulator, tmp_path, file_cas):
    leaf = file_cas.root.issue_leaf("amqp-honest")
    connection = device(emulator, tmp_path, leaf, file_cas.root)
    try:
        address = link_address(emulator, "amqp-someone-else")
        connection.create_receiver(address)
        delivery = connection.create_sender(address).send(register_message("amqp-someone-else", "c-2"),
                                                           error_states=[])
    finally:
        connection.close()
    assert delivery.remote_state == Delivery.REJECTED
    assert json.loads(delivery.remote.condition.description)["errorCode"] == 401002


def test_unknown_operation_type_is_rejected_as_a_bad_request(emulator, tmp_path, file_cas):
    leaf = file_cas.root.issue_leaf("amqp-odd-op")
    connection = device(emulator, tmp_path, leaf, file_cas.root)
    try:
        address = link_address(emulator, "amqp-odd-op")
        connection.create_receiver(address)
        message = Message(body=b"{}", inferred=True, properties={"iotdps-operation-type": "iotdps-dance"})
        sender = connection.create_sender(address)
        delivery = sender.send(message, error_states=[])
        poll = Message(body="", properties={"iotdps-operation-type": "iotdps-get-operationstatus"})
        no_operation_id = sender.send(poll, error_states=[])
    finally:
        connection.close()
    assert delivery.remote_state == Delivery.REJECTED
    assert json.loads(delivery.remote.condition.description)["errorCode"] == 400000
    assert "iotdps-operation-id" in json.loads(no_operation_id.remote.condition.description)["message"]


def test_wrong_link_address_is_refused(emulator, tmp_path, file_cas):
    leaf = file_cas.root.issue_leaf("amqp-lost")
    connection = device(emulator, tmp_path, leaf, file_cas.root)
    try:
        with pytest.raises(LinkDetached) as refused:
            connection.create_sender("$cbs")
        assert refused.value.link.remote_condition.name == "amqp:not-found"
        # The connection stays usable: the right address still works.
        _replies, body = provision(connection, link_address(emulator, "amqp-lost"), "amqp-lost")
    finally:
        connection.close()
    assert body["status"] == "assigned"


def _tls(port: int, ca_cert: str) -> ssl.SSLSocket:
    context = ssl.create_default_context(cafile=ca_cert)
    return context.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10),
                               server_hostname="localhost")


def _read_to_end(sock, limit: float = 10.0) -> bytes:
    data, deadline = b"", time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, ssl.SSLEOFError):
            break
        if not chunk:
            break
        data += chunk
    return data


@pytest.mark.parametrize("garbage", [
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",  # not AMQP at all
    b"AMQP\x00\x01\x00\x00" + b"\x00\x00\x00\x08\x02\x00\x00\x00" + b"\xff" * 64,  # header, then a bad frame
    b"AMQP\x00\x01\x00\x00" + b"\x7f\xff\xff\xff\x02\x00\x00\x00",  # a 2 GB frame announced
])
def test_malformed_amqp_is_closed_cleanly(emulator, garbage):
    with _tls(emulator.amqp_port, emulator.ready["ca_cert"]) as sock:
        sock.sendall(garbage)
        answer = _read_to_end(sock)
    assert answer.startswith(b"AMQP"), answer[:40]  # our protocol header, then the close
    assert not [line for line in emulator.logged if "Traceback" in line or "connection failed" in line]


def test_silent_and_trickling_clients_are_cut_off(tmp_path):
    emulator = start(tmp_path, limits=Limits(request_timeout=1.0, idle_timeout=2.0))
    try:
        with _tls(emulator.amqp_port, emulator.ready["ca_cert"]) as silent:
            started = time.monotonic()
            assert _read_to_end(silent) == b""  # never spoke: closed without a word
            assert time.monotonic() - started < 5
        with _tls(emulator.amqp_port, emulator.ready["ca_cert"]) as trickle:
            started = time.monotonic()
            try:
                for byte in b"AMQP\x00\x01\x00":  # never a whole header: 2.8 s of trickle
                    trickle.sendall(bytes([byte]))
                    time.sleep(0.4)
                cut_off = False
            except (OSError, ssl.SSLError):
                cut_off = True
            _read_to_end(trickle)
            assert cut_off and time.monotonic() - started < 2.5, "a byte now and then renews no deadline"
    finally:
        emulator.stop()


def test_oversized_message_detaches_the_link(emulator, tmp_path, file_cas):
    leaf = file_cas.root.issue_leaf("amqp-big")
    connection = device(emulator, tmp_path, leaf, file_cas.root)
    try:
        address = link_address(emulator, "amqp-big")
        connection.create_receiver(address)
        sender = connection.create_sender(address)
        huge = Message(body=b"x" * (300 * 1024), inferred=True, properties={"iotdps-operation-type": "iotdps-register"})
        with pytest.raises(LinkDetached) as detached:
            sender.send(huge)
        assert detached.value.link.remote_condition.name == "amqp:link:message-size-exceeded"
    finally:
        connection.close()


def test_body_over_the_core_limit_is_rejected_413(emulator, tmp_path, file_cas):
    leaf = file_cas.root.issue_leaf("amqp-fat")
    connection = device(emulator, tmp_path, leaf, file_cas.root)
    try:
        address = link_address(emulator, "amqp-fat")
        connection.create_receiver(address)
        body = json.dumps({"payload": {"x": "y" * (100 * 1024)}}).encode()
        message = Message(body=body, inferred=True, properties={"iotdps-operation-type": "iotdps-register"})
        delivery = connection.create_sender(address).send(message, error_states=[])
    finally:
        connection.close()
    assert delivery.remote_state == Delivery.REJECTED
    assert json.loads(delivery.remote.condition.description)["errorCode"] == 413000


@pytest.mark.parametrize("address, expected", [
    ("0ne1/registrations/dev-1", ("0ne1", "dev-1")),
    ("/0ne1/registrations/dev-1", ("0ne1", "dev-1")),
    ("amqps://global.azure-devices-provisioning.net/0ne1/registrations/dev-1", ("0ne1", "dev-1")),
    ("0ne1/registrations", None),
    ("0ne1/registrations/dev-1/extra", None),
    ("$cbs", None),
    (None, None),
    ("x" * 600, None),
])
def test_link_addresses(address, expected):
    parsed = parse_address(address)
    assert (parsed and (parsed.id_scope, parsed.registration_id)) == expected or (parsed is None and expected is None)


def test_api_version_from_link_properties_or_the_default():
    assert link_api_version({symbol("com.microsoft:api-version"): "2019-03-31"}) == "2019-03-31"
    assert link_api_version(None) == "2021-06-01"
    assert link_api_version({symbol("com.microsoft:api-version"): 7}) == "2021-06-01"


def test_throttled_register_is_rejected_with_retry_after_in_the_info(tmp_path, file_cas):
    emulator = start(tmp_path / "home", throttle=1)
    try:
        emulator.admin.upload_ca("root", file_cas.root.cert_pem, verified=True)
        emulator.admin.create_group("all", cert_pem=file_cas.root.cert_pem)
        leaf = file_cas.root.issue_leaf("amqp-throttled")
        connection = device(emulator, tmp_path, leaf, file_cas.root)
        try:
            address = link_address(emulator, "amqp-throttled")
            receiver = connection.create_receiver(address)
            sender = connection.create_sender(address)
            throttled = sender.send(register_message("amqp-throttled", "t-1"), error_states=[])
            _reply, body = request(sender, receiver, register_message("amqp-throttled", "t-2"))
        finally:
            connection.close()
    finally:
        emulator.stop()
    condition = throttled.remote.condition
    assert throttled.remote_state == Delivery.REJECTED
    assert condition.name == "com.microsoft:device-container-throttled"
    assert json.loads(condition.description)["errorCode"] == 429001
    assert condition.info["retry-after"] == "1"
    assert body["status"] == "assigning"  # the retry goes through


def _serve(home, *args):
    import subprocess
    import sys

    return subprocess.Popen([sys.executable, "-m", "device_sim.cli", "stub", "serve", "--home", str(home),
                             "--port", "0", "--service-port", "0", "--no-mqtt", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_stub_serve_amqp_port_and_ready_line(tmp_path):
    process = _serve(tmp_path, "--amqp-port", "0")
    try:
        ready = json.loads(process.stdout.readline())
        assert ready["amqp_url"].startswith("amqps://localhost:")
        assert int(ready["amqp_url"].rsplit(":", 1)[1]) > 0
    finally:
        process.terminate()
        process.wait(timeout=10)
    off = _serve(tmp_path, "--no-amqp")
    try:
        assert "amqp_url" not in json.loads(off.stdout.readline())
    finally:
        off.terminate()
        off.wait(timeout=10)


def test_busy_amqp_port_is_a_one_line_error(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        process = _serve(tmp_path, "--amqp-port", str(port))
        _out, err = process.communicate(timeout=30)
    assert process.returncode != 0
    assert err.count("\n") == 1, err
    assert f"AMQP port {port}" in err and "--amqp-port 0" in err and "--no-amqp" in err


class WebSocketRelay:
    """A local port where proton's client speaks plain AMQP; each connection is carried in
    WebSocket binary messages (wsproto's client, subprotocol AMQPWSB10) over TLS, with the
    device's certificate, to the emulator's device port, as the SDKs' AMQP-over-WebSockets does."""

    def __init__(self, emulator, cert, key):
        from wsproto import ConnectionType, WSConnection

        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        context = ssl.create_default_context(cafile=emulator.ready["ca_cert"])
        context.load_cert_chain(str(cert), str(key))
        device_port = int(emulator.ready["device_url"].rsplit(":", 1)[1])
        self.tls = context.wrap_socket(socket.create_connection(("127.0.0.1", device_port), timeout=10),
                                       server_hostname="localhost")
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.accepted = self._upgrade()
        threading.Thread(target=self._run, daemon=True).start()

    def _upgrade(self):
        from wsproto.events import AcceptConnection, RejectConnection, Request

        self.tls.sendall(self.ws.send(Request(host="localhost", target="/$iothub/websocket",
                                              subprotocols=["AMQPWSB10"])))
        while True:
            self.ws.receive_data(self.tls.recv(65536))
            for event in self.ws.events():
                if isinstance(event, (AcceptConnection, RejectConnection)):
                    return event

    def _run(self) -> None:
        """One thread does every TLS read and write: an SSL socket read in one thread while
        another writes to it can stall (the hang this test showed under a loaded suite)."""
        from wsproto.events import BytesMessage, CloseConnection, Ping

        client, _ = self.listener.accept()
        try:
            with selectors.DefaultSelector() as selector:
                selector.register(client, selectors.EVENT_READ, "client")
                selector.register(self.tls, selectors.EVENT_READ, "tls")
                while ready := {key.data for key, _ in selector.select(timeout=30)}:
                    if "client" in ready:
                        if not (data := client.recv(65536)):
                            return
                        self.tls.sendall(self.ws.send(BytesMessage(data=data)))
                    while "tls" in ready or self.tls.pending():
                        ready.discard("tls")
                        if not (data := self.tls.recv(65536)):
                            return
                        self.ws.receive_data(data)
                        for event in self.ws.events():
                            if isinstance(event, BytesMessage):
                                client.sendall(event.data)
                            elif isinstance(event, Ping):
                                self.tls.sendall(self.ws.send(event.response()))
                            elif isinstance(event, CloseConnection):
                                return
        except OSError:
            pass
        finally:
            client.close()

    def close(self) -> None:
        for sock in (self.tls, self.listener):
            try:
                sock.close()
            except OSError:
                pass


def test_amqp_over_websockets_on_the_device_port(emulator, tmp_path, file_cas):
    pytest.importorskip("device_sim.stub.net.websocket", reason="WebSockets on the device port (branch ws)")
    registration_id = "amqp-ws-dev"
    leaf = file_cas.inter2.issue_leaf(registration_id)
    cert, key = leaf.write(tmp_path, registration_id)
    relay = WebSocketRelay(emulator, cert, key)
    try:
        assert relay.accepted.subprotocol == "AMQPWSB10"
        connection = BlockingConnection(f"amqp://127.0.0.1:{relay.port}", sasl_enabled=False, timeout=10)
        try:
            replies, body = provision(connection, link_address(emulator, registration_id), registration_id)
        finally:
            connection.close()
    finally:
        relay.close()
    assert body["status"] == "assigned"
    assert body["registrationState"]["deviceId"] == registration_id  # the chain of the TLS under the WebSocket


def test_a_device_insisting_on_sasl_external_gets_a_clean_refusal(emulator, tmp_path, file_cas):
    from proton import ConnectionException

    leaf = file_cas.root.issue_leaf("amqp-external")
    cert, key = leaf.write(tmp_path, "amqp-external")
    domain = SSLDomain(SSLDomain.MODE_CLIENT)
    domain.set_trusted_ca_db(emulator.ready["ca_cert"])
    domain.set_credentials(str(cert), str(key), None)
    with pytest.raises(ConnectionException):
        BlockingConnection(emulator.ready["amqp_url"], ssl_domain=domain, sasl_enabled=True,
                           allowed_mechs="EXTERNAL", timeout=10)
    assert not [line for line in emulator.logged if "Traceback" in line or "connection failed" in line]


def test_an_idle_connection_is_closed_with_an_amqp_error(tmp_path, file_cas):
    from proton.utils import ConnectionClosed

    emulator = start(tmp_path / "home", limits=Limits(request_timeout=1.0, idle_timeout=1.0))
    try:
        leaf = file_cas.root.issue_leaf("amqp-idle")
        connection = device(emulator, tmp_path, leaf, file_cas.root)
        time.sleep(2.5)
        with pytest.raises(ConnectionClosed) as closed:
            connection.create_sender(link_address(emulator, "amqp-idle"))
        assert closed.value.connection.remote_condition.name == "amqp:resource-limit-exceeded"
    finally:
        emulator.stop()

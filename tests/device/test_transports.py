"""The transports added beside https and mqtt (mqtt-ws, amqp, amqp-ws): their own failures.

The DPS decisions over every transport are in test_register_e2e.py; here: endpoints that
are unreachable, silent, or speak another protocol, option pairs that cannot work, and the
AMQP rejection mapping (docs/device.md, "Transports"). Real CLI processes, SoftHSM keys,
real TLS over loopback.
"""

import json
import socket
import subprocess
import threading
import time

import pytest
from OpenSSL import SSL, crypto

from device_sim.device import target as targets
from device_sim.device.transport_amqp import rejection_response, reply_response
from device_sim.testing import Emulator, TestCA
from proton import Message

from .helpers import LoopbackTlsServer, http_response
from .test_register_e2e import DEVICE_SIM, admin, register

NEW_TRANSPORTS = ["mqtt-ws", "amqp", "amqp-ws"]


@pytest.fixture(scope="module")
def fake_server(tmp_path_factory):
    pki = TestCA("fake-dps-root")
    trust = tmp_path_factory.mktemp("fake") / "trust.pem"
    trust.write_bytes(pki.cert_pem)
    return pki, trust


def fake_ready(port):
    return {"device_url": f"https://localhost:{port}", "mqtt_url": f"mqtts://localhost:{port}",
            "amqp_url": f"amqps://localhost:{port}", "id_scope": "0ne00FAKE", "ca_cert": None}


@pytest.fixture(scope="module")
def emulator(token_pki, tmp_path_factory):
    home = tmp_path_factory.mktemp("emulator")
    proc = Emulator.spawn(home, "--retry-after", "0")
    admin(home, "ca", "upload", "root", token_pki.root.pem_path, "--verified")
    admin(home, "group", "create", "everyone", "--ca-ref", "root")
    ready = dict(proc.ready, home=home)
    yield ready
    proc.stop()


def free_port():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return port


# -- endpoints that misbehave -----------------------------------------------------------------


@pytest.mark.parametrize("transport", NEW_TRANSPORTS)
def test_unreachable_endpoint(token_pki, fake_server, transport):
    _, trust = fake_server
    code, out, err = register(token_pki, "device-ec-p256", fake_ready(free_port()), trust=trust, timeout=3,
                              transport=transport)
    assert (code, out["status"]) == (6, "unreachable"), err
    assert out["retries_by_cause"].get("refused", 0) >= 1  # refused connections are retried


@pytest.mark.parametrize("transport", NEW_TRANSPORTS)
@pytest.mark.parametrize("mode", ["silent", "silent-after-tls"])
def test_silent_server_times_out_on_time(token_pki, fake_server, transport, mode):
    pki, trust = fake_server
    server = LoopbackTlsServer(pki.issue_server(), mode=mode)
    started = time.monotonic()
    try:
        code, out, err = register(token_pki, "device-ec-p256", fake_ready(server.port), trust=trust,
                                  timeout=1.5, transport=transport)
    finally:
        server.close()
    assert (code, out["status"]) == (6, "timeout"), err
    assert time.monotonic() - started < 10  # process start-up included


@pytest.mark.parametrize("transport", ["mqtt-ws", "amqp-ws"])
def test_websocket_upgrade_refused_is_a_protocol_error(token_pki, fake_server, transport):
    pki, trust = fake_server
    server = LoopbackTlsServer(pki.issue_server(), mode="http", responses=[http_response(404, b"{}")])
    try:
        code, out, err = register(token_pki, "device-ec-p256", fake_ready(server.port), trust=trust,
                                  timeout=5, transport=transport)
    finally:
        server.close()
    assert (code, out["status"]) == (8, "protocol_error"), out["error"]
    assert server.requests and server.requests[0].startswith(b"GET /$iothub/websocket ")
    assert b"upgrade: websocket" in server.requests[0].lower()


def test_websocket_upgrade_answered_with_garbage_is_a_protocol_error(token_pki, fake_server):
    pki, trust = fake_server
    server = LoopbackTlsServer(pki.issue_server(), mode="garbage")
    try:
        code, out, err = register(token_pki, "device-ec-p256", fake_ready(server.port), trust=trust,
                                  timeout=5, transport="amqp-ws")
    finally:
        server.close()
    assert (code, out["status"]) == (8, "protocol_error"), err
    assert "not HTTP" in out["error"]["message"]


class SpeaksFirstServer:
    """A TLS server that greets every client with `greeting` after the handshake, then waits."""

    def __init__(self, identity, greeting: bytes, hang_up=False):
        self.hang_up = hang_up
        self.context = SSL.Context(SSL.TLS_SERVER_METHOD)
        self.context.use_certificate(crypto.X509.from_cryptography(identity.cert))
        self.context.use_privatekey(crypto.PKey.from_cryptography_key(identity.key))
        self.context.set_verify(SSL.VERIFY_PEER, lambda *args: True)
        self.greeting = greeting
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.open = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            self.open.append(client)
            conn = SSL.Connection(self.context, client)
            conn.set_accept_state()
            try:
                conn.do_handshake()
                conn.sendall(self.greeting)
                if self.hang_up:
                    conn.recv(65536)  # the client's first bytes, then a close without an answer
                    conn.shutdown()
                    client.close()
            except (SSL.Error, OSError):
                pass

    def close(self):
        self.sock.close()
        for client in self.open:
            client.close()


def test_amqp_answered_with_something_else_is_a_protocol_error_at_once(token_pki, fake_server):
    pki, trust = fake_server
    server = SpeaksFirstServer(pki.issue_server(), b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")
    started = time.monotonic()
    try:
        code, out, err = register(token_pki, "device-ec-p256", fake_ready(server.port), trust=trust,
                                  timeout=10, transport="amqp")
    finally:
        server.close()
    assert (code, out["status"]) == (8, "protocol_error"), err
    assert "not AMQP" in out["error"]["message"] and out["retries"] == 0
    assert time.monotonic() - started < 8  # final at once, not retried to the deadline


@pytest.mark.parametrize("transport, extra", [("amqp", []), ("amqp-ws", []), ("https", ["--tls", "openssl"])])
def test_server_hanging_up_after_tls_is_retried_as_dropped(token_pki, fake_server, transport, extra):
    pki, trust = fake_server
    server = SpeaksFirstServer(pki.issue_server(), b"", hang_up=True)
    try:
        code, out, err = register(token_pki, "device-ec-p256", fake_ready(server.port), *extra, trust=trust,
                                  timeout=4, transport=transport)  # register() also checks: no traceback
    finally:
        server.close()
    if transport != "https":  # HTTPS first tries a fresh connection itself (a kept-alive one may have timed out)
        assert out["retries_by_cause"].get("dropped", 0) >= 1, json.dumps(out)
    # After the deadline, dropped means protocol_error. The later handshakes of the process
    # stay on the device's token although the suite's module has a 'ca' token too (docs/openssl.md).
    assert (code, out["status"]) == (8, "protocol_error"), json.dumps(out)


def test_amqp_ws_to_the_amqp_port_is_a_protocol_error(token_pki, emulator):
    """The AMQP port answers an HTTP upgrade request with AMQP bytes."""
    port = emulator["amqp_url"].rsplit(":", 1)[1]
    code, out, err = register(token_pki, "device-ec-p256", emulator, endpoint=f"wss://localhost:{port}",
                              transport="amqp-ws", timeout=10)
    assert (code, out["status"]) == (8, "protocol_error"), err


def test_amqp_with_untrusted_server_is_a_tls_error(token_pki, emulator, fake_server):
    _, other_trust = fake_server
    code, out, err = register(token_pki, "device-ec-p256", emulator, trust=other_trust, transport="amqp",
                              timeout=5)
    assert (code, out["status"]) == (7, "tls_error"), err


# -- --emulator resolves each transport's port ------------------------------------------------


@pytest.mark.parametrize("transport", NEW_TRANSPORTS)
def test_emulator_flag_picks_the_transport_port(emulator, transport):
    """--emulator: the WebSocket transports dial the device HTTPS port, amqp the amqp_url's."""
    target = targets.resolve_target(emulator["home"], transport=transport, emulator=True)
    url = emulator["amqp_url"] if transport == "amqp" else emulator["device_url"]
    assert (target.transport, target.port) == (transport, int(url.rsplit(":", 1)[1]))
    assert target.id_scope == emulator["id_scope"] and target.trust_pem


def test_emulator_without_amqp_names_the_option(token_pki, tmp_path):
    home = tmp_path / "no-amqp"
    proc = Emulator.spawn(home, "--no-amqp", "--no-mqtt")
    try:
        result = subprocess.run([DEVICE_SIM, "register", "device-ec-p256", "--emulator", "--home", str(home),
                                 "--transport", "amqp"], capture_output=True, text=True, timeout=60,
                                env=token_pki.env())
    finally:
        proc.stop()
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert "--no-amqp" in lines[0] and "amqp-ws" in lines[0]


# -- option pairs that cannot work: one line, exit 2, before the token is opened ---------------


@pytest.mark.parametrize("argv, words", [
    (["--transport", "amqp", "--tls", "awscrt"], ["--transport amqp", "--tls awscrt"]),
    (["--transport", "amqp-ws", "--tls", "awscrt"], ["--transport amqp-ws", "--tls awscrt"]),
    (["--transport", "mqtt-ws", "--tls", "openssl"], ["--tls openssl", "--transport mqtt-ws"]),
    (["--transport", "amqp", "--endpoint", "https://localhost:1"], ["--endpoint", "amqps://"]),
    (["--transport", "mqtt-ws", "--endpoint", "mqtts://localhost:1"], ["--endpoint", "wss://"]),
])
def test_option_pairs_that_cannot_work(tmp_path, argv, words):
    result = subprocess.run([DEVICE_SIM, "register", "no-such-device", "--home", str(tmp_path), "--id-scope",
                             "0ne00FAKE", *argv], capture_output=True, text=True, timeout=60)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("device-sim: error: "), result.stderr
    assert all(word in lines[0] for word in words), lines[0]


def test_fleet_run_offers_the_awscrt_transports_only(tmp_path):
    """A fleet shares one awscrt runtime: the AMQP transports (OpenSSL) are register's only."""
    result = subprocess.run([DEVICE_SIM, "fleet", "run", "--home", str(tmp_path), "--transport", "amqp"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "invalid choice: 'amqp'" in result.stderr and "mqtt-ws" in result.stderr


# -- the endpoint rule (no I/O) ------------------------------------------------------------------


@pytest.mark.parametrize("transport, text, expected", [
    ("amqp", "dps.example", ("dps.example", 5671)),
    ("amqp", "amqps://dps.example:5672", ("dps.example", 5672)),
    ("amqp-ws", "dps.example", ("dps.example", 443)),
    ("amqp-ws", "https://localhost:8443", ("localhost", 8443)),
    ("mqtt-ws", "wss://localhost:8443/$iothub/websocket", ("localhost", 8443)),
])
def test_endpoint_defaults_per_transport(transport, text, expected):
    assert targets.parse_endpoint(text, transport) == expected


# -- AMQP answers as the Responses the flow reads (no I/O) ------------------------------------


def test_rejection_status_comes_from_the_error_code_and_retry_after_from_info():
    body = '{"errorCode":429001,"message":"throttled"}'
    response = rejection_response("com.microsoft:device-container-throttled", body, {"retry-after": "3"})
    assert (response.status, response.headers, response.body) == (429, {"retry-after": "3"}, body.encode())


def test_rejection_without_error_json_takes_the_condition():
    response = rejection_response("amqp:unauthorized-access", "go away", None)
    assert response.status == 401 and b"go away" in response.body
    assert rejection_response("amqp:something-else", None, None).status == 400


def test_reply_is_202_while_assigning_and_200_when_done():
    assigning = Message(body=b'{"operationId":"op","status":"assigning"}', inferred=True,
                        properties={"retry-after": "1"})
    assert reply_response(assigning)[:2] == (202, {"retry-after": "1"})
    assigned = Message(body=b'{"operationId":"op","status":"assigned"}', inferred=True)
    assert reply_response(assigned)[:2] == (200, {})


def test_fleet_run_over_mqtt_ws(token_pki, emulator, tmp_path):
    report = tmp_path / "report.json"
    result = subprocess.run([DEVICE_SIM, "fleet", "run", "--prefix", "device-ec-", "--transport", "mqtt-ws",
                             "--endpoint", emulator["device_url"], "--id-scope", emulator["id_scope"],
                             "--trust", emulator["ca_cert"], "--no-progress", "--json", str(report),
                             "--timeout", "30"], capture_output=True, text=True, timeout=120, env=token_pki.env())
    assert result.returncode == 0, result.stdout + result.stderr
    records = json.loads(report.read_text())["devices"]
    assert sorted(r["registration_id"] for r in records) == ["device-ec-p256", "device-ec-p384"]
    assert all(r["status"] == "assigned" for r in records)

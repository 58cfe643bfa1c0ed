"""Devices that ride faults out: a real emulator killed and restarted on the same port, a
port that opens late, a server that closes during the TLS handshake, a port that never
opens. Token keys in SoftHSM, real TLS over loopback, the CLI as a user runs it."""

from __future__ import annotations

import json
import select
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from device_sim.common.x509util import to_pem
from device_sim.device import registration as reg
from device_sim.device.driver import run_registration
from device_sim.device.target import HTTPS, MQTT, resolve_target
from device_sim.device.transport_https import CrtRuntime, TlsIdentity, client_tls_context
from hsm_setup import tokens

BIN = Path(sys.executable).parent
DEVICE_SIM = str(BIN / "device-sim")
DEVICE = "device-ec-p256"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve(home: Path, port: int, *extra, transport: str = HTTPS) -> tuple[subprocess.Popen, dict]:
    """`python -m device_sim.cli stub serve` with `transport` on a fixed port (0: any);
    returns it and its ready line."""
    ports = ["--port", str(port), "--no-mqtt", "--no-amqp"] if transport == HTTPS else ["--port", "0", "--mqtt-port", str(port), "--no-amqp"]
    proc = subprocess.Popen([sys.executable, "-m", "device_sim.cli", "stub", "serve", "--home", str(home),
                             "--service-port", "0", *ports, *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ready, _, _ = select.select([proc.stdout], [], [], 30)
    line = proc.stdout.readline() if ready else ""
    if not line:
        proc.kill()
        pytest.fail(f"emulator did not start: {proc.stderr.read()[:2000]}")
    return proc, json.loads(line)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)


def admin(home: Path, *argv) -> None:
    result = subprocess.run([DEVICE_SIM, "stub", *map(str, argv), "--home", str(home)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def enrol(home: Path, token_pki) -> None:
    admin(home, "ca", "upload", "root", token_pki.root.pem_path, "--verified")
    admin(home, "group", "create", "everyone", "--ca-ref", "root")


def register_cli(token_pki, port: int, emulator: dict, timeout: float) -> subprocess.Popen:
    id_scope, ca_cert = emulator["id_scope"], emulator["ca_cert"]
    argv = [DEVICE_SIM, "register", DEVICE, "--json", "--timeout", str(timeout),
            "--endpoint", f"localhost:{port}", "--id-scope", id_scope,
            "--trust", ca_cert]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=token_pki.env())


def finished(proc: subprocess.Popen, timeout: float = 60) -> tuple[int, dict]:
    out, err = proc.communicate(timeout=timeout)
    assert "Traceback" not in err, err
    return proc.returncode, json.loads(out)


@pytest.fixture(scope="module")
def emulator_home(tmp_path_factory, token_pki):
    """A state directory whose emulator knows the token PKI's root (verified) and a group."""
    home = tmp_path_factory.mktemp("faults-emulator")
    proc, ready = serve(home, 0)
    try:
        enrol(home, token_pki)
    finally:
        stop(proc)
    return home, ready


class RecordingTransport:
    """Passes every call through and notes which requests the flow sent."""

    def __init__(self, inner):
        self.inner = inner
        self.sent: list[str] = []

    def connect(self, timeout):
        self.inner.connect(timeout)

    def send_register(self, body, timeout):
        self.sent.append(reg.REGISTER)
        return self.inner.send_register(body, timeout)

    def send_poll(self, operation_id, timeout):
        self.sent.append(reg.POLL)
        return self.inner.send_poll(operation_id, timeout)

    def close(self):
        self.inner.close()


def in_process_device(token_pki, home: Path, port: int, emulator: dict, runtime: CrtRuntime, transport: str):
    record = token_pki.devices[DEVICE]
    slot_id = tokens.find_token(token_pki.lib(), record.token_label).slot.slot_id
    chain = to_pem([record.certificate_x509(), *record.chain_x509()])
    target = resolve_target(home, transport=transport, endpoint=f"localhost:{port}",
                            id_scope=emulator["id_scope"], trust_file=emulator["ca_cert"])
    context = client_tls_context(TlsIdentity(token_pki.module_path, record.label, chain, token_pki.pin,
                                             slot_id=slot_id), target.trust_pem, runtime)
    return RecordingTransport(target.new_transport(DEVICE, context, runtime))


@pytest.mark.parametrize("transport", [HTTPS, MQTT])
def test_emulator_killed_and_restarted_after_register_the_device_resumes_its_operation(
        token_pki, emulator_home, transport):
    home, emulator = emulator_home
    port = free_port()
    options = ("--assignment-delay", "2.5", "--retry-after", "1")
    proc, _ = serve(home, port, *options, transport=transport)
    device = in_process_device(token_pki, home, port, emulator, CrtRuntime(), transport)
    flow = reg.RegistrationFlow(DEVICE)
    restarted = {}

    def outage():
        # Once DPS has answered the register (202 assigning, an operation id), the emulator
        # dies; it comes back on the same port 1.5 s later with the same state directory.
        while flow.operation_id is None:
            time.sleep(0.02)
        proc.kill()
        proc.wait(10)
        time.sleep(1.5)
        restarted["proc"], _ = serve(home, port, *options, transport=transport)

    killer = threading.Thread(target=outage)
    killer.start()
    try:
        outcome, timings = run_registration(flow, device, 20)
    finally:
        killer.join(30)
        stop(restarted.get("proc") or proc)
    assert outcome.status == reg.ASSIGNED, outcome
    assert timings.retries_by_cause[reg.REFUSED] >= 1, timings
    # It polled the operation it had rather than registering again.
    assert device.sent.count(reg.REGISTER) == 1, device.sent


def test_a_port_that_opens_late_is_waited_for(token_pki, emulator_home):
    home, emulator = emulator_home
    port = free_port()
    device = register_cli(token_pki, port, emulator, timeout=20)
    time.sleep(2.0)  # the device meets refused connections meanwhile
    proc, _ = serve(home, port, "--retry-after", "0")
    try:
        code, out = finished(device)
    finally:
        stop(proc)
    assert (code, out["status"]) == (0, "assigned"), out
    assert out["retries_by_cause"].get("refused", 0) >= 1, out
    assert out["retries"] == sum(out["retries_by_cause"].values())


def test_only_refused_connections_end_unreachable_at_the_timeout(token_pki, emulator_home):
    home, emulator = emulator_home
    timeout = 4.0
    started = time.monotonic()
    code, out = finished(register_cli(token_pki, free_port(), emulator, timeout))
    wall = time.monotonic() - started
    assert (code, out["status"]) == (6, "unreachable"), out
    assert abs(out["timings_ms"]["total"] / 1000 - timeout) <= 1.0, out["timings_ms"]
    assert timeout - 1.0 <= wall <= timeout + 3.0  # + interpreter start and imports
    assert out["retries_by_cause"]["refused"] >= 3, out
    assert "refused" in out["error"]["message"].lower()


def test_tls_eof_is_retried_and_reported(token_pki, emulator_home):
    home, emulator = emulator_home
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    accepted = []

    def accept_and_close():
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            accepted.append(1)
            conn.close()

    threading.Thread(target=accept_and_close, daemon=True).start()
    try:
        code, out = finished(register_cli(token_pki, listener.getsockname()[1], emulator, timeout=3))
    finally:
        listener.close()
    assert (code, out["status"]) == (7, "tls_error"), out
    assert out["retries_by_cause"].get("tls_eof", 0) >= 2, out
    assert len(accepted) == out["retries_by_cause"]["tls_eof"] + 1


# -- what a fault plan does to the device (issue 12, items 3 and 4's causes) ------------

def _emulator_with_plan(tmp_path, token_pki, plan: dict):
    from device_sim.stub.core.faults import parse_plan
    from device_sim.testing import Emulator

    emulator = Emulator.in_process(tmp_path / "emu", faults=parse_plan(json.dumps(plan)))
    emulator.admin.upload_ca("root", token_pki.root.pem_path.read_bytes(), verified=True)
    emulator.admin.create_group("everyone", ca_ref="root")
    return emulator


def _device_for(token_pki, emulator, transport: str):
    port = emulator.mqtt_port if transport == MQTT else emulator.device_port
    ready = {"id_scope": emulator.id_scope, "ca_cert": str(emulator.ca_cert)}
    return in_process_device(token_pki, emulator.home, port, ready, CrtRuntime(), transport)


@pytest.mark.parametrize("transport", [HTTPS, MQTT])
@pytest.mark.parametrize("action", [{"reset": "before_tls"}, {"close": "before_tls"}, {"reset": "after_tls"},
                                    {"close": "after_tls"}, {"refuse_connections": True}])
def test_resets_and_closes_around_the_handshake_are_retried_not_tls_errors(tmp_path, token_pki, transport, action):
    emulator = _emulator_with_plan(tmp_path, token_pki, {"seed": 1, "rules": [
        {"match": {"transport": transport}, "first": 2, "action": action}]})
    try:
        device = _device_for(token_pki, emulator, transport)
        outcome, timings = run_registration(reg.RegistrationFlow(DEVICE), device, 20)
        fired = emulator.app.device_api.faults.report()["rules"][0]["fired"]
    finally:
        emulator.stop()
    assert outcome.status == reg.ASSIGNED, outcome
    assert fired == 2
    # Every spoiled connection is one retry of a retryable cause, none hidden, none final.
    assert sum(timings.retries_by_cause.values()) == 2, timings.retries_by_cause
    assert set(timings.retries_by_cause) <= {reg.RESET, reg.TLS_EOF, reg.DROPPED}, timings.retries_by_cause


@pytest.mark.parametrize("operation", ["register", "poll"])
def test_a_close_after_the_request_is_a_dropped_retry_in_the_outcome(tmp_path, token_pki, operation):
    # The poll goes on the connection the register kept alive: the case the HTTPS
    # transport used to retry silently (hiding the drop from the counts).
    hold = [{"match": {"operation": "register"}, "action": {"assigning_s": 0.3}}] if operation == "poll" else []
    emulator = _emulator_with_plan(tmp_path, token_pki, {"seed": 1, "rules": [
        *hold, {"match": {"operation": operation}, "first": 1, "action": {"close": "after_request"}}]})
    try:
        device = _device_for(token_pki, emulator, HTTPS)
        outcome, timings = run_registration(reg.RegistrationFlow(DEVICE), device, 20)
        record = emulator.app.store.get_registration(DEVICE)
    finally:
        emulator.stop()
    assert outcome.status == reg.ASSIGNED, outcome
    assert timings.retries_by_cause == {reg.DROPPED: 1}, timings.retries_by_cause
    # A drop after register registers again; after a poll the device polls again.
    assert record.internal["registerRequests"] == (2 if operation == "register" else 1)
    assert device.sent.count(reg.REGISTER) == (2 if operation == "register" else 1), device.sent


def _tls_server(identity, **options):
    """A pyOpenSSL server on loopback that runs each handshake and hangs up."""
    from OpenSSL import SSL, crypto

    context = SSL.Context(SSL.TLS_SERVER_METHOD)
    context.use_certificate(crypto.X509.from_cryptography(identity.cert))
    context.use_privatekey(crypto.PKey.from_cryptography_key(identity.key))
    if options.get("tls13_only"):
        context.set_min_proto_version(SSL.TLS1_3_VERSION)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    accepted = []

    def serve():
        while True:
            try:
                sock, _ = listener.accept()
            except OSError:
                return
            accepted.append(1)
            connection = SSL.Connection(context, sock)
            connection.set_accept_state()
            try:
                connection.do_handshake()
            except SSL.Error:
                pass
            sock.close()

    threading.Thread(target=serve, daemon=True).start()
    return listener, accepted


def _https_device(token_pki, port: int, trust_pem: bytes):
    from device_sim.device.transport_https import HttpsTransport

    record = token_pki.devices[DEVICE]
    runtime = CrtRuntime()
    chain = to_pem([record.certificate_x509(), *record.chain_x509()])
    context = client_tls_context(TlsIdentity(token_pki.module_path, record.label, chain, token_pki.pin,
                                             token_label=record.token_label), trust_pem, runtime)
    return HttpsTransport("127.0.0.1", port, "0ne00000001", DEVICE, context, runtime=runtime,
                          server_name="localhost")


def test_a_tls_alert_stays_a_tls_error_and_is_not_retried(token_pki):
    from device_sim.testing import TestCA

    ca = TestCA("alert-server-ca")
    # awscrt negotiates TLS 1.2 with a token key: a TLS 1.3-only server answers an alert.
    listener, accepted = _tls_server(ca.issue_server("localhost"), tls13_only=True)
    try:
        outcome, timings = run_registration(reg.RegistrationFlow(DEVICE),
                                            _https_device(token_pki, listener.getsockname()[1], ca.cert_pem), 10)
    finally:
        listener.close()
    assert outcome.status == reg.TLS_ERROR, outcome
    assert timings.retries_by_cause == {}
    assert "NEGOTIATION_FAILURE" in outcome.error_message
    assert len(accepted) == 2  # the handshake, and the ClientHello that settled it was TLS's own


def test_a_wrong_trust_anchor_stays_a_tls_error_and_is_not_retried(tmp_path, token_pki):
    from device_sim.testing import TestCA

    emulator = _emulator_with_plan(tmp_path, token_pki, {"seed": 1, "rules": []})
    try:
        device = _https_device(token_pki, emulator.device_port, TestCA("not-the-emulators-ca").cert_pem)
        # s2n answers a server certificate it rejects only after a 10-30 s delay (blinding).
        outcome, timings = run_registration(reg.RegistrationFlow(DEVICE), device, 45)
    finally:
        emulator.stop()
    assert outcome.status == reg.TLS_ERROR, outcome
    assert timings.retries_by_cause == {}


def test_an_ambiguous_handshake_failure_is_settled_by_asking_the_server_again():
    from awscrt.exceptions import AwsCrtError

    from device_sim.device.transport import TlsFailure
    from device_sim.device.transport_https import NEGOTIATION_FAILURE, handshake_failure, peer_gone

    failure = AwsCrtError(1029, NEGOTIATION_FAILURE, "TLS (SSL) negotiation failed")
    error = TlsFailure("TLS handshake failed while connecting", reg.TLS_REJECTED)
    resetting = socket.socket()
    resetting.bind(("127.0.0.1", 0))
    resetting.listen(4)

    def reset_each():
        while True:
            try:
                sock, _ = resetting.accept()
            except OSError:
                return
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            sock.close()

    threading.Thread(target=reset_each, daemon=True).start()
    try:
        settled = handshake_failure(failure, error, "127.0.0.1", resetting.getsockname()[1], 2)
        assert settled.cause in (reg.RESET, reg.TLS_EOF), settled
        assert settled.cause in reg.RETRIED_CONNECTION_CAUSES
    finally:
        resetting.close()
    assert peer_gone("127.0.0.1", free_port(), 2) == reg.REFUSED
    # Anything but the ambiguous name is left as classify said.
    other = AwsCrtError(1030, "AWS_IO_TLS_ERROR_ALERT_RECEIVED", "alert")
    assert handshake_failure(other, error, "127.0.0.1", free_port(), 2) is error

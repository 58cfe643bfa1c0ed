"""`device-sim register` end to end: real CLI processes, SoftHSM keys, the emulator over real TLS.

The scenarios about DPS decisions run over every transport (`TRANSPORTS`): the same
outcome, JSON and exit code whatever carries the requests (docs/device.md, "Transports");
throttling and failed assignment, which need emulators of their own, are in
test_transports_outcomes.py (a file of their own, so `make test` runs them beside this one).
"""

import datetime
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from OpenSSL import SSL

from device_sim.testing import Emulator, TestCA

from .helpers import LoopbackTlsServer

BIN = Path(sys.executable).parent
DEVICE_SIM = str(BIN / "device-sim")

TRANSPORTS = ["https", "mqtt", "mqtt-ws", "amqp", "amqp-ws"]
# The ready-line URL each transport dials: the WebSocket ones share the device HTTPS port.
READY_URL = {"https": "device_url", "mqtt": "mqtt_url", "mqtt-ws": "device_url", "amqp": "amqp_url",
             "amqp-ws": "device_url"}


def admin(emu_home, *argv):
    result = subprocess.run([DEVICE_SIM, "stub", *map(str, argv), "--home", str(emu_home)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture(scope="module")
def emulator(token_pki, tmp_path_factory):
    home = tmp_path_factory.mktemp("emulator")
    proc = Emulator.spawn(home, "--retry-after", "0")  # every front end, each on a free port
    ready = proc.ready
    admin(home, "ca", "upload", "root", token_pki.root.pem_path, "--verified")
    admin(home, "group", "create", "everyone", "--ca-ref", "root")
    ready["home"] = home
    yield ready
    proc.stop()


def register(pki, device, ready=None, *extra, endpoint=None, trust=None, timeout=20, env=None,
             transport="https"):
    """Run `device-sim register --json`; returns (exit code, JSON object or None, stderr)."""
    argv = [DEVICE_SIM, "register", device, "--json", "--timeout", str(timeout), "--transport", transport]
    if ready is not None:
        argv += ["--endpoint", endpoint or ready[READY_URL[transport]], "--id-scope", ready["id_scope"],
                 "--trust", trust or ready["ca_cert"]]
    argv += [str(a) for a in extra]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout + 30, env=env or pki.env())
    assert "Traceback" not in result.stderr, result.stderr
    document = json.loads(result.stdout) if result.stdout.strip().startswith("{") else None
    return result.returncode, document, result.stderr


# -- outcomes against the emulator ------------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_assigned_with_token_key_and_full_json(token_pki, emulator, transport):
    code, out, err = register(token_pki, "device-ec-p256", emulator, "--payload", '{"model": "demo"}',
                              transport=transport)
    assert code == 0, (out, err)
    assert out["status"] == "assigned" and out["registration_id"] == "device-ec-p256"
    assert out["transport"] == transport
    assert out["device_id"] == "device-ec-p256" and out["assigned_hub"]
    assert out["substatus"] and out["operation_id"] and out["error"] is None
    assert set(out["timings_ms"]) == {"connect_tls", "register", "total"}
    assert out["chain_length"] == 3  # leaf, intermediate, root


@pytest.mark.parametrize("device", ["device-ec-p384", "device-rsa-2048"])
def test_other_key_types_named_by_uri_with_pin_source(token_pki, emulator, tmp_path, device):
    pin_file = tmp_path / "pin"
    pin_file.write_text(token_pki.pin + "\n")
    env = token_pki.env()
    del env["PKCS11_PIN"]
    uri = f"pkcs11:token=devices;object={device}?pin-source={pin_file}"
    code, out, err = register(token_pki, uri, emulator, env=env)
    assert (code, out["status"], out["device_id"]) == (0, "assigned", device), err


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_chain_missing_an_intermediate_is_refused_and_the_full_chain_accepted(token_pki, emulator, transport):
    # root (verified) -> intermediate -> line -> device-line-1: leaf + line alone cannot reach the root
    code, out, _ = register(token_pki, "device-line-1", emulator, "--chain-to", "line", transport=transport)
    assert (code, out["status"], out["error"]["code"]) == (4, "unauthorized", 401002)
    code, out, _ = register(token_pki, "device-line-1", emulator, transport=transport)
    assert (code, out["status"], out["chain_length"]) == (0, "assigned", 4)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_disabled_group_blocks_its_devices_only(token_pki, emulator, transport):
    admin(emulator["home"], "group", "create", "line-off", "--cert", token_pki.line.pem_path, "--disabled")
    try:
        code, out, _ = register(token_pki, "device-line-1", emulator, transport=transport)
        assert (code, out["status"]) == (3, "disabled")
        code, out, _ = register(token_pki, "device-ec-p256", emulator, transport=transport)
        assert (code, out["status"]) == (0, "assigned")
    finally:
        admin(emulator["home"], "group", "delete", "line-off")


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_disabled_individual_enrollment_blocks_that_device(token_pki, emulator, transport):
    device = token_pki.devices["device-rsa-2048"]
    admin(emulator["home"], "enroll", "create", "device-rsa-2048", "--cert", device.cert_path, "--disabled")
    try:
        code, out, _ = register(token_pki, "device-rsa-2048", emulator, transport=transport)
        assert (code, out["status"]) == (3, "disabled")
    finally:
        admin(emulator["home"], "enroll", "delete", "device-rsa-2048")


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_wrong_registration_id_is_unauthorized(token_pki, emulator, transport):
    code, out, _ = register(token_pki, "device-ec-p256", emulator, "--registration-id", "someone-else",
                            transport=transport)
    assert (code, out["status"], out["http_status"]) == (4, "unauthorized", 401)


# -- endpoints that misbehave -----------------------------------------------------------------


@pytest.fixture(scope="module")
def fake_server_pki(tmp_path_factory):
    pki = TestCA("fake-dps-root")
    trust = tmp_path_factory.mktemp("fake") / "trust.pem"
    trust.write_bytes(pki.cert_pem)
    return pki, trust


def fake_ready(port):
    return {"device_url": f"https://localhost:{port}", "id_scope": "0ne00FAKE", "ca_cert": None}


def test_server_that_accepts_and_stays_silent_times_out_on_time(token_pki, fake_server_pki):
    pki, trust = fake_server_pki
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    started = time.monotonic()
    try:
        code, out, _ = register(token_pki, "device-ec-p256", fake_ready(listener.getsockname()[1]),
                                trust=trust, timeout=1.5)
    finally:
        listener.close()
    assert (code, out["status"]) == (6, "timeout")
    assert time.monotonic() - started < 8  # process start-up included


def test_unreachable_endpoint(token_pki, fake_server_pki):
    _, trust = fake_server_pki
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    code, out, _ = register(token_pki, "device-ec-p256", fake_ready(port), trust=trust, timeout=5)
    assert (code, out["status"]) == (6, "unreachable")


def test_garbage_answer_is_a_protocol_error(token_pki, fake_server_pki):
    pki, trust = fake_server_pki
    server = LoopbackTlsServer(pki.issue_server(), mode="garbage")
    try:
        code, out, _ = register(token_pki, "device-ec-p256", fake_ready(server.port), trust=trust, timeout=5)
    finally:
        server.close()
    assert (code, out["status"]) == (8, "protocol_error")


def test_tls_failure(token_pki, fake_server_pki):
    pki, trust = fake_server_pki
    server = LoopbackTlsServer(pki.issue_server(), mode="http", responses=[b""])
    server._ctx.set_min_proto_version(SSL.TLS1_3_VERSION)  # the device offers TLS 1.2 only
    try:
        code, out, _ = register(token_pki, "device-ec-p256", fake_ready(server.port), trust=trust, timeout=5)
    finally:
        server.close()
    assert (code, out["status"]) == (7, "tls_error")


# -- bad input: one line, exit 2, before any connection -----------------------------------------


def one_line_error(err):
    lines = [l for l in err.strip().splitlines() if l]
    assert len(lines) == 1 and lines[0].startswith("device-sim: error: "), err
    return lines[0]


def test_wrong_pin(token_pki, emulator, tmp_path):
    bad = tmp_path / "bad-pin"
    bad.write_text("0000\n")
    env = token_pki.env()
    del env["PKCS11_PIN"]
    code, _, err = register(token_pki, "device-ec-p256", emulator, "--pin-file", bad, env=env)
    assert code == 2 and "PIN" in one_line_error(err) and "0000" not in err


def test_missing_object(token_pki, emulator):
    code, _, err = register(token_pki, "pkcs11:token=devices;object=no-such-device", emulator)
    assert code == 2 and "no private key" in one_line_error(err)
    code, _, err = register(token_pki, "no-such-device", emulator)
    assert code == 2 and "unknown device" in one_line_error(err)


def test_certificate_of_another_key(token_pki, emulator):
    other = token_pki.devices["device-ec-p384"].cert_path
    code, _, err = register(token_pki, "device-ec-p256", emulator, "--cert", other)
    assert code == 2 and "does not belong to the token key" in one_line_error(err)


def test_expired_certificate(token_pki, emulator, tmp_path):
    device = token_pki.devices["device-ec-p256"]
    start = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=10)
    expired = TestCA("old-ca").issue_leaf("device-ec-p256", public_key=device.certificate_x509().public_key(),
                                          not_before=start, days=1)
    path = tmp_path / "expired.pem"
    path.write_bytes(expired.cert_pem)
    code, _, err = register(token_pki, "device-ec-p256", emulator, "--cert", path)
    assert code == 2 and "expired" in one_line_error(err)


@pytest.mark.parametrize("payload", ["{not json", "[1, 2]"])
def test_bad_payload(token_pki, emulator, payload):
    code, _, err = register(token_pki, "device-ec-p256", emulator, "--payload", payload)
    assert code == 2 and "--payload" in one_line_error(err)


# -- chain commands on token identities ----------------------------------------------------------


def test_chain_show_and_lint(token_pki):
    env = token_pki.env()
    show = subprocess.run([DEVICE_SIM, "chain", "show", "device-line-1", "--json"],
                          capture_output=True, text=True, env=env, timeout=60)
    chain = json.loads(show.stdout)["chain"]
    assert [c["subject"] for c in chain] == ["CN=device-line-1", "CN=line", "CN=intermediate", "CN=root"]
    assert all(len(c["sha256"]) == 64 and c["key"].startswith("EC") for c in chain)
    root = str(token_pki.root.pem_path)
    ok = subprocess.run([DEVICE_SIM, "chain", "lint", "device-line-1", "--verified", root],
                        capture_output=True, text=True, env=env, timeout=60)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    short = subprocess.run([DEVICE_SIM, "chain", "lint", "device-line-1", "--verified", root,
                            "--chain-to", "line", "--json"], capture_output=True, text=True, env=env, timeout=60)
    assert short.returncode == 1
    assert "verified" in {f["rule"] for f in json.loads(short.stdout)["findings"] if f["level"] == "error"}


# -- a certificate outside its validity, on purpose --------------------------------------------


def test_allow_invalid_time_presents_an_expired_certificate_to_see_dps_answer(token_pki, emulator, tmp_path):
    """The token key with an expired certificate: refused before connecting unless asked."""
    record = token_pki.devices["device-ec-p256"]
    now = datetime.datetime.now(datetime.timezone.utc)
    expired = TestCA("expired-test-root").issue_leaf(
        "device-ec-p256", public_key=record.certificate_x509().public_key(),
        not_before=now - datetime.timedelta(days=30), not_after=now - datetime.timedelta(days=1))
    cert_file = tmp_path / "expired.pem"
    cert_file.write_bytes(expired.chain_pem)
    code, out, err = register(token_pki, "device-ec-p256", emulator, "--cert", cert_file)
    # exit 2 with --json: only the error object (issue 15: errors a script can read)
    assert code == 2 and set(out) == {"error"} and "expired on" in err
    assert out["error"]["exit_code"] == 2 and "expired on" in out["error"]["message"]
    code, out, err = register(token_pki, "device-ec-p256", emulator, "--cert", cert_file, "--allow-invalid-time")
    assert code == 4 and out["status"] == "unauthorized", err
    assert "validity" in out["error"]["message"]  # the emulator's own reason, as DPS would refuse it


def test_chain_show_reads_public_objects_without_a_pin(token_pki):
    env = token_pki.env()
    del env["PKCS11_PIN"]
    result = subprocess.run([DEVICE_SIM, "chain", "show", "device-ec-p256"], capture_output=True, text=True,
                            timeout=60, env=env, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    assert "device-ec-p256" in result.stdout

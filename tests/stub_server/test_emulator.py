"""The whole emulator as users run it: `device-sim stub serve` in a subprocess, the admin
commands, devices registering over mTLS with `requests`, restarts and `kill -9`."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import requests
from cryptography.x509.oid import NameOID

from device_sim.testing import Emulator, TestCA

from .emulator_proc import API, cli, stub_admin


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    running = Emulator.spawn(tmp_path_factory.mktemp("emulator-home"), "--retry-after", "0")
    yield running
    running.stop()


@pytest.fixture(scope="module")
def enrolled(emulator, file_cas, tmp_path_factory):
    """Root uploaded and verified by proof of possession; a group on inter2 (the docs' example)."""
    files = tmp_path_factory.mktemp("enrolled")
    (files / "root.pem").write_bytes(file_cas.root.cert_pem)
    (files / "inter2.pem").write_bytes(file_cas.inter2.cert_pem)
    stub_admin(emulator, "ca", "upload", "root", files / "root.pem")
    code = stub_admin(emulator, "ca", "code", "root").stdout.strip()
    verification = verification_cert(file_cas.root, code)
    (files / "verify.pem").write_bytes(verification.cert_pem)
    stub_admin(emulator, "ca", "verify", "root", files / "verify.pem")
    stub_admin(emulator, "group", "create", "group-inter2", "--cert", files / "inter2.pem")
    return files


def verification_cert(ca: TestCA, code: str):
    issued = ca.issue_leaf(code)
    assert issued.cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == code
    return issued


def register(emulator, registration_id: str, cert=None, body=None) -> tuple[int, dict]:
    """Register and poll on one kept-alive connection; the final (status, body)."""
    ca = emulator.ready["ca_cert"]
    scope = emulator.ready["id_scope"]
    with requests.Session() as session:
        response = session.put(
            f"{emulator.device_url}/{scope}/registrations/{registration_id}/register?api-version={API}",
            json=body if body is not None else {"registrationId": registration_id},
            cert=cert, verify=ca, timeout=10)
        for _ in range(50):
            if response.status_code != 202:
                break
            operation = response.json()["operationId"]
            response = session.get(
                f"{emulator.device_url}/{scope}/registrations/{registration_id}/operations/{operation}"
                f"?api-version={API}", cert=cert, verify=ca, timeout=10)
        return response.status_code, response.json()


def test_ready_line_and_state_files(emulator):
    ready = emulator.ready
    for key in ("device_url", "service_url", "id_scope", "ca_cert", "service_key_file", "pid", "mqtt_url"):
        assert key in ready
    assert ready["device_url"].startswith("https://localhost:")
    assert ready["service_url"] != ready["device_url"]
    key_file = Path(ready["service_key_file"])
    assert key_file.stat().st_mode & 0o777 == 0o600
    # The key appears once: inside the connection string the service SDKs take (docs/emulator.md).
    others = {k: v for k, v in ready.items() if k != "service_connection_string"}
    assert key_file.read_text().strip() not in json.dumps(others)
    assert json.loads((emulator.home / "stub" / "endpoint.json").read_text())["pid"] == ready["pid"]


def test_proof_of_possession_flow_with_the_admin_commands(emulator, enrolled):
    listed = json.loads(stub_admin(emulator, "ca", "list", "--json").stdout)
    assert [(c["name"], c["properties"]["isVerified"]) for c in listed] == [("root", True)]
    group = json.loads(stub_admin(emulator, "group", "get", "group-inter2", "--json").stdout)
    assert group["enrollmentGroupId"] == "group-inter2" and group["provisioningStatus"] == "enabled"


def test_full_chain_registers_and_a_chain_missing_an_intermediate_does_not(emulator, enrolled, file_cas, tmp_path):
    leaf = file_cas.device("dev-full")
    full = leaf.write(tmp_path, "full", [file_cas.inter2, file_cas.inter1, file_cas.root])
    status, body = register(emulator, "dev-full", full)
    assert status == 200 and body["status"] == "assigned", body
    assert body["registrationState"]["deviceId"] == "dev-full"

    short_leaf = file_cas.device("dev-short")
    short = short_leaf.write(tmp_path, "short", [file_cas.inter2])  # no inter1: cannot reach the root
    status, body = register(emulator, "dev-short", short)
    assert status == 401 and body["errorCode"] == 401002, body

    record = json.loads(stub_admin(emulator, "registration", "get", "dev-full", "--json").stdout)
    assert record["status"] == "assigned"


def test_no_client_certificate_gets_401002_not_a_tls_alert(emulator, enrolled):
    status, body = register(emulator, "dev-nocert", cert=None)
    assert status == 401 and body["errorCode"] == 401002


def test_unknown_certificate_gets_401002(emulator, enrolled, tmp_path):

    stranger = TestCA("stranger-root")
    files = stranger.issue_leaf("dev-stranger").write(tmp_path, "stranger", [stranger])
    status, body = register(emulator, "dev-stranger", files)
    assert status == 401 and body["errorCode"] == 401002


def test_bad_json_body_is_400(emulator, enrolled, file_cas, tmp_path):
    files = file_cas.device("dev-badjson").write(tmp_path, "badjson", [file_cas.inter2, file_cas.inter1])
    response = requests.put(
        f"{emulator.device_url}/{emulator.ready['id_scope']}/registrations/dev-badjson/register?api-version={API}",
        data=b"{not json", headers={"Content-Type": "application/json"},
        cert=files, verify=emulator.ready["ca_cert"], timeout=10)
    assert response.status_code == 400 and response.json()["errorCode"] // 1000 == 400


def test_oversized_body_and_unknown_route_through_the_real_server(emulator):
    ca = emulator.ready["ca_cert"]
    response = requests.put(
        f"{emulator.device_url}/{emulator.ready['id_scope']}/registrations/big/register?api-version={API}",
        data=b"{" + b" " * (200 * 1024) + b"}", headers={"Content-Type": "application/json"},
        verify=ca, timeout=10)
    assert response.status_code == 413 and response.json()["errorCode"] == 413000
    response = requests.get(f"{emulator.device_url}/favicon.ico", verify=ca, timeout=10)
    assert response.status_code == 404 and response.json()["errorCode"] == 404000


def test_service_api_refuses_requests_without_a_sas_token(emulator):
    response = requests.get(f"{emulator.ready['service_url']}/certificates?api-version=2021-10-01",
                            verify=emulator.ready["ca_cert"], timeout=10)
    assert response.status_code == 401 and response.json()["errorCode"] == 401000


def test_admin_errors_are_one_line_with_exit_codes(emulator, tmp_path):
    result = stub_admin(emulator, "group", "get", "no-such-group", check=False)
    assert result.returncode == 3
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("device-sim: error:")
    assert "Traceback" not in result.stderr
    result = cli("stub", "ca", "list", "--home", tmp_path / "nothing-here", check=False)
    assert result.returncode == 4 and "stub serve" in result.stderr
    not_a_cert = tmp_path / "garbage.pem"
    not_a_cert.write_text("hello")
    result = stub_admin(emulator, "ca", "upload", "junk", not_a_cert, check=False)
    assert result.returncode == 2 and "no X.509 certificate" in result.stderr


def test_disable_and_enable_through_the_admin_commands(emulator, enrolled, file_cas, tmp_path):
    files = file_cas.device("dev-toggle").write(tmp_path, "toggle", [file_cas.inter2, file_cas.inter1, file_cas.root])
    (tmp_path / "leaf.pem").write_bytes(files[0].read_bytes().split(b"-----END CERTIFICATE-----")[0]
                                        + b"-----END CERTIFICATE-----\n")
    stub_admin(emulator, "enroll", "create", "dev-toggle", "--cert", tmp_path / "leaf.pem", "--device-id", "toggled",
                   "--disabled")
    status, body = register(emulator, "dev-toggle", files)
    assert body["status"] == "disabled", body  # the first entry found decides, even with an enabled group above
    stub_admin(emulator, "enroll", "enable", "dev-toggle")
    status, body = register(emulator, "dev-toggle", files)
    assert status == 200 and body["registrationState"]["deviceId"] == "toggled"
    stub_admin(emulator, "enroll", "delete", "dev-toggle")
    assert "dev-toggle" not in stub_admin(emulator, "enroll", "list").stdout


def test_state_survives_a_restart_and_kill_9(tmp_path, file_cas):
    home = tmp_path / "home"
    first = Emulator.spawn(home, "--retry-after", "0")
    (tmp_path / "root.pem").write_bytes(file_cas.root.cert_pem)
    stub_admin(first, "ca", "upload", "root", tmp_path / "root.pem", "--verified")
    stub_admin(first, "group", "create", "root-group", "--ca-ref", "root")
    files = file_cas.device("dev-persist").write(tmp_path, "persist", [file_cas.inter2, file_cas.inter1, file_cas.root])
    status, body = register(first, "dev-persist", files)
    assert status == 200 and body["status"] == "assigned"
    scope = first.ready["id_scope"]
    assert first.stop(signal.SIGTERM) == 0
    assert not (home / "stub" / "endpoint.json").exists()

    second = Emulator.spawn(home, "--retry-after", "0")
    assert second.ready["id_scope"] == scope
    assert second.ready["ca_cert"] == first.ready["ca_cert"]
    (tmp_path / "leaf.pem").write_bytes(file_cas.device("dev-individual").cert_pem)
    stub_admin(second, "enroll", "create", "dev-individual", "--cert", tmp_path / "leaf.pem")
    second.stop(signal.SIGKILL)  # no clean shutdown: acknowledged writes must still be there

    third = Emulator.spawn(home, "--retry-after", "0")
    try:
        assert third.ready["id_scope"] == scope
        cas = json.loads(stub_admin(third, "ca", "list", "--json").stdout)
        assert [(c["name"], c["properties"]["isVerified"]) for c in cas] == [("root", True)]
        assert "root-group" in stub_admin(third, "group", "list").stdout
        assert "dev-individual" in stub_admin(third, "enroll", "list").stdout
        record = json.loads(stub_admin(third, "registration", "get", "dev-persist", "--json").stdout)
        assert record["status"] == "assigned"
        status, body = register(third, "dev-persist", files)  # and it still serves
        assert status == 200 and body["status"] == "assigned"
    finally:
        third.stop()


def test_serve_refuses_a_busy_port_in_one_line(emulator, tmp_path):
    port = emulator.device_url.rsplit(":", 1)[1]
    result = cli("stub", "serve", "--home", tmp_path, "--port", port, "--mqtt-port", "0", "--no-amqp", check=False)
    assert result.returncode == 2 and "cannot listen" in result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""

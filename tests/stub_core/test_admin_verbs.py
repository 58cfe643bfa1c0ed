"""`device-sim stub registration list` and `device-sim stub status` against a running
`stub serve` (a subprocess on loopback; devices register over mTLS with `requests`)."""

from __future__ import annotations

import json

import pytest
import requests

from device_sim.testing import Emulator, LeafCert, TestCA
from stub_server.emulator_proc import API, stub_admin

from .env import pem


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    running = Emulator.spawn(tmp_path_factory.mktemp("admin-verbs-home"), "--retry-after", "0")
    yield running
    running.stop()


def write_device(directory, device: LeafCert) -> tuple[str, str]:
    cert, key = device.write(directory, str(device.cert.serial_number))
    return str(cert), str(key)


def register(emulator, device: LeafCert, registration_id: str, files) -> int:
    cert = write_device(files, device)
    url = emulator.device_url
    scope = emulator.ready["id_scope"]
    with requests.Session() as session:
        response = session.put(f"{url}/{scope}/registrations/{registration_id}/register?api-version={API}",
                               json={"registrationId": registration_id}, cert=cert,
                               verify=emulator.ready["ca_cert"], timeout=10)
        assert response.headers.get("x-ms-request-id")
        for _ in range(20):
            if response.status_code != 202:
                break
            operation = response.json()["operationId"]
            response = session.get(f"{url}/{scope}/registrations/{registration_id}/operations/"
                                   f"{operation}?api-version={API}", cert=cert,
                                   verify=emulator.ready["ca_cert"], timeout=10)
        return response.status_code


def test_registration_list_and_status(emulator, tmp_path):
    assert stub_admin(emulator, "registration", "list").stdout.strip() == "(no registration records)"
    root = TestCA("Test Root")
    inter = root.issue_intermediate("I")
    (tmp_path / "root.pem").write_text(pem(root.cert))
    stub_admin(emulator, "ca", "upload", "root", tmp_path / "root.pem", "--verified")
    stub_admin(emulator, "group", "create", "line", "--ca-ref", "root")
    for name in ("dev-1", "dev-2"):
        leaf = inter.issue_leaf(name)
        assert register(emulator, leaf, name, tmp_path) == 200
    selfie = TestCA.self_signed_leaf("selfie")
    (tmp_path / "selfie.pem").write_text(pem(selfie.cert))
    stub_admin(emulator, "enroll", "create", "selfie", "--cert", tmp_path / "selfie.pem", "--disabled")
    assert register(emulator, selfie, "selfie", tmp_path) == 200

    lines = stub_admin(emulator, "registration", "list").stdout.splitlines()
    assert [line.split("\t")[:2] for line in lines] == [
        ["dev-1", "assigned"], ["dev-2", "assigned"], ["selfie", "disabled"]]
    grouped = json.loads(stub_admin(emulator, "registration", "list", "--group", "line", "--json").stdout)
    assert [r["registrationId"] for r in grouped] == ["dev-1", "dev-2"]
    missing = stub_admin(emulator, "registration", "list", "--group", "nope", check=False)
    assert missing.returncode == 3 and "404201" in missing.stderr

    status = json.loads(stub_admin(emulator, "status", "--json").stdout)
    assert status["certificates"] == {"total": 1, "verified": 1}
    assert (status["enrollmentGroups"], status["enrollments"]) == (1, 1)
    assert status["registrations"]["byStatus"] == {"assigned": 2, "disabled": 1}
    text = stub_admin(emulator, "status").stdout
    assert "CA certificates\t1 (1 verified)" in text and "registrations\t3 (2 assigned, 1 disabled)" in text

"""The ready line's service_connection_string, and the service API on the device port.

Over real TLS on loopback against the `stub serve` assembly (in process).
"""

from __future__ import annotations

import base64
import json
import stat

import pytest

from device_sim.stub import server
from device_sim.stub.core import sas

from .conftest import client_context, read_response, tls_connect
from .test_transport import request_bytes

API = "2021-10-01"


def parse_connection_string(text: str) -> dict[str, str]:
    return dict(part.split("=", 1) for part in text.split(";"))


@pytest.fixture
def started(tmp_path):
    def start(**options):
        stub = server.StubServer(server.ServeOptions(home=tmp_path, **options), log=lambda m: None)
        made.append(stub)
        return stub, stub.start()
    made: list[server.StubServer] = []
    yield start
    for stub in made:
        stub.close()


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def ask(port: int, ca_cert: str, method: str, target: str, body: bytes = b"", headers=None):
    with tls_connect(port, client_context(ca_cert)) as sock:
        sock.sendall(request_bytes(method, target, body, {"Connection": "close", **(headers or {})}))
        status, _, raw = read_response(sock)
    return status, json.loads(raw) if raw else None


def test_the_ready_line_carries_the_connection_string_by_default(started):
    _, ready = started()
    assert "SharedAccessKey=" in ready["service_connection_string"]


def test_no_secret_in_the_ready_line_when_told_not_to(started, tmp_path):
    _, ready = started(service_connection_string=False)
    assert "service_connection_string" not in ready
    assert (tmp_path / "stub" / "service.key").read_text().strip() not in json.dumps(ready)


def test_ready_line_has_a_service_connection_string_for_the_service_port(started, tmp_path):
    _, ready = started()
    fields = parse_connection_string(ready["service_connection_string"])
    assert fields["HostName"] == f"localhost:{port_of(ready['service_url'])}"
    assert fields["SharedAccessKeyName"] == "provisioningserviceowner"
    key_file = tmp_path / "stub" / "service.key"
    assert base64.b64decode(fields["SharedAccessKey"]) == base64.b64decode(key_file.read_text())
    endpoint = tmp_path / "stub" / "endpoint.json"
    assert json.loads(endpoint.read_text()) == ready
    assert stat.S_IMODE(endpoint.stat().st_mode) == 0o600  # it carries the key


def test_the_key_of_the_connection_string_signs_service_requests(started):
    stub, ready = started()
    key = base64.b64decode(parse_connection_string(ready["service_connection_string"])["SharedAccessKey"])
    token = sas.make_token(ready["service_host"], key)
    status, body = ask(port_of(ready["service_url"]), ready["ca_cert"], "GET",
                       f"/certificates?api-version={API}", headers={"Authorization": token})
    assert status == 200, body


def test_service_api_on_the_device_port_beside_the_device_api(started):
    stub, ready = started(service_on_device_port=True)
    device_port = port_of(ready["device_url"])
    fields = parse_connection_string(ready["service_connection_string"])
    assert fields["HostName"] == f"localhost:{device_port}"
    token = sas.make_token(ready["service_host"], base64.b64decode(fields["SharedAccessKey"]))
    auth = {"Authorization": token}
    for head in ("certificates", "enrollments", "enrollmentGroups", "ENROLLMENTS"):
        target = f"/{head}/query?api-version={API}" if head.lower() != "certificates" else f"/{head}?api-version={API}"
        method = "GET" if head == "certificates" else "POST"
        status, body = ask(device_port, ready["ca_cert"], method, target, b"{}" if method == "POST" else b"",
                           {**auth, "Content-Type": "application/json"} if method == "POST" else auth)
        assert status == 200, (head, body)
    status, body = ask(device_port, ready["ca_cert"], "GET", f"/registrations/dev-x?api-version={API}", headers=auth)
    assert status == 404 and body["errorCode"] != 404000  # the service API's own "not found", not a routing miss
    status, _ = ask(device_port, ready["ca_cert"], "GET", f"/enrollments/x?api-version={API}")
    assert status == 401  # no SAS: the service API refuses
    # Device paths still reach the device API: no client certificate -> 401002, DPS's answer.
    status, body = ask(device_port, ready["ca_cert"], "PUT",
                       f"/{ready['id_scope']}/registrations/dev-x/register?api-version=2021-06-01",
                       b'{"registrationId":"dev-x"}', {"Content-Type": "application/json"})
    assert status == 401 and body["errorCode"] == 401002
    # And the service port keeps serving.
    status, _ = ask(port_of(ready["service_url"]), ready["ca_cert"], "GET", f"/certificates?api-version={API}",
                    headers=auth)
    assert status == 200


def test_without_the_option_the_device_port_has_no_service_routes(started):
    stub, ready = started()
    status, body = ask(port_of(ready["device_url"]), ready["ca_cert"], "GET", f"/certificates?api-version={API}")
    assert status == 404 and body["errorCode"] == 404000


def test_serve_option_names_the_device_port_in_the_connection_string(tmp_path):
    from device_sim.testing import Emulator

    emulator = Emulator.spawn(tmp_path, "--service-on-device-port")
    try:
        fields = parse_connection_string(emulator.ready["service_connection_string"])
        assert fields["HostName"] == f"localhost:{port_of(emulator.device_url)}"
    finally:
        assert emulator.stop() == 0
    assert "SharedAccessKey" not in (tmp_path / "serve.log").read_text()  # never logged


def test_a_sas_signed_for_the_connection_strings_host_and_port_is_accepted(started):
    """Service SDKs sign `sr` = the HostName they dialled (`localhost%3APORT` from make_token,
    as the Python service SDK sends it; the raw form is covered in tests/stub_core)."""
    stub, ready = started()
    fields = parse_connection_string(ready["service_connection_string"])
    token = sas.make_token(fields["HostName"], base64.b64decode(fields["SharedAccessKey"]))
    status, body = ask(port_of(ready["service_url"]), ready["ca_cert"], "GET",
                       f"/certificates?api-version={API}", headers={"Authorization": token})
    assert status == 200, body
    wrong = sas.make_token(f"localhost:{port_of(ready['device_url'])}", base64.b64decode(fields["SharedAccessKey"]))
    status, _ = ask(port_of(ready["service_url"]), ready["ca_cert"], "GET",
                    f"/certificates?api-version={API}", headers={"Authorization": wrong})
    assert status == 401


def test_status_reports_the_listeners_and_uptime(started):
    stub, ready = started()
    token = sas.make_token(ready["service_host"], stub.app.service_api.service_key)
    status, body = ask(port_of(ready["service_url"]), ready["ca_cert"], "GET",
                       f"/emulator/status?api-version={API}", headers={"Authorization": token})
    assert status == 200, body
    assert body["server"]["listeners"]["device"] == ready["device_url"]
    assert body["server"]["uptimeSeconds"] >= 0

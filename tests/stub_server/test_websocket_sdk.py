"""Official Azure SDKs we did not write against `device-sim stub serve` (a real subprocess):

- azure-iot-device provisions over MQTT (port 8883) and over MQTT over WebSockets
  (`websockets=True`, wss://localhost:443/$iothub/websocket) with file keys;
- azure-iot-deviceprovisioning (the service SDK) creates and reads an enrollment group
  from the ready line's service_connection_string, on the device port (443) and on the
  service port.

The SDKs dial fixed ports, so the emulator listens on 443 and 8883 here, under a lock.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from device_sim.testing import Emulator
from .emulator_proc import stub_admin
from .sdk_venv import fixed_ports, sdk_python

DEVICE_CLIENT = r"""
import json, sys
from azure.iot.device import ProvisioningDeviceClient, X509
ready, chain, key, rid, websockets = json.loads(sys.argv[1]), *sys.argv[2:5], sys.argv[5] == "ws"
client = ProvisioningDeviceClient.create_from_x509_certificate(
    provisioning_host="localhost", registration_id=rid, id_scope=ready["id_scope"],
    x509=X509(cert_file=chain, key_file=key), websockets=websockets,
    server_verification_cert=open(ready["ca_cert"]).read())
result = client.register()
print(json.dumps({"status": result.status, "hub": result.registration_state.assigned_hub,
                  "device_id": result.registration_state.device_id}))
"""

SERVICE_CLIENT = r"""
import json, sys
from azure.iot.deviceprovisioning import DeviceProvisioningClient
connection_string, group_id, pem = sys.argv[1], sys.argv[2], open(sys.argv[3]).read()
client = DeviceProvisioningClient.from_connection_string(connection_string)
group = {
    "enrollmentGroupId": group_id,
    "attestation": {"type": "x509", "x509": {"signingCertificates": {"primary": {"certificate": pem}}}},
    "provisioningStatus": "enabled",
}
created = client.enrollment_group.create_or_update(id=group_id, enrollment_group=group)
read = client.enrollment_group.get(id=group_id)
print(json.dumps({"created": created["enrollmentGroupId"], "read": read["enrollmentGroupId"],
                  "etag": read.get("etag"), "status": read["provisioningStatus"]}))
"""


@pytest.fixture(scope="module")
def fixed(tmp_path_factory):
    """Two emulators under the port lock: one on 443 only (device and service API, MQTT over
    WebSockets; no 8883, so a WebSocket registration cannot have gone anywhere else) and one
    with MQTT on 8883."""
    with fixed_ports():
        on_443 = Emulator.spawn(tmp_path_factory.mktemp("ws-sdk-443"), "--port", "443", "--no-mqtt",
                          "--service-on-device-port")
        on_8883 = None
        try:
            on_8883 = Emulator.spawn(tmp_path_factory.mktemp("ws-sdk-8883"), "--mqtt-port", "8883")
            assert on_443.ready["device_url"].endswith(":443") and "mqtt_url" not in on_443.ready
            assert on_8883.ready["mqtt_url"].endswith(":8883")
            yield {"ws": on_443, "mqtt": on_8883}
        finally:
            for running in (on_443, on_8883):
                if running is not None:
                    running.stop()
    for running in (on_443, on_8883):
        log = running.log.read_text()
        assert "Traceback" not in log, log


@pytest.fixture(scope="module")
def emulator(fixed):
    return fixed["ws"]


def run_sdk(script: str, *args, ca_cert: str | None = None) -> dict:
    env = dict(os.environ)
    if ca_cert is not None:
        env["REQUESTS_CA_BUNDLE"] = ca_cert  # the service SDK's HTTP stack is requests
    answer = subprocess.run([sdk_python(), "-c", script, *map(str, args)], capture_output=True, text=True,
                            timeout=120, env=env)
    assert answer.returncode == 0, answer.stderr[-3000:]
    return json.loads(answer.stdout.splitlines()[-1])


@pytest.fixture(scope="module")
def enrolled(emulator, file_cas, tmp_path_factory):
    """The inter2 group made by the service SDK itself, through the device port (443); the
    root it chains to uploaded as verified with the admin verbs (the SDK has no CA calls)."""
    files = tmp_path_factory.mktemp("ws-sdk-files")
    (files / "inter2.pem").write_bytes(file_cas.inter2.cert_pem)
    (files / "root.pem").write_bytes(file_cas.root.cert_pem)
    stub_admin(emulator, "ca", "upload", "sdk-root", files / "root.pem", "--verified")
    outcome = run_sdk(SERVICE_CLIENT, emulator.ready["service_connection_string"], "sdk-inter2",
                      files / "inter2.pem", ca_cert=emulator.ready["ca_cert"])
    return outcome


def test_the_service_sdk_creates_and_reads_a_group_on_the_device_port(emulator, enrolled):
    assert enrolled["created"] == enrolled["read"] == "sdk-inter2"
    assert enrolled["status"] == "enabled" and enrolled["etag"]
    listed = json.loads(stub_admin(emulator, "group", "get", "sdk-inter2", "--json").stdout)
    assert listed["enrollmentGroupId"] == "sdk-inter2"


def test_the_service_sdk_on_the_service_port(emulator, file_cas, tmp_path):
    (tmp_path / "inter1.pem").write_bytes(file_cas.inter1.cert_pem)
    key = emulator.ready["service_connection_string"].split("SharedAccessKey=", 1)[1]
    port = emulator.ready["service_url"].rsplit(":", 1)[1]
    connection_string = (f"HostName=localhost:{port};SharedAccessKeyName=provisioningserviceowner;"
                         f"SharedAccessKey={key}")
    outcome = run_sdk(SERVICE_CLIENT, connection_string, "sdk-inter1", tmp_path / "inter1.pem",
                      ca_cert=emulator.ready["ca_cert"])
    assert outcome["read"] == "sdk-inter1"


@pytest.mark.parametrize("transport", ["mqtt", "ws"])
def test_the_device_sdk_provisions(fixed, enrolled, file_cas, tmp_path, transport):
    emulator = fixed[transport]
    if transport == "mqtt":
        (tmp_path / "root.pem").write_bytes(file_cas.root.cert_pem)
        (tmp_path / "inter2.pem").write_bytes(file_cas.inter2.cert_pem)
        stub_admin(emulator, "ca", "upload", "sdk-root", tmp_path / "root.pem", "--verified")
        stub_admin(emulator, "group", "create", "sdk-inter2", "--cert", tmp_path / "inter2.pem")
    registration_id = f"sdk-{transport}-device"
    chain, key = file_cas.device(registration_id).write(tmp_path, registration_id)
    outcome = run_sdk(DEVICE_CLIENT, json.dumps(emulator.ready), chain, key, registration_id, transport)
    assert outcome["status"] == "assigned" and outcome["device_id"] == registration_id
    record = json.loads(stub_admin(emulator, "registration", "get", registration_id, "--json").stdout)
    assert record["status"] == "assigned"

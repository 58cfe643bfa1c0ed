"""The official azure-iot-device SDK registers over MQTT with the key in the token, given
only X509(cert_file=DIR/cert.pem, key_file=DIR/key.pem) and the export's env. The SDK dials
port 8883 only, so this emulator listens there."""

from __future__ import annotations

import json
import subprocess

import pytest
from device_sim.testing import Emulator

from .conftest import admit_pki, clean_env, sdk_python, sourced

SDK_CLIENT = r"""
import json, sys
from azure.iot.device import ProvisioningDeviceClient, X509
ready, out, rid = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
client = ProvisioningDeviceClient.create_from_x509_certificate(
    provisioning_host="localhost", registration_id=rid, id_scope=ready["id_scope"],
    x509=X509(cert_file=f"{out}/cert.pem", key_file=f"{out}/key.pem"),
    server_verification_cert=open(ready["ca_cert"]).read())
result = client.register()
print(json.dumps({"status": result.status, "hub": result.registration_state.assigned_hub,
                  "device_id": result.registration_state.device_id}))
"""


@pytest.fixture(scope="module")
def emulator_on_8883(tmp_path_factory, token_pki):
    running = Emulator.spawn(tmp_path_factory.mktemp("openssl-sdk-emulator"), "--mqtt-port", "8883")
    assert running.ready["mqtt_url"].endswith(":8883")
    admit_pki(running, token_pki)
    yield running
    running.stop()


@pytest.mark.parametrize("device", ["device-ec-p256", "device-rsa-2048"])
def test_official_sdk_registers_over_mqtt_with_the_token_key(exported, token_pki, emulator_on_8883, device):
    out = exported(device)
    answer = subprocess.run([sdk_python(), "-c", SDK_CLIENT, json.dumps(emulator_on_8883.ready), out, device],
                            capture_output=True, text=True, timeout=120,
                            env=sourced(out / "env", clean_env(token_pki)))
    assert answer.returncode == 0, answer.stderr[-3000:]
    outcome = json.loads(answer.stdout.splitlines()[-1])
    assert outcome["status"] == "assigned" and outcome["device_id"] == device
    assert emulator_on_8883.admin.get_registration(device)["status"] == "assigned"

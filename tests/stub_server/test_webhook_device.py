"""Custom allocation as users run it: `device-sim stub serve --webhook-trust`, an enrollment
group made with `stub group create --allocation custom`, and `device-sim register` with
SoftHSM token keys over HTTPS and MQTT, the webhook a real HTTPS server on loopback."""

from __future__ import annotations

import json

import pytest

from device_sim.stub.net.server_pki import ensure_server_identity
from device_sim.testing import Emulator

from .emulator_proc import cli, stub_admin
from .webhook_server import HUB_A, HUB_B, Webhook


@pytest.fixture(scope="module")
def hook(tmp_path_factory):
    tls = ensure_server_identity(tmp_path_factory.mktemp("device-webhook-tls"))
    webhook = Webhook((tls.cert, tls.key))
    webhook.ca_cert = tls.ca_cert
    yield webhook
    webhook.close()


@pytest.fixture(scope="module")
def emulator(tmp_path_factory, token_pki, hook):
    running = Emulator.spawn(tmp_path_factory.mktemp("device-webhook-home"), "--retry-after", "0",
                             "--hub", HUB_A, "--hub", HUB_B, "--webhook-trust", str(hook.ca_cert),
                             "--webhook-timeout", "5")
    stub_admin(running, "ca", "upload", "root", token_pki.root.pem_path, "--verified")
    stub_admin(running, "group", "create", "everyone", "--ca-ref", "root", "--allocation", "custom",
               "--webhook-url", hook.url("/choose"))
    yield running
    running.stop()


@pytest.mark.parametrize("transport", ["https", "mqtt"])
def test_device_sim_register_gets_the_webhooks_hub_and_payload(emulator, token_pki, hook, transport):
    endpoint = emulator.ready["device_url"] if transport == "https" else emulator.ready["mqtt_url"]
    result = cli("register", "--home", token_pki.home, "device-ec-p384", "--transport", transport,
                 "--endpoint", endpoint, "--id-scope", emulator.ready["id_scope"],
                 "--trust", emulator.ready["ca_cert"], "--payload", '{"model": "toaster"}', "--json",
                 env=token_pki.env(), check=False)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["status"] == "assigned" and out["assigned_hub"] == HUB_B  # the ID does not end in -a
    assert out["payload"]["for"] == "device-ec-p384"
    request = hook.received("device-ec-p384")[-1][1]
    assert request["deviceRuntimeContext"]["payload"] == {"model": "toaster"}
    assert request["enrollmentGroup"]["enrollmentGroupId"] == "everyone"

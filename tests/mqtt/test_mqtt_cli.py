"""As users run it: `device-sim stub serve` (ready line with mqtt_url) and
`device-sim register --transport mqtt`, both as subprocesses, with the token PKI's keys."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from device_sim.testing import Emulator


def cli(*argv, env=None, check=True, timeout=60):
    result = subprocess.run([sys.executable, "-m", "device_sim.cli", *map(str, argv)], env=env,
                            capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{argv}: exit {result.returncode}: {result.stderr}")
    return result


@pytest.fixture(scope="module")
def emulator(tmp_path_factory, token_pki):
    home = tmp_path_factory.mktemp("mqtt-cli-stub")
    with Emulator.spawn(home, "--retry-after", "0") as running:
        cli("stub", "ca", "upload", "--home", home, "--verified", "root", token_pki.root.pem_path)
        cli("stub", "group", "create", "--home", home, "--ca-ref", "root", "all-devices")
        yield running.ready


def register(token_pki, ready, *extra):
    return cli("register", "--home", token_pki.home, "device-ec-p256", "--transport", "mqtt",
               "--endpoint", ready["mqtt_url"], "--id-scope", ready["id_scope"], "--trust", ready["ca_cert"],
               "--json", *extra, env=token_pki.env(), check=False)


def test_ready_line_names_the_mqtt_url(emulator):
    assert emulator["mqtt_url"].startswith("mqtts://")
    assert int(emulator["mqtt_url"].rsplit(":", 1)[1]) > 0


def test_register_over_mqtt_assigns_with_the_same_output_as_https(emulator, token_pki):
    result = register(token_pki, emulator)
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["status"] == "assigned"
    assert document["transport"] == "mqtt"
    assert document["device_id"] == "device-ec-p256"
    assert document["exit_code"] == 0
    assert set(document["timings_ms"]) == {"connect_tls", "register", "total"}


def test_register_over_mqtt_with_the_leaf_alone_is_unauthorized_exit_4(emulator, token_pki):
    result = register(token_pki, emulator, "--chain-to", "leaf")
    assert result.returncode == 4, result.stderr
    document = json.loads(result.stdout)
    assert (document["status"], document["http_status"]) == ("unauthorized", 401)
    assert document["error"]["code"] == 401002


def test_mqtt_endpoint_must_be_mqtts(token_pki, tmp_path):
    result = cli("register", "--home", token_pki.home, "device-ec-p256", "--transport", "mqtt",
                 "--endpoint", "https://localhost:8883", "--id-scope", "0ne00000000", env=token_pki.env(), check=False)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "mqtts://" in result.stderr


def test_busy_mqtt_port_is_a_one_line_error(tmp_path):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        result = cli("stub", "serve", "--home", tmp_path, "--port", "0", "--service-port", "0",
                     "--mqtt-port", port, "--no-amqp", check=False)
    assert result.returncode != 0
    assert result.stderr.count("\n") == 1, result.stderr
    assert f"MQTT port {port}" in result.stderr and "--mqtt-port 0" in result.stderr


def test_emulator_without_mqtt_is_named_when_mqtt_is_asked_for(tmp_path):
    from device_sim.cli.main import build_parser
    from device_sim.cli.register import resolve_target
    from device_sim.common.errors import UserError
    from device_sim.device.target import emulator_url, endpoint_file

    assert emulator_url({"mqtt_url": "mqtts://localhost:8883"}, "mqtt") == "mqtts://localhost:8883"
    endpoint_file(tmp_path).parent.mkdir()
    endpoint_file(tmp_path).write_text(json.dumps({"device_url": "https://localhost:1", "id_scope": "0ne1",
                                                   "ca_cert": "ca.pem"}))
    args = build_parser().parse_args(["register", "dev", "--emulator", "--transport", "mqtt"])
    with pytest.raises(UserError, match="--no-mqtt"):
        resolve_target(args, tmp_path)


def test_fleet_run_over_mqtt(emulator, token_pki, tmp_path):
    report = tmp_path / "fleet.json"
    result = cli("fleet", "run", "--home", token_pki.home, "--prefix", "device-", "--transport", "mqtt",
                 "--endpoint", emulator["mqtt_url"], "--id-scope", emulator["id_scope"], "--trust",
                 emulator["ca_cert"], "--concurrency", "4", "--no-progress", "--json", report,
                 env=token_pki.env(), check=False)
    assert result.returncode == 0, result.stderr
    document = json.loads(report.read_text())
    assert document["settings"]["transport"] == "mqtt"
    outcomes = {device["registration_id"]: device["status"] for device in document["devices"]}
    assert outcomes and set(outcomes.values()) == {"assigned"}, outcomes

"""device_sim.testing itself: the certificates TestCA promises, the in-process transport
against the emulator core, an emulator that cannot start, and a state directory driven
through the CLIs with a fleet in it."""

from __future__ import annotations

import datetime as dt
import json
import socket

import pytest
from cryptography import x509

from device_sim.common import x509util
from device_sim.device.driver import run_registration
from device_sim.device.registration import ASSIGNED, UNAUTHORIZED, RegistrationFlow
from device_sim.testing import (TEST_SO_PIN, DeviceApiTransport, Emulator, EmulatorFailed, StateDir, TestCA,
                                fleet_emulator, fleet_world)


def test_chain_is_leaf_first_and_each_link_verifies():
    root = TestCA("root")
    line = root.issue_intermediate("line", path_length=0)
    leaf = line.issue_leaf("dev-1")
    assert [x509util.common_name(c) for c in leaf.chain] == ["dev-1", "line", "root"]
    assert x509util.issued_by(leaf.cert, line.cert) and x509util.issued_by(line.cert, root.cert)
    assert x509util.is_self_signed(root.cert) and not x509util.is_ca(leaf.cert)
    assert leaf.chain_pem.count(b"BEGIN CERTIFICATE") == 3 and leaf.key_pem.startswith(b"-----BEGIN PRIVATE KEY")
    assert line.cert.extensions.get_extension_for_class(x509.BasicConstraints).value.path_length == 0


def test_broken_certificates_are_what_they_say():
    root = TestCA("root")
    assert not x509util.is_ca(root.issue_intermediate("not-a-ca", ca=False).cert)
    usage = root.issue_intermediate("no-sign", key_cert_sign=False).cert.extensions.get_extension_for_class(
        x509.KeyUsage).value
    assert not usage.key_cert_sign
    past = dt.datetime(2020, 1, 1, tzinfo=dt.timezone.utc)
    expired = root.issue_leaf("old", not_before=past, not_after=past + dt.timedelta(days=1))
    assert not x509util.in_validity(expired.cert, dt.datetime.now(dt.timezone.utc))
    loner = TestCA.self_signed_leaf("loner")
    assert loner.chain == [loner.cert] and x509util.is_self_signed(loner.cert)
    assert TestCA.from_pem(root.cert_pem, root.key_pem).issue_leaf("again").chain[1] == root.cert


def test_in_process_transport_drives_the_flow_against_the_core(tmp_path):
    root = TestCA("root")
    leaf = root.issue_intermediate("line").issue_leaf("dev-1")
    with Emulator.in_process(tmp_path / "emu", mqtt=False) as emu:
        emu.admin.upload_ca("root", root.cert_pem)
        emu.admin.verify_ca("root", root)
        emu.admin.create_group("all", ca_ref="root")
        transport = DeviceApiTransport(emu.app.device_api, emu.id_scope, "dev-1", leaf.chain)
        outcome, _ = run_registration(RegistrationFlow("dev-1"), transport, 5)
        assert (outcome.status, outcome.device_id) == (ASSIGNED, "dev-1")
        assert [operation for operation, _ in transport.requests] == ["register", "poll"]
        short = DeviceApiTransport(emu.app.device_api, emu.id_scope, "dev-1", leaf.chain_to(0))
        outcome, _ = run_registration(RegistrationFlow("dev-1"), short, 5)
        assert outcome.status == UNAUTHORIZED and outcome.http_status == 401


def test_an_emulator_that_cannot_start_says_why(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        with pytest.raises(EmulatorFailed, match="before it was ready"):
            Emulator.spawn(tmp_path / "emu", "--port", str(busy.getsockname()[1]), "--no-mqtt")


REFUSE_REGISTER = {"seed": 1, "rules": [{"match": {"operation": "register"}, "action": {"status": 503,
                                                                                        "retry_after": 1}}]}


@pytest.mark.parametrize("given", ["object", "path"])
def test_in_process_emulator_with_dashboard_amqp_and_a_fault_plan(tmp_path, given):
    import requests

    root = TestCA("root")
    chain, key = root.issue_leaf("dev-1").write(tmp_path, "dev-1")
    plan = REFUSE_REGISTER
    if given == "path":
        plan = tmp_path / "faults.json"
        plan.write_text(json.dumps(REFUSE_REGISTER))
    with Emulator.in_process(tmp_path / "emu", mqtt=False, amqp=True, dashboard=True, faults=plan) as emu:
        assert emu.ready["faults"] == {"seed": 1, "rules": 1}
        assert emu.amqp_port > 0 and emu.mqtt_url is None
        page = requests.get(emu.dashboard_url, timeout=10)
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        emu.admin.upload_ca("root", root.cert_pem, verified=True)
        emu.admin.create_group("all", ca_ref="root")
        answer = requests.put(f"{emu.device_url}/{emu.id_scope}/registrations/dev-1/register?api-version=2021-06-01",
                              json={"registrationId": "dev-1"}, cert=(str(chain), str(key)), verify=str(emu.ca_cert),
                              timeout=10)
        assert answer.status_code == 503 and answer.headers["retry-after"] == "1"
    assert emu.server is None  # stopped: every listener closed


def test_in_process_emulator_refuses_a_bad_fault_plan_before_starting(tmp_path):
    from device_sim.stub.core.faults import FaultPlanError

    with pytest.raises(FaultPlanError):
        Emulator.in_process(tmp_path / "emu", faults={"seed": 1, "rules": [{"action": {"status": "soon"}}]})


def test_state_dir_runs_the_cli_in_its_environment_and_says_what_failed(tmp_path, monkeypatch):
    monkeypatch.setenv("SOFTHSM2_CONF", str(tmp_path / "another-softhsm.conf"))  # another directory's SoftHSM
    state = StateDir(tmp_path / "home", pin=None, extra_env={"DEVICE_SIM_TEST_EXTRA": "yes"})
    names = ("DEVICE_SIM_HOME", "PKCS11_PIN", "PKCS11_SO_PIN", "SOFTHSM2_CONF", "DEVICE_SIM_TEST_EXTRA")
    seen = state.python("-c", "import json, os, sys; print(json.dumps({n: os.environ[n] for n in sys.argv[1:] "
                              "if n in os.environ}))", *names)
    env = json.loads(seen.stdout)
    assert env["DEVICE_SIM_HOME"] == str(tmp_path / "home") and env["PKCS11_SO_PIN"] == TEST_SO_PIN
    assert "PKCS11_PIN" not in env and "SOFTHSM2_CONF" not in env and env["DEVICE_SIM_TEST_EXTRA"] == "yes"
    with pytest.raises(AssertionError) as failed:
        state.hsm_setup("device", "show", "dev-1")  # no state directory yet
    message = str(failed.value)
    assert "device_sim.cli.hsm_setup device show dev-1: exit 2" in message
    assert "stdout:" in message and "no state directory at" in message
    assert state.hsm_setup("device", "show", "dev-1", check=False).returncode == 2


def test_python_peak_rss_is_the_command_s_own_not_its_parent_s(tmp_path):
    state = StateDir(tmp_path / "home")
    ballast = b"x" * (200 << 20)  # this process 200 MiB larger (written, so resident): no child pays it
    _, small = state.python_peak_rss("-c", "pass")
    _, large = state.python_peak_rss("-c", "import time; b = b'x' * (80 << 20); time.sleep(0.3)")
    assert len(ballast) and small < 60 and large - small >= 70, (small, large)


def test_fleet_world_and_its_emulator_register_the_fleet(tmp_path):
    state = StateDir(tmp_path / "home")
    made = fleet_world(state, 3, "tw-", cas=("root", "line"), per_token=2)
    assert made["count"] == 3 and made["tokens"] == ["fleet-001", "fleet-002"]
    shown = json.loads(state.hsm_setup("device", "show", "tw-0003", "--json").stdout)
    assert (shown["ca"], shown["token"]) == ("line", "fleet-002")  # the last CA of the chain issued it
    emulator = fleet_emulator(state, "--retry-after", "0", "--assignment-delay", "0", "--no-mqtt", "--no-amqp")
    try:
        done = state.device_sim("fleet", "run", "--emulator", "--no-progress", "--prefix", "tw-")
        assert "assigned 3" in done.stdout, done.stdout
        assert emulator.admin.get_registration("tw-0002")["status"] == "assigned"
    finally:
        emulator.stop()
    assert state.fleet_create(3, "tw-", "line", per_token=2)["kept"] == 3

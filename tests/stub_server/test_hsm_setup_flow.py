"""The `make demo` flow against the emulator with identities made by hsm_setup: the CA key
stays in the token, so the proof of possession is signed inside it, and a device whose key
is in the token registers over mTLS through this server."""

from __future__ import annotations

import json

import pytest

from device_sim.testing import Emulator

from .emulator_proc import cli, stub_admin


@pytest.fixture(scope="module")
def token_emulator(tmp_path_factory):
    running = Emulator.spawn(tmp_path_factory.mktemp("emulator-tokens"), "--retry-after", "0")
    yield running
    running.stop()


def test_token_ca_proof_of_possession_then_a_token_device_registers(token_emulator, token_pki, tmp_path):
    emulator = token_emulator
    stub_admin(emulator, "ca", "upload", "token-root", token_pki.root.pem_path)
    assert not json.loads(stub_admin(emulator, "ca", "get", "token-root", "--json").stdout)["properties"]["isVerified"]
    code = stub_admin(emulator, "ca", "code", "token-root").stdout.strip()

    verification = tmp_path / "verification.pem"
    made = cli("ca", "verification-cert", "root", "--code", code, "--out", verification,
               env=token_pki.env(), program="device_sim.cli.hsm_setup")
    assert made.returncode == 0 and verification.exists()

    # A certificate with the right CN but from another key must not pass.
    wrong = tmp_path / "wrong.pem"
    cli("ca", "verification-cert", "intermediate", "--code", code, "--out", wrong,
        env=token_pki.env(), program="device_sim.cli.hsm_setup")
    refused = stub_admin(emulator, "ca", "verify", "token-root", wrong, check=False)
    assert refused.returncode == 3 and "Traceback" not in refused.stderr

    stub_admin(emulator, "ca", "verify", "token-root", verification)
    assert json.loads(stub_admin(emulator, "ca", "get", "token-root", "--json").stdout)["properties"]["isVerified"]
    stub_admin(emulator, "group", "create", "token-devices", "--ca-ref", "token-root")

    ready = emulator.ready
    result = cli("register", "device-ec-p256", "--json", "--endpoint", ready["device_url"],
                 "--id-scope", ready["id_scope"], "--trust", ready["ca_cert"], "--timeout", "20",
                 env=token_pki.env(), check=False)
    assert result.returncode == 0, result.stderr
    outcome = json.loads(result.stdout)
    assert outcome["status"] == "assigned" and outcome["device_id"] == "device-ec-p256"
    record = json.loads(stub_admin(emulator, "registration", "get", "device-ec-p256", "--json").stdout)
    assert record["status"] == "assigned"

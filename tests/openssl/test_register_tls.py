"""`device-sim register --tls openssl` beside the awscrt default: same outcomes, same exit codes;
the transport speaks TLS 1.2 and 1.3 and serialises handshakes. Everything that loads
pkcs11-provider runs in a subprocess, so the provider never enters the pytest process."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest
from stub_server.emulator_proc import cli

from .conftest import HANDSHAKES, hsm_setup


def register(token_pki, emulator, device, tls, *extra):
    ready = emulator.ready
    return cli("register", device, "--json", "--endpoint", ready["device_url"], "--id-scope", ready["id_scope"],
               "--trust", ready["ca_cert"], "--timeout", "20", "--tls", tls, *extra, env=token_pki.env(), check=False)


@pytest.mark.parametrize("tls", ["awscrt", "openssl"])
def test_assigned_with_either_stack(token_pki, emulator, tls):
    result = register(token_pki, emulator, "device-ec-p256", tls)
    assert result.returncode == 0, result.stderr
    outcome = json.loads(result.stdout)
    assert outcome["status"] == "assigned" and outcome["device_id"] == "device-ec-p256"


def test_same_outcomes_and_exit_codes(token_pki, emulator):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    cases = {
        "assigned": ("device-rsa-2048",),
        "unauthorized": ("device-ec-p384", "--registration-id", "someone-else"),
        "unreachable": ("device-ec-p384", "--endpoint", f"127.0.0.1:{closed_port}"),
    }
    for name, args in cases.items():
        seen = {}
        for tls in ("awscrt", "openssl"):
            result = register(token_pki, emulator, args[0], tls, *args[1:])
            outcome = json.loads(result.stdout)
            seen[tls] = (result.returncode, outcome["status"], outcome.get("http_status"))
        assert seen["awscrt"] == seen["openssl"], (name, seen)
    assert seen["openssl"][0] == 6


def test_untrusted_server_is_a_tls_failure(token_pki, emulator, tmp_path):
    other_ca = token_pki.root.pem_path  # not the emulator's CA
    result = register(token_pki, emulator, "device-ec-p256", "openssl", "--trust", other_ca)
    assert result.returncode == 7, result.stderr
    assert json.loads(result.stdout)["status"] == "tls_failed" or "TLS" in result.stdout


def test_mqtt_with_openssl_is_a_usage_error(token_pki, emulator):
    result = register(token_pki, emulator, "device-ec-p256", "openssl", "--transport", "mqtt",
                      "--endpoint", emulator.ready["mqtt_url"])
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "--tls openssl" in result.stderr




@pytest.fixture(scope="module")
def solo(tmp_path_factory, token_pki, emulator):
    """A state directory whose only token holds both the CA and the device key, so that
    the lock is all that is measured (several tokens: test_several_tokens.py)."""
    home = tmp_path_factory.mktemp("openssl-solo")
    env = {**token_pki.env(), "DEVICE_SIM_HOME": str(home), "SOFTHSM2_CONF": str(home / "softhsm2.conf")}
    hsm_setup("token", "init", "solo", env=env)
    hsm_setup("ca", "create", "solo-root", "--token", "solo", env=env)
    hsm_setup("device", "create", "solo-1", "--ca", "solo-root", "--token", "solo", env=env)
    emulator.admin.upload_ca("solo-root", (home / "pki" / "ca" / "solo-root" / "cert.pem").read_bytes(), verified=True)
    emulator.admin.create_group("solo-devices", ca_ref="solo-root")
    return home, env


def run_handshakes(solo, emulator, threads, each, *, max_tls12=False):
    home, env = solo
    script = HANDSHAKES
    if max_tls12:
        script = script.replace("Path(ready[\"ca_cert\"]).read_bytes())",
                                "Path(ready[\"ca_cert\"]).read_bytes())\n"
                                "import ssl; context.maximum_version = ssl.TLSVersion.TLSv1_2")
    result = subprocess.run([sys.executable, "-c", script, json.dumps(emulator.ready), home,
                             str(threads), str(each), "solo-1"], capture_output=True, text=True, timeout=120,
                            env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout)


def test_tls13_by_default_and_tls12_when_capped(solo, emulator):
    assert run_handshakes(solo, emulator, 1, 2) == {"versions": ["TLSv1.3"], "failures": []}
    assert run_handshakes(solo, emulator, 1, 2, max_tls12=True) == {"versions": ["TLSv1.2"], "failures": []}


def test_concurrent_handshakes_in_one_process_all_succeed(solo, emulator):
    # Without SIGNING_LOCK, 8 threads x 25 handshakes gave 1-101 bad signatures per run
    # (and once a crash) with pkcs11-provider 1.0 on SoftHSM 2.6.1: docs/openssl.md.
    assert run_handshakes(solo, emulator, 6, 15)["failures"] == []

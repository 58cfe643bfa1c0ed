"""Fixtures for the token key through standard OpenSSL (docs/openssl.md): an export directory
per device of the session PKI (`token_pki`), and an emulator whose root CA is verified and
whose group admits every device of that PKI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hsm_setup.openssl_export import find_provider_module
from device_sim.testing import Emulator
from stub_server.emulator_proc import REPO


def hsm_setup(*args, env, check=True) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "device_sim.cli.hsm_setup", *map(str, args)],
                            capture_output=True, text=True, cwd=REPO, timeout=60, env=env)
    if check and result.returncode != 0:
        raise AssertionError(f"hsm-setup {' '.join(map(str, args))} failed: {result.stderr}")
    return result


def sourced(env_file: Path, base: dict) -> dict:
    """`base` after sourcing `env_file` in a shell, as a user would."""
    out = subprocess.run(["bash", "-c", f'. "{env_file}" && env -0'], capture_output=True, env=base,
                         check=True, timeout=10).stdout
    return dict(item.split("=", 1) for item in out.decode().split("\0") if "=" in item)


def clean_env(token_pki) -> dict:
    """The PKI's environment without the PIN: the export must bring the PIN source itself."""
    env = token_pki.env()
    env.pop("PKCS11_PIN", None)
    env.pop("OPENSSL_CONF", None)
    return env


@pytest.fixture(scope="session")
def provider_installed():
    try:
        return find_provider_module()
    except Exception as exc:
        pytest.fail(f"{exc} (make venv installs it)")


@pytest.fixture(scope="session")
def pin_file(tmp_path_factory, token_pki) -> Path:
    path = tmp_path_factory.mktemp("openssl-pin") / "pin"
    path.write_text(token_pki.pin + "\n")
    path.chmod(0o600)
    return path


@pytest.fixture(scope="session")
def exported(tmp_path_factory, token_pki, pin_file, provider_installed):
    """registration ID -> export directory (PIN by file)."""
    made = {}

    def export(registration_id: str) -> Path:
        if registration_id not in made:
            out = tmp_path_factory.mktemp(f"openssl-{registration_id}")
            hsm_setup("export", "openssl", registration_id, "--out", out, "--pin-file", pin_file,
                      env=clean_env(token_pki))
            made[registration_id] = out
        return made[registration_id]
    return export


def admit_pki(emulator: Emulator, token_pki) -> None:
    emulator.admin.upload_ca("token-root", token_pki.root.cert_pem, verified=True)
    emulator.admin.create_group("token-devices", ca_ref="token-root")


@pytest.fixture(scope="module")
def emulator(tmp_path_factory, token_pki):
    running = Emulator.spawn(tmp_path_factory.mktemp("openssl-emulator"))
    admit_pki(running, token_pki)
    yield running
    running.stop()


def sdk_python() -> str:
    """The interpreter of the separate venv holding azure-iot-device (it pins paho-mqtt < 2,
    which the test extras cannot share): made by `make venv`."""
    path = os.environ.get("DEVICE_SIM_SDK_PYTHON") or str(REPO / ".venv" / "sdk" / "bin" / "python")
    if not Path(path).is_file():
        pytest.fail(f"no azure-iot-device venv at {path}: run 'make venv' (or set DEVICE_SIM_SDK_PYTHON)")
    return path


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def ready_json(emulator: Emulator) -> str:
    return json.dumps(emulator.ready)


# One process, `threads` threads x `each` registrations through transport_openssl (as
# `device-sim register --tls openssl` makes them): argv ready-JSON HOME THREADS EACH RID;
# prints {"versions": [...], "failures": [...]}.
HANDSHAKES = r"""
import json, os, sys, threading
from pathlib import Path
from device_sim.device import chain_builder, transport_openssl as t
from device_sim.device.identity import load_identity
ready, home, threads, each = json.loads(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
identity = load_identity(sys.argv[5], home=home)
context = t.client_context(identity.module_path, identity.uri,
                           chain_builder.to_pem([identity.leaf, *identity.ca_certs]), identity.pin,
                           Path(ready["ca_cert"]).read_bytes())
port = int(ready["device_url"].rsplit(":", 1)[1])
versions, failures, lock = set(), [], threading.Lock()

def work(maximum):
    for _ in range(each):
        transport = t.OpensslHttpsTransport("localhost", port, ready["id_scope"], sys.argv[5], context)
        try:
            answer = transport.send_register(json.dumps({"registrationId": sys.argv[5]}).encode(), 20)
            with lock:
                versions.add(transport.connection.sock.version() if transport.connection else "closed")
                if answer.status != 202:
                    failures.append(answer.status)
        except Exception as exc:
            with lock:
                failures.append(str(exc))
        finally:
            transport.close()

workers = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
[w.start() for w in workers]
[w.join() for w in workers]
print(json.dumps({"versions": sorted(versions), "failures": failures}))
"""

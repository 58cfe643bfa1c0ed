"""The token key through pkcs11-provider when the device token is not the module's first
slot: every handshake of a process succeeds, and no other token is logged into.

pkcs11-provider 1.0 loaded lazily checks the server's signature inside the first slot's
token from the second handshake of a process on, logging in there (docs/token-quirks.md).
Here the tokens in front of the device token have another PIN, so such a login fails
the handshake instead of passing unseen; `pkcs11-module-load-behavior = early` (what
`hsm-setup export openssl` and `transport_openssl` write) keeps OpenSSL's own code on it.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from hsm_setup import tokens
from stub_server.emulator_proc import cli

from .conftest import HANDSHAKES, clean_env, hsm_setup, sourced

OTHER_PIN = "99999999"


@pytest.fixture
def crowded(device_sim_pki, device_sim_emulator_session, provider_installed):
    """A state directory whose device token (with its CA) comes after a token of another PIN.

    SoftHSM lists tokens in an order of its own (stable across C_Initialize): of two new
    tokens, the one listed first gets another user PIN, the other holds CA and device."""
    pki = device_sim_pki
    for label in ("token-a", "token-b"):
        pki.init_token(label)
    first, second = [t.label for t in tokens.list_tokens(pki.lib(fresh=True))]
    with tokens.find_token(pki.lib(), first).open(rw=True, so_pin=pki.so_pin) as so_session:
        so_session.init_pin(OTHER_PIN)
    pki.device_token = second
    root = pki.ca("crowded-root", token=second)
    pki.device("crowded-1", ca="crowded-root")
    assert [t.label for t in tokens.list_tokens(pki.lib(fresh=True))] == [first, second]
    admin = device_sim_emulator_session.admin
    admin.upload_ca("crowded-root", root.cert_pem, verified=True)
    admin.create_group("crowded", ca_ref="crowded-root")
    return pki


# Three handshakes with one SSLContext, each sending the registration request.
PLAIN_SSL = r"""
import json, socket, ssl, sys
ready, out, rid = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
context = ssl.create_default_context(cafile=ready["ca_cert"])
context.load_cert_chain(f"{out}/cert.pem", f"{out}/key.pem")
host, port = "localhost", int(ready["device_url"].rsplit(":", 1)[1])
body = json.dumps({"registrationId": rid})
request = (f"PUT /{ready['id_scope']}/registrations/{rid}/register?api-version=2021-06-01 HTTP/1.1\r\n"
           f"Host: localhost\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
           f"Connection: close\r\n\r\n{body}").encode()
seen = []
for _ in range(3):
    try:
        with socket.create_connection((host, port), 20) as raw, context.wrap_socket(raw, server_hostname=host) as tls:
            tls.sendall(request)
            seen.append(tls.recv(64).split(b" ")[1].decode())
    except ssl.SSLError as exc:
        seen.append(exc.reason or str(exc))
print(json.dumps(seen))
"""


def test_exported_config_keeps_every_handshake_of_a_process_on_the_device_token(crowded, device_sim_emulator_session,
                                                                                tmp_path):
    pin_file = tmp_path / "pin"
    pin_file.write_text(crowded.pin + "\n")
    out = tmp_path / "export"
    hsm_setup("export", "openssl", "crowded-1", "--out", out, "--pin-file", pin_file, env=clean_env(crowded))
    answer = subprocess.run([sys.executable, "-c", PLAIN_SSL, json.dumps(device_sim_emulator_session.ready), out,
                             "crowded-1"], capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
                            env=sourced(out / "env", clean_env(crowded)))
    assert answer.returncode == 0, answer.stderr[-2000:]
    assert json.loads(answer.stdout) == ["202", "202", "202"]


def test_register_tls_openssl_keeps_every_handshake_of_a_process_on_the_device_token(crowded,
                                                                                    device_sim_emulator_session):
    result = subprocess.run([sys.executable, "-c", HANDSHAKES, json.dumps(device_sim_emulator_session.ready),
                             crowded.home, "1", "3", "crowded-1"], capture_output=True, text=True, timeout=120,
                            stdin=subprocess.DEVNULL, env=crowded.env())
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout) == {"versions": ["TLSv1.3"], "failures": []}
    ready = device_sim_emulator_session.ready
    registered = cli("register", "crowded-1", "--tls", "openssl", "--json", "--endpoint", ready["device_url"],
                     "--id-scope", ready["id_scope"], "--trust", ready["ca_cert"], "--timeout", "20",
                     env=crowded.env(), check=False)
    assert registered.returncode == 0, registered.stderr
    assert json.loads(registered.stdout)["status"] == "assigned"

"""Unchanged OpenSSL tools and Python's ssl/requests register through the emulator with the
key in the token, after sourcing the export's env (docs/openssl.md)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from .conftest import clean_env, port_of, sourced

BODY = '{"registrationId":"%s"}'


def register_request(scope: str, registration_id: str) -> bytes:
    body = BODY % registration_id
    return (f"PUT /{scope}/registrations/{registration_id}/register?api-version=2021-06-01 HTTP/1.1\r\n"
            f"Host: localhost\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            f"Connection: close\r\n\r\n{body}").encode()


@pytest.mark.parametrize("version", ["-tls1_2", "-tls1_3"])
@pytest.mark.parametrize("device", ["device-ec-p256", "device-rsa-2048"])
def test_openssl_s_client_registers(exported, token_pki, emulator, version, device):
    out = exported(device)
    ready = emulator.ready
    answer = subprocess.run(
        ["openssl", "s_client", version, "-ign_eof", "-connect", f"localhost:{port_of(ready['device_url'])}",
         "-cert", out / "cert.pem", "-cert_chain", out / "cert.pem", "-key", out / "key.pem",
         "-CAfile", ready["ca_cert"], "-verify_return_error"],
        input=register_request(ready["id_scope"], device), capture_output=True, timeout=60,
        env=sourced(out / "env", clean_env(token_pki)))
    text = answer.stdout.decode(errors="replace")
    assert "HTTP/1.1 202" in text, answer.stderr.decode(errors="replace")[-2000:]
    assert f"Protocol  : TLSv1.{version[-1]}" in text


def test_curl_registers(exported, token_pki, emulator):
    out = exported("device-ec-p384")
    ready = emulator.ready
    answer = subprocess.run(
        ["curl", "-sS", "--cert", out / "cert.pem", "--key", out / "key.pem", "--cacert", ready["ca_cert"],
         "-X", "PUT", "-H", "Content-Type: application/json", "-d", BODY % "device-ec-p384",
         f"{ready['device_url']}/{ready['id_scope']}/registrations/device-ec-p384/register?api-version=2021-06-01"],
        capture_output=True, text=True, timeout=60, env=sourced(out / "env", clean_env(token_pki)))
    assert answer.returncode == 0, answer.stderr
    assert json.loads(answer.stdout)["status"] == "assigning"


PYTHON_CLIENT = r"""
import json, ssl, sys, requests
ready, out, rid = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
url = f"{ready['device_url']}/{ready['id_scope']}/registrations/{rid}/register?api-version=2021-06-01"
answer = requests.put(url, json={"registrationId": rid}, cert=(f"{out}/cert.pem", f"{out}/key.pem"),
                      verify=ready["ca_cert"], timeout=30)
print(answer.status_code, answer.json()["status"])
"""


def test_python_requests_registers(exported, token_pki, emulator):
    out = exported("device-ec-p256")
    answer = subprocess.run([sys.executable, "-c", PYTHON_CLIENT, json.dumps(emulator.ready), out, "device-ec-p256"],
                            capture_output=True, text=True, timeout=60, env=sourced(out / "env", clean_env(token_pki)))
    assert answer.stdout.split() == ["202", "assigning"], answer.stderr[-2000:]

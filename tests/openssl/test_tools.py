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


# paho-mqtt as a user would drive it: the key file is the export's key.pem, nothing else
# knows of the token. DPS over MQTT by its documented topics (not device_sim.mqtt), polled
# until the operation leaves "assigning".
PAHO_CLIENT = r"""
import json, queue, ssl, sys, time
import paho.mqtt.client as mqtt
ready, out, rid = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
answers, connack = queue.Queue(), queue.Queue()
client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=rid, protocol=mqtt.MQTTv311)
client.tls_set(ca_certs=ready["ca_cert"], certfile=f"{out}/cert.pem", keyfile=f"{out}/key.pem",
               tls_version=ssl.PROTOCOL_TLS_CLIENT)
client.username_pw_set(f"{ready['id_scope']}/registrations/{rid}/api-version=2019-03-31")
client.on_connect = lambda c, userdata, flags, reason, props: connack.put(str(reason))
client.on_message = lambda c, userdata, message: answers.put(message)
host, port = ready["mqtt_url"].split("://", 1)[1].rsplit(":", 1)
client.connect(host, int(port), keepalive=30)
client.loop_start()
assert connack.get(timeout=20) == "Success"
client.subscribe("$dps/registrations/res/#", qos=1)

def ask(topic, payload):
    client.publish(topic, payload, qos=1).wait_for_publish(timeout=20)
    message = answers.get(timeout=20)
    status, query = message.topic[len("$dps/registrations/res/"):].split("/?", 1)
    fields = dict(part.split("=", 1) for part in query.split("&"))
    return int(status), fields, json.loads(message.payload)

status, fields, document = ask("$dps/registrations/PUT/iotdps-register/?$rid=1",
                               json.dumps({"registrationId": rid}))
steps = [status]
for n in range(2, 30):
    if document.get("status") != "assigning":
        break
    time.sleep(int(fields.get("retry-after", "1")))
    status, fields, document = ask(f"$dps/registrations/GET/iotdps-get-operationstatus/?$rid={n}"
                                   f"&operationId={document['operationId']}", b"")
    steps.append(status)
client.disconnect()
client.loop_stop()
print(json.dumps({"steps": steps, "status": document.get("status"),
                  "device_id": document.get("registrationState", {}).get("deviceId")}))
"""


@pytest.mark.parametrize("device", ["device-ec-p256", "device-rsa-2048"])
def test_paho_mqtt_registers_with_the_exported_key_file(exported, token_pki, emulator, device):
    out = exported(device)
    answer = subprocess.run([sys.executable, "-c", PAHO_CLIENT, json.dumps(emulator.ready), out, device],
                            capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
                            env=sourced(out / "env", clean_env(token_pki)))
    assert answer.returncode == 0, answer.stderr[-2000:]
    outcome = json.loads(answer.stdout)
    assert outcome["status"] == "assigned" and outcome["device_id"] == device
    assert outcome["steps"][0] == 202 and outcome["steps"][-1] == 200


# Python's ssl reads the key file through OpenSSL's decoders, which find the provider's
# only if OpenSSL loaded $OPENSSL_CONF: it does so once, when `ssl` is first imported.
LOAD_KEY = r"""
import os, sys
out, when = sys.argv[1], sys.argv[2]
if when == "before":
    os.environ["OPENSSL_CONF"] = sys.argv[3]
import ssl
if when == "after":
    os.environ["OPENSSL_CONF"] = sys.argv[3]
try:
    ssl.create_default_context().load_cert_chain(f"{out}/cert.pem", f"{out}/key.pem")
    print("loaded")
except ssl.SSLError as exc:
    print(exc)
"""


def test_python_ssl_loads_the_key_only_when_openssl_conf_is_set_before_ssl_is_imported(exported, token_pki):
    out = exported("device-ec-p256")
    env = sourced(out / "env", clean_env(token_pki))
    conf = env.pop("OPENSSL_CONF")
    seen = {}
    for when in ("before", "after"):
        answer = subprocess.run([sys.executable, "-c", LOAD_KEY, out, when, conf], capture_output=True, text=True,
                                timeout=60, stdin=subprocess.DEVNULL, env=env)
        seen[when] = answer.stdout.strip()
    assert seen["before"] == "loaded", seen
    assert "PEM lib" in seen["after"], seen


def test_paho_mqtt_without_the_export_env_cannot_read_the_key_file(exported, token_pki, emulator):
    out = exported("device-ec-p256")
    answer = subprocess.run([sys.executable, "-c", PAHO_CLIENT, json.dumps(emulator.ready), out, "device-ec-p256"],
                            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
                            env=clean_env(token_pki))
    assert answer.returncode != 0 and "PEM lib" in answer.stderr, answer.stderr[-2000:]

"""Service SDK SAS tokens: `sr` is the connection string's HostName, with or without the
port, raw or URL-encoded, in any case (docs/emulator.md, "Service API")."""

import base64
import hashlib
import hmac
from urllib.parse import quote, quote_plus

import pytest

from device_sim.stub.core.config import StubConfig
from device_sim.stub.core.sas import make_token

from .env import KEY, Env

PORT = 40124


@pytest.fixture
def env(tmp_path):
    env = Env(tmp_path)
    env.config.service_ports = (PORT,)
    return env


def signed(sr_as_sent: str, signed_text: str, expiry: int) -> str:
    digest = hmac.new(KEY, f"{signed_text}\n{expiry}".encode(), hashlib.sha256).digest()
    sig = quote(base64.b64encode(digest).decode(), safe="")
    return f"SharedAccessSignature sr={sr_as_sent}&sig={sig}&se={expiry}&skn=provisioningserviceowner"


def status_with(env, token: str, path: str = "/certificates") -> int:
    return env.call("GET", path, headers={"Authorization": token}, token=False).status


@pytest.mark.parametrize("resource", ["localhost", f"localhost:{PORT}", f"LocalHost:{PORT}",
                                      f"https://localhost:{PORT}", f"localhost:{PORT}/certificates"])
def test_host_with_or_without_port_encoded(env, resource):
    # make_token URL-encodes sr (`localhost%3A40124`), as the Python service SDK does
    assert status_with(env, make_token(resource, KEY, now=env.clock())) == 200


@pytest.mark.parametrize("hostname", [f"localhost:{PORT}", f"LOCALHOST:{PORT}"])
def test_raw_sr_signed_as_sent(env, hostname):
    expiry = int(env.clock()) + 600
    assert status_with(env, signed(hostname, hostname, expiry)) == 200
    encoded = quote_plus(hostname)
    assert status_with(env, signed(encoded, encoded, expiry)) == 200


def test_other_ports_and_hosts_are_refused(env):
    now = env.clock()
    for resource in (f"localhost:{PORT + 1}", "localhost:", "localhost:abc", "localhost.evil",
                     f"otherhost:{PORT}", f"localhost:{PORT}/enrollments"):
        assert status_with(env, make_token(resource, KEY, now=now)) == 401, resource


def test_without_known_ports_only_the_bare_host_counts(tmp_path):
    env = Env(tmp_path)
    assert status_with(env, make_token(f"localhost:{PORT}", KEY, now=env.clock())) == 401
    assert status_with(env, make_token("localhost", KEY, now=env.clock())) == 200


def test_config_checks_ports():
    assert StubConfig(service_ports=[443]).service_resources() == ("localhost", "localhost:443")
    with pytest.raises(ValueError, match="service_ports"):
        StubConfig(service_ports=(0,))

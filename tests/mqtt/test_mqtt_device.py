"""`device-sim register` over MQTT end to end: token key (SoftHSM) -> awscrt MQTT -> emulator.

The same scenarios as over HTTPS, with the shared session PKI of tests/conftest.py
(`token_pki`: root -> intermediate -> devices, and root -> intermediate -> line ->
device-line-1, every key inside SoftHSM). Each test starts its own emulator (the
`stub serve` assembly, MQTT on a free port) and enrolls what the scenario needs.
"""

from __future__ import annotations

import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from device_sim.device import registration as reg
from device_sim.device.driver import run_registration
from device_sim.device.transport_https import CrtRuntime, TlsIdentity, client_tls_context
from device_sim.device.transport_mqtt import MqttTransport
from device_sim.stub.server import DEFAULT_HUB
from device_sim.testing import Emulator

RUNTIME = CrtRuntime()  # the awscrt event loop every device of this module runs on


def _cert(der: bytes) -> x509.Certificate:
    return x509.load_der_x509_certificate(der)


def _pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


@pytest.fixture
def stub(tmp_path, token_pki):
    made = []

    def make(**options):
        stub = Emulator.in_process(tmp_path / f"stub-{len(made)}", **options)
        made.append(stub)
        stub.admin.upload_ca("root", _pem(_cert(token_pki.root.certificate)), verified=True)
        return stub

    yield make
    for stub in made:
        stub.stop()


def register(stub, token_pki, device_name, *, chain_length=None, registration_id=None, timeout=15.0):
    """One registration over MQTT: (outcome, timings, flow). `chain_length`: how many CA
    certificates after the leaf to present (default: all of them, root included)."""
    record = token_pki.devices[device_name]
    cas = [_cert(der) for der in record.chain][:chain_length]
    token_pki.lib()  # point SoftHSM at the PKI's state directory before awscrt opens it
    context = client_tls_context(
        # By label, not by the recorded slot id: SoftHSM renumbers slots when re-initialised.
        TlsIdentity(token_pki.module_path, record.label, _pem(_cert(record.certificate), *cas), token_pki.pin,
                    token_label=record.token_label),
        trust_pem=stub.ca_cert.read_bytes(), runtime=RUNTIME)
    registration_id = registration_id or record.registration_id
    transport = MqttTransport("127.0.0.1", stub.mqtt_port, stub.id_scope, registration_id, context,
                              runtime=RUNTIME)
    flow = reg.RegistrationFlow(registration_id, {"firmware": "1.0"})
    outcome, timings = run_registration(flow, transport, timeout)
    return outcome, timings, flow


@pytest.mark.parametrize("device_name", ["device-ec-p256", "device-ec-p384", "device-rsa-2048"])
def test_assigned_through_a_group_on_the_root(stub, token_pki, device_name):
    dps = stub()
    dps.admin.create_group("root-group", cert_pem=_pem(_cert(token_pki.root.certificate)))
    outcome, timings, _ = register(dps, token_pki, device_name)
    assert outcome.status == reg.ASSIGNED, outcome
    assert outcome.device_id == device_name
    assert outcome.assigned_hub == DEFAULT_HUB
    assert outcome.http_status == 200
    assert timings.connect_ms > 0 and timings.total_ms >= timings.register_ms
    record = dps.admin.get_registration(device_name)
    assert record["status"] == "assigned"


def test_missing_intermediate_is_refused_and_the_full_chain_accepted(stub, token_pki):
    # Only the root is verified; the group holds `line` (a second-level intermediate).
    dps = stub()
    dps.admin.create_group("line-group", cert_pem=_pem(_cert(token_pki.line.certificate)))
    outcome, _, _ = register(dps, token_pki, "device-line-1", chain_length=1)  # leaf + line only
    assert outcome.status == reg.UNAUTHORIZED, outcome
    assert (outcome.http_status, outcome.error_code) == (401, 401002)
    outcome, _, _ = register(dps, token_pki, "device-line-1")  # leaf + line + intermediate + root
    assert outcome.status == reg.ASSIGNED, outcome


def test_disabled_group_blocks_its_devices(stub, token_pki):
    dps = stub()
    dps.admin.create_group("root-group", cert_pem=_pem(_cert(token_pki.root.certificate)))
    dps.admin.create_group("intermediate-group", cert_pem=_pem(_cert(token_pki.intermediate.certificate)), enabled=False)
    outcome, _, _ = register(dps, token_pki, "device-ec-p256")
    assert outcome.status == reg.DISABLED, outcome


def test_disabled_individual_blocks_one_device_while_its_group_still_admits_others(stub, token_pki):
    dps = stub()
    dps.admin.create_group("root-group", cert_pem=_pem(_cert(token_pki.root.certificate)))
    blocked = token_pki.devices["device-ec-p384"]
    dps.admin.create_enrollment(blocked.registration_id, _pem(_cert(blocked.certificate)), enabled=False)
    outcome, _, _ = register(dps, token_pki, "device-ec-p384")
    assert outcome.status == reg.DISABLED, outcome
    outcome, _, _ = register(dps, token_pki, "device-ec-p256")
    assert outcome.status == reg.ASSIGNED, outcome


def test_registration_id_that_is_not_the_certificate_cn_is_unauthorized(stub, token_pki):
    dps = stub()
    dps.admin.create_group("root-group", cert_pem=_pem(_cert(token_pki.root.certificate)))
    outcome, _, _ = register(dps, token_pki, "device-ec-p256", registration_id="device-ec-p384")
    assert outcome.status == reg.UNAUTHORIZED, outcome  # CONNACK refusal, reported like HTTP 401
    assert outcome.http_status == 401


def test_throttling_is_honoured(stub, token_pki):
    dps = stub(throttle=1)  # the first request of each registration ID gets 429, Retry-After: 1
    dps.admin.create_group("root-group", cert_pem=_pem(_cert(token_pki.root.certificate)))
    started = time.monotonic()
    outcome, _, flow = register(dps, token_pki, "device-ec-p256")
    assert outcome.status == reg.ASSIGNED, outcome
    assert flow.requests == 3  # register (429), register again, poll
    assert time.monotonic() - started >= 1.0  # waited Retry-After before repeating

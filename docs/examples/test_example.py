"""Provisioning tests of a device fleet against the local DPS emulator, with the device
keys in a PKCS#11 token: what the device-sim pytest plugin gives (docs/pytest.md).

Run with:  pytest docs/examples/test_example.py
"""

import pytest


@pytest.fixture
def line(device_sim_pki, device_sim_emulator):
    """A root CA (verified by proof of possession) and an enrollment group on it."""
    root = device_sim_pki.ca("root")
    device_sim_pki.ca("line-1", parent="root")
    admin = device_sim_emulator.admin
    admin.upload_ca("root", root.cert_pem)
    admin.verify_ca("root", root)  # signed inside the token by the root's key
    admin.create_group("line-1", ca_ref="root")
    return root


@pytest.mark.parametrize("transport", ["https", "mqtt"])
def test_device_is_assigned(line, device_sim_pki, device_sim_emulator, device_sim_register, transport):
    device = device_sim_pki.device(f"sensor-{transport}", ca="line-1")
    outcome = device_sim_register(device, device_sim_emulator, transport=transport)
    assert outcome.status == "assigned"
    assert outcome.device_id == f"sensor-{transport}"
    assert outcome.assigned_hub


def test_disabled_device_is_refused_while_the_group_admits_others(line, device_sim_pki, device_sim_emulator,
                                                                 device_sim_register):
    blocked = device_sim_pki.device("sensor-002", ca="line-1")
    other = device_sim_pki.device("sensor-003", ca="line-1")
    device_sim_emulator.admin.create_enrollment(blocked.registration_id, blocked.cert_pem, enabled=False)
    assert device_sim_register(blocked, device_sim_emulator).status == "disabled"
    assert device_sim_register(other, device_sim_emulator).status == "assigned"


def test_unverified_root_admits_nobody(device_sim_pki, device_sim_emulator, device_sim_register):
    root = device_sim_pki.ca("root")
    device = device_sim_pki.device("sensor-004", ca="root")
    device_sim_emulator.admin.upload_ca("root", root.cert_pem)  # uploaded, never verified
    device_sim_emulator.admin.create_group("everyone", ca_ref="root")
    assert device_sim_register(device, device_sim_emulator).status == "unauthorized"


def test_group_can_be_switched_off(line, device_sim_pki, device_sim_emulator, device_sim_register):
    device = device_sim_pki.device("sensor-005", ca="line-1")
    device_sim_emulator.admin.set_enabled("group", "line-1", False)
    assert device_sim_register(device, device_sim_emulator).status == "disabled"

"""Throttling and failed assignment over every transport: emulators of their own per scenario.

Part of the scenarios of test_register_e2e.py (same helpers, same assertions), kept in a
file of their own so `make test` (pytest-xdist, one file per worker) runs them in parallel
with the rest.
"""

import pytest

from device_sim.testing import Emulator

from .test_register_e2e import TRANSPORTS, admin, register


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_throttling_is_retried_after_retry_after(token_pki, tmp_path, transport):
    # --throttle counts per registration ID, so each transport gets a fresh emulator.
    proc = Emulator.spawn(tmp_path / "throttled", "--throttle", "2", "--retry-after", "0")
    ready = proc.ready
    try:
        admin(tmp_path / "throttled", "ca", "upload", "root", token_pki.root.pem_path, "--verified")
        admin(tmp_path / "throttled", "group", "create", "everyone", "--ca-ref", "root")
        code, out, _ = register(token_pki, "device-ec-p256", ready, transport=transport)
    finally:
        proc.stop()
    assert (code, out["status"]) == (0, "assigned")
    assert out["retries"] == 2
    assert out["timings_ms"]["register"] >= 2000  # two 429s with Retry-After: 1


@pytest.fixture(scope="module")
def unlinked_emulator(token_pki, tmp_path_factory):
    """An enrollment pinned to a hub that is no longer linked."""
    home = tmp_path_factory.mktemp("unlinked")
    proc = Emulator.spawn(home, "--no-mqtt", "--no-amqp", "--hub", "old-hub.azure-devices.net")
    try:
        admin(home, "ca", "upload", "root", token_pki.root.pem_path, "--verified")
        admin(home, "enroll", "create", "device-ec-p256", "--cert", token_pki.devices["device-ec-p256"].cert_path,
              "--hub", "old-hub.azure-devices.net")
    finally:
        proc.stop()
    proc = Emulator.spawn(home, "--hub", "new-hub.azure-devices.net", "--retry-after", "0")
    yield proc.ready
    proc.stop()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_failed_assignment(token_pki, unlinked_emulator, transport):
    # DPS accepts the device, then the operation ends 'failed' with errorCode 400208 (no hub
    # could be assigned).
    code, out, _ = register(token_pki, "device-ec-p256", unlinked_emulator, transport=transport)
    assert (code, out["status"], out["error"]["code"]) == (5, "failed", 400208)

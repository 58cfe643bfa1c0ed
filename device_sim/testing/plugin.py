"""The pytest plugin of device-sim (entry point `pytest11`, loaded by any pytest that has
device-sim installed); docs/pytest.md shows it at work.

Fixtures:
  device_sim_pki                a `TokenPki` in a temporary directory (SoftHSM, or the
                                module of --device-sim-module): `.ca(name, parent=None)`,
                                `.device(registration_id, ca=NAME)`
  device_sim_emulator           a running emulator with its own state directory, one per
                                test (`Emulator`: `.device_url`, `.admin`, ...)
  device_sim_emulator_session   the same, one for the whole session
  device_sim_register           `register(identity, emulator, transport="https", **options)`

Option `--device-sim-module PATH` runs the same tests with another PKCS#11 module
(its tokens are initialised with the PINs of `device_sim.testing.TEST_PIN`/`TEST_SO_PIN`);
`--device-sim-tpm` with a software TPM token (device_sim.testing.tpm.SoftwareTpm).
"""

from __future__ import annotations

import os

import pytest

# The helpers are imported by the fixtures, not here: a plugin loads before the suite's
# conftest files, and importing the project's packages that early would shadow a test
# package of the same name (device-sim's own tests/hsm_setup).

SOFTHSM_CONF = "SOFTHSM2_CONF"


def pytest_addoption(parser) -> None:
    group = parser.getgroup("device-sim")
    group.addoption("--device-sim-module", metavar="PATH", default=None,
                    help="PKCS#11 module for device_sim_pki (default: SoftHSM in a temporary directory)")
    group.addoption("--device-sim-tpm", action="store_true", default=False,
                    help="device_sim_pki keeps its keys in a software TPM (swtpm + tpm2-abrmd + tpm2-pkcs11)")


@pytest.fixture(scope="session")
def device_sim_module(request) -> str | None:
    """The PKCS#11 module path given with --device-sim-module, or None for SoftHSM."""
    return request.config.getoption("--device-sim-module")


@pytest.fixture(scope="session")
def device_sim_tpm(request, tmp_path_factory):
    """With --device-sim-tpm: the running software TPM token, else None. One per session
    (the PKCS#11 library stays initialised with it), so the device registration IDs of a
    session must differ from test to test."""
    if not request.config.getoption("--device-sim-tpm"):
        yield None
        return
    from device_sim.testing.token import TEST_PIN, TEST_SO_PIN
    from device_sim.testing.tpm import SoftwareTpm

    tpm = SoftwareTpm.launch(tmp_path_factory.mktemp("device-sim-tpm"), label="device-sim",
                             user_pin=TEST_PIN, so_pin=TEST_SO_PIN, max_transients=100)
    try:
        yield tpm
    finally:
        tpm.stop()


@pytest.fixture
def device_sim_pki(tmp_path_factory, device_sim_module, device_sim_tpm, monkeypatch):
    from device_sim.testing.token import TokenPki

    # SoftHSM finds its directory through $SOFTHSM2_CONF: put back whatever was there.
    monkeypatch.setenv(SOFTHSM_CONF, os.environ.get(SOFTHSM_CONF, ""))
    home = tmp_path_factory.mktemp("device-sim-pki")
    if device_sim_tpm is None:
        return TokenPki(home, module_path=device_sim_module)
    for name, value in device_sim_tpm.env.items():
        monkeypatch.setenv(name, value)
    label = device_sim_tpm.token_label  # one TPM token holds CAs and devices
    return TokenPki(home, module_path=device_sim_tpm.module_path, ca_token=label, device_token=label)


@pytest.fixture
def device_sim_emulator(tmp_path_factory):
    from device_sim.testing.emulator import Emulator

    with Emulator.in_process(tmp_path_factory.mktemp("device-sim-emulator")) as emulator:
        yield emulator


@pytest.fixture(scope="session")
def device_sim_emulator_session(tmp_path_factory):
    from device_sim.testing.emulator import Emulator

    with Emulator.in_process(tmp_path_factory.mktemp("device-sim-emulator-session")) as emulator:
        yield emulator


@pytest.fixture
def device_sim_register():
    from device_sim.testing.device import register

    return register

"""The pytest plugin (device_sim.testing.plugin): docs/examples/test_example.py runs as
written in a pytest of its own, and our tests use its fixtures where they fit."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from hsm_setup import module

EXAMPLE = Path(__file__).resolve().parents[1] / "docs" / "examples" / "test_example.py"


def test_the_documented_example_passes_as_written(pytester):
    pytester.makepyfile(test_example=EXAMPLE.read_text())
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=5)


def test_the_example_runs_against_a_module_given_by_path(pytester, tmp_path):
    softhsm = module.resolve_module(None, tmp_path)  # the path another module would be given as
    pytester.makepyfile(test_example=EXAMPLE.read_text())
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--device-sim-module", softhsm,
                                           "-k", "assigned and https")
    result.assert_outcomes(passed=1)


@pytest.mark.skipif(shutil.which("swtpm") is None, reason="swtpm is not installed")
def test_the_example_runs_with_the_keys_in_a_software_tpm(pytester):
    pytester.makepyfile(test_example=EXAMPLE.read_text())
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--device-sim-tpm")
    result.assert_outcomes(passed=5)


def test_session_emulator_is_one_emulator(device_sim_emulator_session, device_sim_pki, device_sim_register):
    emulator = device_sim_emulator_session
    assert emulator.mqtt_url.startswith("mqtts://") and emulator.ca_cert.is_file()
    root = device_sim_pki.ca("plugin-root")
    emulator.admin.upload_ca("plugin-root", root.cert_pem, verified=True)
    emulator.admin.create_group("plugin-group", cert_pem=root.cert_pem)
    device = device_sim_pki.device("plugin-device", ca="plugin-root", key_type="ec-p384")
    outcome = device_sim_register(device, emulator, transport="mqtt", payload={"model": "x"})
    assert (outcome.status, outcome.device_id) == ("assigned", "plugin-device")
    assert emulator.admin.get_registration("plugin-device")["status"] == "assigned"

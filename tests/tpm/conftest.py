"""A software TPM 2.0 token (swtpm + tpm2-abrmd + tpm2-pkcs11) for the tests in this folder.

``software_tpm`` (session scope)
    One running `device_sim.testing.tpm.SoftwareTpm` with a token labelled "tpm" (user
    PIN ``TEST_PIN``, SO PIN ``TEST_SO_PIN``), its resource manager allowing 100 loaded
    objects per client (its maximum) instead of 27. Its environment is put into os.environ for
    the whole session, before any test loads libtpm2_pkcs11.so in this process (the
    module reads it in C_Initialize only), and restored afterwards.

``fresh_tpm`` (function scope)
    A TPM of its own (tpm2-abrmd defaults) for a test that breaks it (kill_tpm) or
    measures its limits. Do NOT use it in this process
    through the module: the session TPM owns libtpm2_pkcs11.so here; use it from a
    subprocess with ``{**os.environ, **fresh_tpm.env}``.

``tpm_home`` (function scope)
    A state directory for hsm-setup on the session token: DEVICE_SIM_HOME, PKCS11_MODULE
    and PKCS11_PIN point at it (monkeypatched); ``cli(*argv)`` runs hsm-setup in-process.

A machine without the packages gets an error here, not a skip: `make venv` installs them.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from device_sim.testing.tpm import SoftwareTpm

TEST_PIN = "1234"
TEST_SO_PIN = "87654321"
TOKEN_LABEL = "tpm"


@pytest.fixture(scope="session")
def software_tpm(tmp_path_factory):
    # This process generates and uses a few dozen keys under one C_Initialize; tpm2-pkcs11
    # keeps each loaded, and tpm2-abrmd's default of 27 loaded objects per client would
    # stop it after about 13 key pairs (test_tpm_token pins that limit down); 100 (the
    # most tpm2-abrmd accepts) allows about 50.
    tpm = SoftwareTpm.launch(tmp_path_factory.mktemp("software-tpm"), label=TOKEN_LABEL,
                             user_pin=TEST_PIN, so_pin=TEST_SO_PIN, max_transients=100)
    saved = {name: os.environ.get(name) for name in tpm.env}
    tpm.apply_env()
    try:
        yield tpm
    finally:
        _finalize_module(tpm.module_path)
        tpm.stop()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _finalize_module(path: str) -> None:
    """C_Finalize the module in this process while its TPM still runs (else the exit-time
    C_Finalize floods stderr with failed Esys_FlushContext calls)."""
    import pkcs11

    loaded = pkcs11._loaded.get(path)  # python-pkcs11's per-path library objects
    if loaded is not None and loaded.initialized:
        loaded.finalize()


@pytest.fixture
def fresh_tpm(tmp_path):
    with SoftwareTpm.start(tmp_path / "tpm", label="fresh", user_pin=TEST_PIN,
                           so_pin=TEST_SO_PIN) as tpm:
        yield tpm


@dataclasses.dataclass
class TpmHome:
    home: Path
    tpm: SoftwareTpm
    pin: str
    _run: object
    _context: object = None

    def cli(self, *argv):
        return self._run(*argv)

    def lib(self):
        """This home's `Pkcs11Library` for the TPM module (one context per TpmHome)."""
        from hsm_setup.context import Pkcs11Context
        if self._context is None:
            self._context = Pkcs11Context(self.home)
        return self._context.library(self.tpm.module_path)

    def session(self):
        """The context's logged-in session on the TPM token."""
        from hsm_setup import tokens
        return tokens.session(self.lib(), self.tpm.token_label, self.pin)


@pytest.fixture
def tpm_home(software_tpm, tmp_path, monkeypatch, run_hsm_setup) -> TpmHome:
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("DEVICE_SIM_HOME", str(home))
    monkeypatch.setenv("PKCS11_MODULE", software_tpm.module_path)
    monkeypatch.setenv("PKCS11_PIN", TEST_PIN)
    monkeypatch.setenv("PKCS11_SO_PIN", TEST_SO_PIN)
    monkeypatch.delenv("PKCS11_CA_PIN", raising=False)
    return TpmHome(home, software_tpm, TEST_PIN, run_hsm_setup)

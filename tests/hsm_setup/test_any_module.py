"""Another PKCS#11 module than SoftHSM by name: OpenSC's pkcs11-spy in front of SoftHSM.

The spy forwards every call to SoftHSM and logs it, so the test also sees that key
generation, token initialisation and every signature really go through the module.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from hsm_setup import module

SPY_CANDIDATES = ("/usr/lib/x86_64-linux-gnu/pkcs11/pkcs11-spy.so",
                  "/usr/lib/aarch64-linux-gnu/pkcs11/pkcs11-spy.so",
                  "/usr/lib/pkcs11/pkcs11-spy.so")
SPY = next((p for p in SPY_CANDIDATES if Path(p).is_file()), None)


@pytest.mark.skipif(SPY is None, reason="OpenSC's pkcs11-spy.so is not installed")
def test_tool_works_through_a_non_softhsm_module(softhsm_home, tmp_path):
    h = softhsm_home
    spy_log = tmp_path / "spy.log"
    env = dict(os.environ, PKCS11_MODULE=SPY, PKCS11SPY=h.module_path,
               PKCS11SPY_OUTPUT=str(spy_log), SOFTHSM2_CONF=str(h.home / module.SOFTHSM_CONF_NAME))
    cli = str(Path(sys.executable).with_name("hsm-setup"))

    def run(*argv):
        done = subprocess.run([cli, *argv], env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        return done.stdout

    run("token", "init", "spy-token")
    run("ca", "create", "root", "--token", "spy-token")
    out = run("device", "create", "spy-dev", "--ca", "root", "--token", "spy-token")
    assert "pkcs11:token=spy-token;object=spy-dev;id=" in out
    calls = spy_log.read_text(errors="replace")
    assert "C_InitToken" in calls
    assert calls.count("C_GenerateKeyPair") >= 2          # CA key, device key
    assert calls.count("C_SignInit") >= 3                  # root self-signature, CSR, leaf

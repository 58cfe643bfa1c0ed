"""Shared fixtures: real SoftHSM tokens in temporary state directories.

Fixtures
--------
``token_pki`` (session scope; alias ``pki`` where no closer conftest overrides it)
    Built ONCE per test session (token key generation is slow, ~30-60/s) with the
    real `hsm_setup` API in its own state directory::

        root (ec-p256, self-signed)            token "ca"
        └─ intermediate (ec-p256)              token "ca"
           ├─ device-ec-p256, device-ec-p384, device-rsa-2048     token "devices"
           └─ line (ec-p256, a 2nd intermediate)                  token "ca"
              └─ device-line-1 (ec-p256)                          token "devices"

    A `TokenPki` with: ``home``, ``module_path``, ``pin``, ``so_pin``, the CA records
    ``root``, ``intermediate``, ``line`` (`hsm_setup.ca.CaRecord`), ``devices``
    (registration ID -> `hsm_setup.devices.DeviceRecord`), and helpers:
      - ``lib()``: the python-pkcs11 lib switched to THIS state directory (call it
        again after any other fixture used another home: SoftHSM reads its
        configuration at C_Initialize, so switching homes re-initialises the
        library and closes every session of the previous home);
      - ``session(token_label)``: a logged-in session on one of its tokens;
      - ``env()``: environment for a subprocess (`hsm-setup`, `device-sim`) that
        should use this PKI (DEVICE_SIM_HOME, SOFTHSM2_CONF, PKCS11_PIN, ...);
      - ``device(registration_id)``: one DeviceRecord.
    Treat it as read-only: tests that create or break things use ``softhsm_home``.

``softhsm_home`` (function scope)
    A fresh state directory with SoftHSM configured and no tokens; $DEVICE_SIM_HOME,
    $PKCS11_PIN and $PKCS11_SO_PIN point at it for the test (monkeypatched), and
    ``pin_file`` / ``so_pin_file`` hold the same PINs. ``init_token(label)`` makes a
    token, ``lib(fresh=False)`` re-activates this home (``fresh=True`` also re-reads
    the token list, for tokens a subprocess created), ``cli(*argv)`` runs `hsm-setup` in this
    process and returns (exit code, stdout, stderr).

``run_hsm_setup``
    The in-process CLI runner alone: ``run_hsm_setup(*argv) -> CliResult``.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from device_sim.cli import hsm_setup as cli
from hsm_setup import ca, devices, identities
from hsm_legacy_api import module, tokens  # until conftest makes its own Pkcs11Context
from hsm_setup.key_types import key_spec

TEST_PIN = "1234"
TEST_SO_PIN = "87654321"


@dataclasses.dataclass
class CliResult:
    code: int
    out: str
    err: str

    def __iter__(self):  # allows: code, out, err = cli(...)
        return iter((self.code, self.out, self.err))


def _run_cli(capsys, argv) -> CliResult:
    capsys.readouterr()
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as exc:  # argparse usage errors
        code = exc.code if isinstance(exc.code, int) else 2
    captured = capsys.readouterr()
    return CliResult(code, captured.out, captured.err)


@pytest.fixture
def run_hsm_setup(capsys):
    return lambda *argv: _run_cli(capsys, argv)


@dataclasses.dataclass
class TokenPki:
    home: Path
    module_path: str
    pin: str
    so_pin: str
    root: ca.CaRecord
    intermediate: ca.CaRecord
    line: ca.CaRecord
    devices: dict[str, devices.DeviceRecord]
    ca_token: str = "ca"
    device_token: str = "devices"

    def lib(self, *, fresh: bool = False):
        module.configure_softhsm(self.home)
        return module.load_library(self.module_path, fresh=fresh)

    def session(self, token_label: str):
        return tokens.session(self.lib(), token_label, self.pin)

    def device(self, registration_id: str) -> devices.DeviceRecord:
        return self.devices[registration_id]

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update({
            "DEVICE_SIM_HOME": str(self.home),
            "SOFTHSM2_CONF": str(self.home / module.SOFTHSM_CONF_NAME),
            "PKCS11_MODULE": self.module_path,
            "PKCS11_PIN": self.pin,
            "PKCS11_SO_PIN": self.so_pin,
        })
        return env


def _build_pki(home: Path) -> TokenPki:
    module_path = module.resolve_module(None, home)
    lib = module.load_library(module_path)
    for label in ("ca", "devices"):
        tokens.init_token(lib, module_path, label, so_pin=TEST_SO_PIN, user_pin=TEST_PIN)
    ec = key_spec("ec-p256")
    root = ca.create_ca(lib, home, "root", parent=None, spec=ec, days=3650, token_label="ca", pin=TEST_PIN)
    inter = ca.create_ca(lib, home, "intermediate", parent="root", spec=ec, days=3650,
                         token_label="ca", pin=TEST_PIN)
    line = ca.create_ca(lib, home, "line", parent="intermediate", spec=ec, days=3650,
                        token_label="ca", pin=TEST_PIN)
    made = {}
    issuer = ca.open_issuer(lib, home, "intermediate", TEST_PIN)
    for key in ("ec-p256", "ec-p384", "rsa-2048"):
        rid = f"device-{key}"
        made[rid] = identities.create_device(lib, home, rid, issuer=issuer, spec=key_spec(key),
                                             token_label="devices", pin=TEST_PIN)
    line_issuer = ca.open_issuer(lib, home, "line", TEST_PIN)
    made["device-line-1"] = identities.create_device(lib, home, "device-line-1", issuer=line_issuer,
                                                     spec=ec, token_label="devices", pin=TEST_PIN)
    return TokenPki(home=home, module_path=module_path, pin=TEST_PIN, so_pin=TEST_SO_PIN,
                    root=root, intermediate=inter, line=line, devices=made)


@pytest.fixture(scope="session")
def token_pki(tmp_path_factory) -> TokenPki:
    home = tmp_path_factory.mktemp("token-pki")
    saved = os.environ.get(module.ENV_SOFTHSM_CONF)
    pki = _build_pki(home)
    yield pki
    if saved is None:
        os.environ.pop(module.ENV_SOFTHSM_CONF, None)
    else:
        os.environ[module.ENV_SOFTHSM_CONF] = saved


@pytest.fixture(scope="session")
def pki(token_pki) -> TokenPki:
    return token_pki


@dataclasses.dataclass
class SoftHsmHome:
    home: Path
    module_path: str
    pin: str
    so_pin: str
    pin_file: Path
    so_pin_file: Path
    _capsys: object

    def lib(self, *, fresh: bool = False):
        """This home's library; fresh=True also sees tokens a subprocess created."""
        os.environ[module.ENV_SOFTHSM_CONF] = str(self.home / module.SOFTHSM_CONF_NAME)
        return module.load_library(self.module_path, fresh=fresh)

    def init_token(self, label: str) -> tokens.TokenInfo:
        return tokens.init_token(self.lib(), self.module_path, label, so_pin=self.so_pin,
                                 user_pin=self.pin)

    def session(self, token_label: str):
        return tokens.session(self.lib(), token_label, self.pin)

    def cli(self, *argv) -> CliResult:
        return _run_cli(self._capsys, argv)


@pytest.fixture
def softhsm_home(tmp_path, monkeypatch, capsys) -> SoftHsmHome:
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("DEVICE_SIM_HOME", str(home))
    monkeypatch.setenv("PKCS11_PIN", TEST_PIN)
    monkeypatch.setenv("PKCS11_SO_PIN", TEST_SO_PIN)
    monkeypatch.delenv("PKCS11_CA_PIN", raising=False)
    monkeypatch.delenv("PKCS11_MODULE", raising=False)
    monkeypatch.setenv(module.ENV_SOFTHSM_CONF, os.environ.get(module.ENV_SOFTHSM_CONF, ""))
    module_path = module.resolve_module(None, home)
    pin_file = tmp_path / "user.pin"
    pin_file.write_text(TEST_PIN + "\n")
    so_pin_file = tmp_path / "so.pin"
    so_pin_file.write_text(TEST_SO_PIN + "\n")
    return SoftHsmHome(home, module_path, TEST_PIN, TEST_SO_PIN, pin_file, so_pin_file, capsys)

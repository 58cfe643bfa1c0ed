"""Shared fixtures, built on `device_sim.testing` (docs/testing.md).

Fixtures
--------
``token_pki`` (session scope)
    A `SuiteTokenPki` (a `device_sim.testing.TokenPki`) built ONCE per session (token key
    generation is slow, ~30-60/s) with the real `hsm_setup` API in its own state directory::

        root (ec-p256, self-signed)            token "ca"
        └─ intermediate (ec-p256)              token "ca"
           ├─ device-ec-p256, device-ec-p384, device-rsa-2048     token "devices"
           └─ line (ec-p256, a 2nd intermediate)                  token "ca"
              └─ device-line-1 (ec-p256)                          token "devices"

    ``root``, ``intermediate``, ``line`` are its CAs (`TokenCa`), ``devices`` maps
    registration ID -> `TokenDevice`; ``lib()``, ``session(label)``, ``env()`` as in
    `TokenPki`. Treat it as read-only: tests that create or break things use ``softhsm_home``.

``softhsm_home`` (function scope)
    A fresh state directory with SoftHSM configured and no tokens; $DEVICE_SIM_HOME,
    $PKCS11_PIN and $PKCS11_SO_PIN point at it for the test (monkeypatched), and
    ``pin_file`` / ``so_pin_file`` hold the same PINs. ``init_token(label)`` makes a
    token, ``lib(fresh=False)`` re-activates this home (``fresh=True`` also re-reads
    the token list, for tokens a subprocess created), ``cli(*argv)`` runs `hsm-setup` in this
    process and returns (exit code, stdout, stderr).

``file_cas`` (session scope)
    File-key CAs (`device_sim.testing.TestCA`) root -> inter1 -> inter2, the shape of the
    docs' group example; ``device(cn)`` issues a leaf below inter2.

``run_hsm_setup``
    The in-process CLI runner alone: ``run_hsm_setup(*argv) -> CliResult``.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from device_sim.cli import hsm_setup as cli
from device_sim.testing import TEST_PIN, TEST_SO_PIN, LeafCert, TestCA, TokenCa, TokenPki
from hsm_setup import module

pytest_plugins = ["pytester"]


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


class SuiteTokenPki(TokenPki):
    """The session's token PKI, with its three CAs by name."""

    @property
    def root(self) -> TokenCa:
        return self.cas["root"]

    @property
    def intermediate(self) -> TokenCa:
        return self.cas["intermediate"]

    @property
    def line(self) -> TokenCa:
        return self.cas["line"]


def _build_pki(home: Path) -> SuiteTokenPki:
    pki = SuiteTokenPki(home)
    pki.init_token(pki.ca_token)
    pki.init_token(pki.device_token)
    pki.ca("root")
    pki.ca("intermediate", parent="root")
    pki.ca("line", parent="intermediate")
    for key in ("ec-p256", "ec-p384", "rsa-2048"):
        pki.device(f"device-{key}", ca="intermediate", key_type=key)
    pki.device("device-line-1", ca="line")
    return pki


@pytest.fixture(scope="session")
def token_pki(tmp_path_factory) -> SuiteTokenPki:
    home = tmp_path_factory.mktemp("token-pki")
    saved = os.environ.get(module.ENV_SOFTHSM_CONF)
    pki = _build_pki(home)
    yield pki
    if saved is None:
        os.environ.pop(module.ENV_SOFTHSM_CONF, None)
    else:
        os.environ[module.ENV_SOFTHSM_CONF] = saved


class SoftHsmHome(TokenPki):
    """A fresh SoftHSM directory for tests that create or break tokens."""

    def __init__(self, home: Path, pin_file: Path, so_pin_file: Path, capsys):
        super().__init__(home)
        self.pin_file, self.so_pin_file = pin_file, so_pin_file
        self._capsys = capsys

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
    pin_file = tmp_path / "user.pin"
    pin_file.write_text(TEST_PIN + "\n")
    so_pin_file = tmp_path / "so.pin"
    so_pin_file.write_text(TEST_SO_PIN + "\n")
    return SoftHsmHome(home, pin_file, so_pin_file, capsys)


@dataclasses.dataclass
class FileCas:
    root: TestCA
    inter1: TestCA
    inter2: TestCA

    def device(self, cn: str) -> LeafCert:
        return self.inter2.issue_leaf(cn)


@pytest.fixture(scope="session")
def file_cas() -> FileCas:
    root = TestCA("stub-test-root")
    inter1 = root.issue_intermediate("stub-test-inter1")
    return FileCas(root, inter1, inter1.issue_intermediate("stub-test-inter2"))

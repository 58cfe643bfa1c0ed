"""Token-held test identities: a state directory with a PKCS#11 token (SoftHSM by default,
configured inside the directory), CAs and devices made by the real `hsm_setup` API.

    >>> from device_sim.testing import TokenPki
    >>> pki = TokenPki(tmp_path / "home")                     # doctest: +SKIP
    >>> root = pki.ca("root")
    >>> line = pki.ca("line-1", parent="root")
    >>> device = pki.device("device-7", ca="line-1")
    >>> device.uri
    'pkcs11:token=devices;object=device-7;id=%5a%...;type=private'
    >>> device.chain_pem.count(b"BEGIN CERTIFICATE")          # leaf, line-1, root
    3

CAs live on token `ca_token` ("ca"), devices on `device_token` ("devices"); both are
initialised on first use with `pin` / `so_pin`. `pki.env()` is the environment for a
`device-sim` or `hsm-setup` subprocess that should use this directory; `pki.cas` and
`pki.devices` hold what was made. The records are hsm_setup's (`CaRecord`,
`DeviceRecord`, docs/hsm-setup.md) with PEM views added.

Each TokenPki owns one `hsm_setup.context.Pkcs11Context` for its directory. SoftHSM reads
its configuration when the library is initialised, so one process uses one SoftHSM
directory at a time: `lib()` switches to this one (the context re-initialises the library,
closing the sessions of the directory used before).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from cryptography import x509

from device_sim.testing.ca import pem
from hsm_setup import ca as hsm_ca
from hsm_setup import devices as hsm_devices
from hsm_setup import identities, module, tokens, verification
from hsm_setup.context import Pkcs11Context
from hsm_setup.key_types import key_spec

TEST_PIN = "1234"
TEST_SO_PIN = "87654321"
DAYS = 3650


def _copy(record, cls, **extra):
    return cls(**{f.name: getattr(record, f.name) for f in dataclasses.fields(record)}, **extra)


class _CertPem:
    cert: x509.Certificate

    @property
    def cert_pem(self) -> bytes:
        return pem(self.cert)


@dataclasses.dataclass(frozen=True)
class TokenCa(_CertPem, hsm_ca.CaRecord):
    """A CA whose key is in the token (hsm_setup's CaRecord with PEM views)."""

    pki: "TokenPki | None" = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def cert(self) -> x509.Certificate:
        return self.x509()

    def verification_certificate(self, code: str) -> bytes:
        """DPS proof of possession for `code`, signed inside the token by this CA's key (PEM)."""
        issuer = hsm_ca.open_issuer(self.pki.lib(), self.pki.home, self.name, self.pki.pin)
        proof = verification.issue_verification_certificate(issuer, code)
        return pem(x509.load_der_x509_certificate(proof.dump()))


@dataclasses.dataclass(frozen=True)
class TokenDevice(_CertPem, hsm_devices.DeviceRecord):
    """A device identity whose key is in the token (hsm_setup's DeviceRecord with PEM views)."""

    pki: "TokenPki | None" = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def cert(self) -> x509.Certificate:
        return self.certificate_x509()

    @property
    def chain_pem(self) -> bytes:
        """Leaf first, then its CAs up to the root."""
        return pem(self.cert, *self.chain_x509())


class TokenPki:
    """CAs and devices in tokens of one state directory `home` (see the module docstring)."""

    def __init__(self, home: str | Path, *, module_path: str | None = None, pin: str = TEST_PIN,
                 so_pin: str = TEST_SO_PIN, ca_token: str = "ca", device_token: str = "devices"):
        self.home = Path(home)
        self.home.mkdir(parents=True, exist_ok=True)
        self.module_path = module.resolve_module(module_path, self.home)
        self.context = Pkcs11Context(self.home)
        self.pin, self.so_pin = pin, so_pin
        self.ca_token, self.device_token = ca_token, device_token
        self.cas: dict[str, TokenCa] = {}
        self.devices: dict[str, TokenDevice] = {}
        self._issuers: dict[str, hsm_ca.Issuer] = {}

    def lib(self, *, fresh: bool = False):
        """This directory's `Pkcs11Library` (hsm_setup/context.py), switched to it; `fresh`
        also re-reads the token list, for tokens another process created."""
        library = self.context.library(self.module_path)
        if fresh:
            library.reload()
        else:
            library.lib  # noqa: B018 - initialise, or switch back from another directory
        return library

    def session(self, token_label: str):
        """A logged-in session on `token_label`. Logged in afresh each call: an in-process
        CLI run in between may have logged this process out (a second login logs out first,
        hsm_setup/tokens.py), which ends the sessions a cache would hand back."""
        library = self.lib()
        library.drop_session(tokens.find_token(library, token_label).slot.slot_id)
        return tokens.session(library, token_label, self.pin)

    def init_token(self, label: str) -> tokens.TokenInfo:
        """Initialise token `label` with this PKI's PINs (unless it exists already)."""
        lib = self.lib()
        existing = tokens.find_token(lib, label, required=False)
        if existing is not None:
            return tokens.token_info(existing)
        self._issuers.clear()  # initialising re-reads the slot list: cached sessions end
        return tokens.init_token(lib, label, so_pin=self.so_pin, user_pin=self.pin)

    def ca(self, name: str, parent: str | None = None, *, key_type: str = "ec-p256",
           token: str | None = None) -> TokenCa:
        """Create CA `name` (a root, or below CA `parent`) with its key in the CA token."""
        token = token or self.ca_token
        self.init_token(token)
        record = hsm_ca.create_ca(self.lib(), self.home, name, parent=parent, spec=key_spec(key_type), days=DAYS,
                                  token_label=token, pin=self.pin)
        self.cas[name] = _copy(record, TokenCa, pki=self)
        return self.cas[name]

    def device(self, registration_id: str, ca: str, *, key_type: str = "ec-p256",
               token: str | None = None) -> TokenDevice:
        """Create device `registration_id` issued by CA `ca`, its key in the device token."""
        token = token or self.device_token
        self.init_token(token)
        lib = self.lib()
        if ca not in self._issuers:
            self._issuers[ca] = hsm_ca.open_issuer(lib, self.home, ca, self.pin)
        record = identities.create_device(lib, self.home, registration_id, issuer=self._issuers[ca],
                                          spec=key_spec(key_type), token_label=token, pin=self.pin)
        self.devices[registration_id] = _copy(record, TokenDevice, pki=self)
        return self.devices[registration_id]

    def env(self) -> dict[str, str]:
        """os.environ plus what a `device-sim` / `hsm-setup` subprocess needs to use this PKI."""
        env = dict(os.environ)
        env.update({
            "DEVICE_SIM_HOME": str(self.home),
            "PKCS11_MODULE": self.module_path,
            "PKCS11_PIN": self.pin,
            "PKCS11_SO_PIN": self.so_pin,
        })
        if module.is_softhsm(self.module_path):
            env[module.ENV_SOFTHSM_CONF] = str(self.home / module.SOFTHSM_CONF_NAME)
        return env

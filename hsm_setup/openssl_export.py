"""A device's token key for standard OpenSSL 3 tools, through pkcs11-provider (docs/openssl.md).

`export_openssl` writes one directory per device:

- `key.pem`: a "PKCS#11 PROVIDER URI" PEM. pkcs11-provider's decoder reads it where a
  private key file is expected and loads the token key the URI names: DER
  SEQUENCE { desc VisibleString "PKCS#11 Provider URI v1.0", uri UTF8String }.
  It holds no secret: the key never leaves the token.
- `cert.pem`: the leaf and the CA certificates the device presents (up to the root).
- `openssl.cnf`: loads the default and the pkcs11 providers, with the device's PKCS#11
  module initialised as the provider loads (`pkcs11-module-load-behavior = early`: only
  then does a process with several tokens keep its handshakes off tokens other than the
  device's); for SoftHSM the quirks it needs; the PIN as `file:PATH` when a PIN file is given.
- `env`: `export OPENSSL_CONF=...` (and `SOFTHSM2_CONF`), plus where the PIN comes from;
  the PIN itself only when asked (`include_pin`), the file then being owner-only.

Everything comes from the registry and the module choice: exporting logs into no token.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import subprocess
from pathlib import Path

from asn1crypto import core, pem

from device_sim.common.errors import UserError
from device_sim.common.files import write_atomic
from hsm_setup import certificates, devices
from hsm_setup.module import ENV_SOFTHSM_CONF, is_softhsm, resolve_module
from hsm_setup.uri import Pkcs11Uri

PEM_LABEL = "PKCS#11 PROVIDER URI"
URI_DESCRIPTION = "PKCS#11 Provider URI v1.0"  # the provider refuses any other text
PROVIDER_NAME = "pkcs11.so"
ENV_PIN = "PKCS11_PIN"
# SoftHSM 2.6 crashes when OpenSSL's exit handlers finalise it (no-deinit) and cannot
# save a digest's state, which OpenSSL asks for when it duplicates the TLS 1.2
# handshake hash (no-operation-state).
SOFTHSM_QUIRKS = "no-deinit no-operation-state"
LOAD_BEHAVIOR = "early"
PROVIDER_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/ossl-modules/pkcs11.so",
    "/usr/lib/aarch64-linux-gnu/ossl-modules/pkcs11.so",
    "/usr/lib64/ossl-modules/pkcs11.so",
    "/usr/local/lib/ossl-modules/pkcs11.so",
)


class ProviderUri(core.Sequence):
    _fields = [("desc", core.VisibleString), ("uri", core.UTF8String)]


@dataclasses.dataclass(frozen=True)
class OpensslExport:
    directory: Path
    key_pem: Path
    cert_pem: Path
    openssl_cnf: Path
    env: Path
    uri: str


def key_pem(uri: str) -> bytes:
    """The PEM that makes pkcs11-provider load the token key named by `uri`."""
    der = ProviderUri({"desc": URI_DESCRIPTION, "uri": uri}).dump()
    return pem.armor(PEM_LABEL, der)


def key_uri(record: devices.DeviceRecord) -> str:
    """The device's private key by token serial and label, key label and id (no PIN)."""
    return str(Pkcs11Uri(token=record.token_label, serial=record.token_serial or None,
                         object=record.label, id=record.key_id, type="private"))


def find_provider_module() -> str:
    """pkcs11-provider's module: in OpenSSL's module directory, else a usual place."""
    candidates = []
    try:
        answer = subprocess.run(["openssl", "version", "-m"], capture_output=True, text=True, timeout=10)
        # MODULESDIR: "/usr/lib/x86_64-linux-gnu/ossl-modules"
        if answer.returncode == 0 and ":" in answer.stdout:
            candidates.append(str(Path(answer.stdout.split(":", 1)[1].strip().strip('"')) / PROVIDER_NAME))
    except (OSError, subprocess.SubprocessError):
        pass
    for path in [*candidates, *PROVIDER_CANDIDATES]:
        if Path(path).is_file():
            return path
    raise UserError("pkcs11-provider is not installed (no ossl-modules/pkcs11.so): run 'make sysdeps', or "
                    "'apt-get install -t bookworm-backports pkcs11-provider' on Debian 12")


def openssl_cnf(provider_module: str, pkcs11_module: str, *, softhsm: bool,
                pin_file: Path | None = None, pin_from_env: bool = False) -> str:
    """An OpenSSL configuration with the default provider and pkcs11-provider on `pkcs11_module`."""
    lines = [
        "# Written by 'hsm-setup export openssl': standard OpenSSL with the key in a PKCS#11 token.",
        "openssl_conf = openssl_init",
        "",
        "[openssl_init]",
        "providers = provider_sect",
        "",
        "[provider_sect]",
        "default = default_sect",
        "pkcs11 = pkcs11_sect",
        "",
        "[default_sect]",
        "activate = 1",
        "",
        "[pkcs11_sect]",
        f"module = {provider_module}",
        f"pkcs11-module-path = {pkcs11_module}",
        # Only key operations belong in the token: OpenSSL would otherwise also hash there.
        "pkcs11-module-block-operations = digest",
        # Initialise the module when the provider loads. Loaded lazily, the provider offers
        # OpenSSL signature verification it only sets up later, and from the second
        # handshake of a process on OpenSSL checks the server's signature in the token:
        # it imports the server's key into the FIRST slot and logs in there (with this
        # file's PIN, or fails), whichever token that is (docs/token-quirks.md).
        f"pkcs11-module-load-behavior = {LOAD_BEHAVIOR}",
    ]
    if softhsm:
        lines.append(f"pkcs11-module-quirks = {SOFTHSM_QUIRKS}")
    if pin_from_env:
        lines.append(f"pkcs11-module-token-pin = $ENV::{ENV_PIN}")
    elif pin_file is not None:
        lines.append(f"pkcs11-module-token-pin = file:{pin_file}")
    lines.append("activate = 1")
    return "\n".join(lines) + "\n"


def env_script(cnf: Path, *, softhsm_conf: str | None, pin_file: Path | None,
               pin: str | None = None) -> str:
    """Shell lines to source; `pin` is written only when given (include_pin)."""
    lines = ["# source this file: OpenSSL tools then use the device key in its token",
             f"export OPENSSL_CONF={shlex.quote(str(cnf))}"]
    if softhsm_conf:
        lines.append(f"export {ENV_SOFTHSM_CONF}={shlex.quote(softhsm_conf)}")
    if pin is not None:
        lines.append(f"# the PIN: ${ENV_PIN} (openssl.cnf reads it as $ENV::{ENV_PIN})")
        lines.append(f"export {ENV_PIN}={shlex.quote(pin)}")
    elif pin_file is not None:
        lines.append(f"# the PIN: file:{pin_file} (pkcs11-module-token-pin in openssl.cnf)")
    else:
        lines.append("# the PIN: not configured; OpenSSL tools prompt for it, Python's "
                     "ssl takes it as load_cert_chain(password=...)")
    return "\n".join(lines) + "\n"


def export_openssl(home: Path, registration_id: str, out: Path, *, module: str | None = None,
                   pin_file: str | os.PathLike | None = None, pin: str | None = None) -> OpensslExport:
    """Write key.pem, cert.pem, openssl.cnf and env for `registration_id` into `out`.

    `pin` (the PIN itself) goes into `env` only when given; `pin_file` is referenced by path.
    UserError for an unknown device or a missing pkcs11-provider; nothing is written then.
    """
    record = devices.lookup_device(home, registration_id)
    module_path = resolve_module(module, home)  # for SoftHSM also points SOFTHSM2_CONF into home
    provider = find_provider_module()
    softhsm = is_softhsm(module_path)
    pin_path = Path(pin_file).resolve() if pin_file else None
    if pin_path is not None and not pin_path.is_file():
        raise UserError(f"PIN file not found: {pin_path}")
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    uri = key_uri(record)
    paths = OpensslExport(out, out / "key.pem", out / "cert.pem", out / "openssl.cnf", out / "env", uri)
    write_atomic(paths.key_pem, key_pem(uri))
    write_atomic(paths.cert_pem, certificates.to_pem(record.certificate, *record.chain))
    write_atomic(paths.openssl_cnf, openssl_cnf(provider, module_path, softhsm=softhsm, pin_file=pin_path,
                                                pin_from_env=pin is not None))
    softhsm_conf = os.environ.get(ENV_SOFTHSM_CONF) if softhsm else None
    write_atomic(paths.env, env_script(paths.openssl_cnf, softhsm_conf=softhsm_conf, pin_file=pin_path, pin=pin),
                 private=pin is not None)
    return paths

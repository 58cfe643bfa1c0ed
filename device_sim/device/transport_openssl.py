"""DPS over HTTPS through CPython's `ssl`, the client key being the token key via pkcs11-provider.

The alternative to awscrt (`transport_https`) for `device-sim register --tls openssl`; it
implements the same `Transport` seam, so outcomes and exit codes are the same. What it
relies on (OpenSSL 3.0 and pkcs11-provider 1.0 on Debian 12, SoftHSM 2.6; docs/openssl.md):

- `ssl.SSLContext.load_cert_chain(cert, key)` reads the key file through OpenSSL's
  decoders, so a "PKCS#11 PROVIDER URI" PEM (`hsm_setup.openssl_export.key_pem`) loads the
  token key once pkcs11-provider is active; the PIN goes through the password callback,
  so no PIN is ever written to a file or a configuration.
- The provider is activated in this process by loading a configuration into OpenSSL's
  default library context (`OSSL_LIB_CTX_load_config`, called through ctypes on the
  libcrypto `ssl` is linked with): $OPENSSL_CONF is read only once, when the process
  first uses OpenSSL, which is too early to rely on here.
- python-pkcs11 may have initialised and logged into the same module first (the identity
  checks do): the provider's own C_Initialize and C_Login then find both done, so the
  token sees a single login.
- That configuration initialises the module as the provider loads
  (`pkcs11-module-load-behavior = early`): loaded lazily, the provider would verify the
  server's signature in whichever token is the first slot from the second handshake on.
- Both TLS 1.2 and TLS 1.3 work (the emulator's device port speaks both).
- Handshakes are serialised per process (`SIGNING_LOCK`): concurrent signing through
  pkcs11-provider 1.0 on SoftHSM 2.6.1 produced bad signatures (measured, docs/openssl.md).
"""

from __future__ import annotations

import ctypes
import dataclasses
import ctypes.util
import http.client
import socket
import ssl
import tempfile
import threading
from pathlib import Path

from device_sim.common.errors import UserError
from device_sim.device.registration import Response
from device_sim.device.transport import ProtocolFailure, TlsFailure, TransportTimeout, Unreachable
from device_sim.common.dps import DEVICE_API_VERSION
from device_sim.device import registration as reg
from device_sim.device.transport_https import MAX_BODY, USER_AGENT, HttpsTransport
from hsm_setup.module import is_softhsm
from hsm_setup.openssl_export import find_provider_module, key_pem, openssl_cnf

SIGNING_LOCK = threading.Lock()
_loaded: set[str] = set()  # PKCS#11 module paths pkcs11-provider was configured with
_load_lock = threading.Lock()


def _libcrypto():
    name = ctypes.util.find_library("crypto")
    lib = ctypes.CDLL(name) if name else None
    if lib is None or not hasattr(lib, "OSSL_LIB_CTX_load_config"):
        raise UserError("--tls openssl needs OpenSSL 3 (libcrypto.so.3) for pkcs11-provider")
    lib.OpenSSL_version_num.restype = ctypes.c_ulong
    if lib.OpenSSL_version_num() >> 20 != ssl.OPENSSL_VERSION_NUMBER >> 20:
        raise UserError(f"Python's ssl uses {ssl.OPENSSL_VERSION}, not the system libcrypto {name}: "
                        "pkcs11-provider cannot be loaded into it")
    lib.OSSL_LIB_CTX_load_config.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    lib.OSSL_PROVIDER_available.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    return lib


def load_provider(module_path: str) -> None:
    """Activate pkcs11-provider on `module_path` in this process's default OpenSSL context (once)."""
    with _load_lock:
        if module_path in _loaded:
            return
        if _loaded:
            raise UserError(f"pkcs11-provider is already configured with {next(iter(_loaded))} in this "
                            f"process; one PKCS#11 module per process with --tls openssl")
        lib = _libcrypto()
        with tempfile.TemporaryDirectory(prefix="device-sim-openssl-") as folder:
            cnf = Path(folder) / "openssl.cnf"
            cnf.write_text(openssl_cnf(find_provider_module(), module_path, softhsm=is_softhsm(module_path)))
            loaded = lib.OSSL_LIB_CTX_load_config(None, str(cnf).encode())
        if loaded != 1 or lib.OSSL_PROVIDER_available(None, b"pkcs11") != 1:
            raise UserError(f"OpenSSL could not load pkcs11-provider for {module_path} "
                            "(set PKCS11_PROVIDER_DEBUG=file:/dev/stderr to see why)")
        _loaded.add(module_path)


def client_context(module_path: str, key_uri: str, chain_pem: bytes, pin: str | None,
                   trust_pem: bytes | None) -> ssl.SSLContext:
    """A TLS 1.2/1.3 client context presenting `chain_pem` with the token key `key_uri` signing.

    `trust_pem`: CA certificates for the server (the emulator's); None means the system store.
    """
    load_provider(module_path)
    context = ssl.create_default_context(cadata=trust_pem.decode("ascii") if trust_pem else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    with tempfile.TemporaryDirectory(prefix="device-sim-openssl-") as folder:
        key_file, cert_file = Path(folder) / "key.pem", Path(folder) / "cert.pem"
        key_file.write_bytes(key_pem(key_uri))  # a URI, no secret
        cert_file.write_bytes(chain_pem)
        try:
            context.load_cert_chain(cert_file, key_file, password=lambda: pin or "")
        except ssl.SSLError as exc:
            raise UserError(f"OpenSSL could not use the token key {key_uri} with its certificate "
                            f"({exc.reason or exc}): check the URI, the PIN and the certificate") from None
    return context


class _Connection(http.client.HTTPSConnection):
    """HTTPS whose handshake holds SIGNING_LOCK (the client signature is made in it)."""

    def __init__(self, host, port, *, context, server_name, timeout):
        super().__init__(host, port, context=context, timeout=timeout)
        self.server_name = server_name

    def connect(self):
        sock = socket.create_connection((self.host, self.port), self.timeout)
        try:
            tls = self._context.wrap_socket(sock, server_hostname=self.server_name,
                                            do_handshake_on_connect=False)
            with SIGNING_LOCK:
                tls.do_handshake()
        except BaseException:
            sock.close()
            raise
        self.sock = tls


@dataclasses.dataclass(eq=False)
class OpensslHttpsTransport:
    """One device's HTTPS connection to DPS over CPython `ssl`; implements `Transport`."""

    host: str
    port: int
    id_scope: str
    registration_id: str
    tls_context: ssl.SSLContext
    api_version: str = DEVICE_API_VERSION
    server_name: str | None = None
    connection: _Connection | None = dataclasses.field(default=None, init=False)
    connects: int = dataclasses.field(default=0, init=False)

    _base = HttpsTransport._base
    register_path = HttpsTransport.register_path
    poll_path = HttpsTransport.poll_path

    def __post_init__(self):
        self.server_name = self.server_name or self.host

    def connect(self, timeout: float) -> None:
        if self.connection is not None:
            return
        connection = _Connection(self.host, self.port, context=self.tls_context,
                                 server_name=self.server_name, timeout=timeout)
        what = f"connecting to {self.host}:{self.port}"
        try:
            connection.connect()
        except ssl.SSLEOFError:
            raise TlsFailure(f"the server closed the connection during the TLS handshake while {what}",
                             reg.TLS_EOF) from None
        except (ssl.SSLError, ssl.CertificateError) as exc:
            reason = getattr(exc, "verify_message", None) or getattr(exc, "reason", None) or exc
            raise TlsFailure(f"TLS handshake failed while {what}: {reason}") from None
        except (socket.timeout, TimeoutError):
            raise TransportTimeout(f"no TLS session with {self.host}:{self.port} within {timeout:.3g} s",
                                   reg.CONNECT_TIMEOUT) from None
        except OSError as exc:
            # The flow retries what may pass (docs/device.md): say which it was.
            cause = {ConnectionRefusedError: reg.REFUSED, ConnectionResetError: reg.RESET}.get(type(exc), reg.NO_ROUTE)
            raise Unreachable(f"{what} failed: {exc.strerror or exc} (check --endpoint and the network)",
                              cause) from None
        self.connection = connection
        self.connects += 1

    def send_register(self, body: bytes, timeout: float) -> Response:
        headers = {"content-type": "application/json; charset=utf-8"}
        return self._request("PUT", self.register_path(), headers, body, timeout)

    def send_poll(self, operation_id: str, timeout: float) -> Response:
        return self._request("GET", self.poll_path(operation_id), {}, None, timeout)

    def close(self) -> None:
        if self.connection is not None:
            self.connection.close()
            self.connection = None

    def _request(self, method, path, headers, body, timeout) -> Response:
        reused = self.connection is not None
        try:
            return self._round_trip(method, path, headers, body, timeout)
        except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
            self.close()
            # A kept-alive connection the server closed while we waited: nothing was answered.
            if not reused:
                raise ProtocolFailure(f"the server closed the connection before answering {method} "
                                      f"{path.split('?')[0]}", reg.DROPPED) from None
            return self._round_trip(method, path, headers, body, timeout)

    def _round_trip(self, method, path, headers, body, timeout) -> Response:
        self.connect(timeout)
        self.connection.sock.settimeout(timeout)
        what = f"waiting for the answer to {method} {path.split('?')[0]}"
        try:
            self.connection.request(method, path, body=body, headers={
                "user-agent": USER_AGENT, "accept": "application/json", "connection": "keep-alive", **headers})
            answer = self.connection.getresponse()
            data = answer.read(MAX_BODY + 1)
        except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
            raise
        except (socket.timeout, TimeoutError):
            self.close()
            raise TransportTimeout(f"no answer from the server while {what}") from None
        except ssl.SSLError as exc:
            self.close()  # TLS 1.3: a refused client certificate arrives as an alert after the handshake
            raise TlsFailure(f"TLS failed while {what}: {exc.reason or exc}") from None
        except (http.client.HTTPException, OSError) as exc:
            self.close()
            raise ProtocolFailure(f"the server broke the exchange while {what}: {type(exc).__name__}") from None
        if len(data) > MAX_BODY:
            self.close()
            raise ProtocolFailure(f"the answer to {method} {path.split('?')[0]} is too large to be DPS")
        if answer.will_close:
            self.close()
        return Response(answer.status, {k.lower(): v for k, v in answer.getheaders()}, data)

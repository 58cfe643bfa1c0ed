"""DPS over HTTPS with mutual TLS whose client signature is made inside the PKCS#11 token.

awscrt (s2n + aws-c-io) does the TLS: it logs into the token and asks it to sign the
handshake; the private key never leaves the token. Facts this module relies on (checked
against awscrt 0.38 and SoftHSM 2.6, see docs/device.md):

- `cert_file_contents` may hold several PEM certificates: s2n sends all of them, in that
  order, so passing leaf + intermediates (+ root) presents the whole chain.
- The key is found by `private_key_label` (no CKA_ID search); the token by `slot_id` or
  `token_label`. We pass the slot id the identity loader already knows, so creating a
  context does not enumerate every token's label (~15 ms among 100 tokens).
- With PKCS#11 awscrt negotiates TLS 1.2 only. DPS speaks TLS 1.2, so that is enough.
- awscrt's `Pkcs11Lib` DEFAULT behaviour calls C_Initialize and ignores "already
  initialised", so it can share a module python-pkcs11 opened first in the same process.
  But python-pkcs11 initialises with no locking arguments, which makes SoftHSM disable its
  mutexes: then only one thread may use the module at a time (measured: two event-loop
  threads signing concurrently abort the process). `CrtRuntime` therefore uses one
  event-loop thread by default (all signing happens on it). Several threads are safe only
  when awscrt initialised the module (it asks for OS locking) and python-pkcs11 is not used
  in the process.

There is no process-wide runtime: the program's entry point (the register CLI, the fleet
runner) makes one `CrtRuntime` and passes it to every context and transport it creates.
Failures are reported with what happened (`registration.REFUSED`, `TLS_EOF`, `DROPPED`,
...); whether to retry is the flow's decision (docs/device.md).
"""

from __future__ import annotations

import concurrent.futures
import gc
import io as _io
import os
import re
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import quote

from awscrt import exceptions as crt_exceptions
from awscrt import http as crt_http
from awscrt import io as crt_io

from device_sim.common.dps import DEVICE_API_VERSION
from device_sim.device import registration as reg
from device_sim.device.registration import Response
from device_sim.device.transport import (
    ProtocolFailure,
    TlsFailure,
    TransportError,
    TransportTimeout,
    Unreachable,
)
from device_sim.common.errors import UserError

USER_AGENT = "device-sim/0.1"
MAX_BODY = 1 << 20  # DPS messages are at most 96 KB; anything far larger is not DPS


@dataclass(frozen=True)
class TlsIdentity:
    """What the TLS client needs to prove the device's identity with the token key."""

    module_path: str
    key_label: str
    chain_pem: bytes  # leaf first, then the intermediates (and the root if wanted)
    pin: str | None = field(repr=False)  # never in a repr, log or traceback
    slot_id: int | None = None
    token_label: str | None = None


class CrtRuntime:
    """Event loop, resolver, bootstrap and loaded PKCS#11 modules, owned by whoever runs
    the devices (one per CLI run): a fleet shares one runtime and makes one
    `ClientTlsContext` per device."""

    def __init__(self, event_loop_threads: int = 1):
        self.event_loop_threads = event_loop_threads
        self.event_loop_group = crt_io.EventLoopGroup(event_loop_threads)
        self.host_resolver = crt_io.DefaultHostResolver(self.event_loop_group)
        self.bootstrap = crt_io.ClientBootstrap(self.event_loop_group, self.host_resolver)
        self._libs: dict[str, crt_io.Pkcs11Lib] = {}
        self._default: set[str] = set()  # loaded DEFAULT: awscrt never finalises those
        self._lock = threading.Lock()

    def pkcs11_lib(self, module_path: str) -> crt_io.Pkcs11Lib:
        with self._lock:
            lib = self._libs.get(module_path)
            if lib is None:
                if self.event_loop_threads > 1 and initialised_without_locking(module_path):
                    raise UserError(
                        f"{module_path} was initialised by python-pkcs11 in this process, without "
                        "locking: several awscrt event-loop threads would sign concurrently and can crash "
                        "the process; use one event-loop thread, or let awscrt load the module first")
                try:
                    lib = crt_io.Pkcs11Lib(file=module_path)
                except crt_exceptions.AwsCrtError as exc:
                    raise UserError(f"cannot load PKCS#11 module {module_path}: {exc.name}; "
                                    "check --module / PKCS11_MODULE") from None
                self._libs[module_path] = lib
                self._default.add(module_path)
            return lib

    def release_modules(self) -> None:
        """Let go of the loaded modules: one loaded STRICT (`reinitialise`) is finalised once
        the last context on it is gone, now rather than during interpreter shutdown."""
        with self._lock:
            self._libs.clear()

    def reinitialise(self, module_path: str, environment: dict[str, str], *, timeout: float = 60.0) -> None:
        """Initialise `module_path` again with `environment` set first: SoftHSM reads
        $SOFTHSM2_CONF in C_Initialize only, so a fleet loads a few tokens at a time this
        way (device_sim/fleet/token_views.py). Call it when no TLS context is in use.

        The module is loaded STRICT: awscrt calls C_Finalize once the last context on it
        is gone (it may be released on an event-loop thread a moment after its device
        finished), and C_Initialize answers "already initialised" until then. So the
        retry ends only when no session of the previous initialisation is left.
        """
        with self._lock:
            self._libs.pop(module_path, None)
            if module_path in self._default:  # loaded without finalising: never initialised again
                raise UserError(f"{module_path} was loaded for all its tokens in this process already; "
                                "run the fleet in its own process")
        os.environ.update(environment)
        deadline = time.monotonic() + timeout
        while True:
            gc.collect()  # a context kept alive by a reference cycle holds the module too
            try:
                lib = crt_io.Pkcs11Lib(file=module_path, behavior=crt_io.Pkcs11Lib.InitializeFinalizeBehavior.STRICT)
                break
            except (crt_exceptions.AwsCrtError, RuntimeError) as exc:
                name, message = _crt_error(exc)
                if name != "AWS_ERROR_PKCS11_CKR_CRYPTOKI_ALREADY_INITIALIZED":
                    raise UserError(f"cannot load PKCS#11 module {module_path}: {name or exc}; "
                                    "check --module / PKCS11_MODULE") from None
                if time.monotonic() > deadline:
                    raise UserError(f"{module_path} was still in use {timeout:g} s after the last device "
                                    "of a token batch finished; try --token-batch 0") from None
                time.sleep(0.02)
        with self._lock:
            self._libs[module_path] = lib


def initialised_without_locking(module_path: str) -> bool:
    """True when python-pkcs11 initialised `module_path` in this process (it passes no
    C_INITIALIZE_ARGS, so the module may drop its own locks - SoftHSM does)."""
    import pkcs11

    lib = getattr(pkcs11, "_loaded", {}).get(module_path)  # python-pkcs11's per-path cache
    return bool(lib is not None and lib.initialized)


def client_tls_context(identity: TlsIdentity, trust_pem: bytes | None, runtime: CrtRuntime) -> crt_io.ClientTlsContext:
    """A TLS 1.2 client context that signs with the token key and presents `chain_pem`.

    `trust_pem`: CA certificates that may sign the server certificate (the emulator's);
    None means the system trust store (real DPS). `runtime` holds the loaded module.
    """
    options = crt_io.TlsContextOptions.create_client_with_mtls_pkcs11(
        pkcs11_lib=runtime.pkcs11_lib(identity.module_path),
        user_pin=identity.pin,
        slot_id=identity.slot_id,
        token_label=None if identity.slot_id is not None else identity.token_label,
        private_key_label=identity.key_label,
        cert_file_contents=identity.chain_pem,
    )
    options.min_tls_ver = crt_io.TlsVersion.TLSv1_2
    if trust_pem is not None:
        options.override_default_trust_store(trust_pem)
    try:
        return crt_io.ClientTlsContext(options)
    except (crt_exceptions.AwsCrtError, RuntimeError) as exc:
        # awscrt's C extension raises a plain RuntimeError "1081 (AWS_ERROR_...): text"
        # (e.g. a token that went away: CKR_GENERAL_ERROR from C_Login / C_FindObjects).
        name, message = _crt_error(exc)
        if name is None:
            raise
        raise UserError(_context_error(name, message)) from None


_CRT_RUNTIME_ERROR = re.compile(r"^-?\d+ \((AWS_[A-Z0-9_]+)\): ?(.*)$", re.DOTALL)


def _crt_error(exc: Exception) -> tuple[str | None, str]:
    """(awscrt error name, its text); name None for a RuntimeError that is not awscrt's."""
    if isinstance(exc, crt_exceptions.AwsCrtError):
        return exc.name, exc.message
    match = _CRT_RUNTIME_ERROR.match(str(exc))
    return (match.group(1), match.group(2).strip()) if match else (None, str(exc))


def _context_error(name: str, message: str) -> str:
    if "PIN" in name:
        return f"the token refused the PIN ({name}); check --pin-file / PKCS11_PIN"
    if "KEY_NOT_FOUND" in name or "OBJECT" in name:
        return f"the private key was not found on the token ({name}); check the URI's object/id"
    if "PEM" in name or "X509" in name or "CERT" in name:
        return f"the certificate chain could not be loaded ({name})"
    if "PKCS11" in name:
        return f"the token failed while setting up TLS with the device key ({name}): is it still there?"
    return f"cannot set up TLS with the token key: {name}: {message}"


def classify(exc: BaseException, what: str, *, connecting: bool = False) -> TransportError:
    """Map an awscrt error to the transport error (and its cause) the driver understands.

    `connecting`: the error ended a connect + TLS handshake, not a request on an open
    connection. awscrt reports a peer that closes or resets the socket as
    AWS_IO_SOCKET_CLOSED in both phases: during the handshake that is a TLS EOF, after it a
    dropped connection. A reset that breaks a TLS read or write is a reset, not a TLS
    refusal. AWS_IO_TLS_ERROR_NEGOTIATION_FAILURE is ambiguous (an alert, an untrusted
    peer, or a reset before the first read): `tls_rejected` here, which a transport that
    can ask the server again settles with `handshake_failure` (docs/device.md).
    """
    if isinstance(exc, concurrent.futures.TimeoutError):
        return TransportTimeout(f"no answer from the server while {what}")
    if isinstance(exc, TransportError):
        return exc
    name = _crt_error(exc)[0] if isinstance(exc, RuntimeError) else None
    name = name or getattr(exc, "name", type(exc).__name__)
    if "PKCS11" in name:  # the token could not sign the handshake: retrying cannot help
        # (checked first: CKR_SESSION_CLOSED is no socket closing)
        return TlsFailure(f"the token failed to sign the TLS handshake while {what}: {name} "
                          "(is it still there?)", reg.TLS_REJECTED)
    if "REFUSED" in name:
        return Unreachable(f"{what} failed: {name} (check --endpoint and the network)", reg.REFUSED)
    if "RESET" in name or name in _BROKEN_TLS_IO:
        return Unreachable(f"the server reset the connection while {what}: {name}", reg.RESET)
    if "CLOSED" in name or "HANGUP" in name:
        if connecting and "HANGUP" not in name:
            return TlsFailure(f"the server closed the connection during the TLS handshake while {what}: {name}",
                              reg.TLS_EOF)
        # MQTT's hang-up before CONNACK comes after the handshake: the CONNECT was dropped.
        return ProtocolFailure(f"the server closed the connection while {what}: {name}", reg.DROPPED)
    if name == "AWS_IO_DNS_QUERY_FAILED":
        # Not "no such name" (AWS_IO_DNS_INVALID_NAME): the resolver failed for now. awscrt's
        # resolver also answers this for a name it resolved a moment ago, under a burst of
        # failed connections (measured on awscrt 0.38), so it is retried.
        return Unreachable(f"{what} failed: {name} (the name did not resolve this time)", reg.RESOLVE_FAILED)
    if "TLS" in name or "S2N" in name:
        return TlsFailure(f"TLS handshake failed while {what}: {name}")
    if "TIMEOUT" in name:
        return TransportTimeout(f"timed out while {what}: {name}",
                                reg.CONNECT_TIMEOUT if connecting else reg.NO_ANSWER)
    if any(word in name for word in ("DNS", "NO_ROUTE", "NETWORK", "UNREACHABLE", "SOCKET", "ADDRESS")):
        return Unreachable(f"{what} failed: {name} (check --endpoint and the network)")
    return ProtocolFailure(f"the server broke the exchange while {what}: {name}")


# A TLS record that could not be read or written: the socket under it broke (an RST after
# the handshake gives AWS_IO_TLS_ERROR_WRITE_FAILURE on MQTT's CONNECT, measured).
_BROKEN_TLS_IO = {"AWS_IO_TLS_ERROR_WRITE_FAILURE", "AWS_IO_TLS_ERROR_READ_FAILURE"}
NEGOTIATION_FAILURE = "AWS_IO_TLS_ERROR_NEGOTIATION_FAILURE"


def handshake_failure(exc: BaseException, error: TransportError, host: str, port: int,
                      timeout: float) -> TransportError:
    """`error` (classify's), or a retryable cause when an ambiguous handshake failure was
    the peer going away rather than TLS saying no.

    s2n reports an RST that arrives before its first read exactly as it reports an alert:
    AWS_IO_TLS_ERROR_NEGOTIATION_FAILURE (measured on awscrt 0.38: about 1 in 20 connections
    reset at accept). So the server is asked once more with a bare ClientHello: whatever
    answers it (a ServerHello, an alert) speaks TLS, and the failure was TLS's own
    (`tls_rejected`, not retried); a reset, a close or silence is what the flow retries.
    """
    if error.cause != reg.TLS_REJECTED or getattr(exc, "name", None) != NEGOTIATION_FAILURE:
        return error
    gone = peer_gone(host, port, min(timeout, PROBE_TIMEOUT))
    if gone is None:
        return error
    return Unreachable(f"{error} (the server {gone} a second ClientHello: it went away, TLS did not refuse)",
                       gone)


PROBE_TIMEOUT = 2.0


def peer_gone(host: str, port: int, timeout: float) -> str | None:
    """None when something at host:port answers a ClientHello with TLS bytes; else the
    cause of what happened instead (refused, reset, tls_eof, connect_timeout)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # nothing is judged: only whether TLS answers
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing)
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass  # the ClientHello is in `outgoing`
    try:
        with socket.create_connection((host, port), timeout=max(0.05, timeout)) as sock:
            sock.sendall(outgoing.read())
            return None if sock.recv(1) else reg.TLS_EOF
    except ConnectionRefusedError:
        return reg.REFUSED
    except (TimeoutError, socket.timeout):
        return reg.CONNECT_TIMEOUT
    except OSError:
        return reg.RESET


class CrtTransport:
    """What both awscrt transports hold: where DPS is, who the device is, the TLS context
    that signs with its token key, and the runtime whose event loop carries the bytes."""

    def __init__(self, host: str, port: int, id_scope: str, registration_id: str,
                 tls_context: crt_io.ClientTlsContext, *, runtime: CrtRuntime,
                 api_version: str = DEVICE_API_VERSION):
        self.host = host
        self.port = port
        self.id_scope = id_scope
        self.registration_id = registration_id
        self.api_version = api_version
        self.tls_context = tls_context
        self.runtime = runtime
        self.connects = 0


class HttpsTransport(CrtTransport):
    """One device's HTTPS connection to DPS (real or emulated); implements `Transport`."""

    def __init__(self, host: str, port: int, id_scope: str, registration_id: str,
                 tls_context: crt_io.ClientTlsContext, *, runtime: CrtRuntime,
                 api_version: str = DEVICE_API_VERSION, server_name: str | None = None):
        super().__init__(host, port, id_scope, registration_id, tls_context, runtime=runtime,
                         api_version=api_version)
        self.server_name = server_name or host
        self.connection: crt_http.HttpClientConnection | None = None
        self._answered = 0  # answers on the current connection (0: it never carried one)

    # -- paths (docs/device.md, "Requests") -------------------------------------------

    def _base(self) -> str:
        return f"/{quote(self.id_scope, safe='')}/registrations/{quote(self.registration_id, safe='')}"

    def register_path(self) -> str:
        return f"{self._base()}/register?api-version={quote(self.api_version)}"

    def poll_path(self, operation_id: str) -> str:
        return f"{self._base()}/operations/{quote(operation_id, safe='')}?api-version={quote(self.api_version)}"

    # -- Transport ---------------------------------------------------------------------

    def connect(self, timeout: float) -> None:
        if self.connection is not None and self.connection.is_open():
            return
        socket_options = crt_io.SocketOptions()
        socket_options.domain = crt_io.SocketDomain.IPv4 if _is_ipv4(self.host) else crt_io.SocketDomain.IPv6
        socket_options.connect_timeout_ms = max(1, int(min(timeout, 30) * 1000))
        tls_options = self.tls_context.new_connection_options()
        # Also for an IP address: s2n then checks the certificate's IP SAN (without a name it
        # cannot verify the server at all and the handshake fails).
        tls_options.set_server_name(self.server_name)
        future = crt_http.HttpClientConnection.new(
            host_name=self.host, port=self.port, bootstrap=self.runtime.bootstrap,
            socket_options=socket_options, tls_connection_options=tls_options)
        try:
            self.connection = future.result(timeout)
            self._answered = 0
        except concurrent.futures.TimeoutError:
            # A connection that completes after we gave up must not leak.
            future.add_done_callback(_close_late_connection)
            raise TransportTimeout(
                f"no TLS session with {self.host}:{self.port} within {timeout:.3g} s: the server is "
                "silent, or the handshake failed (s2n reports a server certificate it rejects only "
                "after a 10-30 s delay; check --trust)", reg.CONNECT_TIMEOUT) from None
        except BaseException as exc:
            error = classify(exc, f"connecting to {self.host}:{self.port}", connecting=True)
            raise handshake_failure(exc, error, self.host, self.port, timeout) from None
        self.connects += 1

    def send_register(self, body: bytes, timeout: float) -> Response:
        headers = [("content-type", "application/json; charset=utf-8"), ("content-length", str(len(body)))]
        return self._request("PUT", self.register_path(), headers, body, timeout)

    def send_poll(self, operation_id: str, timeout: float) -> Response:
        return self._request("GET", self.poll_path(operation_id), [], b"", timeout)

    def close(self) -> None:
        if self.connection is not None:
            self.connection.close()
            self.connection = None
        self._answered = 0

    # -- one round trip -----------------------------------------------------------------

    def _request(self, method, path, extra_headers, body, timeout) -> Response:
        # A kept-alive connection the server closed while the device waited (its idle
        # timeout can be shorter than Retry-After) is seen closed here, before anything is
        # sent: connect() opens a new one, which is keeping a connection, not a fault, and
        # is not counted. A connection that closed before it carried any answer (right after
        # its handshake) was no kept-alive one: that is reported. Once the request is on its
        # way, a close before any answer is a dropped connection the flow decides about.
        if self.connection is not None and not self._answered and not self.connection.is_open():
            self.close()
            raise ProtocolFailure("the server closed the connection after the TLS handshake, before "
                                  f"{method} {path.split('?')[0]} was sent", reg.DROPPED)
        try:
            return self._round_trip(method, path, extra_headers, body, timeout)
        except _NoAnswer:
            raise ProtocolFailure(f"the server closed the connection before answering {method} "
                                  f"{path.split('?')[0]}", reg.DROPPED) from None

    def _round_trip(self, method, path, extra_headers, body, timeout) -> Response:
        self.connect(timeout)  # no-op while the connection is open: polls reuse it
        headers = crt_http.HttpHeaders([
            ("host", self.server_name if self.port == 443 else f"{self.server_name}:{self.port}"),
            ("user-agent", USER_AGENT),
            ("accept", "application/json"),
            ("connection", "keep-alive"),
            *extra_headers,
        ])
        request = crt_http.HttpRequest(method, path, headers, _io.BytesIO(body) if body else None)
        answer = {"status": None, "headers": {}}
        chunks = bytearray()

        def on_response(http_stream, status_code, headers, **kwargs):
            answer["status"] = status_code
            answer["headers"] = {name.lower(): value for name, value in headers}

        def on_body(http_stream, chunk, **kwargs):
            chunks.extend(chunk)
            if len(chunks) > MAX_BODY:
                raise ValueError("response body too large")

        try:
            stream = self.connection.request(request, on_response, on_body)
            stream.activate()
            stream.completion_future.result(timeout)
        except BaseException as exc:
            self.close()  # a half-read response leaves the connection unusable
            name = _crt_error(exc)[0] if isinstance(exc, RuntimeError) else getattr(exc, "name", "")
            if answer["status"] is None and "CLOSED" in (name or ""):
                raise _NoAnswer() from None
            raise classify(exc, f"waiting for the answer to {method} {path.split('?')[0]}") from None
        self._answered += 1
        return Response(answer["status"], answer["headers"], bytes(chunks))


class _NoAnswer(Exception):
    """The connection closed before any part of the answer arrived."""


def _close_late_connection(future) -> None:
    if future.exception() is None:
        future.result().close()


def _is_ipv4(host: str) -> bool:
    parts = host.split(".")
    return len(parts) == 4 and all(p.isdigit() for p in parts)

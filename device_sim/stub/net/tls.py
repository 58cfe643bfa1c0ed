"""TLS termination for the emulator: its own server identity, pyOpenSSL contexts, and a listener.

Why pyOpenSSL and not the `ssl` module: DPS answers an unknown or missing client certificate
with HTTP 401 / errorCode 401002, not with a TLS alert, so the server must accept any chain
at the TLS layer and hand the application the chain the device actually sent. CPython's
`ssl` can neither accept an unverifiable chain nor return the presented intermediates.

Each connection runs over memory BIOs (`TlsStream`): this module does every socket read
itself, so it can re-arm TCP_QUICKACK before each one (the client's Nagle algorithm waits
for our ACK between its handshake flights; a delayed ACK costs ~40 ms per connection) and
enforce deadlines on a client that connects and then stays silent.

Other front ends (MQTT) reuse `TlsListener` with their own per-connection handler.
"""

from __future__ import annotations

import datetime
import ipaddress
import math
import os
import select
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import SSL

DEFAULT_SERVER_NAMES = ("localhost", "127.0.0.1", "::1")
CA_VALIDITY = datetime.timedelta(days=3650)
SERVER_VALIDITY = datetime.timedelta(days=825)
RENEW_BEFORE = datetime.timedelta(days=30)
READ_CHUNK = 64 * 1024

# The first byte of every TLS connection is a handshake record (content type 22).
TLS_HANDSHAKE_RECORD = 0x16


class TlsClosed(Exception):
    """The peer closed the connection (or sent close_notify)."""


class NotTls(Exception):
    """The first bytes on the port were not a TLS handshake; `data` holds them."""

    def __init__(self, data: bytes):
        super().__init__("client did not start a TLS handshake")
        self.data = data


# --------------------------------------------------------------------------- identity


@dataclass(frozen=True)
class ServerIdentity:
    """Files of the emulator's own server identity, below `<home>/stub/tls/`."""

    ca_cert: Path  # clients trust this file
    cert: Path  # server certificate (leaf only)
    key: Path  # server key (file key: the emulator's own identity, not a device's)


def ensure_server_identity(tls_dir: Path, extra_names: Sequence[str] = ()) -> ServerIdentity:
    """Create the emulator's CA on first start; (re)issue the server certificate when the
    names asked for are not all in it or it is about to expire. The CA is reused, so clients
    keep trusting the same file across restarts."""
    tls_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    identity = ServerIdentity(tls_dir / "ca.pem", tls_dir / "server.pem", tls_dir / "server.key")
    ca_key_path = tls_dir / "ca.key"
    names = _unique([*DEFAULT_SERVER_NAMES, *extra_names])

    if not (identity.ca_cert.exists() and ca_key_path.exists()):
        ca_key, ca_cert = _make_ca()
        _write_private(ca_key_path, _key_pem(ca_key))
        _write_public(identity.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM))
    else:
        ca_key = serialization.load_pem_private_key(ca_key_path.read_bytes(), password=None)
        ca_cert = x509.load_pem_x509_certificate(identity.ca_cert.read_bytes())

    if _server_cert_needs_renewal(identity, ca_cert, names):
        key, cert = _make_server_cert(ca_key, ca_cert, names)
        _write_private(identity.key, _key_pem(key))
        _write_public(identity.cert, cert.public_bytes(serialization.Encoding.PEM))
    return identity


def _unique(items: Sequence[str]) -> list[str]:
    seen: dict[str, None] = {}
    for item in items:
        seen.setdefault(item.strip().lower(), None)
    return [item for item in seen if item]


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _make_ca() -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "device-sim"),
        x509.NameAttribute(NameOID.COMMON_NAME, "device-sim local DPS emulator CA"),
    ])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _san_entries(names: Sequence[str]) -> list[x509.GeneralName]:
    entries: list[x509.GeneralName] = []
    for name in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return entries


def _make_server_cert(ca_key, ca_cert: x509.Certificate, names: Sequence[str]):
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(min(now + SERVER_VALIDITY, ca_cert.not_valid_after_utc))
        .add_extension(x509.SubjectAlternativeName(_san_entries(names)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


def _server_cert_needs_renewal(identity: ServerIdentity, ca_cert: x509.Certificate, names) -> bool:
    if not (identity.cert.exists() and identity.key.exists()):
        return True
    try:
        cert = x509.load_pem_x509_certificate(identity.cert.read_bytes())
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, x509.ExtensionNotFound):
        return True
    if cert.issuer != ca_cert.subject:
        return True
    if cert.not_valid_after_utc - _now() < RENEW_BEFORE:
        return True
    have = set(san)
    return not all(entry in have for entry in _san_entries(names))


def _key_pem(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _write_private(path: Path, data: bytes) -> None:
    """Write a secret atomically, readable by the owner only (never world-readable, not even briefly)."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _write_public(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- contexts


def _accept_any_chain(conn, cert, errno, depth, ok) -> bool:
    # The decision engine judges the chain after the handshake and answers with a DPS error;
    # the TLS layer must not reject anything, or the device would see an alert instead.
    return True


def _base_context(identity: ServerIdentity) -> SSL.Context:
    context = SSL.Context(SSL.TLS_METHOD)
    context.set_min_proto_version(SSL.TLS1_2_VERSION)
    context.set_max_proto_version(SSL.TLS1_3_VERSION)
    context.use_certificate_chain_file(str(identity.cert))
    context.use_privatekey_file(str(identity.key))
    context.check_privatekey()
    # No session resumption: a resumed session carries no peer chain, and every connection
    # must show the emulator the chain the device presents now.
    context.set_options(SSL.OP_NO_TICKET | SSL.OP_NO_COMPRESSION)
    context.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    return context


def device_context(identity: ServerIdentity) -> SSL.Context:
    """Context for device ports: asks every client for a certificate and accepts any chain
    (or none); `presented_chain` then returns what was sent."""
    context = _base_context(identity)
    context.set_verify(SSL.VERIFY_PEER, _accept_any_chain)
    # OpenSSL's own chain check is thrown away (the callback accepts everything) but still
    # costs a signature verification per link, ~0.3 ms per handshake. Depth 0 stops its
    # chain building at the leaf. The decision engine checks every link of the chain as
    # presented; the peer chain OpenSSL keeps is the one received, whatever the depth, and
    # the client's CertificateVerify (proof of the leaf key) is checked regardless.
    context.set_verify_depth(0)
    return context


def service_context(identity: ServerIdentity) -> SSL.Context:
    """Context for the service API: server authentication only (callers use SAS tokens)."""
    return _base_context(identity)


def presented_chain(conn: SSL.Connection) -> list[x509.Certificate]:
    """The client's chain as sent: leaf first, then the extra certificates in wire order.

    OpenSSL's SSL_get_peer_cert_chain() leaves the leaf out on the server side, so it is
    put in front here; if a build ever returns it included, it is not duplicated.
    """
    leaf = conn.get_peer_certificate(as_cryptography=True)
    if leaf is None:
        return []
    rest = conn.get_peer_cert_chain(as_cryptography=True) or []
    if rest and rest[0] == leaf:
        return list(rest)
    return [leaf, *rest]


# --------------------------------------------------------------------------- sockets


def tune_socket(sock: socket.socket, quickack: bool = True) -> None:
    """Answer small writes at once: no Nagle delay on our flights, no delayed ACK on theirs."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if quickack:
        _quickack(sock)


def _quickack(sock: socket.socket) -> None:
    # Linux clears TCP_QUICKACK on its own after a while, so it is re-armed before every read.
    option = getattr(socket, "TCP_QUICKACK", None)
    if option is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, option, 1)
        except OSError:
            pass


class TlsStream:
    """One server-side TLS connection: handshake, recv, sendall, close, all with deadlines."""

    def __init__(self, sock: socket.socket, context: SSL.Context, quickack: bool = True,
                 turn: threading.Lock | None = None):
        self.sock = sock
        self.turn = turn  # held while working, let go while waiting (see TlsListener)
        # Non-blocking, with the deadlines kept by poll() here: a socket timeout would cost
        # an ioctl per settimeout() and a poll() before every send and recv.
        sock.setblocking(False)
        self._poll = select.poll()
        self._poll.register(sock, select.POLLIN)
        self.conn = SSL.Connection(context, None)
        self.conn.set_accept_state()
        self.quickack = quickack
        self.write_timeout = 10.0

    def handshake(self, timeout: float) -> None:
        """Run the server handshake; raises NotTls, TlsClosed, TimeoutError, SSL.Error, OSError."""
        deadline = time.monotonic() + timeout
        first = True
        while True:
            try:
                self.conn.do_handshake()
                self._flush()
                return
            except SSL.WantReadError:
                self._flush()
                data = self._read_socket(deadline)
                if first and data[0] != TLS_HANDSHAKE_RECORD:
                    raise NotTls(data)
                first = False
                self.conn.bio_write(data)

    def presented_chain(self) -> list[x509.Certificate]:
        return presented_chain(self.conn)

    def recv(self, size: int, timeout: float) -> bytes:
        """Up to `size` bytes of application data; b"" when the peer closed cleanly."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self.conn.recv(size)
            except SSL.WantReadError:
                self._flush()  # e.g. TLS 1.3 key update replies
                try:
                    self.conn.bio_write(self._read_socket(deadline))
                except TlsClosed:
                    return b""
            except SSL.ZeroReturnError:
                return b""

    def sendall(self, data: bytes) -> None:
        # The write BIO is an unbounded memory buffer, so SSL_write takes everything at once.
        self.conn.sendall(data)
        self._flush()

    def close(self) -> None:
        """Send close_notify if possible, then close the socket; never raises."""
        try:
            self.conn.shutdown()
            self._flush()
        except Exception:
            pass
        close_socket(self.sock)

    def _read_socket(self, deadline: float) -> bytes:
        if self.quickack:
            _quickack(self.sock)  # before the wait, so the data we wait for is ACKed at once
        while True:
            try:
                data = self.sock.recv(READ_CHUNK)
                break
            except BlockingIOError:
                self._wait(select.POLLIN, deadline, "client too slow")
            except OSError:
                if self.sock.fileno() == -1:  # TlsListener.close() cut this connection
                    raise TlsClosed() from None
                raise
        if not data:
            raise TlsClosed()
        return data

    def _flush(self) -> None:
        # A memory BIO hands out everything it holds up to the size asked for, so a read
        # shorter than that emptied it: no second read (and no WantReadError) is needed.
        chunks = []
        while True:
            try:
                chunk = self.conn.bio_read(READ_CHUNK)
            except SSL.WantReadError:
                break
            chunks.append(chunk)
            if len(chunk) < READ_CHUNK:
                break
        if chunks:
            self._send_all(b"".join(chunks) if len(chunks) > 1 else chunks[0])

    def _send_all(self, data: bytes) -> None:
        deadline = time.monotonic() + self.write_timeout
        view = memoryview(data)
        while view:
            try:
                view = view[self.sock.send(view):]
            except BlockingIOError:
                self._wait(select.POLLOUT, deadline, "client not reading")

    def _wait(self, event: int, deadline: float, why: str) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(why)
        if event != select.POLLIN:
            self._poll.modify(self.sock, event)
        if self.turn is not None:
            self.turn.release()
        try:
            ready = self._poll.poll(max(1, math.ceil(remaining * 1000)))
        finally:
            if self.turn is not None:
                self.turn.acquire()
            if event != select.POLLIN:
                self._poll.modify(self.sock, select.POLLIN)
        if not ready and time.monotonic() >= deadline:
            raise TimeoutError(why)


def close_socket(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass


# --------------------------------------------------------------------------- listener


@dataclass
class Limits:
    """Deadlines and bounds that keep one bad client from hurting the others."""

    handshake_timeout: float = 10.0
    idle_timeout: float = 60.0  # between requests on a kept-alive connection
    request_timeout: float = 15.0  # to receive one whole request once it has started
    max_connections: int = 512


ConnectionHandler = Callable[[TlsStream], None]
PlainHandler = Callable[[socket.socket, bytes], None]


class TlsListener:
    """A TCP listener that terminates TLS and runs `handler(stream)` in a thread per connection.

    Threads are bounded by `limits.max_connections`; pyOpenSSL releases the GIL inside
    OpenSSL, so handshakes of different connections run in parallel. `on_not_tls` may answer
    a client that spoke plain text to the TLS port (e.g. a plain-HTTP hint).

    The threads are reused: each one blocks in accept() itself, serves the connection it
    got, and goes back to accept(). A new thread is started only when a connection is taken
    and no other thread is left waiting in accept(). Against a thread started per
    connection this saves the thread creation and the accept-thread-to-worker hand-off
    (two context switches) on every connection. The kernel wakes one blocked accept() per
    connection (no thundering herd); close() wakes them all with shutdown().
    """

    def __init__(
        self,
        name: str,
        scheme: str,
        host: str,
        port: int,
        context: SSL.Context,
        handler: ConnectionHandler,
        limits: Limits | None = None,
        on_not_tls: PlainHandler | None = None,
        url_host: str | None = None,
        log: Callable[[str], None] | None = None,
        quickack: bool = True,
        one_at_a_time: bool = False,
    ):
        self.name = name
        # one_at_a_time: the connection threads take turns (a lock held while a thread
        # works, let go while it waits for its client), so only one of them runs Python at
        # a time. Why: pyOpenSSL and sqlite3 release the GIL around every C call; with
        # dozens of runnable threads each release hands the GIL to another thread, a
        # futex wake and a context switch, ~100 per registration measured. Taking turns
        # leaves a handful of hand-offs per registration, like an event loop would.
        # Only for handlers that never block except in TlsStream reads and writes.
        self._turn = threading.Lock() if one_at_a_time else None
        self.quickack = quickack  # off only to measure what it buys (bench/bench_stub.py)
        self.scheme = scheme
        self.context = context
        self.handler = handler
        self.limits = limits or Limits()
        self.on_not_tls = on_not_tls
        self.log = log or _log_stderr
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._sock = socket.socket(family, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, port))
        self._sock.listen(1024)
        self.port = self._sock.getsockname()[1]
        shown = url_host or host
        if ":" in shown:
            shown = f"[{shown}]"
        self.url = f"{scheme}://{shown}:{self.port}"
        self._stop = threading.Event()
        self._pool_lock = threading.Lock()
        self._threads: set[threading.Thread] = set()
        self._waiting = 0  # threads blocked in accept()
        self._active: set[socket.socket] = set()
        self._active_lock = threading.Lock()
        self._started = False

    def start(self) -> None:
        """Start the first accepting thread (a second call does nothing)."""
        with self._pool_lock:
            if self._started:
                return
            self._started = True
        self._spawn()

    def close(self) -> None:
        """Stop accepting and cut every open connection; returns when the threads ended."""
        self._stop.set()
        try:
            self._sock.shutdown(socket.SHUT_RDWR)  # wakes every thread blocked in accept()
        except OSError:
            pass
        with self._active_lock:
            active = list(self._active)
        for sock in active:
            close_socket(sock)
        deadline = time.monotonic() + 5
        with self._pool_lock:
            threads = list(self._threads)
        for thread in threads:
            if thread is not threading.current_thread():
                thread.join(timeout=max(0.0, deadline - time.monotonic()))
        close_socket(self._sock)

    def _spawn(self) -> None:
        """Start one more thread that waits in accept(); counted as waiting from now on."""
        with self._pool_lock:
            if self._stop.is_set() or len(self._threads) >= self.limits.max_connections:
                return
            thread = threading.Thread(target=self._serve_loop, name=f"{self.name}-conn", daemon=True)
            self._threads.add(thread)
            self._waiting += 1
        thread.start()

    def _serve_loop(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    sock, _ = self._sock.accept()
                except OSError as exc:
                    if self._stop.is_set():
                        return
                    self.log(f"{self.name}: accept failed: {exc}")
                    time.sleep(0.05)
                    continue
                with self._pool_lock:
                    self._waiting -= 1
                    grow = self._waiting == 0
                if grow:
                    self._spawn()  # keep one thread in accept() while this one serves
                with self._active_lock:
                    self._active.add(sock)
                if self._stop.is_set():
                    close_socket(sock)  # close() may have missed it
                    with self._active_lock:
                        self._active.discard(sock)
                    return
                self._run(sock)
                with self._pool_lock:
                    self._waiting += 1
        finally:
            with self._pool_lock:
                self._waiting -= 1
                self._threads.discard(threading.current_thread())

    def _run(self, sock: socket.socket) -> None:
        if self._turn is not None:
            self._turn.acquire()
        try:
            self._serve_connection(sock)
        finally:
            if self._turn is not None:
                self._turn.release()

    def _serve_connection(self, sock: socket.socket) -> None:
        stream = None
        try:
            tune_socket(sock, self.quickack)
            stream = TlsStream(sock, self.context, self.quickack, self._turn)
            try:
                stream.handshake(self.limits.handshake_timeout)
            except NotTls as exc:
                if self.on_not_tls is not None:
                    self._outside_turn(self.on_not_tls, sock, exc.data)  # blocking send
                return
            except (TlsClosed, TimeoutError, socket.timeout, SSL.Error, OSError):
                return  # garbage, silence or a reset during the handshake: just drop it
            self.handler(stream)
        except Exception as exc:  # a bug must not kill the server or leak a traceback to a client
            self.log(f"{self.name}: connection failed: {type(exc).__name__}: {exc}")
        finally:
            if stream is not None:
                stream.close()
            else:
                close_socket(sock)
            with self._active_lock:
                self._active.discard(sock)

    def _outside_turn(self, function, *args) -> None:
        if self._turn is None:
            function(*args)
            return
        self._turn.release()
        try:
            function(*args)
        finally:
            self._turn.acquire()


def _log_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)

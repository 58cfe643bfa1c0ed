"""A threaded TCP listener that terminates TLS and hands each connection to a front end.

Every front end (HTTPS device and service API, MQTT) is a `TlsListener` with its own
per-connection handler; `Limits` holds the deadlines and bounds they share.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import struct
import threading
import time
from dataclasses import dataclass
from typing import Callable

from OpenSSL import SSL

from device_sim.stub.net.log import log_stderr
from device_sim.stub.net.tls_stream import NotTls, TlsClosed, TlsStream, close_socket, tune_socket

# Wake one waiter per connection; older kernels without it still work, with a herd.
EPOLLEXCLUSIVE = getattr(select, "EPOLLEXCLUSIVE", 0)


@dataclass
class Limits:
    """Deadlines and bounds that keep one bad client from hurting the others."""

    handshake_timeout: float = 10.0
    idle_timeout: float = 60.0  # between requests on a kept-alive connection
    request_timeout: float = 15.0  # to receive one whole request once it has started
    max_connections: int = 512
    # A connection thread left waiting for this long exits (the last one stays), so the
    # threads, and their stacks, of a flood are released once it is over.
    spare_thread_timeout: float = 30.0
    # `stub serve --workers N`: every worker process binds the same ports with SO_REUSEPORT
    # and the kernel spreads new connections over their sockets (docs/scaling.md).
    # "first": the first worker, which must find the port free; "join": the others.
    share_port: str = ""


class ListenError(OSError):
    """A listener could not take its address; `reason` says why in a few words."""

    def __init__(self, name: str, host: str, port: int, cause: OSError):
        if cause.errno == errno.EADDRINUSE:
            reason = "is in use"
        elif cause.errno == errno.EACCES:
            reason = "needs privileges (below 1024: root or CAP_NET_BIND_SERVICE)"
        else:
            reason = f"cannot be used ({cause.strerror or cause})"
        super().__init__(cause.errno, f"port {port} {reason}: cannot listen on {host}:{port} ({name})")
        self.name, self.host, self.port, self.reason = name, host, port, reason


def _bound_socket(name: str, host: str, port: int, share_port: str = "") -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    if share_port == "first" and port:
        _probe_free(name, family, host, port)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if share_port:
            # Set on the first socket too: Linux lets a socket join a port only when every
            # socket on it asked for sharing, and only for the same user.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(1024)
    except OSError as exc:
        sock.close()
        raise ListenError(name, host, port, exc) from None
    return sock


def _probe_free(name: str, family: int, host: str, port: int) -> None:
    """EADDRINUSE when another socket holds the port, even one that shares it: with
    SO_REUSEPORT alone, a second emulator of the same user would silently take half the
    connections of the first."""
    probe = socket.socket(family, socket.SOCK_STREAM)
    try:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((host, port))
    except OSError as exc:
        raise ListenError(name, host, port, exc) from None
    finally:
        probe.close()


def reset_socket(sock: socket.socket) -> None:
    """Close with an RST instead of a FIN (SO_LINGER 0, and no shutdown first)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    except OSError:
        pass


def pause(stream: TlsStream, seconds: float) -> None:
    """Sleep without holding the listener's turn (a fault plan's latency)."""
    turn = stream.turn
    if turn is not None:
        turn.release()
    try:
        time.sleep(seconds)
    finally:
        if turn is not None:
            turn.acquire()


def _stay_silent(sock: socket.socket, seconds: float) -> None:
    """Read and drop what the client sends, answer nothing, until it leaves or time is up."""
    deadline = time.monotonic() + seconds
    sock.setblocking(True)
    while (remaining := deadline - time.monotonic()) > 0:
        sock.settimeout(remaining)
        try:
            if not sock.recv(65536):
                return
        except (TimeoutError, socket.timeout, OSError):
            return


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
    (two context switches) on every connection. A thread that waited
    `limits.spare_thread_timeout` without a connection exits, unless it is the last one.

    Each thread waits in its own epoll with EPOLLEXCLUSIVE on the listening socket, so the
    kernel wakes one waiter per connection (no thundering herd) and the wait can time out;
    close() wakes them all through a pipe registered in every one of them.
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
        faults=None,
        transport: str | None = None,
    ):
        """`faults` (core.faults.Faults) with `transport` ("https", "mqtt", ...): the plan
        asked once per accepted connection; None for listeners no plan may spoil."""
        self.name = name
        self.faults = faults if transport else None
        self.transport = transport
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
        self.log = log or log_stderr
        self._sock = _bound_socket(name, host, port, self.limits.share_port)
        self.accepted = 0  # connections taken by this process (`stub status` per worker)
        self._sock.setblocking(False)  # threads wait in epoll; a lost race to accept is EAGAIN
        self._wake_read, self._wake_write = os.pipe()
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
            os.write(self._wake_write, b"x")  # wakes every waiting thread; never read
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
        for fd in (self._wake_read, self._wake_write):
            try:
                os.close(fd)
            except OSError:
                pass

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
        waiter = select.epoll()
        try:
            waiter.register(self._sock.fileno(), select.EPOLLIN | EPOLLEXCLUSIVE)
            waiter.register(self._wake_read, select.EPOLLIN)
            while not self._stop.is_set():
                sock = self._next_connection(waiter)
                if sock is None:
                    if self._stop.is_set() or self._retire():
                        return
                    continue
                with self._pool_lock:
                    self._waiting -= 1
                    self.accepted += 1
                    grow = self._waiting == 0
                if grow:
                    self._spawn()  # keep one thread waiting while this one serves
                with self._active_lock:
                    self._active.add(sock)
                if self._stop.is_set():
                    close_socket(sock)  # close() may have missed it
                    with self._active_lock:
                        self._active.discard(sock)
                    with self._pool_lock:
                        self._waiting += 1
                    return
                self._run(sock)
                with self._pool_lock:
                    self._waiting += 1
        finally:
            waiter.close()
            with self._pool_lock:
                if threading.current_thread() in self._threads:
                    self._waiting -= 1
                    self._threads.discard(threading.current_thread())

    def _next_connection(self, waiter) -> socket.socket | None:
        """A new connection, or None after a spare-thread timeout, a lost race or close()."""
        if not waiter.poll(self.limits.spare_thread_timeout):
            return None
        try:
            sock, _ = self._sock.accept()
        except (BlockingIOError, InterruptedError):
            return None  # another thread took it (EPOLLEXCLUSIVE may wake more than one)
        except OSError as exc:
            if not self._stop.is_set():
                self.log(f"{self.name}: accept failed: {exc}")
                time.sleep(0.05)
            return None
        # Left as accept() made it (blocking at the OS level, so no extra syscall here):
        # TlsStream and the plain-text hint set the mode they need.
        return sock

    def _retire(self) -> bool:
        """After a wait without a connection: exit when another thread is waiting too."""
        with self._pool_lock:
            if self._waiting <= 1:
                return False
            self._waiting -= 1
            self._threads.discard(threading.current_thread())
            return True

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
            fault = None if self.faults is None else self.faults.on_connection(self.transport)
            if fault is not None and self._spoil_before_tls(sock, fault):
                return
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
            if fault is not None and fault.reset == "after_tls":
                reset_socket(sock)
                return
            if fault is not None and fault.close == "after_tls":
                return  # the finally clause closes it (close_notify, then FIN)
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

    def _spoil_before_tls(self, sock: socket.socket, fault) -> bool:
        """Carry out a connection-level fault that comes before TLS; True when it took the connection."""
        if fault.refuse or fault.reset == "before_tls":
            # The kernel accepted already, so an outage is a reset the client sees at once.
            reset_socket(sock)
            return True
        if fault.close == "before_tls":
            close_socket(sock)
            return True
        if fault.silent_s is not None:
            self._outside_turn(_stay_silent, sock, fault.silent_s)
            close_socket(sock)
            return True
        return False

    def _outside_turn(self, function, *args) -> None:
        if self._turn is None:
            function(*args)
            return
        self._turn.release()
        try:
            function(*args)
        finally:
            self._turn.acquire()

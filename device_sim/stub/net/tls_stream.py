"""One server-side TLS connection over memory BIOs, with deadlines (`TlsStream`).

This module does every socket read itself, so it can re-arm TCP_QUICKACK before each one
(the client's Nagle algorithm waits for our ACK between its handshake flights; a delayed
ACK costs ~40 ms per connection) and enforce deadlines on a client that connects and then
stays silent.
"""

from __future__ import annotations

import math
import select
import socket
import threading
import time

from cryptography import x509
from OpenSSL import SSL

from device_sim.stub.net.tls_context import presented_chain

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

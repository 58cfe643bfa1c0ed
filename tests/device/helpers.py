"""Test helper for the device area: a loopback TLS server that plays a misbehaving DPS.

Device keys come from the shared SoftHSM fixture (`token_pki` in tests/conftest.py); the
server's certificate from a `device_sim.testing.TestCA`. The server is pyOpenSSL, accepts
any client chain and records what the client presented.
"""

from __future__ import annotations

import socket
import threading
import time

from cryptography import x509
from OpenSSL import SSL, crypto

from device_sim.testing import LeafCert


class LoopbackTlsServer:
    """A TLS 1.2 server on 127.0.0.1 that accepts any client chain.

    mode "http": answers each request from `responses` (list of raw HTTP bytes; the last
    repeats); "silent": completes nothing after accept; "garbage": handshakes, then
    answers any request with non-HTTP bytes; "silent-after-tls": handshakes, never answers.
    """

    def __init__(self, identity: LeafCert, mode="http", responses=(), close_after_answer=False):
        self.mode = mode
        self.close_after_answer = close_after_answer  # like a server whose keep-alive idle timeout hit
        self.responses = list(responses)
        self.presented: list[list[x509.Certificate]] = []
        self.requests: list[bytes] = []
        self.connections = 0
        self._ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
        self._ctx.use_certificate(crypto.X509.from_cryptography(identity.cert))
        self._ctx.use_privatekey(crypto.PKey.from_cryptography_key(identity.key))
        self._ctx.set_verify(SSL.VERIFY_PEER, lambda *args: True)
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(16)
        self.port = self._sock.getsockname()[1]
        self._open: list[socket.socket] = []
        self._closing = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self._closing:
            try:
                sock, _ = self._sock.accept()
            except OSError:
                return
            self._open.append(sock)
            self.connections += 1
            threading.Thread(target=self._handle, args=(sock,), daemon=True).start()

    def _handle(self, sock):
        if self.mode == "silent":
            return  # keep the socket open, say nothing
        conn = SSL.Connection(self._ctx, sock)
        conn.set_accept_state()
        try:
            conn.do_handshake()
            peer = conn.get_peer_certificate()
            chain = [peer.to_cryptography()] if peer else []
            chain += [c.to_cryptography() for c in (conn.get_peer_cert_chain() or [])]
            self.presented.append(chain)
            while True:
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    data += chunk
                head, _, rest = data.partition(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    key, _, value = line.partition(b":")
                    if key.strip().lower() == b"content-length":
                        length = int(value)
                while len(rest) < length:
                    rest += conn.recv(65536)
                self.requests.append(head + b"\r\n\r\n" + rest)
                if self.mode == "silent-after-tls":
                    continue
                if self.mode == "garbage":
                    conn.sendall(b"\x00\x01garbage that is not HTTP\r\n\r\n")
                    continue
                answer = self.responses.pop(0) if len(self.responses) > 1 else self.responses[0]
                conn.sendall(answer)
                if self.close_after_answer:
                    time.sleep(0.05)
                    sock.close()
                    return
        except (SSL.Error, OSError):
            return

    def close(self):
        self._closing = True
        self._sock.close()
        for sock in self._open:
            try:
                sock.close()
            except OSError:
                pass


def http_response(status, body=b"", **headers):
    reason = {200: "OK", 202: "Accepted", 401: "Unauthorized", 429: "Too Many Requests"}.get(status, "X")
    lines = [f"HTTP/1.1 {status} {reason}", f"Content-Length: {len(body)}",
             "Content-Type: application/json"]
    lines += [f"{k.replace('_', '-')}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body

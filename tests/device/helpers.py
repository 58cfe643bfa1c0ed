"""Test helpers for the device area: certificates from in-memory CAs, a loopback TLS server.

Device keys come from the shared SoftHSM fixture (`token_pki` in tests/conftest.py); the
in-memory CAs here only make server certificates and certificates for pure chain tests.
The server is pyOpenSSL, accepts any client chain and records what the client presented.
"""

from __future__ import annotations

import datetime
import socket
import threading
import time
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import SSL


def now():
    return datetime.datetime.now(datetime.timezone.utc)


def name(cn):
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def issue(subject, public_key, issuer_cert, issuer_key, *, ca, days=30, start=None, eku=True):
    start = start or now() - datetime.timedelta(hours=1)
    builder = (x509.CertificateBuilder()
               .subject_name(name(subject))
               .issuer_name(issuer_cert.subject if issuer_cert is not None else name(subject))
               .public_key(public_key)
               .serial_number(x509.random_serial_number())
               .not_valid_before(start)
               .not_valid_after(start + datetime.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        builder = builder.add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False), True)
    else:
        builder = builder.add_extension(x509.KeyUsage(True, False, True, False, False, False, False, False, False), True)
        if eku:
            builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False)
    return builder.sign(issuer_key, hashes.SHA256())


def pem(*certs):
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


@dataclass
class FilePki:
    root_key: object
    root: x509.Certificate
    inter_key: object
    inter: x509.Certificate

    @classmethod
    def create(cls, prefix="test"):
        root_key = ec.generate_private_key(ec.SECP256R1())
        root = issue(f"{prefix}-root", root_key.public_key(), None, root_key, ca=True)
        inter_key = ec.generate_private_key(ec.SECP256R1())
        inter = issue(f"{prefix}-intermediate", inter_key.public_key(), root, root_key, ca=True)
        return cls(root_key, root, inter_key, inter)


class LoopbackTlsServer:
    """A TLS 1.2 server on 127.0.0.1 that accepts any client chain.

    mode "http": answers each request from `responses` (list of raw HTTP bytes; the last
    repeats); "silent": completes nothing after accept; "garbage": handshakes, then
    answers any request with non-HTTP bytes; "silent-after-tls": handshakes, never answers.
    """

    def __init__(self, server_cert, server_key, mode="http", responses=(), close_after_answer=False):
        self.mode = mode
        self.close_after_answer = close_after_answer  # like a server whose keep-alive idle timeout hit
        self.responses = list(responses)
        self.presented: list[list[x509.Certificate]] = []
        self.requests: list[bytes] = []
        self.connections = 0
        self._ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
        self._ctx.use_certificate(server_cert if not isinstance(server_cert, x509.Certificate)
                                  else _crypto_cert(server_cert))
        self._ctx.use_privatekey(_crypto_key(server_key))
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


def _crypto_cert(cert):
    from OpenSSL import crypto
    return crypto.X509.from_cryptography(cert)


def _crypto_key(key):
    from OpenSSL import crypto
    return crypto.PKey.from_cryptography_key(key)


def server_identity(pki: FilePki, host="localhost"):
    """A server certificate for `host` (and 127.0.0.1) issued by the test root."""
    import ipaddress
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(name(host)).issuer_name(pki.root.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now() - datetime.timedelta(hours=1))
            .not_valid_after(now() + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName(host), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .sign(pki.root_key, hashes.SHA256()))
    return cert, key

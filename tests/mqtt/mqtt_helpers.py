"""A raw MQTT client for the MQTT tests: our codec over CPython ssl, file keys (the device
side's tests use a real SoftHSM token key)."""

from __future__ import annotations

import socket
import ssl
import time
from pathlib import Path

from device_sim.mqtt.codec import Decoder, Packet, encode


class RawClient:
    """An MQTT client that is only our codec over CPython ssl: sends exactly what a test says."""

    def __init__(self, port: int, ca_cert: Path, identity: tuple[Path, Path] | None, timeout: float = 5.0):
        context = ssl.create_default_context(cafile=str(ca_cert))
        if identity is not None:
            context.load_cert_chain(str(identity[0]), str(identity[1]))
        raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock = context.wrap_socket(raw, server_hostname="localhost")
        self.decoder = Decoder(max_packet_size=1 << 24)
        self.pending: list[Packet] = []

    def send(self, *packets: Packet) -> None:
        self.sock.sendall(b"".join(encode(p) for p in packets))

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def receive(self, timeout: float = 5.0) -> Packet | None:
        """The next packet, or None when the server closed the connection."""
        deadline = time.monotonic() + timeout
        while not self.pending:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data = self.sock.recv(65536)
            except (ConnectionResetError, ssl.SSLEOFError):
                return None
            if not data:
                return None
            self.pending += self.decoder.feed(data)
        return self.pending.pop(0)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

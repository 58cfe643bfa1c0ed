"""The emulator's MQTT front end: DPS over MQTT 3.1.1 on TLS, driving the same `DeviceApi`.

`serve_mqtt` is the only I/O loop: bytes from a `TlsStream` through the codec into the
sans-IO `DpsMqttSession` (`net/mqtt_session.py`), answers back out. `mqtt_listener` puts it
on a `TlsListener` (thread per connection), so one client's garbage, silence or crash never
touches another. docs/emulator.md ("MQTT") lists what each packet gets.
"""

from __future__ import annotations

import time
from typing import Callable

from OpenSSL import SSL

from device_sim.mqtt.codec import DEFAULT_MAX_PACKET_SIZE, Decoder, ProtocolError, encode
from device_sim.stub.net.listener import Limits, TlsListener, pause, reset_socket
from device_sim.stub.net.log import log_stderr
from device_sim.stub.net.mqtt_session import DpsMqttSession, SessionClosed
from device_sim.stub.net.tls_context import UnreadablePeerChain, device_context

READ_CHUNK = 64 * 1024
# MQTT 3.1.1 §3.1.2.10: the server drops a client silent for one and a half keep-alives.
KEEP_ALIVE_FACTOR = 1.5
# A client that asked for no keep-alive (0) is still dropped after this much silence.
MAX_SILENCE = 300.0
DEFAULT_PORT = 8883  # the official SDKs always dial 8883


def serve_mqtt(stream, api, limits: Limits, max_packet_size: int = DEFAULT_MAX_PACKET_SIZE,
               log: Callable[[str], None] | None = None) -> None:
    """Run one device connection to its end; the caller closes the stream afterwards."""
    try:
        chain = stream.presented_chain()
    except UnreadablePeerChain:
        chain = []  # an unreadable certificate authenticates nobody: CONNACK refuses it
    try:
        session = DpsMqttSession(api, chain, faults=getattr(api, "faults", None))
        _serve(stream, session, Decoder(max_packet_size), limits, log)
    except (OSError, SSL.Error):
        return  # the peer vanished mid-answer (reset, broken pipe): nothing left to tell it


def _serve(stream, session: DpsMqttSession, decoder: Decoder, limits: Limits, log) -> None:
    # Deadlines are absolute, not per read: a client trickling one byte at a time must still
    # complete CONNECT within request_timeout, and afterwards a whole packet within each
    # keep-alive window (MQTT 3.1.1 §3.1.2.10 counts control packets, not bytes).
    deadline = time.monotonic() + limits.request_timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return  # keep-alive expired, or no CONNECT in time
        try:
            data = stream.recv(READ_CHUNK, remaining)
        except TimeoutError:
            return
        if not data:
            return
        decoder.receive_data(data)
        received = False
        try:
            while (packet := decoder.next_packet()) is not None:
                received = True
                answer = session.receive(packet)
                _wait(stream, session)
                stream.sendall(b"".join(encode(p) for p in answer))
        except ProtocolError as exc:
            _note(log, f"mqtt: closing connection: malformed packet: {exc}")
            return
        except SessionClosed as exc:
            _wait(stream, session)
            if exc.reset:
                reset_socket(stream.sock)
                return
            if exc.answer:
                stream.sendall(b"".join(encode(p) for p in exc.answer))
            if exc.reason != "client disconnected" and not exc.reason.startswith("fault plan"):
                _note(log, f"mqtt: closing connection: {exc.reason}")
            return
        if received and session.connected:
            window = session.keep_alive * KEEP_ALIVE_FACTOR if session.keep_alive else MAX_SILENCE
            deadline = time.monotonic() + window


def _wait(stream, session: DpsMqttSession) -> None:
    if session.delay:
        pause(stream, session.delay)
        session.delay = 0.0


def _note(log: Callable[[str], None] | None, message: str) -> None:
    if log is not None:
        log(message)


def mqtt_listener(api, context, host: str = "127.0.0.1", port: int = 8883, *,
                  limits: Limits | None = None, max_packet_size: int = DEFAULT_MAX_PACKET_SIZE,
                  url_host: str | None = None, log: Callable[[str], None] | None = None) -> TlsListener:
    """The DPS MQTT listener, bound but not started (port 0 picks a free port).

    `context` is the device-port pyOpenSSL context (`tls_context.device_context`); `.url` is
    `mqtts://host:port`; `.start()` / `.close()` run and stop it.
    """
    limits = limits or Limits()
    log = log or log_stderr

    def handler(stream) -> None:
        serve_mqtt(stream, api, limits, max_packet_size, log)

    return TlsListener("mqtt", "mqtts", host, port, context, handler, limits=limits, url_host=url_host, log=log,
                       faults=getattr(api, "faults", None), transport="mqtt")


def start_mqtt_listener(api, identity, host: str = "127.0.0.1", port: int = 8883, **kwargs) -> TlsListener:
    """Bind and start the listener with the emulator's `server_pki.ServerIdentity`."""
    listener = mqtt_listener(api, device_context(identity), host, port, **kwargs)
    listener.start()
    return listener


def listener_factory(port: int = DEFAULT_PORT):
    """The `server.ListenerFactory` serving MQTT on `port` (0 picks a free one)."""

    def factory(app):
        return mqtt_listener(app.device_api, app.device_context(), app.host, port,
                             limits=app.limits, url_host=app.url_host, log=app.log)

    return factory

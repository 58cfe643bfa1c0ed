"""The emulator's AMQP front end: DPS over AMQP 1.0 on TLS, driving the same `DeviceApi`.

`serve_amqp` is the only I/O loop: bytes from a stream into the sans-IO `DpsAmqpSession`
(`net/amqp_session.py`, python-qpid-proton's engine), answers back out. The stream is
anything with `recv(size, timeout)`, `sendall(data)` and `presented_chain()`: a
`TlsStream` on the AMQP port, or a WebSocket stream (subprotocol `AMQPWSB10`) on the
device HTTPS port, so the core sees the TLS chain as the device sent it either way.
`amqp_listener` puts it on a `TlsListener` (thread per connection), which carries out a
fault plan's connection-level actions; the session asks the plan about each request and
this loop waits its latency or drops the connection. docs/emulator.md ("AMQP", "Fault
plans") describes the messages and the faults.
"""

from __future__ import annotations

import time
from typing import Callable

from OpenSSL import SSL

from device_sim.stub.net.listener import Limits, TlsListener, pause, reset_socket
from device_sim.stub.net.log import log_stderr
from device_sim.stub.net.tls_context import UnreadablePeerChain, device_context

READ_CHUNK = 64 * 1024
DEFAULT_PORT = 5671  # the official SDKs always dial 5671 (or 443 over WebSockets)
WEBSOCKET_SUBPROTOCOL = "AMQPWSB10"


def serve_amqp(stream, api, limits: Limits, max_body: int,
               log: Callable[[str], None] | None = None) -> None:
    """Run one device connection to its end; the caller closes the stream afterwards."""
    # Imported here: proton takes ~0.1 s to load, which every CLI verb would pay, since
    # `stub serve` reads DEFAULT_PORT from this module to build its options.
    from device_sim.stub.net.amqp_session import DpsAmqpSession

    try:
        chain = stream.presented_chain()
    except UnreadablePeerChain:
        chain = []  # an unreadable certificate authenticates nobody: requests answer 401
    session = DpsAmqpSession(api, chain, max_body, note=lambda message: _note(log, f"amqp: {message}"),
                             faults=getattr(api, "faults", None))
    try:
        _serve(stream, session, limits)
    except (OSError, SSL.Error):
        return  # the peer vanished mid-answer (reset, broken pipe): nothing left to tell it


def _serve(stream, session, limits: Limits) -> None:
    # Deadlines are absolute, not per read: the connection must open within
    # request_timeout; afterwards each protocol step (attach, a whole request message)
    # renews idle_timeout, and a message arriving in pieces must be whole within
    # request_timeout of its first frame. Heartbeat frames renew nothing.
    now = time.monotonic()
    deadline = now + limits.request_timeout
    message_deadline = None
    while not session.finished:
        now = time.monotonic()
        if now >= deadline or (message_deadline is not None and now >= message_deadline):
            session.close("amqp:resource-limit-exceeded", "no complete request in time")
            stream.sendall(session.output())
            return
        heartbeat = session.tick(now)
        stream.sendall(session.output())
        wake = min(d for d in (deadline, message_deadline, heartbeat or None) if d is not None)
        try:
            data = stream.recv(READ_CHUNK, max(0.001, wake - now))
        except TimeoutError:
            continue
        if not data:
            session.end_of_input()
            stream.sendall(session.output())
            return
        session.receive(data)
        if not _carry_out_faults(stream, session):
            return
        stream.sendall(session.output())
        if session.progressed:
            session.progressed = False
            deadline = time.monotonic() + limits.idle_timeout
        if session.partial:
            message_deadline = message_deadline or time.monotonic() + limits.request_timeout
        else:
            message_deadline = None


def _carry_out_faults(stream, session) -> bool:
    """Wait a fault plan's latency; False when the connection is to be dropped instead
    (its answer lost: the caller closes it, or it is reset here)."""
    if session.delay:
        pause(stream, session.delay)
        session.delay = 0.0
    if session.dropped == "reset":
        reset_socket(stream.sock)
    return session.dropped is None


def _note(log: Callable[[str], None] | None, message: str) -> None:
    if log is not None:
        log(message)


def stream_handler(api, limits: Limits, max_body: int, log: Callable[[str], None] | None = None):
    """`handler(stream)` serving DPS over AMQP: for the AMQP port and for the WebSocket
    upgrade with subprotocol AMQPWSB10 alike."""

    def handler(stream) -> None:
        serve_amqp(stream, api, limits, max_body, log)

    return handler


def register_websocket(app) -> bool:
    """Serve AMQP over WebSockets (subprotocol AMQPWSB10) on the device port of `app`.

    Goes through the device port's subprotocol registry (`app.websocket_subprotocols`,
    net/websocket.py); False, and nothing done, where the app has no WebSocket upgrades.
    """
    subprotocols = getattr(app, "websocket_subprotocols", None)
    if subprotocols is None:
        return False
    subprotocols.register_subprotocol(
        WEBSOCKET_SUBPROTOCOL, stream_handler(app.device_api, app.limits, app.config.max_body, app.log))
    return True


def amqp_listener(api, context, host: str = "127.0.0.1", port: int = DEFAULT_PORT, *,
                  limits: Limits | None = None, max_body: int = 96 * 1024,
                  url_host: str | None = None, log: Callable[[str], None] | None = None) -> TlsListener:
    """The DPS AMQP listener, bound but not started (port 0 picks a free port).

    `context` is the device-port pyOpenSSL context (`tls_context.device_context`); `.url` is
    `amqps://host:port`; `.start()` / `.close()` run and stop it.
    """
    limits = limits or Limits()
    log = log or log_stderr
    handler = stream_handler(api, limits, max_body, log)
    return TlsListener("amqp", "amqps", host, port, context, handler, limits=limits, url_host=url_host, log=log,
                       faults=getattr(api, "faults", None), transport="amqp")


def start_amqp_listener(api, identity, host: str = "127.0.0.1", port: int = DEFAULT_PORT, **kwargs) -> TlsListener:
    """Bind and start the listener with the emulator's `server_pki.ServerIdentity`."""
    listener = amqp_listener(api, device_context(identity), host, port, **kwargs)
    listener.start()
    return listener


def listener_factory(port: int = DEFAULT_PORT):
    """The `server.ListenerFactory` serving AMQP on `port` (0 picks a free one)."""

    def factory(app):
        return amqp_listener(app.device_api, app.device_context(), app.host, port, limits=app.limits,
                             max_body=app.config.max_body, url_host=app.url_host, log=app.log)

    return factory

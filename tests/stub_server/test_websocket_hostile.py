"""Hostile and odd WebSocket input on the device port: bad handshakes, oversized and
malformed frames, text frames, silence, and the RFC 6455 mechanics a real client relies on
(fragments, ping/pong, close). Each ends in a JSON refusal or a clean close frame, and
`stub serve` (a real subprocess) writes no traceback to stderr."""

from __future__ import annotations

import os
import socket
import ssl
import struct
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from wsproto.events import AcceptConnection, BytesMessage, CloseConnection, Message, Ping, Pong

from device_sim.mqtt import topics
from device_sim.mqtt.codec import Connack, Connect, Decoder, Disconnect, encode
from device_sim.stub.net.listener import Limits

from .conftest import client_context, read_response, tls_connect
from device_sim.testing import Emulator
from .ws_helpers import PATH, WsClient, start

KEY = "dGhlIHNhbXBsZSBub25jZQ=="  # the RFC 6455 example key


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    running = Emulator.spawn(tmp_path_factory.mktemp("ws-hostile-home"), "--no-mqtt")
    yield running
    assert running.stop() == 0
    log = running.log.read_text()
    assert "Traceback" not in log, log


@pytest.fixture
def port(emulator):
    return int(emulator.device_url.rsplit(":", 1)[1])


@pytest.fixture
def ca(emulator):
    return emulator.ready["ca_cert"]


def assert_no_traceback(emulator):
    log = emulator.log.read_text()
    assert "Traceback" not in log, log


def raw_upgrade(port, ca, headers: dict[str, str], method: str = "GET", target: str = PATH):
    lines = [f"{method} {target} HTTP/1.1", "Host: localhost"] + [f"{k}: {v}" for k, v in headers.items()]
    with tls_connect(port, client_context(ca)) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        return read_response(sock)


GOOD = {"Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Key": KEY,
        "Sec-WebSocket-Version": "13", "Sec-WebSocket-Protocol": "mqtt"}


@pytest.mark.parametrize("change, status, words", [
    ({"Sec-WebSocket-Key": None}, 400, "Sec-WebSocket-Key"),
    ({"Sec-WebSocket-Version": "8"}, 426, "Sec-WebSocket-Version"),
    ({"Sec-WebSocket-Version": None}, 400, "Sec-WebSocket-Version"),
    ({"Connection": "keep-alive"}, 400, "Connection: Upgrade"),
    ({"Sec-WebSocket-Protocol": None}, 400, "no WebSocket subprotocol"),
    ({"Sec-WebSocket-Protocol": "wamp, v10.stomp"}, 400, "wamp, v10.stomp not served here; offer one of:"),
])
def test_a_bad_handshake_gets_a_json_refusal(emulator, port, ca, change, status, words):
    headers = {k: v for k, v in {**GOOD, **change}.items() if v is not None}
    got, response_headers, body = raw_upgrade(port, ca, headers)
    assert got == status, body
    import json

    document = json.loads(body)
    assert document["errorCode"] == status * 1000 and words in document["message"], document
    assert response_headers["x-ms-request-id"] and response_headers["connection"] == "close"
    if status == 426:
        assert response_headers["sec-websocket-version"] == "13"  # RFC 6455 §4.4
    assert_no_traceback(emulator)


def test_an_upgrade_that_is_not_a_get_is_405(emulator, port, ca):
    status, _, body = raw_upgrade(port, ca, GOOD, method="POST")
    assert status == 405, body


def test_other_paths_and_plain_gets_stay_with_the_device_routes(emulator, port, ca):
    status, _, body = raw_upgrade(port, ca, GOOD, target="/elsewhere")
    assert status == 404 and b"no device API route" in body
    status, _, body = raw_upgrade(port, ca, {}, target=PATH)
    assert status == 404 and b"no device API route" in body


def upgraded(port, ca, identity=None) -> WsClient:
    client = WsClient(port, ca, identity)
    assert isinstance(client.upgrade(), AcceptConnection)
    return client


def closes_with(client: WsClient, timeout: float = 5.0) -> int | None:
    """The code of the server's close frame (None if the connection ended without one),
    after which the server must end the connection."""
    client.sock.settimeout(timeout)
    code = None
    try:
        while True:
            events = client.events()
            if not events:
                return code
            for event in events:
                if isinstance(event, CloseConnection):
                    code = event.code
                    try:
                        client.send(event.response())  # as a real client answers
                    except Exception:
                        pass
    except (ConnectionResetError, ssl.SSLError, OSError):
        return code


@pytest.fixture
def sink(tmp_path):
    """The emulator in process with one more subprotocol, `sink`, whose loop only reads:
    what bounds a message is then the WebSocket layer alone (MQTT has its own packet limit)."""
    running = start(tmp_path)

    def drain(stream):
        while stream.recv(65536, 0.5):
            pass

    running.app.websocket_subprotocols.register_subprotocol("sink", drain)
    yield running
    running.close()
    assert not [line for line in running.logged if "failed" in line], running.logged


def sink_client(sink) -> WsClient:
    client = WsClient(sink.port, sink.ca_cert)
    assert isinstance(client.upgrade(["sink"]), AcceptConnection)
    return client


def huge_frame(client: WsClient) -> None:
    """A binary frame declaring 2**40 bytes (masked with a zero key), then 300 KiB of it."""
    try:
        client.sock.sendall(b"\x82\xff" + struct.pack("!Q", 2**40) + b"\x00\x00\x00\x00")
        for _ in range(300):
            client.sock.sendall(b"\x00" * 1024)
    except OSError:
        pass  # the server may already have closed


def test_a_frame_past_the_message_limit_is_closed_with_1009(sink):
    client = sink_client(sink)
    try:
        huge_frame(client)
        assert closes_with(client) == 1009
    finally:
        client.close()
    assert any("1009" in line for line in sink.logged)


def test_a_fragmented_message_past_the_limit_is_closed_with_1009(sink):
    client = sink_client(sink)
    try:
        try:
            for _ in range(5):
                client.send(Message(data=b"\x00" * 64 * 1024, message_finished=False))
        except OSError:
            pass
        assert closes_with(client) == 1009
    finally:
        client.close()


def test_many_messages_below_the_limit_are_fine(sink):
    client = sink_client(sink)
    try:
        for _ in range(8):
            client.send(Message(data=b"\x00" * 64 * 1024))
        client.send(CloseConnection(code=1000))
        assert closes_with(client) == 1000
    finally:
        client.close()


def test_a_huge_frame_of_garbage_to_mqtt_is_a_clean_close(emulator, port, ca):
    client = upgraded(port, ca)
    try:
        huge_frame(client)
        assert closes_with(client) is not None  # a close frame, then the end
    finally:
        client.close()
    assert_no_traceback(emulator)


@pytest.mark.parametrize("garbage", [
    b"\x82\x05hello",  # unmasked: RFC 6455 §5.1 says a server must close
    os.urandom(4096),
    b"\x8f\x80\x00\x00\x00\x00",  # reserved opcode
    b"\x89\xfe\x01\x00\x00\x00\x00\x00" + b"x" * 256,  # a ping longer than 125 bytes
])
def test_garbage_after_the_upgrade_is_closed_with_a_protocol_error(emulator, port, ca, garbage):
    client = upgraded(port, ca)
    try:
        client.sock.sendall(garbage)
        assert closes_with(client) in (1002, 1007, None)
    finally:
        client.close()
    assert_no_traceback(emulator)


def test_a_text_message_is_closed_with_1003(emulator, port, ca):
    client = upgraded(port, ca)
    try:
        client.send(Message(data="CONNECT"))
        assert closes_with(client) == 1003
    finally:
        client.close()


def test_a_client_that_hangs_up_mid_frame_costs_nothing(emulator, port, ca):
    for _ in range(5):
        client = upgraded(port, ca)
        client.sock.sendall(b"\x82\xfe\x10\x00\x00\x00")  # 4 KiB announced, none sent
        client.close()
    status, _, _ = raw_upgrade(port, ca, {**GOOD, "Sec-WebSocket-Protocol": "none"})
    assert status == 400  # still answering
    assert_no_traceback(emulator)


def mqtt_packets(client: WsClient, until: type, timeout: float = 5.0):
    """Pongs seen and MQTT packets decoded from binary messages until one of type `until`."""
    client.sock.settimeout(timeout)
    decoder, pongs, packets = Decoder(), [], []
    while not any(isinstance(p, until) for p in packets):
        events = client.events()
        assert events, "closed early"
        for event in events:
            if isinstance(event, Pong):
                pongs.append(event.payload)
            elif isinstance(event, BytesMessage):
                packets += decoder.feed(event.data)
    return pongs, packets


def test_fragments_pings_and_messages_make_one_byte_stream(emulator, port, ca, file_cas, tmp_path):
    identity = file_cas.device("ws-frag").write(tmp_path, "ws-frag")
    client = upgraded(port, ca, identity)
    try:
        connect = encode(Connect("ws-frag", topics.format_username(emulator.ready["id_scope"], "ws-frag",
                                                                    "2019-03-31")))
        client.send(Message(data=connect[:3], message_finished=False))
        client.send(Ping(b"between fragments"))  # control frames may interleave (RFC 6455 §5.4)
        client.send(Message(data=connect[3:9], message_finished=True))
        client.send(Message(data=connect[9:]))  # the rest of the packet in a second message
        pongs, packets = mqtt_packets(client, Connack)
        assert pongs == [b"between fragments"]
        assert packets == [Connack(0)]
        client.send(Message(data=encode(Disconnect())))
        assert closes_with(client) == 1000
    finally:
        client.close()


def test_a_close_frame_is_answered_with_one(emulator, port, ca):
    client = upgraded(port, ca)
    try:
        client.send(CloseConnection(code=1000, reason="bye"))
        assert closes_with(client) == 1000
    finally:
        client.close()


def test_silence_after_the_upgrade_ends_at_the_request_deadline(tmp_path):
    running = start(tmp_path, limits=Limits(request_timeout=1.0, idle_timeout=1.0, handshake_timeout=1.0))
    try:
        client = upgraded(running.port, running.ca_cert)
        started = time.monotonic()
        try:
            assert closes_with(client, timeout=10) == 1000
            # The server waits CLOSE_WAIT (1 s) for our close frame, then ends the connection.
            assert time.monotonic() - started < 4
        finally:
            client.close()
        # And a trickled handshake is the HTTP layer's 408, like any other request.
        with tls_connect(running.port, client_context(running.ca_cert)) as sock:
            sock.sendall(b"GET /$iothub/websocket HTTP/1.1\r\n")
            sock.settimeout(5)
            status, _, _ = read_response(sock)
            assert status == 408
    finally:
        running.close()
    assert not [line for line in running.logged if "failed" in line], running.logged


def test_many_upgraded_connections_end_cleanly(emulator, port, ca):
    clients = [upgraded(port, ca) for _ in range(20)]
    for client in clients:
        client.send(CloseConnection(code=1000))
    assert all(closes_with(client) == 1000 for client in clients)
    for client in clients:
        client.close()
    assert_no_traceback(emulator)


def test_pings_do_not_extend_the_connect_deadline(tmp_path):
    running = start(tmp_path, limits=Limits(request_timeout=1.0, idle_timeout=1.0, handshake_timeout=1.0))
    try:
        client = upgraded(running.port, running.ca_cert)
        started = time.monotonic()
        closed = None
        try:
            while time.monotonic() - started < 5 and closed is None:
                try:
                    client.send(Ping(b"still here"))
                except OSError:
                    break
                client.sock.settimeout(0.3)
                try:
                    for event in client.events():
                        if isinstance(event, CloseConnection):
                            closed = time.monotonic() - started
                except (socket.timeout, ssl.SSLError, OSError):
                    pass
        finally:
            client.close()
        assert closed is not None and closed < 2.5, closed
    finally:
        running.close()


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(min_size=1, max_size=2048))
def test_any_bytes_after_the_upgrade_end_in_a_close(sink, data):
    client = sink_client(sink)
    try:
        client.sock.sendall(data)
        client.sock.sendall(b"\x88\x80\x00\x00\x00\x00")  # and then a close frame, if still parseable
        closes_with(client, timeout=10)
    finally:
        client.close()
    # Still serving; that nothing escaped as a failure, the sink fixture checks in its log.
    sink_client(sink).close()


def test_a_subprotocol_without_a_handler_is_refused_until_one_registers(server_identity):
    """What AMQPWSB10 gets while no AMQP front end has registered (the device port's own
    wiring, with a registry of ours)."""
    from device_sim.stub.net import http as http_server
    from device_sim.stub.net import websocket
    from device_sim.stub.net.listener import TlsListener
    from device_sim.stub.net.tls_context import device_context

    registry = websocket.Subprotocols()
    registry.register_subprotocol(websocket.MQTT, lambda stream: None)
    logged: list[str] = []
    upgrade = websocket.upgrade_handler(registry, log=logged.append)
    listener = TlsListener(
        "device", "https", "127.0.0.1", 0, device_context(server_identity),
        lambda stream: http_server.serve_http(stream, lambda request, chain: None, Limits(), 96 * 1024,
                                              logged.append, upgrade),
        log=logged.append)
    listener.start()
    try:
        ca = server_identity.ca_cert
        status, _, body = raw_upgrade(listener.port, ca, {**GOOD, "Sec-WebSocket-Protocol": websocket.AMQP})
        assert status == 400 and b"AMQPWSB10 not served here; offer one of: mqtt" in body
        served = []
        registry.register_subprotocol(websocket.AMQP, lambda stream: served.append(stream.subprotocol))
        client = WsClient(listener.port, ca)
        try:
            assert client.upgrade([websocket.AMQP, websocket.MQTT]).subprotocol == websocket.AMQP
            assert closes_with(client) == 1000
        finally:
            client.close()
        assert served == [websocket.AMQP]
    finally:
        listener.close()
    assert logged == []

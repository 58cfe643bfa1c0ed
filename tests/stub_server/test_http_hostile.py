"""Hostile HTTP clients: trickled requests meet an absolute deadline, malformed framing gets a
400 (never a dropped connection logged as a failure), and a flood's threads are released.

Real TLS over loopback against `TlsListener` + `serve_http`; deadlines shortened via `Limits`.
"""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest
from hypothesis import given, settings, strategies as st

from device_sim.stub.net import http as http_server
from device_sim.stub.net.listener import Limits, TlsListener
from device_sim.stub.net.tls_context import device_context

from .conftest import EchoDeviceApi, client_context, read_response, tls_connect
from .test_transport import request_bytes

REGISTER = "/s/registrations/d/register?api-version=1"


def trickle(sock, data: bytes, every: float, until: float) -> None:
    """Send `data` one byte per `every` seconds, stopping when the server closed or at `until`."""
    for byte in data:
        if time.monotonic() > until:
            return
        try:
            sock.sendall(bytes([byte]))
        except OSError:
            return
        time.sleep(every)


def trickled_response(listener, server_identity, data: bytes):
    sock = tls_connect(listener.port, client_context(server_identity.ca_cert), timeout=10)
    started = time.monotonic()
    sender = threading.Thread(target=trickle, args=(sock, data, 0.25, started + 6), daemon=True)
    sender.start()
    try:
        status, _, body = read_response(sock)
        return status, json.loads(body), time.monotonic() - started
    finally:
        sock.close()
        sender.join()


def test_header_trickled_byte_by_byte_gets_408_at_the_request_deadline(echo_listener, server_identity):
    # request_timeout is 1 s in this fixture; each byte comes within it, so a per-read
    # deadline would never fire (the whole head takes ~20 s at this pace).
    head = b"GET /s/registrations/d/operations/o?api-version=1 HTTP/1.1\r\nHost: localhost\r\nX-Slow: " + b"a" * 40
    status, body, took = trickled_response(echo_listener, server_identity, head)
    assert status == 408 and body["errorCode"] == 408000
    assert 0.9 < took < 2.5


def test_body_trickled_byte_by_byte_gets_408_at_the_same_deadline(echo_listener, server_identity):
    head = request_bytes("PUT", REGISTER, b"x" * 60)
    sock = tls_connect(echo_listener.port, client_context(server_identity.ca_cert), timeout=10)
    try:
        sock.sendall(head[:-60])  # the whole head at once, then the body byte by byte
        started = time.monotonic()
        sender = threading.Thread(target=trickle, args=(sock, b"{" + b" " * 58 + b"}", 0.25, started + 6),
                                  daemon=True)
        sender.start()
        status, _, body = read_response(sock)
        took = time.monotonic() - started
        sender.join()
    finally:
        sock.close()
    assert status == 408 and json.loads(body)["errorCode"] == 408000
    assert took < 2.5


# Header bytes are read as Latin-1, so b"\xb2" is "²" and b"\xb9" is "¹": digits to
# str.isdigit(), not to int().
@pytest.mark.parametrize("value", [b"\xb2", b"1\xb9", "٣".encode(), b"+5", b"-1", b"0x10", b"1_0", b"5 5"])
def test_content_length_not_ascii_digits_is_400(echo_listener, server_identity, value):
    raw = (f"PUT {REGISTER} HTTP/1.1\r\nContent-Type: application/json\r\n".encode()
           + b"Content-Length: " + value + b"\r\n\r\n{}")
    with tls_connect(echo_listener.port, client_context(server_identity.ca_cert)) as sock:
        sock.sendall(raw)
        status, _, body = read_response(sock)
    assert status == 400 and json.loads(body)["errorCode"] == 400000
    time.sleep(0.05)
    assert not [line for line in echo_listener.logged if "failed" in line]


@pytest.mark.parametrize("raw", [
    b"GET\r\n\r\n",
    b"GET  /x HTTP/1.1\r\n\r\n",
    b"GET x HTTP/1.1\r\n\r\n",
    b"G\xc3\xa9T /x HTTP/1.1\r\n\r\n",
    b"GET /x HTTP/1.1\r\n: empty-name\r\n\r\n",
    b"GET /x HTTP/1.1\r\n folded: header\r\n\r\n",
    b"GET /x HTTP/1.1\r\nN\xc3\xa4me: v\r\n\r\n",
    b"GET /x HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
    b"\x00\x01\x02 /x HTTP/1.1\r\n\r\n",
])
def test_malformed_request_lines_and_headers_get_400_and_no_failure_log(echo_listener, server_identity, raw):
    with tls_connect(echo_listener.port, client_context(server_identity.ca_cert)) as sock:
        sock.sendall(raw)
        status, _, body = read_response(sock)
    assert status == 400 and json.loads(body)["errorCode"] == 400000
    time.sleep(0.05)
    assert not [line for line in echo_listener.logged if "failed" in line]


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300), st.integers(0, 100_000))
def test_parsers_raise_nothing_but_http_errors(head, max_body):
    try:
        method, target, _version, headers = http_server.parse_head(head)
        http_server.body_length(method, headers, max_body)
        http_server.split_target(target)
    except http_server.HttpError as exc:
        assert 400 <= exc.code // 1000 < 600


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=12))
def test_content_length_accepts_exactly_ascii_digits(value):
    headers = {"content-length": value}
    try:
        length = http_server.body_length("PUT", headers, 10**30)
    except http_server.HttpError as exc:
        assert exc.code in (400000, 413000)
        assert not (value.isascii() and value.isdigit())
    else:
        assert value.isascii() and value.isdigit() and length == int(value)


def conn_threads(name: str) -> int:
    return sum(1 for t in threading.enumerate() if t.name == f"{name}-conn" and t.is_alive())


def test_a_floods_threads_exit_after_idling(server_identity):
    limits = Limits(handshake_timeout=3.0, idle_timeout=3.0, request_timeout=3.0, max_connections=64,
                    spare_thread_timeout=0.3)
    handler = http_server.device_handler(EchoDeviceApi())
    listener = TlsListener("flood", "https", "127.0.0.1", 0, device_context(server_identity),
                           lambda stream: http_server.serve_http(stream, handler, limits, 1024, None),
                           limits=limits, log=lambda message: None)
    listener.start()
    context = client_context(server_identity.ca_cert)
    try:
        held = [tls_connect(listener.port, context) for _ in range(24)]  # handshaken, then idle
        time.sleep(0.3)
        assert conn_threads("flood") >= 24
        for sock in held:
            sock.close()
        deadline = time.monotonic() + 5
        while conn_threads("flood") > 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert conn_threads("flood") == 1  # one stays waiting for the next client
        with tls_connect(listener.port, context) as sock:  # and it still serves
            sock.sendall(request_bytes("GET", "/s/registrations/r/operations/o?api-version=1",
                                       headers={"Connection": "close"}))
            assert read_response(sock)[0] == 200
    finally:
        listener.close()
    assert conn_threads("flood") == 0

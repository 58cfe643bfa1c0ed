"""TLS termination and the HTTP/1.1 front end over real TLS on loopback.

These tests put a stand-in behind the device port that echoes what the transport handed
it, so they pin the transport's own promises: the chain as sent, routing and decoding,
keep-alive, and a JSON error (never a crash) for every kind of bad client.
"""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import threading
import time

import pytest

from device_sim.stub.net import http as http_server
from device_sim.stub.net.server_pki import ensure_server_identity

from .conftest import client_context, read_response, tls_connect


def request_bytes(method: str, target: str, body: bytes = b"", headers: dict | None = None) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: localhost"]
    all_headers = {"Content-Type": "application/json"} if body else {}
    all_headers.update(headers or {})
    if body and "Content-Length" not in all_headers:
        all_headers["Content-Length"] = str(len(body))
    lines += [f"{k}: {v}" for k, v in all_headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def ask(listener, context, method, target, body=b"", headers=None):
    with tls_connect(listener.port, context) as sock:
        sock.sendall(request_bytes(method, target, body, headers))
        status, response_headers, raw = read_response(sock)
    return status, response_headers, json.loads(raw) if raw else None


def assert_still_serving(listener, server_identity):
    status, _, body = ask(listener, client_context(server_identity.ca_cert), "GET",
                          "/scope/registrations/probe/operations/op1?api-version=1")
    assert status == 200 and body["registration_id"] == "probe"


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_chain_reaches_the_application_leaf_first_in_the_order_sent(echo_listener, server_identity,
                                                                   file_cas, tmp_path, version):
    leaf = file_cas.device("dev-order")
    # Deliberately not the issuing order: the server must not rebuild or sort the chain.
    chain, key = leaf.write(tmp_path, "odd", [file_cas.inter1, file_cas.root, file_cas.inter2])
    context = client_context(server_identity.ca_cert, chain, key, version)
    status, _, body = ask(echo_listener, context, "PUT",
                          "/0ne001/registrations/dev-order/register?api-version=2021-06-01",
                          b'{"registrationId":"dev-order"}')
    assert status == 200
    assert body["chain"] == ["CN=dev-order", "CN=stub-test-inter1", "CN=stub-test-root", "CN=stub-test-inter2"]
    assert body["op"] == "register" and body["api_version"] == "2021-06-01"
    assert body["body"] == '{"registrationId":"dev-order"}'


def test_no_client_certificate_is_not_a_tls_failure(echo_listener, server_identity):
    status, _, body = ask(echo_listener, client_context(server_identity.ca_cert), "PUT",
                          "/s/registrations/dev/register?api-version=1", b"{}")
    assert status == 200 and body["chain"] == []


def test_server_certificate_names_localhost_and_loopback_ip(echo_listener, server_identity):
    context = client_context(server_identity.ca_cert)
    for host in ("localhost", "127.0.0.1"):
        with socket.create_connection(("127.0.0.1", echo_listener.port)) as raw:
            with context.wrap_socket(raw, server_hostname=host) as sock:
                assert sock.version() in ("TLSv1.2", "TLSv1.3")


def test_extra_server_name_reissues_the_server_certificate_from_the_same_ca(tmp_path):
    first = ensure_server_identity(tmp_path)
    ca_before = first.ca_cert.read_bytes()
    again = ensure_server_identity(tmp_path, ["stub.example.test", "10.1.2.3"])
    assert again.ca_cert.read_bytes() == ca_before
    from cryptography import x509

    san = x509.load_pem_x509_certificate(again.cert.read_bytes()).extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value
    assert "stub.example.test" in san.get_values_for_type(x509.DNSName)
    assert (tmp_path / "ca.key").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "server.key").stat().st_mode & 0o777 == 0o600


def test_routes_decode_path_segments_and_keep_the_connection_alive(echo_listener, server_identity, device_files):
    chain, key = device_files
    connection = http.client.HTTPSConnection("localhost", echo_listener.port,
                                             context=client_context(server_identity.ca_cert, chain, key))
    replies = []
    for method, target in [
        ("PUT", "/0ne001/registrations/dev%2Da/register?api-version=2019-03-31"),
        ("GET", "/0ne001/registrations/dev-a/operations/5.abc%3Adef?api-version=2019-03-31"),
        ("POST", "/0ne001/registrations/dev-a?api-version=2019-03-31"),
    ]:
        connection.request(method, target, body=b'{"registrationId":"dev-a"}' if method != "GET" else None,
                           headers={"Content-Type": "application/json; charset=utf-8"})
        response = connection.getresponse()
        assert response.getheader("Content-Type") == "application/json; charset=utf-8"
        assert response.getheader("x-test") == "1"
        replies.append(json.loads(response.read()))
        sock_after = connection.sock
    connection.close()
    assert [r["op"] for r in replies] == ["register", "operation_status", "registration_status"]
    assert replies[0]["registration_id"] == "dev-a"
    assert replies[1]["operation_id"] == "5.abc:def"
    assert all(len(r["chain"]) == 4 for r in replies)
    assert sock_after is not None  # one connection served all three requests


def test_unknown_route_and_wrong_method(echo_listener, server_identity):
    context = client_context(server_identity.ca_cert)
    status, headers, body = ask(echo_listener, context, "GET", "/nothing/here")
    assert status == 404 and body["errorCode"] == 404000 and body["trackingId"]
    status, _, body = ask(echo_listener, context, "DELETE", "/s/registrations/d/register?api-version=1")
    assert status == 405 and body["errorCode"] == 405000


def test_wrong_content_type_is_415_and_the_connection_stays_usable(echo_listener, server_identity):
    with tls_connect(echo_listener.port, client_context(server_identity.ca_cert)) as sock:
        sock.sendall(request_bytes("PUT", "/s/registrations/d/register?api-version=1", b"a=b",
                                   {"Content-Type": "application/x-www-form-urlencoded"}))
        status, _, raw = read_response(sock)
        assert status == 415 and json.loads(raw)["errorCode"] == 415000
        sock.sendall(request_bytes("PUT", "/s/registrations/d/register?api-version=1", b"{}"))
        status, _, raw = read_response(sock)
        assert status == 200


def test_oversized_body_is_refused_before_it_is_read(echo_listener, server_identity):
    with tls_connect(echo_listener.port, client_context(server_identity.ca_cert)) as sock:
        # Announce 10 MB but send nothing: the answer must come from the header alone.
        sock.sendall(request_bytes("PUT", "/s/registrations/d/register?api-version=1", b"",
                                   {"Content-Type": "application/json", "Content-Length": str(10 * 1024 * 1024)}))
        status, headers, raw = read_response(sock)
        assert status == 413 and json.loads(raw)["errorCode"] == 413000
        assert headers["connection"] == "close"
    # Exactly at the limit is fine.
    body = b'{"p":"' + b"x" * (96 * 1024 - 8) + b'"}'
    status, _, _ = ask(echo_listener, client_context(server_identity.ca_cert), "PUT",
                       "/s/registrations/d/register?api-version=1", body)
    assert status == 200


def test_chunked_bodies_are_refused_with_411(echo_listener, server_identity):
    status, _, body = ask(echo_listener, client_context(server_identity.ca_cert), "PUT",
                          "/s/registrations/d/register?api-version=1", b"",
                          {"Transfer-Encoding": "chunked", "Content-Type": "application/json"})
    assert status == 411 and body["errorCode"] == 411000


def test_malformed_request_line_and_headers_get_400(echo_listener, server_identity):
    for raw in (b"NONSENSE\r\n\r\n", b"GET /x HTTP/1.1\r\nno colon here\r\n\r\n",
                b"PUT /s/registrations/d/register HTTP/1.1\r\nContent-Length: zz\r\n\r\n"):
        with tls_connect(echo_listener.port, client_context(server_identity.ca_cert)) as sock:
            sock.sendall(raw)
            status, _, body = read_response(sock)
            assert status == 400 and json.loads(body)["errorCode"] == 400000


def test_handler_bug_becomes_a_500_json_error(echo_listener, server_identity):
    status, _, body = ask(echo_listener, client_context(server_identity.ca_cert), "PUT",
                          "/s/registrations/explode/register?api-version=1", b"{}")
    assert status == 500 and body["errorCode"] == 500000
    assert any("RuntimeError" in line for line in echo_listener.logged)
    assert_still_serving(echo_listener, server_identity)


def test_garbage_on_the_tls_port_is_dropped_and_others_are_served(echo_listener, server_identity):
    with socket.create_connection(("127.0.0.1", echo_listener.port), timeout=3) as sock:
        sock.sendall(b"\x16\x03\x01\x00\x05hello-this-is-not-a-client-hello" * 4)
        sock.settimeout(3)
        while sock.recv(4096):
            pass  # an alert at most, then EOF: the server closed it (a hang would time out)
    with socket.create_connection(("127.0.0.1", echo_listener.port), timeout=3) as sock:
        sock.sendall(bytes(range(256)) * 8)
        sock.settimeout(3)
        assert sock.recv(4096) == b""
    assert_still_serving(echo_listener, server_identity)


def test_plain_http_on_the_tls_port_gets_a_hint(echo_listener):
    with socket.create_connection(("127.0.0.1", echo_listener.port), timeout=3) as sock:
        sock.sendall(request_bytes("GET", "/s/registrations/d/operations/o?api-version=1"))
        status, _, body = read_response(sock)
    assert status == 400 and "https" in json.loads(body)["message"]


def test_silent_and_half_open_clients_time_out_without_blocking_others(echo_listener, server_identity):
    # Listener deadlines are 1 s in this fixture.
    silent = socket.create_connection(("127.0.0.1", echo_listener.port), timeout=5)
    half = tls_connect(echo_listener.port, client_context(server_identity.ca_cert))
    half.sendall(b"PUT /s/registrations/d/register?api-version=1 HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: 10\r\n\r\n{")
    started = time.monotonic()
    assert_still_serving(echo_listener, server_identity)  # served while both hang
    assert time.monotonic() - started < 0.9
    status, _, body = read_response(half)  # body never completes -> 408
    assert status == 408 and json.loads(body)["errorCode"] == 408000
    assert silent.recv(1) == b""  # handshake deadline: dropped
    half.close()
    silent.close()


def test_client_vanishing_mid_handshake_does_not_hurt_the_server(echo_listener, server_identity):
    for _ in range(5):
        raw = socket.create_connection(("127.0.0.1", echo_listener.port))
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        context = client_context(server_identity.ca_cert)
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        obj = context.wrap_bio(incoming, outgoing, server_hostname="localhost")
        try:
            obj.do_handshake()
        except ssl.SSLWantReadError:
            raw.sendall(outgoing.read())  # ClientHello only, then a reset
        raw.close()
    assert_still_serving(echo_listener, server_identity)


def test_many_concurrent_clients(echo_listener, server_identity, device_files):
    chain, key = device_files
    context = client_context(server_identity.ca_cert, chain, key)
    failures = []

    def one():
        try:
            status, _, body = ask(echo_listener, context, "PUT",
                                  "/s/registrations/dev-a/register?api-version=1", b"{}")
            assert status == 200 and len(body["chain"]) == 4
        except Exception as exc:  # collected and asserted below
            failures.append(exc)

    threads = [threading.Thread(target=one) for _ in range(24)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []


def test_pure_parsers():
    method, target, version, headers = http_server.parse_head(
        b"PUT /a?b=c HTTP/1.1\r\nContent-Length: 3\r\nX-A: 1\r\nX-A: 2")
    assert (method, target, version) == ("PUT", "/a?b=c", "HTTP/1.1")
    assert headers == {"content-length": "3", "x-a": "1, 2"}
    assert http_server.body_length("PUT", headers, 10) == 3
    with pytest.raises(http_server.HttpError) as caught:
        http_server.body_length("PUT", {"content-length": "11"}, 10)
    assert caught.value.code == 413000
    assert http_server.match_device_route("GET", "/s/registrations/a%2Fb/operations/o") == (
        "operation_status", ["s", "a/b", "o"])
    with pytest.raises(http_server.HttpError):
        http_server.match_device_route("PUT", "/s/registrations//register")
    assert http_server.wants_keep_alive("HTTP/1.0", {}) is False
    assert http_server.wants_keep_alive("HTTP/1.1", {"connection": "Close"}) is False

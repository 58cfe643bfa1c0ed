"""awscrt mTLS with the device key inside SoftHSM, against a pyOpenSSL loopback server."""

import json
import socket
import time

import pkcs11
from OpenSSL import SSL
import pytest
from pkcs11 import Attribute, ObjectClass

from device_sim.device import registration as reg
from device_sim.device.driver import run_registration
from device_sim.device.transport import TlsFailure, TransportTimeout, Unreachable
from device_sim.device.transport_https import CrtRuntime, HttpsTransport, TlsIdentity, client_tls_context
from hsm_setup import tokens
from device_sim.common.errors import UserError
from device_sim.testing import TestCA, pem

from .helpers import LoopbackTlsServer, http_response


class Device:
    """The bits of token_pki's device-ec-p256 these tests need."""

    def __init__(self, pki, runtime):
        record = pki.devices["device-ec-p256"]
        self.runtime = runtime
        self.pki_fixture = pki
        self.token_label = record.token_label
        self.key_label = record.label
        # The live slot id: SoftHSM renumbers slots whenever another test re-initialises it,
        # so the one recorded at creation may be stale.
        self.slot_id = tokens.find_token(pki.lib(), record.token_label).slot.slot_id
        self.leaf = record.certificate_x509()
        self.inter, self.root = record.chain_x509()[0], record.chain_x509()[-1]
        self.public_key = self.leaf.public_key()
        self.module_path = pki.module_path
        self.pin = pki.pin


@pytest.fixture(scope="module")
def crt_runtime():
    return CrtRuntime()


@pytest.fixture()
def device(token_pki, crt_runtime):
    token_pki.lib()  # other tests may have pointed SoftHSM at another state directory meanwhile
    return Device(token_pki, crt_runtime)


@pytest.fixture(scope="module")
def server_pki():
    return TestCA("loopback-server-root")


def tls_context(device, chain=None, trust=None, server_root=None):
    identity = TlsIdentity(device.module_path, device.key_label, chain or pem(device.leaf, device.inter),
                           device.pin, slot_id=device.slot_id)
    return client_tls_context(identity, trust or pem(server_root), device.runtime)


def transport_for(device, port, server_pki, **kw):
    return HttpsTransport("localhost", port, "0ne0000TEST", "dev-1",
                          tls_context(device, server_root=server_pki.cert, **kw), runtime=device.runtime)


def assigned_body(op="op-1"):
    return json.dumps({"operationId": op, "status": "assigned",
                       "registrationState": {"assignedHub": "hub.example", "deviceId": "dev-1"}}).encode()


@pytest.fixture()
def server_cert(server_pki):
    return server_pki.issue_server()


def test_register_and_poll_over_one_connection_presenting_the_chain(device, server_cert, server_pki):
    server = LoopbackTlsServer(server_cert, responses=[
        http_response(202, json.dumps({"operationId": "op-1", "status": "assigning"}).encode(), Retry_After="0"),
        http_response(200, assigned_body()),
    ])
    try:
        outcome, timings = run_registration(reg.RegistrationFlow("dev-1"), transport_for(device, server.port, server_pki), 10)
    finally:
        server.close()
    assert outcome.status == reg.ASSIGNED and outcome.assigned_hub == "hub.example"
    assert server.connections == 1  # the poll reused the register connection
    assert [c.subject for c in server.presented[0]] == [device.leaf.subject, device.inter.subject]
    put, get = server.requests
    assert put.startswith(b"PUT /0ne0000TEST/registrations/dev-1/register?api-version=2021-06-01 HTTP/1.1")
    assert json.loads(put.split(b"\r\n\r\n", 1)[1]) == {"registrationId": "dev-1"}
    assert get.startswith(b"GET /0ne0000TEST/registrations/dev-1/operations/op-1?api-version=")
    assert timings.connect_ms > 0 and timings.total_ms >= timings.register_ms


def test_endpoint_given_as_an_ip_address_is_verified_against_the_ip_san(device, server_cert, server_pki):
    server = LoopbackTlsServer(server_cert, responses=[http_response(200, assigned_body())])
    try:
        transport = HttpsTransport("127.0.0.1", server.port, "0ne0000TEST", "dev-1",
                                   tls_context(device, server_root=server_pki.cert), runtime=device.runtime)
        outcome, _ = run_registration(reg.RegistrationFlow("dev-1"), transport, 10)
    finally:
        server.close()
    assert outcome.status == reg.ASSIGNED


def test_poll_after_the_server_closed_the_kept_alive_connection(device, server_cert, server_pki):
    server = LoopbackTlsServer(server_cert, close_after_answer=True, responses=[
        http_response(202, json.dumps({"operationId": "op-1", "status": "assigning"}).encode(), Retry_After="0"),
        http_response(200, assigned_body()),
    ])
    try:
        outcome, _ = run_registration(reg.RegistrationFlow("dev-1"), transport_for(device, server.port, server_pki), 10)
    finally:
        server.close()
    assert outcome.status == reg.ASSIGNED
    assert server.connections == 2


def test_private_key_never_leaves_the_token_yet_the_handshake_succeeds(device, server_cert, server_pki):
    session = device.pki_fixture.session(device.token_label)
    key = session.get_key(object_class=ObjectClass.PRIVATE_KEY, label=device.key_label)
    assert key[Attribute.EXTRACTABLE] is False and key[Attribute.SENSITIVE] is True
    with pytest.raises(pkcs11.PKCS11Error):
        key[Attribute.VALUE]  # the private scalar cannot be read
    server = LoopbackTlsServer(server_cert, responses=[http_response(200, assigned_body())])
    try:
        outcome, _ = run_registration(reg.RegistrationFlow("dev-1"), transport_for(device, server.port, server_pki), 10)
    finally:
        server.close()
    assert outcome.status == reg.ASSIGNED
    # The server verified a TLS 1.2 CertificateVerify made with that key: the presented
    # leaf carries the token's public key.
    assert server.presented[0][0].public_key().public_numbers() == device.public_key.public_numbers()


def test_full_chain_with_root_is_sent_in_order(device, server_cert, server_pki):
    server = LoopbackTlsServer(server_cert, responses=[http_response(200, assigned_body())])
    try:
        chain = pem(device.leaf, device.inter, device.root)
        run_registration(reg.RegistrationFlow("dev-1"), transport_for(device, server.port, server_pki, chain=chain), 10)
    finally:
        server.close()
    assert [c.subject for c in server.presented[0]] == [
        device.leaf.subject, device.inter.subject, device.root.subject]


def test_silent_server_times_out_within_the_deadline(device, server_cert, server_pki):
    server = LoopbackTlsServer(server_cert, mode="silent")
    started = time.monotonic()
    try:
        outcome, _ = run_registration(reg.RegistrationFlow("dev-1"), transport_for(device, server.port, server_pki), 1.5)
    finally:
        server.close()
    assert outcome.status == reg.TIMEOUT
    assert time.monotonic() - started < 3


def test_server_that_never_answers_the_request_times_out(device, server_cert, server_pki):
    server = LoopbackTlsServer(server_cert, mode="silent-after-tls")
    try:
        outcome, _ = run_registration(reg.RegistrationFlow("dev-1"), transport_for(device, server.port, server_pki), 1.5)
    finally:
        server.close()
    assert outcome.status == reg.TIMEOUT and "answer" in outcome.error_message


def test_garbage_answer_is_a_protocol_error(device, server_cert, server_pki):
    server = LoopbackTlsServer(server_cert, mode="garbage")
    try:
        outcome, _ = run_registration(reg.RegistrationFlow("dev-1"), transport_for(device, server.port, server_pki), 5)
    finally:
        server.close()
    assert outcome.status == reg.PROTOCOL_ERROR


def test_handshake_refused_by_the_server_is_a_tls_failure(device, server_cert, server_pki):
    server = LoopbackTlsServer(server_cert, responses=[http_response(200, assigned_body())])
    server._ctx.set_min_proto_version(SSL.TLS1_3_VERSION)  # awscrt+PKCS#11 offers TLS 1.2 only
    try:
        with pytest.raises(TlsFailure):
            transport_for(device, server.port, server_pki).connect(5)
    finally:
        server.close()


def test_untrusted_server_is_reported_within_the_deadline(device, server_cert, server_pki):
    # s2n delays reporting a server certificate it rejects by 10-30 s (blinding): within a
    # short deadline the device must still give up on time and say what to check.
    server = LoopbackTlsServer(server_cert, responses=[http_response(200, assigned_body())])
    other_root = TestCA("other-root").cert
    started = time.monotonic()
    try:
        with pytest.raises((TransportTimeout, TlsFailure)) as info:
            transport_for(device, server.port, server_pki, trust=pem(other_root)).connect(1.0)
    finally:
        server.close()
    assert time.monotonic() - started < 2.5
    assert "--trust" in str(info.value) or isinstance(info.value, TlsFailure)


def test_several_event_loop_threads_refused_on_a_module_python_pkcs11_initialised(device):
    # python-pkcs11 passes no locking arguments to C_Initialize (SoftHSM then drops its
    # mutexes); concurrent signing from two awscrt threads was measured to abort the process.
    with pytest.raises(UserError, match="one event-loop thread"):
        CrtRuntime(event_loop_threads=2).pkcs11_lib(device.module_path)
    assert CrtRuntime(event_loop_threads=1).pkcs11_lib(device.module_path) is not None


def test_closed_port_is_unreachable(device, server_pki):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    with pytest.raises(Unreachable):
        transport_for(device, port, server_pki).connect(5)

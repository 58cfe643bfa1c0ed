"""`DpsAmqpSession` without any I/O: a proton client engine wired to it in memory.

What a device can only do by hand-crafting transfers (undecodable messages, a request
before any receiver link, a flood of links) is checked here; the normal flow against the
real emulator is in test_amqp.py.
"""

from __future__ import annotations

import json

from proton import Collector, Connection, Delivery, Endpoint, Message, Transport, symbol

from device_sim.stub.net.amqp_session import MAX_LINKS, DpsAmqpSession

from .conftest import EchoDeviceApi

ADDRESS = "0ne1/registrations/dev-1"


class ClientEngine:
    """proton's engine as the device side, its bytes handed to the session directly."""

    def __init__(self, session: DpsAmqpSession):
        self.session = session
        self.transport = Transport()
        self.connection = Connection()
        self.collector = Collector()
        self.connection.collect(self.collector)
        self.transport.bind(self.connection)
        self.connection.open()
        self.amqp_session = self.connection.session()
        self.amqp_session.open()

    def pump(self) -> None:
        for _ in range(50):
            moved = False
            while (size := self.transport.pending()) > 0:
                self.session.receive(self.transport.peek(size))
                self.transport.pop(size)
                moved = True
            answer = self.session.output()
            if answer:
                self.transport.push(answer)
                moved = True
            if not moved:
                return

    def sender(self, name: str, address: str = ADDRESS, properties: dict | None = None):
        link = self.amqp_session.sender(name)
        link.target.address = address
        if properties:
            link.properties = properties
        link.open()
        self.pump()
        return link

    def receiver(self, name: str, address: str = ADDRESS, credit: int = 10):
        link = self.amqp_session.receiver(name)
        link.source.address = address
        link.open()
        link.flow(credit)
        self.pump()
        return link

    def send(self, link, payload: bytes, tag: str):
        delivery = link.delivery(tag.encode())
        link.send(payload)
        link.advance()
        self.pump()
        return delivery

    def replies(self, link) -> list[Message]:
        got = []
        while (delivery := link.current) is not None and delivery.readable and not delivery.partial:
            message = Message()
            message.decode(link.recv(delivery.pending))
            link.advance()
            delivery.update(Delivery.ACCEPTED)
            delivery.settle()
            got.append(message)
        self.pump()
        return got


def register(correlation_id=None, message_id=None) -> bytes:
    return Message(body=b'{"payload":{"line":2}}', inferred=True, correlation_id=correlation_id, id=message_id,
                   properties={"iotdps-operation-type": "iotdps-register"}).encode()


def test_reply_waits_for_the_receiver_link_and_its_credit():
    client = ClientEngine(DpsAmqpSession(EchoDeviceApi(), [], 96 * 1024))
    sender = client.sender("s", properties={symbol("com.microsoft:api-version"): "2019-03-31"})
    delivery = client.send(sender, register(correlation_id="c-1"), "1")
    assert delivery.remote_state == Delivery.ACCEPTED
    receiver = client.receiver("r", credit=0)
    assert client.replies(receiver) == []
    receiver.flow(1)
    client.pump()
    (reply,) = client.replies(receiver)
    body = json.loads(bytes(reply.body))
    assert reply.correlation_id == "c-1"
    assert body["op"] == "register" and body["api_version"] == "2019-03-31"
    assert json.loads(body["body"]) == {"payload": {"line": 2}}


def test_message_id_is_the_correlation_when_there_is_none():
    client = ClientEngine(DpsAmqpSession(EchoDeviceApi(), [], 96 * 1024))
    receiver = client.receiver("r")
    client.send(client.sender("s"), register(message_id="m-7"), "1")
    (reply,) = client.replies(receiver)
    assert reply.correlation_id == "m-7"
    assert json.loads(bytes(reply.body))["api_version"] == "2021-06-01"  # no link property: the default


def test_undecodable_message_is_rejected_with_decode_error():
    client = ClientEngine(DpsAmqpSession(EchoDeviceApi(), [], 96 * 1024))
    # An amqp-value section holding a string that is not UTF-8: proton cannot decode it.
    delivery = client.send(client.sender("s"), b"\x00Sw\xa1\x02\xff\xfe", "1")
    assert delivery.remote_state == Delivery.REJECTED
    assert delivery.remote.condition.name == "amqp:decode-error"


def test_links_beyond_the_bound_are_refused():
    client = ClientEngine(DpsAmqpSession(EchoDeviceApi(), [], 96 * 1024))
    links = [client.sender(f"s{i}") for i in range(MAX_LINKS + 1)]
    refused = links[-1]
    assert refused.state & Endpoint.REMOTE_CLOSED
    assert refused.remote_condition.name == "amqp:resource-limit-exceeded"
    assert not links[0].state & Endpoint.REMOTE_CLOSED


def test_garbage_instead_of_a_header_closes_with_the_engine_error():
    session = DpsAmqpSession(EchoDeviceApi(), [], 96 * 1024)
    notes = []
    session.note = notes.append
    session.receive(b"PUT /0ne1/registrations/x HTTP/1.1\r\n\r\n")
    answer = session.output()
    assert answer.startswith(b"AMQP")
    assert session.finished
    assert notes and "framing-error" in notes[0]


def test_sections_proton_reads_as_empty_get_the_400_answer():
    client = ClientEngine(DpsAmqpSession(EchoDeviceApi(), [], 96 * 1024))
    delivery = client.send(client.sender("s"), b"\xff\xff\xff\xff", "1")
    assert delivery.remote_state == Delivery.REJECTED
    assert json.loads(delivery.remote.condition.description)["errorCode"] == 400000


def test_detached_links_free_their_place_and_replies_go_to_the_new_receiver():
    client = ClientEngine(DpsAmqpSession(EchoDeviceApi(), [], 96 * 1024))
    for i in range(MAX_LINKS * 2):  # attach and detach again and again: never refused
        link = client.receiver(f"r{i}")
        assert not link.state & Endpoint.REMOTE_CLOSED
        link.close()
        client.pump()
    receiver = client.receiver("last")
    client.send(client.sender("s"), register(correlation_id="c-9"), "1")
    (reply,) = client.replies(receiver)
    assert reply.correlation_id == "c-9"

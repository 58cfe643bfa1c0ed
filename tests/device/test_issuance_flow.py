"""The sans-IO flow with certificate issuance: the csr in the register body, the chain in
the terminal result (docs/certificate-issuance.md)."""

import base64
import json

from device_sim.device import registration as reg


def answer(status, **state):
    body = {"operationId": "op-1", "status": status, "registrationState": {"status": status, **state}}
    return reg.Response(200, {}, json.dumps(body).encode())


def test_register_body_carries_the_csr_as_base64_der():
    flow = reg.RegistrationFlow("dev-1", {"a": 1}, csr=b"\x30\x03der")
    body = json.loads(flow.start().body)
    assert body == {"registrationId": "dev-1", "payload": {"a": 1},
                    "csr": base64.b64encode(b"\x30\x03der").decode()}


def test_without_csr_the_body_is_unchanged():
    assert json.loads(reg.RegistrationFlow("dev-1").start().body) == {"registrationId": "dev-1"}


def test_issued_chain_is_decoded_leaf_first():
    flow = reg.RegistrationFlow("dev-1", csr=b"x")
    flow.start()
    chain = [base64.b64encode(b"leaf").decode(), base64.b64encode(b"root").decode()]
    done = flow.receive(answer("assigned", assignedHub="h", deviceId="dev-1", issuedCertificateChain=chain))
    assert done.outcome.status == reg.ASSIGNED
    assert done.outcome.issued_chain == [b"leaf", b"root"]


def test_assigned_without_a_chain_after_a_csr_is_a_protocol_error():
    flow = reg.RegistrationFlow("dev-1", csr=b"x")
    flow.start()
    done = flow.receive(answer("assigned", assignedHub="h", deviceId="dev-1"))
    assert done.outcome.status == reg.PROTOCOL_ERROR
    assert "issuedCertificateChain" in done.outcome.error_message


def test_a_chain_that_is_not_base64_is_no_chain():
    flow = reg.RegistrationFlow("dev-1", csr=b"x")
    flow.start()
    done = flow.receive(answer("assigned", issuedCertificateChain=["not base64!"]))
    assert done.outcome.status == reg.PROTOCOL_ERROR
    assert reg.Outcome(reg.ASSIGNED, registration_state={"issuedCertificateChain": [1]}).issued_chain == []

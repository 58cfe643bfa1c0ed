"""The registration state machine fed with responses, no I/O."""

import json
import random

import pytest

from device_sim.device import registration as reg
from device_sim.device.driver import run_registration
from device_sim.device.transport import TransportTimeout


def status_body(status, operation_id="op-1", **state):
    document = {"operationId": operation_id, "status": status}
    if state:
        document["registrationState"] = state
    return json.dumps(document).encode()


def response(status, body=b"", **headers):
    return reg.Response(status, {k.replace("_", "-"): v for k, v in headers.items()}, body)


def new_flow(**kw):
    return reg.RegistrationFlow("dev-1", kw.pop("payload", None), rng=random.Random(1), **kw)


def test_start_sends_register_with_registration_id_and_payload():
    flow = new_flow(payload={"model": "x"})
    action = flow.start()
    assert action.kind == reg.REGISTER and action.delay == 0
    assert json.loads(action.body) == {"registrationId": "dev-1", "payload": {"model": "x"}}


def test_assigning_then_assigned_polls_with_retry_after():
    flow = new_flow()
    flow.start()
    poll = flow.receive(response(202, status_body("assigning"), retry_after="3"))
    assert (poll.kind, poll.operation_id, poll.delay) == (reg.POLL, "op-1", 3.0)
    again = flow.receive(response(202, status_body("assigning")))
    assert again.kind == reg.POLL and again.delay == 2.0  # SDK default without Retry-After
    done = flow.receive(response(200, status_body("assigned", assignedHub="h.example",
                                                   deviceId="dev-1", substatus="initialAssignment",
                                                   payload={"a": 1})))
    outcome = done.outcome
    assert outcome.status == reg.ASSIGNED
    assert (outcome.assigned_hub, outcome.device_id, outcome.substatus, outcome.payload) == (
        "h.example", "dev-1", "initialAssignment", {"a": 1})
    assert outcome.operation_id == "op-1"


def test_unassigned_keeps_polling():
    flow = new_flow()
    flow.start()
    assert flow.receive(response(202, status_body("unassigned"))).kind == reg.POLL


def test_immediate_200_assigned_needs_no_poll():
    flow = new_flow()
    flow.start()
    done = flow.receive(response(200, status_body("assigned", assignedHub="h")))
    assert done.outcome.status == reg.ASSIGNED


@pytest.mark.parametrize("status", ["failed", "disabled"])
def test_terminal_failed_and_disabled_carry_the_error(status):
    flow = new_flow()
    flow.start()
    flow.receive(response(202, status_body("assigning"), retry_after="0"))
    done = flow.receive(response(200, status_body(status, errorCode=400209, errorMessage="no hub")))
    assert done.outcome.status == status
    assert (done.outcome.error_code, done.outcome.error_message) == (400209, "no hub")


def test_401_is_unauthorized_with_service_error_code():
    flow = new_flow()
    flow.start()
    body = json.dumps({"errorCode": 401002, "message": "Invalid certificate", "trackingId": "t"}).encode()
    done = flow.receive(response(401, body))
    assert done.outcome.status == reg.UNAUTHORIZED
    assert (done.outcome.error_code, done.outcome.error_message, done.outcome.http_status) == (
        401002, "Invalid certificate", 401)


def test_other_4xx_is_rejected_even_without_json():
    flow = new_flow()
    flow.start()
    done = flow.receive(response(404, b"<html>nope</html>"))
    assert done.outcome.status == reg.REJECTED
    assert "404" in done.outcome.error_message


def test_429_retries_the_same_request_after_retry_after_plus_jitter():
    flow = new_flow()
    first = flow.start()
    retry = flow.receive(response(429, b"{}", retry_after="5"))
    assert retry.kind == reg.REGISTER and retry.body == first.body and retry.retry
    assert 5.0 <= retry.delay <= 6.0
    poll = flow.receive(response(202, status_body("assigning"), retry_after="1"))
    retry_poll = flow.receive(response(503, b""))
    assert retry_poll.kind == reg.POLL and retry_poll.operation_id == poll.operation_id
    assert 1.0 <= retry_poll.delay <= 1.2  # backoff base, first retry


def test_backoff_grows_without_retry_after_and_is_capped():
    flow = new_flow(policy=reg.RetryPolicy(backoff_base=1, backoff_cap=4, jitter=0))
    flow.start()
    delays = [flow.receive(response(500)).delay for _ in range(5)]
    assert delays == [1, 2, 4, 4, 4]


def test_retry_after_is_clamped_and_http_date_ignored():
    assert reg.parse_retry_after({"retry-after": "9999"}, 300) == 300
    assert reg.parse_retry_after({"retry-after": "-3"}, 300) == 0
    assert reg.parse_retry_after({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}, 300) is None


@pytest.mark.parametrize("body", [b"garbage", b"[1,2]", b"\xff\xfe", status_body("weird")])
def test_garbage_answers_are_protocol_errors(body):
    flow = new_flow()
    flow.start()
    done = flow.receive(response(200, body))
    assert done.outcome.status == reg.PROTOCOL_ERROR and done.outcome.error_message


def test_assigning_without_operation_id_is_a_protocol_error():
    flow = new_flow()
    flow.start()
    done = flow.receive(response(202, json.dumps({"status": "assigning"}).encode()))
    assert done.outcome.status == reg.PROTOCOL_ERROR


def test_receive_after_done_is_a_programming_error():
    flow = new_flow()
    flow.start()
    flow.receive(response(401))
    with pytest.raises(RuntimeError):
        flow.receive(response(401))


class ScriptedTransport:
    """A transport that replays answers: enough to test the driver's deadline logic."""

    def __init__(self, answers):
        self.answers = list(answers)
        self.sent = []
        self.closed = False

    def connect(self, timeout):
        pass

    def send_register(self, body, timeout):
        return self._next(("register", body))

    def send_poll(self, operation_id, timeout):
        return self._next(("poll", operation_id))

    def _next(self, request):
        self.sent.append(request)
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    def close(self):
        self.closed = True


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now

    def sleep(self, seconds):
        self.now += seconds


def test_driver_runs_register_then_polls_and_closes():
    transport = ScriptedTransport([
        response(202, status_body("assigning"), retry_after="1"),
        response(200, status_body("assigned", assignedHub="h")),
    ])
    clock = FakeClock()
    outcome, timings = run_registration(new_flow(), transport, 10, clock=clock, sleep=clock.sleep)
    assert outcome.status == reg.ASSIGNED
    assert [kind for kind, _ in transport.sent] == ["register", "poll"]
    assert transport.closed and timings.total_ms == 1000


def test_driver_stops_before_a_wait_that_passes_the_deadline():
    transport = ScriptedTransport([response(429, b"", retry_after="30")])
    clock = FakeClock()
    outcome, _ = run_registration(new_flow(), transport, 10, clock=clock, sleep=clock.sleep)
    assert outcome.status == reg.TIMEOUT and clock.now == 0


def test_driver_maps_transport_timeout():
    transport = ScriptedTransport([TransportTimeout("no answer within 1 s")])
    clock = FakeClock()
    outcome, _ = run_registration(new_flow(), transport, 1, clock=clock, sleep=clock.sleep)
    assert outcome.status == reg.TIMEOUT and "no answer" in outcome.error_message


from hypothesis import given, settings, strategies as st  # noqa: E402

any_body = st.one_of(
    st.binary(max_size=64),
    st.builds(lambda status, op: status_body(status, op),
              st.sampled_from(["assigning", "unassigned", "assigned", "failed", "disabled", "weird"]),
              st.text(max_size=8)),
)
any_response = st.builds(
    lambda status, body, retry_after: reg.Response(status, {} if retry_after is None else {"retry-after": retry_after}, body),
    st.sampled_from([200, 202, 301, 400, 401, 404, 429, 500, 503]),
    any_body,
    st.one_of(st.none(), st.text(max_size=6), st.integers(-5, 10_000).map(str)),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(any_response, min_size=1, max_size=12))
def test_any_answer_sequence_gives_a_valid_next_action(responses):
    policy = reg.RetryPolicy()
    flow = new_flow(policy=policy)
    action = flow.start()
    for answer in responses:
        action = flow.receive(answer)
        if isinstance(action, reg.Done):
            assert action.outcome.status in (reg.TERMINAL + (reg.UNAUTHORIZED, reg.REJECTED, reg.PROTOCOL_ERROR))
            break
        assert action.kind in (reg.REGISTER, reg.POLL)
        assert 0 <= action.delay <= max(policy.retry_after_cap, policy.backoff_cap) * (1 + policy.jitter)
        if action.kind == reg.POLL:
            assert action.operation_id


# -- connection failures: decided by the flow, bounded by the driver's deadline ----------------


def failed(cause, message="it broke"):
    return reg.ConnectionFailed(cause, message)


def test_refused_connections_are_retried_with_growing_jittered_waits():
    policy = reg.RetryPolicy()
    flow = new_flow(policy=policy)
    flow.start()
    waits = []
    for _ in range(6):
        action = flow.receive(failed(reg.REFUSED))
        assert (action.kind, action.retry, action.cause, action.reconnect) == (reg.REGISTER, True, reg.REFUSED, True)
        waits.append(action.delay)
    for n, wait in enumerate(waits):
        base = min(policy.reconnect_base * 2 ** n, policy.reconnect_cap)
        assert base <= wait <= base * (1 + policy.reconnect_jitter)
    assert flow.retries_by_cause == {reg.REFUSED: 6} and flow.total_retries == 6


def test_a_connection_dropped_after_register_resumes_by_polling():
    flow = new_flow()
    flow.start()
    poll = flow.receive(response(202, status_body("assigning", "op-9"), retry_after="1"))
    again = flow.receive(failed(reg.DROPPED))
    assert (again.kind, again.operation_id, again.cause) == (reg.POLL, "op-9", reg.DROPPED)
    again = flow.receive(failed(reg.REFUSED))
    assert again.kind == reg.POLL  # still the poll, never a second register
    done = flow.receive(response(200, status_body("assigned", "op-9", assignedHub="h")))
    assert done.outcome.status == reg.ASSIGNED and poll.kind == reg.POLL
    assert flow.retries_by_cause == {reg.DROPPED: 1, reg.REFUSED: 1}


@pytest.mark.parametrize("cause, status", [(reg.NO_ROUTE, reg.UNREACHABLE), (reg.TLS_REJECTED, reg.TLS_ERROR),
                                           (reg.BAD_ANSWER, reg.PROTOCOL_ERROR), (reg.NO_ANSWER, reg.TIMEOUT)])
def test_failures_retrying_cannot_change_end_at_once(cause, status):
    flow = new_flow()
    flow.start()
    done = flow.receive(failed(cause, "why"))
    assert done.outcome.status == status and "why" in done.outcome.error_message
    assert flow.total_retries == 0


def test_expiry_while_retrying_reports_the_failure_not_a_plain_timeout():
    flow = new_flow()
    flow.start()
    flow.receive(failed(reg.TLS_EOF, "peer hung up"))
    done = flow.expire("no time left")
    assert done.outcome.status == reg.TLS_ERROR and "peer hung up" in done.outcome.error_message
    assert flow.retries_by_cause == {} and flow.requests == 1  # the unsent retry is not counted


class RefusingTransport(ScriptedTransport):
    """Every connect refused, in no time."""

    def __init__(self):
        super().__init__([])
        self.attempts = 0

    def connect(self, timeout):
        from device_sim.device.transport import Unreachable

        self.attempts += 1
        raise Unreachable("connection refused", reg.REFUSED)


@pytest.mark.parametrize("timeout", [1.0, 3.0, 10.0, 60.0])
def test_only_refused_connections_end_unreachable_at_the_deadline(timeout):
    transport, clock = RefusingTransport(), FakeClock()
    outcome, timings = run_registration(new_flow(), transport, timeout, clock=clock, sleep=clock.sleep)
    assert outcome.status == reg.UNREACHABLE, outcome
    assert timeout - 1 <= clock.now <= timeout  # kept trying until the deadline, never past it
    assert timings.retries_by_cause == {reg.REFUSED: transport.attempts - 1}
    assert timings.requests == transport.attempts


def test_service_asked_waits_past_the_deadline_are_still_not_started():
    transport = ScriptedTransport([response(503, b"", retry_after="30")])
    clock = FakeClock()
    outcome, timings = run_registration(new_flow(), transport, 10, clock=clock, sleep=clock.sleep)
    assert outcome.status == reg.TIMEOUT and clock.now == 0
    assert timings.retries_by_cause == {} and timings.requests == 1

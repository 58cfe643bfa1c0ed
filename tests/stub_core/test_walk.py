"""The enrollment walk as a pure function over an in-memory view."""

import datetime as dt

from device_sim.common.x509util import sha256_thumbprint as tp
from device_sim.stub.core.enrollment_walk import (ASSIGN, DISABLED, GROUP, INDIVIDUAL, UNAUTHORIZED,
                                             Entry, MemoryView, decide)

from device_sim.testing import TestCA

NOW = dt.datetime.now(dt.timezone.utc)


def group(cert, name, enabled=True):
    return {tp(cert): Entry(GROUP, name, enabled, {"enrollmentGroupId": name})}


def individual(device, enabled=True, device_id=None):
    doc = {"registrationId": "x"}
    if device_id:
        doc["deviceId"] = device_id
    return {tp(device.cert): Entry(INDIVIDUAL, "x", enabled, doc)}


def test_five_device_example_from_design():
    root = TestCA("Test Root")
    a, b = root.issue_intermediate("A"), root.issue_intermediate("B")
    devices = [a.issue_leaf(f"device-{i}") for i in (1, 2, 3)] + [b.issue_leaf(f"device-{i}") for i in (4, 5)]
    view = MemoryView(groups=group(root.cert, "root-group"), verified=[root.cert])
    assert [decide(d.chain, view, NOW).outcome for d in devices] == [ASSIGN] * 5

    view.groups.update(group(b.cert, "b-group", enabled=False))
    assert [decide(d.chain, view, NOW).outcome for d in devices] == \
        [ASSIGN, ASSIGN, ASSIGN, DISABLED, DISABLED]

    view.individuals.update(individual(devices[2], enabled=False))
    outcomes = [decide(d.chain, view, NOW) for d in devices]
    assert [o.outcome for o in outcomes] == [ASSIGN, ASSIGN, DISABLED, DISABLED, DISABLED]
    assert outcomes[2].entry.kind == INDIVIDUAL and outcomes[3].entry.id == "b-group"


def test_verified_root_group_on_intermediate2_needs_intermediate1():
    root = TestCA("Test Root")
    int1 = root.issue_intermediate("Int1")
    int2 = int1.issue_intermediate("Int2")
    leaf = int2.issue_leaf("dev")
    view = MemoryView(groups=group(int2.cert, "g2"), verified=[root.cert])
    short = decide([leaf.cert, int2.cert], view, NOW)
    assert short.outcome == UNAUTHORIZED and "verified" in short.reason
    assert decide([leaf.cert, int2.cert, int1.cert], view, NOW).outcome == ASSIGN
    assert decide([leaf.cert, int2.cert, int1.cert, root.cert], view, NOW).outcome == ASSIGN


def test_unverified_ca_does_not_authenticate():
    root = TestCA("Test Root")
    leaf = root.issue_intermediate("I").issue_leaf("dev")
    view = MemoryView(groups=group(root.cert, "g"))
    decision = decide(leaf.chain, view, NOW)
    assert decision.outcome == UNAUTHORIZED and decision.entry.id == "g"


def test_group_must_be_in_presented_chain():
    root = TestCA("Test Root")
    inter = root.issue_intermediate("I")
    leaf = inter.issue_leaf("dev")
    view = MemoryView(groups=group(root.cert, "root-group"), verified=[root.cert])
    assert decide([leaf.cert, inter.cert], view, NOW).outcome == UNAUTHORIZED
    assert decide([leaf.cert, inter.cert, root.cert], view, NOW).outcome == ASSIGN


def test_verified_certificate_below_the_group_does_not_count():
    root = TestCA("Test Root")
    inter = root.issue_intermediate("I")
    leaf = inter.issue_leaf("dev")
    view = MemoryView(groups=group(root.cert, "root-group"), verified=[inter.cert])
    assert decide(leaf.chain, view, NOW).outcome == UNAUTHORIZED
    view.verified.append(root.cert)
    assert decide(leaf.chain, view, NOW).outcome == ASSIGN


def test_lower_disabled_group_beats_enabled_group_above():
    root = TestCA("Test Root")
    inter = root.issue_intermediate("I")
    leaf = inter.issue_leaf("dev")
    groups = {**group(root.cert, "top"), **group(inter.cert, "low", enabled=False)}
    view = MemoryView(groups=groups, verified=[root.cert])
    decision = decide(leaf.chain, view, NOW)
    assert (decision.outcome, decision.entry.id) == (DISABLED, "low")


def test_individual_before_group_and_device_id():
    root = TestCA("Test Root")
    leaf = root.issue_intermediate("I").issue_leaf("dev-7")
    view = MemoryView(individuals=individual(leaf, device_id="custom-id"),
                      groups=group(root.cert, "g"), verified=[root.cert])
    decision = decide(leaf.chain, view, NOW)
    assert (decision.outcome, decision.entry.kind, decision.device_id) == (ASSIGN, INDIVIDUAL, "custom-id")
    view.individuals.clear()
    decision = decide(leaf.chain, view, NOW)
    assert (decision.entry.kind, decision.device_id, decision.registration_id) == (GROUP, "dev-7", "dev-7")


def test_individual_ca_signed_leaf_needs_verified_ca():
    root = TestCA("Test Root")
    leaf = root.issue_leaf("dev")
    view = MemoryView(individuals=individual(leaf))
    assert decide(leaf.chain, view, NOW).outcome == UNAUTHORIZED
    view.verified.append(root.cert)
    assert decide(leaf.chain, view, NOW).outcome == ASSIGN
    # root verified in the store but not sent: the leaf's issuer is found by name + signature
    assert decide([leaf.cert], view, NOW).outcome == ASSIGN


def test_individual_self_signed_leaf():
    leaf = TestCA.self_signed_leaf("selfie")
    assert decide([leaf.cert], MemoryView(individuals=individual(leaf)), NOW).outcome == ASSIGN
    assert decide([leaf.cert], MemoryView(), NOW).outcome == UNAUTHORIZED


def test_no_chain_and_no_entry():
    assert decide([], MemoryView(), NOW).outcome == UNAUTHORIZED
    root = TestCA("Test Root")
    leaf = root.issue_leaf("dev")
    decision = decide(leaf.chain, MemoryView(verified=[root.cert]), NOW)
    assert decision.outcome == UNAUTHORIZED and "no enrollment" in decision.reason


def test_chain_out_of_order_fails():
    root = TestCA("Test Root")
    int1 = root.issue_intermediate("Int1")
    int2 = int1.issue_intermediate("Int2")
    leaf = int2.issue_leaf("dev")
    view = MemoryView(groups=group(int2.cert, "g"), verified=[root.cert])
    decision = decide([leaf.cert, int1.cert, int2.cert], view, NOW)
    assert decision.outcome == UNAUTHORIZED and "issuing order" in decision.reason


def test_forged_signature_fails():
    root = TestCA("Test Root")
    impostor = TestCA("Test Root")  # same name, other key
    leaf = impostor.issue_leaf("dev")
    view = MemoryView(groups=group(root.cert, "g"), verified=[root.cert])
    decision = decide([leaf.cert, root.cert], view, NOW)
    assert decision.outcome == UNAUTHORIZED and "signature" in decision.reason
    # and the store signer is not fooled either
    assert decide([leaf.cert], MemoryView(individuals=individual(leaf), verified=[root.cert]),
                  NOW).outcome == UNAUTHORIZED


def test_validity_period_is_checked_for_every_certificate():
    root = TestCA("Test Root")
    expired = root.issue_leaf("old", not_before=NOW - dt.timedelta(days=10), not_after=NOW - dt.timedelta(days=1))
    future = root.issue_leaf("new", not_before=NOW + dt.timedelta(days=1), not_after=NOW + dt.timedelta(days=10))
    view = MemoryView(groups=group(root.cert, "g"), verified=[root.cert])
    for device in (expired, future):
        decision = decide(device.chain, view, NOW)
        assert decision.outcome == UNAUTHORIZED and "validity" in decision.reason
    later = NOW + dt.timedelta(days=2)
    assert decide(future.chain, view, later).outcome == ASSIGN
    assert decide(root.issue_leaf("x").chain, view, NOW + dt.timedelta(days=400)).outcome == UNAUTHORIZED


def test_ca_flags_and_path_length():
    root = TestCA("Test Root")
    not_ca = root.issue_intermediate("NotCA", ca=False)
    leaf = not_ca.issue_leaf("dev")
    view = MemoryView(groups=group(root.cert, "g"), verified=[root.cert])
    assert "not a CA" in decide(leaf.chain, view, NOW).reason
    no_sign = root.issue_intermediate("NoSign", key_cert_sign=False)
    assert "keyCertSign" in decide(no_sign.issue_leaf("dev").chain, view, NOW).reason

    short_root = TestCA("Short", path_length=1)
    int1 = short_root.issue_intermediate("I1")
    int2 = int1.issue_intermediate("I2")
    view = MemoryView(groups=group(short_root.cert, "g"), verified=[short_root.cert])
    assert decide(int1.issue_leaf("ok").chain, view, NOW).outcome == ASSIGN
    assert "pathLen" in decide(int2.issue_leaf("bad").chain, view, NOW).reason

"""What `device-sim stub status` and `registration list` read: the core's counts and the
whole-instance registration list, paged like the DPS lists."""

import pytest

from device_sim.testing import TestCA

from .env import Env
from .test_device_api import assert_error


@pytest.fixture
def env(tmp_path):
    return Env(tmp_path)


def test_status_counts_what_the_store_holds(env):
    empty = env.call("GET", "/emulator/status")
    assert empty.status == 200
    assert empty.body["certificates"] == {"total": 0, "verified": 0}
    assert empty.body["registrations"] == {"total": 0, "byStatus": {}}
    assert [h["name"] for h in empty.body["hubs"]] == ["hub1.example", "hub2.example"]
    assert "server" not in empty.body

    root = TestCA("Test Root")
    inter = root.issue_intermediate("I")
    env.upload_ca("root", root.cert)
    env.upload_ca("other", TestCA("Other").cert, verified=False)
    env.group("line", ca_name="root")
    env.group("off", ca_cert=TestCA("Off").issue_intermediate("Off I").cert, status="disabled")
    for i in range(3):
        assert env.provision(inter.issue_leaf(f"dev-{i}")).status == 200
    selfie = TestCA.self_signed_leaf("selfie")
    env.enroll(selfie, status="disabled")
    env.provision(selfie)
    body = env.call("GET", "/emulator/status").body
    assert body["idScope"] == env.config.id_scope
    assert body["certificates"] == {"total": 2, "verified": 1}
    assert (body["enrollments"], body["enrollmentGroups"]) == (1, 2)
    assert body["registrations"] == {"total": 4, "byStatus": {"assigned": 3, "disabled": 1}}
    assert sum(h["assignedRegistrations"] for h in body["hubs"]) == 3
    assert_error(env.call("POST", "/emulator/status"), 405000)
    assert_error(env.call("GET", "/emulator/status", token=False), 401000)


def test_status_includes_the_servers_part(tmp_path):
    env = Env(tmp_path)
    env.service.status.server_part = lambda: {"uptimeSeconds": 12}
    assert env.call("GET", "/emulator/status").body["server"] == {"uptimeSeconds": 12}


def test_every_registration_listed_page_by_page(env):
    root = TestCA("Test Root")
    inter = root.issue_intermediate("I")
    env.upload_ca("root", root.cert)
    env.group("line", ca_name="root")
    for i in range(4):
        env.provision(inter.issue_leaf(f"dev-{i}"))
    selfie = TestCA.self_signed_leaf("a-selfie")
    env.enroll(selfie)
    env.provision(selfie)
    first = env.call("POST", "/emulator/registrations/query", {"query": "*"},
                     headers={"x-ms-max-item-count": "3"})
    assert [r["registrationId"] for r in first.body] == ["a-selfie", "dev-0", "dev-1"]
    assert first.headers["x-ms-item-type"] == "DeviceRegistration"
    rest = env.call("POST", "/emulator/registrations/query", {"query": "*"},
                    headers={"x-ms-continuation": first.headers["x-ms-continuation"]})
    assert [r["registrationId"] for r in rest.body] == ["dev-2", "dev-3"]
    assert "x-ms-continuation" not in rest.headers
    group_only = env.call("POST", "/registrations/line/query")
    assert [r["registrationId"] for r in group_only.body] == [f"dev-{i}" for i in range(4)]
    assert_error(env.call("POST", "/emulator/registrations/query", {"query": "SELECT x"}), 400000)

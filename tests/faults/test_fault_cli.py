"""`stub serve --faults FILE`, `device-sim stub faults show|set|clear`, and the plan with
its counters in the ready line and `stub status`, through the CLI as a user runs it."""

from __future__ import annotations

import json

from device_sim.testing import Emulator
from stub_server.emulator_proc import cli, stub_admin

PLAN = {"seed": 7, "rules": [
    {"match": {"operation": "register"}, "probability": 0.2, "action": {"status": 503, "retry_after": 1}},
    {"match": {"operation": "poll", "registration_id": "line1-*"}, "probability": 0.1,
     "action": {"close": "after_request"}},
    {"match": {}, "window": {"start_s": 5, "duration_s": 3}, "action": {"refuse_connections": True}},
    {"match": {"transport": "mqtt"}, "probability": 0.5, "action": {"latency_ms": [50, 400]}},
]}


def test_serve_with_a_plan_then_show_set_clear(tmp_path):
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(json.dumps(PLAN))
    emulator = Emulator.spawn(tmp_path / "home", "--retry-after", "0", "--faults", str(plan_file), "--quota-units", "2")
    try:
        assert emulator.ready["faults"] == {"seed": 7, "rules": 4}
        assert emulator.ready["quota_units"] == 2
        shown = json.loads(stub_admin(emulator, "faults", "show", "--json").stdout)
        assert [r["matched"] for r in shown["rules"]] == [0, 0, 0, 0] and shown["seed"] == 7
        assert shown["rules"][0]["action"] == {"status": 503, "retry_after": 1}
        status = stub_admin(emulator, "status").stdout
        assert "fault plan\tseed 7, 4 rule(s)" in status and "quota units\t2" in status
        assert "rule 3\tmatched 0\tfired 0" in status

        other = tmp_path / "other.json"
        other.write_text('{"seed": 1, "rules": [{"match": {"operation": "service"}, "action": {"status": 500}}]}')
        assert "rule 0\tmatched 0\tfired 0" in stub_admin(emulator, "faults", "set", other).stdout
        # The plan now spoils service operations: the admin verbs say so in one line...
        failed = stub_admin(emulator, "group", "list", check=False)
        assert failed.returncode == 3 and "500" in failed.stderr and "Traceback" not in failed.stderr
        # ...and the plan's own path still answers, with the counter moved.
        shown = json.loads(stub_admin(emulator, "faults", "show", "--json").stdout)
        assert shown["rules"][0]["fired"] == 1
        assert json.loads(stub_admin(emulator, "status", "--json").stdout)["faults"]["seed"] == 1
        assert stub_admin(emulator, "faults", "clear").stdout.strip() == "fault plan cleared"
        assert stub_admin(emulator, "faults", "show").stdout.strip() == "(no fault plan)"
        assert stub_admin(emulator, "group", "list").returncode == 0
    finally:
        emulator.stop()


def test_a_bad_plan_is_refused_in_one_line_naming_the_field(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"rules": [{"match": {"operation": "regster"}, "action": {"status": 503}}]}')
    result = cli("stub", "serve", "--home", tmp_path / "home", "--faults", bad, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "rules[0].match.operation" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    emulator = Emulator.spawn(tmp_path / "home2")
    try:
        result = stub_admin(emulator, "faults", "set", bad, check=False)
        assert result.returncode == 2 and "rules[0].match.operation" in result.stderr
        assert "faults" not in emulator.ready  # no plan: the ready line is as before
    finally:
        emulator.stop()

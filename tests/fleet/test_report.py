"""The fleet report's arithmetic and the plot file, on hand-made records."""

import json

import pytest

from device_sim.fleet.plot import write_plot
from device_sim.fleet.report import DeviceResult, FleetReport, percentile, render_text
from device_sim.common.errors import UserError


def make(i, status="assigned", total=None, hub="hub-a"):
    return DeviceResult(
        registration_id=f"dev-{i}", status=status, started_s=i / 10,
        tls_ms=10.0, register_ms=2.0, wait_ms=1.0, total_ms=float(total if total is not None else i),
        assigned_hub=hub if status == "assigned" else None,
        error_code="401002" if status == "unauthorized" else None,
    )


def test_percentile_is_nearest_rank():
    values = list(range(1, 101))
    assert percentile(values, 50) == 50
    assert percentile(values, 99) == 99
    assert percentile(values, 100) == 100
    assert percentile([7.0], 90) == 7.0


def test_summary_counts_outcomes_hubs_and_rate():
    devices = [make(i) for i in range(1, 101)] + [make(200, "unauthorized"), make(201, "cancelled")]
    devices[0].assigned_hub = "hub-b"
    devices[5].retries = 3
    summary = FleetReport(wall_s=2.0, devices=devices, interrupted=True).summary()
    assert summary["registrations_per_s"] == 50.0
    assert summary["outcomes"] == {"assigned": 100, "unauthorized": 1, "cancelled": 1}
    assert summary["errors"] == {"401002": 1}
    assert summary["hubs"] == {"hub-a": 99, "hub-b": 1}
    assert summary["retries"] == 3
    assert summary["finished"] == 101
    total = summary["latency_ms"]["total_ms"]
    assert (total["p50"], total["p90"], total["p99"], total["max"]) == (50, 90, 99, 100)
    text = render_text(summary)
    assert "interrupted" in text and "401002" in text


def test_report_json_has_one_record_per_device():
    report = FleetReport(wall_s=1.0, devices=[make(i) for i in range(3)], settings={"concurrency": 2})
    data = json.loads(json.dumps(report.to_dict()))
    assert [d["registration_id"] for d in data["devices"]] == ["dev-0", "dev-1", "dev-2"]
    assert data["settings"]["concurrency"] == 2


def test_unknown_plot_format_is_refused(tmp_path):
    with pytest.raises(UserError, match=r"\.html or \.png"):
        write_plot(tmp_path / "plot.bmp", [make(1)], "run")
    assert not list(tmp_path.iterdir())


def test_retries_are_summed_per_cause_and_shown():
    devices = [make(i) for i in range(4)]
    devices[0].retries, devices[0].retries_by_cause = 3, {"refused": 2, "throttled": 1}
    devices[1].retries, devices[1].retries_by_cause = 2, {"refused": 1, "dropped": 1}
    summary = FleetReport(wall_s=1.0, devices=devices).summary()
    assert summary["retries"] == 5
    assert summary["retries_by_cause"] == {"refused": 3, "throttled": 1, "dropped": 1}
    assert "retries: 5 (refused 3, throttled 1, dropped 1)" in render_text(summary)

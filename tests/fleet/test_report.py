"""The fleet report's arithmetic and the plot file, on hand-made records."""

import json

import pytest

from device_sim.fleet.plot import write_plot
from device_sim.fleet.records import RunLog, write_json_report
from device_sim.fleet.report import (FIRST_FAILED, DeviceResult, FleetReport, explain_throughput, percentile,
                                     render_text)
from device_sim.fleet.runner import FleetSettings, arrival_s
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


def test_failures_have_their_own_percentiles_and_are_not_counted_at_zero():
    devices = [make(i) for i in range(1, 11)] + [make(100 + i, "unauthorized", total=500 + i) for i in range(3)]
    timeout = DeviceResult("dev-t", "timeout", total_ms=60000.0, error_message="no final answer")  # never connected
    summary = FleetReport(wall_s=1.0, devices=devices + [timeout]).summary()
    assert summary["latency_ms"]["total_ms"]["count"] == 10 and summary["latency_ms"]["total_ms"]["max"] == 10
    by_outcome = summary["latency_ms_by_outcome"]
    # HdrHistogram, 3 significant digits: within 0.1% above the recorded value
    assert by_outcome["unauthorized"]["total_ms"]["p50"] == pytest.approx(501, rel=1e-3) and by_outcome["unauthorized"]["total_ms"]["count"] == 3
    assert by_outcome["timeout"] == {"total_ms": {"p50": 60000.0, "p90": 60000.0, "p99": 60000.0, "max": 60000.0,
                                                  "count": 1}}  # phases it never reached are absent, not 0
    text = render_text(summary)
    assert "latency ms, timeout (1)" in text and "  dev-t  timeout: no final answer" in text
    assert "other" not in text


def test_text_names_the_first_ten_failed_devices_and_the_json_all(tmp_path):
    log = RunLog(tmp_path / "r.jsonl")
    for i in range(25):
        log.add_result(make(i, "unauthorized" if i % 2 else "assigned"))
    log.close()
    summary = log.summary(wall_s=1.0)
    assert len(summary["first_failed"]) == FIRST_FAILED
    assert "failed devices (10 of 12 shown):" in render_text(summary)
    assert [f["registration_id"] for f in log.failed()] == [f"dev-{i}" for i in range(1, 25, 2)]
    write_json_report(tmp_path / "r.json", log, settings={"concurrency": 4}, summary=summary)
    data = json.loads((tmp_path / "r.json").read_text())
    assert len(data["failed"]) == 12 and len(data["devices"]) == 25 and data["summary"] == summary
    assert data["devices"][3] == make(3, "unauthorized").to_dict() and data["records"] == str(tmp_path / "r.jsonl")


def test_a_coordinator_merges_records_of_several_workers(tmp_path):
    merged = RunLog(tmp_path / "merged.jsonl")
    for worker in ("w1", "w2"):
        for i in range(3):
            merged.add({**make(i).to_dict(), "registration_id": f"{worker}-{i}", "worker": worker})
    merged.add({**make(9, "cancelled").to_dict(), "worker": "w2"})
    merged.close()
    summary = merged.summary(wall_s=1.0, concurrency=8)
    assert summary["workers"] == {"w1": 3, "w2": 4} and summary["outcomes"] == {"assigned": 6, "cancelled": 1}
    assert summary["finished"] == 6 and summary["latency_ms"]["total_ms"]["count"] == 6
    lines = (tmp_path / "merged.jsonl").read_text().splitlines()
    assert len(lines) == 7 and json.loads(lines[0])["worker"] == "w1"
    assert "workers: w1 3, w2 4" in render_text(summary)


def test_arrivals_ramp_linearly_then_stay_constant():
    assert [arrival_s(i, 10) for i in (0, 1, 10)] == [0.0, 0.1, 1.0]
    # 10/s after 4 s: 20 devices arrive during the ramp; the rate at t is 10 t / 4.
    assert arrival_s(0, 10, 4) == 0.0 and arrival_s(5, 10, 4) == pytest.approx(2.0)
    assert arrival_s(20, 10, 4) == pytest.approx(4.0) and arrival_s(30, 10, 4) == pytest.approx(5.0)
    gaps = [arrival_s(i + 1, 10, 4) - arrival_s(i, 10, 4) for i in range(40)]
    assert all(a >= b - 1e-9 for a, b in zip(gaps[:20], gaps[1:21]))  # ever shorter gaps while ramping
    assert gaps[25] == pytest.approx(0.1)


def test_ramp_needs_a_rate():
    with pytest.raises(UserError, match="--ramp needs --rate"):
        FleetSettings(ramp=10)
    with pytest.raises(UserError, match="--ramp must be a positive"):
        FleetSettings(rate=5, ramp=0)


def _explain(**kw):
    base = dict(finished=500, assigned=500, wall_s=8.0, busy_ms=500 * 1020.0, poll_wait_ms=500 * 1000.0, polls=500,
                concurrency=64, rate=None, ramp=None)
    return explain_throughput(**{**base, **kw})


def test_throughput_bound_by_concurrency_and_retry_after():
    out = _explain()
    assert out["bound"] == "concurrency_x_retry_after" and out["retry_after_s"] == 1.0
    assert out["mean_in_flight"] == 63.8 and out["littles_law_per_s"] == 62.7
    assert out["explanation"].startswith("500 devices at concurrency 64 with Retry-After 1 s: bounded by "
                                         "concurrency x retry-after (about 64/s; 62.5/s achieved)")


def test_throughput_bound_by_concurrency_alone_or_not_at_all():
    busy = _explain(busy_ms=500 * 1020.0, poll_wait_ms=0.0, polls=0)
    assert busy["bound"] == "concurrency" and "Little's law: 64 / 1020 ms mean latency = 62.7/s" in busy["explanation"]
    idle = _explain(busy_ms=500 * 300.0, poll_wait_ms=0.0, polls=0)  # 18.8 in flight of 64
    assert idle["bound"] is None and "not bounded by concurrency: in flight averaged 18.8 of 64" in idle["explanation"]
    paced = _explain(busy_ms=500 * 300.0, rate=60.0, ramp=5.0)
    assert paced["bound"] == "rate" and "--rate 60/s after a 5 s ramp" in paced["explanation"]
    small = _explain(finished=10, assigned=10, busy_ms=10 * 300.0, wall_s=0.4)
    assert small["bound"] == "fleet_size"
    assert _explain(finished=0, assigned=0)["explanation"] == "no device finished"

"""`fleet run --plot`: the files matplotlib writes, what the panels show, and the cost of a
large run, on records made here (plain data as the fleet writes them)."""

from __future__ import annotations

import math
import random
import time
import tracemalloc
import xml.etree.ElementTree as ET

import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg

from device_sim.common.errors import UserError
from device_sim.device import registration as reg
from device_sim.fleet import plot
from device_sim.fleet.report import CANCELLED, STATUSES, DeviceResult, percentile

FAILURES = ("timeout", "unreachable", "tls_error", "throttled")  # throttled: not a known status


def record(i, status="assigned", started=None, total=None, worker=None):
    started = i / 20 if started is None else started
    done = status == "assigned"
    rec = {
        "registration_id": f"dev-{i}", "status": status, "started_s": started,
        "tls_ms": 10.0 + i % 7 if status != "unreachable" else None,
        "register_ms": 3.0 + i % 5 if done else None, "wait_ms": 40.0 + i % 50 if done else None,
        "total_ms": (60.0 + i % 50 if done else 5000.0 + i) if total is None else total,
        "retries": i % 3, "retries_by_cause": {"throttled": i % 3} if i % 3 else {},
        "error_code": None if done else "x", "error_message": None if done else "it failed",
    }
    if worker:
        rec["worker"] = worker
    return rec


def sample_run():
    records = [record(i) for i in range(200)]
    records += [record(200 + i, FAILURES[i % len(FAILURES)]) for i in range(20)]
    return records


def panels(figure):
    return {ax.get_title(loc="left").split(" (")[0]: ax for sub in figure.subfigs for ax in sub.axes}


def drawn(records, title="run"):
    columns = plot.RunColumns.read(records)
    return plot.draw(columns, plot.heading_for(columns, title))


def legend_names(ax):
    legend = ax.get_legend()
    return [] if legend is None else [t.get_text() for t in legend.get_texts()]


def check_file(path, fmt):
    data = path.read_bytes()
    if fmt == "png":
        assert data.startswith(b"\x89PNG\r\n\x1a\n")
    elif fmt == "pdf":
        assert data.startswith(b"%PDF-") and data.rstrip().endswith(b"%%EOF")
    elif fmt == "svg":
        assert ET.fromstring(data).tag == "{http://www.w3.org/2000/svg}svg"
    else:
        text = data.decode("utf-8")
        assert text.startswith("<!doctype html>") and text.count("<svg") == 2 and "<?xml" not in text
        for start in range(2):  # each inlined figure is a whole SVG document
            begin = _nth(text, "<svg", start)
            ET.fromstring(text[begin:text.index("</svg>", begin) + len("</svg>")])


def _nth(text, needle, n):
    at = -1
    for _ in range(n + 1):
        at = text.index(needle, at + 1)
    return at


@pytest.mark.parametrize("fmt", ["png", "svg", "pdf", "html"])
def test_each_format_is_a_valid_file_of_its_kind(tmp_path, fmt):
    out = tmp_path / f"plot.{fmt}"
    plot.write_plot(out, iter(sample_run()), "run of 220")
    check_file(out, fmt)
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # no temporary file left


@pytest.mark.parametrize("fmt", ["png", "svg", "pdf", "html"])
def test_an_empty_run_still_plots(tmp_path, fmt):
    out = tmp_path / f"empty.{fmt}"
    plot.write_plot(out, iter([]), "nothing")
    check_file(out, fmt)
    assert all(legend_names(ax) == [] for ax in panels(drawn([])).values() if ax.get_title() != "")


def test_html_shows_the_summary_as_a_table(tmp_path):
    out = tmp_path / "plot.html"
    summary = {"devices": 220, "registrations_per_s": 12.5,
               "latency_ms": {"tls_ms": {"p50": 11.0, "p99": 16.0}, "total_ms": {"p50": 80.0, "p99": 109.0}},
               "outcomes": {"assigned": 200, "timeout": 5}}
    plot.write_plot(out, sample_run(), "run <220>", summary)
    text = out.read_text()
    assert "<h1>run &lt;220&gt;</h1>" in text and "<th>registrations_per_s</th><td>12.5</td>" in text
    assert "<th>tls_ms</th><td>11.0</td><td>16.0</td>" in text and "assigned 200, timeout 5" in text


def test_html_summary_tables_nested_records_and_lists(tmp_path):
    out = tmp_path / "plot.html"
    summary = {"first_failed": [{"registration_id": "dev-3", "status": "timeout", "error_message": "<late>"}],
               "latency_ms_by_outcome": {"timeout": {"total_ms": {"p50": 5000.0, "count": 5}}},
               "throughput": {"bound": "concurrency", "detail": {"in_flight": 63.8}}, "hubs": {}}
    plot.write_plot(out, sample_run(), "run", summary)
    text = out.read_text()
    assert "<td>dev-3</td><td>timeout</td><td>&lt;late&gt;</td>" in text
    assert "<th>timeout</th><td><table>" in text and "<td>5000.0</td><td>5</td>" in text
    assert "<th>bound</th><td>concurrency</td>" in text and "in_flight 63.8" in text
    assert "<th>hubs</th><td>-</td>" in text and "{" not in text.split("<body>")[1].split("<svg")[0]


def test_outcome_legend_lists_exactly_the_statuses_present_by_name():
    records = sample_run() + [{"registration_id": "late", "status": CANCELLED, "started_s": 0.0}]
    figure = drawn(records)
    present = ["assigned", "timeout", "unreachable", "tls_error", "throttled"]  # known order, then others
    assert legend_names(panels(figure)["Outcomes by status"]) == present
    cdf = legend_names(panels(figure)["Total latency per outcome"])
    assert [name.split(" ")[0] for name in cdf] == present and cdf[0] == "assigned (200)"
    assert "1 cancelled (never started)" in figure.get_suptitle()


def test_outcome_bars_stack_to_the_devices_finished_per_bucket():
    records = [record(i, started=0.0, total=100.0) for i in range(30)]
    records += [record(30 + i, "timeout", started=0.0, total=100.0) for i in range(10)]
    ax = panels(drawn(records))["Outcomes by status"]
    heights = {c.get_label(): sum(bar.get_height() for bar in c) for c in ax.containers}
    assert heights == {"assigned": 30, "timeout": 10}


def test_percentiles_over_time_leave_failures_out():
    # failures finish in the same buckets with far larger latencies: any of them in p99 would show
    records = [record(i, started=i / 10, total=100.0) for i in range(100)]
    records += [record(100 + i, "timeout", started=i / 10, total=90_000.0) for i in range(100)]
    ax = panels(drawn(records))["Latency per phase, assigned devices only"]
    lines = {line.get_label(): line.get_ydata() for line in ax.get_lines()}
    p99 = [y for y in lines["total p99"] if not math.isnan(y)]
    assert p99 and max(p99) == 100.0
    assert "throttled" not in lines  # phases only, p50 and p99 of each
    assert sorted(lines) == sorted(f"{p} p{q}" for p in ("tls", "register", "wait", "total") for q in (50, 99))


def test_latency_distribution_keeps_each_outcome_apart():
    records = [record(i, total=float(50 + i)) for i in range(100)]
    records += [record(100 + i, "timeout", total=30_000.0) for i in range(5)]
    ax = panels(drawn(records))["Total latency per outcome"]
    by_name = {line.get_label().split(" ")[0]: line.get_xdata() for line in ax.get_lines()}
    assert max(by_name["assigned"]) == 149.0 and set(by_name["timeout"]) == {30_000.0}


def test_bucket_percentiles_follow_the_reports_nearest_rank_rule():
    import numpy as np

    rnd = random.Random(7)
    buckets = np.array([rnd.randrange(5) for _ in range(500)], dtype=np.int64)
    values = np.array([rnd.uniform(0, 1000) for _ in range(500)])
    values[::17] = np.nan  # absent latencies are not samples
    for pct in (50, 99):
        got = plot.nearest_rank_by_bucket(buckets, values, 6, pct)
        for b in range(5):
            mine = sorted(v for v, k in zip(values, buckets) if k == b and not math.isnan(v))
            assert got[b] == percentile(mine, pct)
        assert math.isnan(got[5])  # a bucket without devices has no percentile


def test_time_axis_uses_round_ticks_and_no_label_is_clipped():
    records = [record(i, started=i * 819 / 2000) for i in range(2000)]  # an 819 s run
    figure = drawn(records + [record(9000, "tls_error", started=818.0)])
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    ax = panels(figure)["Outcomes by status"]
    ticks = [t for t in ax.get_xticks() if 0 <= t <= ax.get_xlim()[1]]
    steps = {round(b - a, 9) for a, b in zip(ticks, ticks[1:])}
    assert len(steps) == 1 and steps.pop() / 10 ** math.floor(math.log10(ticks[1] - ticks[0])) in (1, 2, 2.5, 5)
    box, renderer = figure.bbox, canvas.get_renderer()
    drawn_boxes = [ax.get_tightbbox(renderer) for ax in panels(figure).values()]  # labels, ticks, legend
    drawn_boxes.append(figure._suptitle.get_window_extent(renderer))
    for extent in drawn_boxes:
        assert box.x0 - 1 <= extent.x0 and extent.x1 <= box.x1 + 1 and box.y0 - 1 <= extent.y0
        assert extent.y1 <= box.y1 + 1


def test_status_colours_are_fixed_for_known_statuses():
    known = [plot.status_colour(s) for s in STATUSES]
    assert len(set(known)) == len(known)
    assert plot.status_colour("throttled") == plot.status_colour("throttled") in plot.FALLBACK
    assert plot.status_colour(reg.ASSIGNED) == plot.STATUS_COLOURS["assigned"]


def test_device_result_objects_read_as_their_records():
    results = [DeviceResult(**{k: v for k, v in record(i, s).items()})
               for i, s in enumerate(["assigned", "timeout", "assigned"])]
    from_objects = plot.RunColumns.read(results)
    from_dicts = plot.RunColumns.read(r.to_dict() for r in results)
    assert from_objects.statuses == from_dicts.statuses == ["assigned", "timeout"]
    assert list(from_objects.finished) == list(from_dicts.finished)
    assert all(list(from_objects.phases[p]) == list(from_dicts.phases[p]) or math.isnan(from_dicts.phases[p][1])
               for p in from_dicts.phases)


def test_unknown_suffix_is_one_line_and_writes_nothing(tmp_path):
    with pytest.raises(UserError) as caught:
        plot.check_format(tmp_path / "plot.bmp")
    assert "\n" not in str(caught.value) and ".png" in str(caught.value) and ".pdf" in str(caught.value)
    with pytest.raises(UserError):
        plot.write_plot(tmp_path / "plot.jpeg", sample_run(), "run")
    assert not list(tmp_path.iterdir())


def test_a_failed_plot_leaves_the_old_file_whole(tmp_path):
    out = tmp_path / "plot.svg"
    out.write_text("previous plot")

    def broken():
        yield record(1)
        raise OSError("records file vanished")

    with pytest.raises(OSError):
        plot.write_plot(out, broken(), "run")
    assert out.read_text() == "previous plot" and [p.name for p in tmp_path.iterdir()] == ["plot.svg"]


def many(n):
    """n synthetic records made one at a time, as a JSON Lines reader yields them."""
    statuses = ("assigned",) * 17 + FAILURES[:3]
    return (record(i, statuses[i % len(statuses)], started=i / 400, worker=f"w{i % 2}") for i in range(n))


def test_a_hundred_thousand_devices_plot_fast_in_bounded_memory(tmp_path):
    n = 100_000
    tracemalloc.start()
    kept = list(many(n // 10))  # a tenth of the run held as dicts, the cost the columns avoid
    dicts_peak = tracemalloc.get_traced_memory()[0] * 10
    del kept
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    columns = plot.RunColumns.read(many(n))
    columns_peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    assert len(columns) == n and columns.count("assigned") == n * 17 // 20
    print(f"\n{n} records: list of dicts {dicts_peak / 2**20:.0f} MiB, columns peak {columns_peak / 2**20:.1f} MiB")
    assert columns_peak < dicts_peak / 10

    out = tmp_path / "big.png"
    started = time.perf_counter()
    plot.write_plot(out, many(n), f"{n} devices")
    elapsed = time.perf_counter() - started
    print(f"{n} records plotted to png in {elapsed:.1f} s (shared machine: noisy)")
    check_file(out, "png")
    assert elapsed < 30  # about 2 s alone; generous: the machine is shared with other test runs


def test_devices_in_flight_show_the_concurrency_bound():
    # one device every 0.5 s, each 1 s long: two in flight once the run is under way
    records = [record(i, started=i * 0.5, total=1000.0) for i in range(40)]
    ax = panels(drawn(records))["Devices in flight"]
    (line,) = ax.get_lines()
    steady = [y for x, y in zip(line.get_xdata(), line.get_ydata()) if 2 <= x <= 18]
    assert steady and set(steady) == {2}


def test_a_distributed_run_gets_a_line_per_worker():
    records = [record(i, worker=f"tcp://10.0.0.{i % 2 + 1}:4000") for i in range(100)]
    names = legend_names(panels(drawn(records))["Throughput"])
    assert [n for n in names if n.startswith("assigned on")] == [
        "assigned on tcp://10.0.0.1:4000", "assigned on tcp://10.0.0.2:4000"]
    assert not [n for n in legend_names(panels(drawn(sample_run()))["Throughput"]) if " on " in n]


def test_records_read_back_from_a_json_lines_file(tmp_path):
    import json

    lines = tmp_path / "records.jsonl"
    lines.write_text("".join(json.dumps(r) + "\n" for r in sample_run()))
    out = tmp_path / "plot.svg"
    with lines.open() as handle:
        plot.write_plot(out, (json.loads(line) for line in handle), "from file")
    check_file(out, "svg")
    with lines.open() as handle:
        columns = plot.RunColumns.read(json.loads(line) for line in handle)
    assert len(columns) == 220 and columns.count("assigned") == 200 and columns.count("throttled") == 5


def test_a_short_run_gets_few_buckets_each_with_samples():
    records = [record(i, started=i / 10, total=50.0) for i in range(10)] + [record(10, "timeout", total=900.0)]
    figure = drawn(records)
    latency = panels(figure)["Latency per phase, assigned devices only"]
    p50 = next(line for line in latency.get_lines() if line.get_label() == "total p50").get_ydata()
    assert 2 <= len(p50) <= 5 and sum(not math.isnan(y) for y in p50) >= 2  # not 60 buckets of 0 or 1
    cdf = panels(figure)["Total latency per outcome"]
    lone = next(line for line in cdf.get_lines() if line.get_label().startswith("timeout"))
    assert list(lone.get_ydata()) == [0.0, 1.0]  # one device still draws its rise

"""`fleet run --plot FILE`: what a fleet run did over time, drawn with matplotlib
(docs/fleet.md, "The plot").

The records (one dict per device, as in the run's JSON Lines file, or DeviceResult objects)
are read once into `RunColumns`: a few bytes per device in typed arrays, never a list of
dicts, so a run of a million devices plots in bounded memory. Time is seconds since the run
started; a device counts at its finish time (start + total latency), except in "started".
Drawing uses matplotlib's `Figure` directly (its Agg/SVG/PDF writers): no pyplot, no display.
numpy and matplotlib are imported inside the drawing functions: every `device-sim` command
imports this module, and importing them would add over a second to each.
"""

from __future__ import annotations

import html
import io
import math
import zlib
from array import array
from collections.abc import Iterable
from pathlib import Path

from device_sim.common.errors import UserError
from device_sim.common.files import write_atomic
from device_sim.device import registration as reg
from device_sim.fleet import report

FORMATS = {".png": "png", ".svg": "svg", ".pdf": "pdf", ".html": "html", ".htm": "html"}

# Known statuses keep their colour from run to run; others get one from FALLBACK by name.
STATUS_COLOURS = {
    reg.ASSIGNED: "#2ca02c",
    reg.FAILED: "#d62728",
    reg.DISABLED: "#ff7f0e",
    reg.UNAUTHORIZED: "#9467bd",
    reg.REJECTED: "#8c564b",
    reg.PROTOCOL_ERROR: "#e377c2",
    reg.TIMEOUT: "#bcbd22",
    reg.UNREACHABLE: "#7f7f7f",
    reg.TLS_ERROR: "#17becf",
    report.SETUP_ERROR: "#1f77b4",
    report.CANCELLED: "#c7c7c7",
    report.ERROR: "#000000",
}
FALLBACK = ("#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#dbdb8d")
PHASE_COLOURS = {"tls_ms": "#1f77b4", "register_ms": "#ff7f0e", "wait_ms": "#9467bd", "total_ms": "#000000"}
TIME_LABEL = "seconds since run start (devices counted at finish time)"
BUCKETS = 60  # time buckets a long run is cut into
DEVICES_PER_BUCKET = 20  # a short run gets fewer buckets, so each has samples
MIN_BUCKETS = 5  # before rounding to a 1-2-5 step, which may halve it
MAX_WORKER_LINES = 8  # workers drawn one line each in the throughput panel
CDF_POINTS = 400  # points per outcome's distribution line, however many devices


def check_format(path: Path) -> str:
    """"png", "svg", "pdf" or "html" by the file name; UserError otherwise (checked before a run starts)."""
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise UserError(f"--plot {path}: unknown format; name the file .html or .png (or .svg, .pdf)")
    return fmt


def status_colour(status: str) -> str:
    return STATUS_COLOURS.get(status) or FALLBACK[zlib.crc32(status.encode()) % len(FALLBACK)]


class Names:
    """Strings stored as small integers, so a column spends 2 bytes per device on them."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self._index: dict[str, int] = {}

    def add(self, name: str) -> int:
        index = self._index.get(name)
        if index is None:
            index = self._index[name] = len(self.names)
            self.names.append(name)
        return index

    def find(self, name: str) -> int:
        """The name's index, -1 when it never occurred (matches no row)."""
        return self._index.get(name, -1)


class RunColumns:
    """Every device of a run as columns: times in float64, latencies in float32 (NaN when
    absent), status and worker as indexes into `statuses` / `workers`. About 32 bytes per device."""

    def __init__(self) -> None:
        self.started = array("d")  # NaN: the device never started (cancelled)
        self.finished = array("d")
        self.status = array("H")
        self.worker = array("H")  # index into workers; "" for a local run's records
        self.phases = {phase: array("f") for phase in report.PHASES}
        self.status_names = Names()
        self.worker_names = Names()

    @classmethod
    def read(cls, records: Iterable) -> "RunColumns":
        columns = cls()
        for record in records:
            columns.add(record)
        return columns

    def add(self, record) -> None:
        """One record: a dict of the JSON Lines file, or an object with the same attributes
        (DeviceResult; read directly, as its to_dict() would copy every field)."""
        get = record.get if isinstance(record, dict) else (lambda name: getattr(record, name, None))
        status = str(get("status"))
        self.status.append(self.status_names.add(status))
        self.worker.append(self.worker_names.add(str(get("worker") or "")))
        started = get("started_s")
        started = math.nan if started is None or status == report.CANCELLED else float(started)
        total = get("total_ms")
        self.started.append(started)
        self.finished.append(started + (total / 1000 if total is not None else 0.0))
        for phase, column in self.phases.items():
            value = get(phase)
            column.append(math.nan if value is None else value)

    @property
    def statuses(self) -> list[str]:
        return self.status_names.names

    @property
    def workers(self) -> list[str]:
        return [name for name in self.worker_names.names if name]

    def __len__(self) -> int:
        return len(self.status)

    def count(self, status: str) -> int:
        return self.status.count(self.status_names.find(status))


def write_plot(path: Path, records: Iterable, title: str, summary: dict | None = None) -> None:
    """Draw the run into `path` (format by suffix, see `check_format`), written whole or not at all.

    `records` is consumed once; `summary` (FleetReport.summary()) becomes a table in .html."""
    fmt = check_format(path)
    columns = RunColumns.read(records)
    heading = heading_for(columns, title)
    if fmt == "html":
        write_atomic(path, render_html(columns, heading, summary))
    else:
        write_atomic(path, _save(draw(columns, heading), fmt))


def draw(columns: RunColumns, heading: str):
    """The whole plot as one matplotlib Figure: the time panels above, the distribution below."""
    figure = _new_figure((11, 16))
    over_time, distribution = figure.subfigures(2, 1, height_ratios=(3.6, 1.1))
    figure.suptitle(heading)
    draw_over_time(over_time, columns)
    draw_distribution(distribution, columns)
    return figure


def heading_for(columns: RunColumns, title: str) -> str:
    cancelled = columns.count(report.CANCELLED)
    assigned = columns.count(reg.ASSIGNED)
    line = f"{len(columns):,} devices: {assigned:,} assigned, {len(columns) - assigned - cancelled:,} not assigned"
    if cancelled:
        line += f", {cancelled:,} cancelled (never started)"
    return f"{title}\n{line}"


def _new_figure(size: tuple[float, float]):
    from matplotlib.figure import Figure

    return Figure(figsize=size, layout="constrained")


def _save(figure, fmt: str) -> bytes:
    out = io.BytesIO()
    figure.savefig(out, format=fmt)
    return out.getvalue()


def render_html(columns: RunColumns, heading: str, summary: dict | None) -> str:
    over_time = _new_figure((11, 12.5))
    draw_over_time(over_time, columns)
    distribution = _new_figure((11, 4))
    draw_distribution(distribution, columns)
    lines = heading.split("\n")
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(lines[0])}</title>"
        "<style>body{font-family:sans-serif;margin:2em}svg{max-width:100%;height:auto}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 8px;text-align:left}</style>"
        f"</head><body><h1>{html.escape(lines[0])}</h1>"
        + "".join(f"<p>{html.escape(line)}</p>" for line in lines[1:])
        + (_summary_table(summary) if summary else "")
        + "<h2>Over time</h2>" + _inline_svg(over_time)
        + "<h2>Total latency per outcome</h2>" + _inline_svg(distribution)
        + "</body></html>"
    )


def _inline_svg(figure) -> str:
    text = _save(figure, "svg").decode("utf-8")
    return text[text.index("<svg"):]  # the XML declaration and DOCTYPE cannot sit inside HTML


def _summary_table(summary: dict) -> str:
    return "<h2>Summary</h2>" + _rows_table(summary)


def _rows_table(values: dict) -> str:
    rows = "".join(f"<tr><th>{html.escape(str(key))}</th><td>{_cell(value)}</td></tr>"
                   for key, value in values.items())
    return f"<table>{rows}</table>"


def _cell(value) -> str:
    """A summary value as HTML: tables for nested records, "key value" pairs for flat counts."""
    if isinstance(value, dict) and value and all(_flat_record(v) for v in value.values()):
        return _nested_table(value)
    if isinstance(value, list) and value and all(_flat_record(v) for v in value):
        return _nested_table({str(n): row for n, row in enumerate(value, 1)})
    if isinstance(value, dict) and any(isinstance(v, (dict, list)) for v in value.values()):
        return _rows_table(value)
    if isinstance(value, dict):
        return html.escape(", ".join(f"{k} {v}" for k, v in value.items()) or "-")
    if isinstance(value, list):
        return html.escape(", ".join(map(str, value)) or "-")
    return html.escape("-" if value is None else str(value))


def _flat_record(value) -> bool:
    return isinstance(value, dict) and not any(isinstance(v, (dict, list)) for v in value.values())


def _nested_table(rows: dict) -> str:
    """{"tls_ms": {"p50": ..., ...}, ...} as a table with one row per key."""
    columns = list(dict.fromkeys(k for row in rows.values() for k in row))
    head = "<tr><th></th>" + "".join(f"<th>{html.escape(str(c))}</th>" for c in columns) + "</tr>"
    body = "".join(
        f"<tr><th>{html.escape(str(name))}</th>" + "".join(f"<td>{_cell(row.get(c))}</td>" for c in columns)
        + "</tr>" for name, row in rows.items()
    )
    return f"<table>{head}{body}</table>"


def bucket_width(span_s: float, buckets: int = BUCKETS) -> float:
    """A 1-2-5 step (…, 0.5, 1, 2, 5, 10, … s) cutting `span_s` into at most `buckets` (plus the one the last finisher opens)."""
    raw = max(span_s, 1e-3) / buckets
    step = 10 ** math.floor(math.log10(raw))
    return next(m * step for m in (1, 2, 5, 10) if raw <= m * step * (1 + 1e-9))


def nearest_rank_by_bucket(buckets, values, n_buckets: int, pct: float):
    """Per bucket, the nearest-rank percentile of its values (report.percentile's rule); NaN
    for a bucket without values."""
    import numpy as np

    keep = ~np.isnan(values)
    buckets, values = buckets[keep], values[keep]
    order = np.lexsort((values, buckets))
    values = values[order]
    counts = np.bincount(buckets, minlength=n_buckets)
    starts = np.cumsum(counts) - counts
    ranks = np.maximum(1, np.ceil(pct / 100 * counts)).astype(np.int64)
    out = np.full(n_buckets, np.nan)
    present = counts > 0
    out[present] = values[(starts + ranks - 1)[present]]
    return out


def draw_over_time(figure, columns: RunColumns) -> None:
    """Four panels on one time axis: throughput, devices in flight, latency percentiles, outcomes."""
    import numpy as np

    started = np.frombuffer(columns.started, dtype=np.float64)
    finished = np.frombuffer(columns.finished, dtype=np.float64)
    status = np.frombuffer(columns.status, dtype=np.uint16)
    ran = ~np.isnan(finished)
    span = float(np.max(finished[ran])) if ran.any() else 0.0
    buckets = max(MIN_BUCKETS, min(BUCKETS, int(ran.sum()) // DEVICES_PER_BUCKET))
    width = bucket_width(span, buckets) if span > 0 else 1.0
    n_buckets = math.floor(span / width) + 1  # the last finisher falls inside the last bucket
    edges = np.arange(n_buckets + 1) * width
    bucket = np.minimum((np.where(ran, finished, 0) / width).astype(np.int64), n_buckets - 1)
    throughput, in_flight, latency, outcomes = figure.subplots(4, 1, sharex=True, height_ratios=(1, 0.6, 1, 1))
    _throughput(throughput, started, bucket, status, ran, columns, edges)
    _in_flight(in_flight, started, finished, edges)
    _latency(latency, bucket, status, columns, edges)
    _outcomes(outcomes, bucket, status, ran, columns, edges)
    outcomes.set_xlabel(TIME_LABEL)
    outcomes.set_xlim(0, edges[-1])


def _per_second(bucket, n_buckets: int, width: float):
    import numpy as np

    return np.bincount(bucket, minlength=n_buckets) / width


def _throughput(ax, started, bucket, status, ran, columns, edges) -> None:
    import numpy as np

    n, width = len(edges) - 1, edges[1] - edges[0]
    did_start = ~np.isnan(started)
    start_bucket = np.minimum((started[did_start] / width).astype(np.int64), n - 1)
    assigned = status == columns.status_names.find(reg.ASSIGNED)
    cancelled = status == columns.status_names.find(report.CANCELLED)
    ax.stairs(_per_second(start_bucket, n, width), edges, label="started (at start time)", color="#1f77b4")
    ax.stairs(_per_second(bucket[ran & assigned], n, width), edges, label="assigned",
              color=status_colour(reg.ASSIGNED))
    ax.stairs(_per_second(bucket[ran & ~assigned & ~cancelled], n, width), edges, label="failed (not assigned)",
              color=status_colour(reg.FAILED))
    _assigned_per_worker(ax, bucket[ran & assigned], np.frombuffer(columns.worker, dtype=np.uint16)[ran & assigned],
                         columns, edges)
    ax.set_ylabel("devices per second")
    ax.set_title(f"Throughput ({width:g} s buckets)", loc="left")
    _legend_beside(ax)


def _assigned_per_worker(ax, bucket, worker, columns, edges) -> None:
    """A distributed run's records name their worker: a thin line per worker shows one that
    lagged or was lost. Past MAX_WORKER_LINES the lines would be unreadable."""
    workers = columns.workers
    if not 2 <= len(workers) <= MAX_WORKER_LINES:
        return
    n, width = len(edges) - 1, edges[1] - edges[0]
    for name in workers:
        ax.stairs(_per_second(bucket[worker == columns.worker_names.find(name)], n, width), edges,
                  label=f"assigned on {name}", linewidth=0.8, linestyle=":")


def _in_flight(ax, started, finished, edges) -> None:
    """Devices started and not yet finished at each bucket's end: flat at --concurrency means
    the concurrency bound the run, not the service."""
    import numpy as np

    did_start = ~np.isnan(started)
    begun = np.searchsorted(np.sort(started[did_start]), edges, side="right")
    ended = np.searchsorted(np.sort(finished[did_start]), edges, side="right")
    ax.plot(edges, begun - ended, color="#1f77b4", label="in flight")
    ax.set_ylabel("devices")
    ax.set_ylim(bottom=0)
    ax.set_title("Devices in flight (started, not finished)", loc="left")


def _latency(ax, bucket, status, columns, edges) -> None:
    import numpy as np

    assigned = status == columns.status_names.find(reg.ASSIGNED)
    mids = (edges[:-1] + edges[1:]) / 2
    for phase in report.PHASES:
        values = np.frombuffer(columns.phases[phase], dtype=np.float32)[assigned].astype(np.float64)
        name = phase.removesuffix("_ms")
        for pct, style in ((50, "-"), (99, "--")):
            line = nearest_rank_by_bucket(bucket[assigned], values, len(mids), pct)
            ax.plot(mids, line, style, color=PHASE_COLOURS[phase], label=f"{name} p{pct}",
                    marker=".", markersize=4)  # a bucket between two empty ones is a point, not a line
    ax.set_yscale("symlog", linthresh=1)  # ms to tens of seconds on one axis, and 0 still drawn
    ax.set_ylabel("latency (ms)")
    ax.set_ylim(bottom=0)
    ax.set_title("Latency per phase, assigned devices only (p50 solid, p99 dashed)", loc="left")
    if assigned.any():
        _legend_beside(ax)


def _outcomes(ax, bucket, status, ran, columns, edges) -> None:
    import numpy as np

    n, width = len(edges) - 1, edges[1] - edges[0]
    bottom = np.zeros(n)
    for index in _present(columns, ran):
        counts = np.bincount(bucket[ran & (status == index)], minlength=n)
        name = columns.statuses[index]
        ax.bar(edges[:-1], counts, width=width, bottom=bottom, align="edge", label=name,
               color=status_colour(name), linewidth=0)
        bottom += counts
    ax.set_ylabel("devices per bucket")
    ax.set_title("Outcomes by status", loc="left")
    if bottom.any():
        _legend_beside(ax)


def _legend_beside(ax) -> None:
    """Legends sit right of their panel: inside, they would hide the data."""
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize="small", frameon=False)


def _present(columns: RunColumns, mask) -> list[int]:
    """Status indexes that occur under `mask`, in the fixed order of known statuses first."""
    import numpy as np

    occurring = set(np.unique(np.frombuffer(columns.status, dtype=np.uint16)[mask]).tolist())
    order = {name: i for i, name in enumerate(report.STATUSES)}
    return sorted(occurring, key=lambda i: (order.get(columns.statuses[i], len(order)), columns.statuses[i]))


def draw_distribution(figure, columns: RunColumns) -> None:
    """The cumulative distribution of total latency, one line per outcome."""
    import numpy as np

    ax = figure.subplots()
    status = np.frombuffer(columns.status, dtype=np.uint16)
    total = np.frombuffer(columns.phases["total_ms"], dtype=np.float32)
    has_total = ~np.isnan(total)
    positive = True
    for index in _present(columns, has_total):
        values = np.sort(total[has_total & (status == index)]).astype(np.float64)
        ranks = np.unique(np.linspace(0, len(values) - 1, min(CDF_POINTS, len(values))).round().astype(np.int64))
        name = columns.statuses[index]
        # from 0 at the first value: a single device still draws its step
        ax.step(np.concatenate((values[:1], values[ranks])), np.concatenate(([0.0], (ranks + 1) / len(values))),
                where="post", color=status_colour(name),
                label=f"{name} ({len(values):,})")
        positive = positive and values[0] > 0
    if has_total.any():
        if positive:
            ax.set_xscale("log")
        _legend_beside(ax)
    ax.set_xlabel("total latency (ms)" + (", log scale" if has_total.any() and positive else ""))
    ax.set_ylabel("fraction of its outcome")
    ax.set_ylim(0, 1.02)
    ax.set_title("Total latency per outcome (cumulative; each outcome on its own)", loc="left")

"""What a fleet run measured: one record per device, and the summary a user acts on.

Pure data and arithmetic; the runner fills records, `records.RunLog` keeps them on disk,
the CLI prints and saves. Statistics are streaming (`RunStats`): counters, and one
HdrHistogram per outcome and phase, so a run's memory does not grow with its devices
(docs/fleet.md, "Memory"). Percentiles are HdrHistogram's (3 significant digits: a
reported value is at most 0.1% above the recorded one); the maximum is exact.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, field

from hdrh.histogram import HdrHistogram

from device_sim.device import registration as reg

# A device's status is one of the flow's outcome statuses (`registration.STATUSES`) or one
# of the fleet's own: the device never reached the flow.
SETUP_ERROR = "setup_error"  # the TLS context could not be made (PIN, key, certificate)
CANCELLED = "cancelled"  # never started: the run was stopped first
ERROR = "error"  # a bug in the runner cost this device (the message says which)
STATUSES = reg.STATUSES + (SETUP_ERROR, CANCELLED, ERROR)

# Phases reported with percentiles, in the order a registration goes through them.
PHASES = ("tls_ms", "register_ms", "wait_ms", "total_ms")
PERCENTILES = (50, 90, 99)
FIRST_FAILED = 10  # failed devices the text report names

# Histogram range: 1 us to 1 hour (a device's --timeout is far below), 3 significant digits.
_UNITS_PER_MS = 1000
_HISTOGRAM_MAX = 3_600_000 * _UNITS_PER_MS
# Thresholds of the throughput explanation.
SATURATED = 0.8  # mean in-flight / --concurrency at or above: the concurrency bound the run
WAIT_DOMINATES = 0.5  # share of device time spent in waits the service asked for


@dataclass
class DeviceResult:
    """One device's registration as the fleet runner saw it."""

    registration_id: str
    status: str  # one of STATUSES
    started_s: float = 0.0  # seconds after the run started
    tls_ms: float | None = None  # token session + TLS handshake
    register_ms: float | None = None  # the register request
    wait_ms: float | None = None  # polling until a terminal status
    total_ms: float | None = None
    retries: int = 0
    retries_by_cause: dict = field(default_factory=dict)  # registration.THROTTLED, REFUSED, ... -> count
    assigned_hub: str | None = None
    device_id: str | None = None
    substatus: str | None = None
    error_code: str | None = None
    error_message: str | None = None
    polls: int = 0  # status polls the service asked for (an "assigning" answer)
    poll_wait_ms: float = 0.0  # time waited before them: the service's Retry-After (or 2 s)

    def to_dict(self) -> dict:
        return asdict(self)


def percentile(sorted_values: list[float], pct: float) -> float:
    """Nearest-rank percentile of an ascending list (no interpolation: a real sample)."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(pct / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


class PhaseStats:
    """Percentiles of one phase of one outcome, in constant memory."""

    def __init__(self):
        self._histogram = HdrHistogram(1, _HISTOGRAM_MAX, 3)
        self.count = 0
        self.max = 0.0

    def add(self, ms: float) -> None:
        self._histogram.record_value(min(_HISTOGRAM_MAX, max(1, round(ms * _UNITS_PER_MS))))
        self.count += 1
        self.max = max(self.max, ms)

    def as_dict(self) -> dict:
        if not self.count:
            return {**{f"p{p}": None for p in PERCENTILES}, "max": None, "count": 0}
        stats = {f"p{p}": _round(min(self.max, self._histogram.get_value_at_percentile(p) / _UNITS_PER_MS))
                 for p in PERCENTILES}
        return {**stats, "max": _round(self.max), "count": self.count}


def _round(value: float | None) -> float | None:
    return None if value is None or math.isnan(value) else round(value, 1)


class RunStats:
    """The summary's figures, fed one record at a time (a `DeviceResult.to_dict()`).

    Holds counters, a histogram per outcome and phase and the first FIRST_FAILED failed
    devices: nothing per device, so a million-device run costs what a hundred does."""

    def __init__(self):
        self.devices = 0
        self.outcomes: Counter = Counter()
        self.errors: Counter = Counter()
        self.hubs: Counter = Counter()
        self.retries = 0
        self.retries_by_cause: Counter = Counter()
        self.workers: Counter = Counter()
        self.phases: dict[str, dict[str, PhaseStats]] = {}  # status -> phase -> stats
        self.busy_ms = 0.0  # device time of finished devices (Little's law: mean in-flight)
        self.poll_wait_ms = 0.0
        self.polls = 0
        self.first_failed: list[dict] = []

    def add(self, record: dict) -> None:
        status = record["status"]
        self.devices += 1
        self.outcomes[status] += 1
        if "worker" in record:
            self.workers[str(record["worker"])] += 1
        if status == CANCELLED:
            return
        if record.get("error_code"):
            self.errors[record["error_code"]] += 1
        if status == reg.ASSIGNED and record.get("assigned_hub"):
            self.hubs[record["assigned_hub"]] += 1
        self.retries += record.get("retries") or 0
        self.retries_by_cause.update(record.get("retries_by_cause") or {})
        self.busy_ms += record.get("total_ms") or 0.0
        self.poll_wait_ms += record.get("poll_wait_ms") or 0.0
        self.polls += record.get("polls") or 0
        phases = self.phases.setdefault(status, {})
        for phase in PHASES:
            value = record.get(phase)
            if value is None:  # a phase the device never reached is absent, not 0 ms
                continue
            if phase not in phases:  # not setdefault: a histogram is ~200 KB, made once
                phases[phase] = PhaseStats()
            phases[phase].add(value)
        if status != reg.ASSIGNED and len(self.first_failed) < FIRST_FAILED:
            self.first_failed.append(failure_line(record))

    def add_result(self, result: DeviceResult) -> None:
        self.add(result.to_dict())

    def latency(self, status: str) -> dict:
        phases = self.phases.get(status, {})
        return {phase: phases.get(phase, PhaseStats()).as_dict() for phase in PHASES}

    def summary(self, *, wall_s: float, interrupted: bool = False, concurrency: int | None = None,
                rate: float | None = None, ramp: float | None = None) -> dict:
        cancelled = self.outcomes.get(CANCELLED, 0)
        assigned = self.outcomes.get(reg.ASSIGNED, 0)
        finished = self.devices - cancelled
        summary = {
            "devices": self.devices,
            "finished": finished,
            "interrupted": interrupted,
            "wall_s": round(wall_s, 3),
            "registrations_per_s": round(assigned / wall_s, 1) if wall_s > 0 else None,
            "latency_ms": self.latency(reg.ASSIGNED),
            "latency_ms_by_outcome": {status: {phase: stats for phase, stats in self.latency(status).items()
                                               if stats["count"]}
                                      for status, _ in self.outcomes.most_common() if status in self.phases},
            "outcomes": dict(self.outcomes.most_common()),
            "errors": dict(self.errors.most_common()),
            "retries": self.retries,
            "retries_by_cause": dict(self.retries_by_cause.most_common()),
            "hubs": dict(self.hubs.most_common()),
            "first_failed": list(self.first_failed),
            "throughput": explain_throughput(
                finished=finished, assigned=assigned, wall_s=wall_s, busy_ms=self.busy_ms,
                poll_wait_ms=self.poll_wait_ms, polls=self.polls, concurrency=concurrency,
                rate=rate, ramp=ramp, throttled=self.retries_by_cause.get(reg.THROTTLED, 0)),
        }
        if self.workers:
            summary["workers"] = dict(sorted(self.workers.items()))
        return summary


def failure_line(record: dict) -> dict:
    """What a report says about one failed device."""
    return {key: record.get(key) for key in ("registration_id", "status", "error_code", "error_message")}


def explain_throughput(*, finished: int, assigned: int, wall_s: float, busy_ms: float, poll_wait_ms: float,
                       polls: int, concurrency: int | None, rate: float | None, ramp: float | None,
                       throttled: int = 0) -> dict:
    """What bounded the registrations/s, by Little's law (mean in-flight = rate x latency).

    Mean in-flight is the devices' time (sum of total_ms) over the wall time. At or above
    SATURATED x --concurrency the run was bounded by concurrency: rate ~ concurrency /
    mean latency; and when most of that latency was waits the service asked for between
    polls (Retry-After), by concurrency x Retry-After: rate <= concurrency / Retry-After.
    """
    out = {"bound": None, "explanation": "", "mean_in_flight": None, "mean_latency_ms": None,
           "littles_law_per_s": None, "poll_wait_share": None, "retry_after_s": None}
    if not finished or wall_s <= 0:
        out["explanation"] = "no device finished"
        return out
    mean_latency_ms = busy_ms / finished
    in_flight = busy_ms / 1000 / wall_s
    wait_share = poll_wait_ms / busy_ms if busy_ms > 0 else 0.0
    retry_after = poll_wait_ms / polls / 1000 if polls else None
    out.update(mean_in_flight=round(in_flight, 1), mean_latency_ms=round(mean_latency_ms, 1),
               poll_wait_share=round(wait_share, 3), retry_after_s=None if retry_after is None else round(retry_after, 2))
    achieved = assigned / wall_s
    waits = (f"; devices spent {wait_share:.0%} of their time waiting the service's Retry-After "
             f"({retry_after:.3g} s a poll)") if retry_after else ""
    if concurrency and in_flight >= SATURATED * concurrency:
        little = concurrency / (mean_latency_ms / 1000) if mean_latency_ms > 0 else None
        out["littles_law_per_s"] = None if little is None else round(little, 1)
        if retry_after and wait_share >= WAIT_DOMINATES:
            out["bound"] = "concurrency_x_retry_after"
            out["explanation"] = (
                f"{finished} devices at concurrency {concurrency} with Retry-After {retry_after:.3g} s: bounded by "
                f"concurrency x retry-after (about {concurrency / retry_after:.0f}/s; {achieved:.1f}/s achieved){waits}. "
                "Raise --concurrency, or lower the service's Retry-After (the emulator's --retry-after)")
        else:
            out["bound"] = "concurrency"
            out["explanation"] = (
                f"bounded by concurrency: in flight averaged {in_flight:.1f} of {concurrency}; Little's law: "
                f"{concurrency} / {mean_latency_ms:.0f} ms mean latency = {little:.1f}/s ({achieved:.1f}/s achieved)"
                f"{waits}. A higher --concurrency helps while the service and this machine have room")
    elif rate:
        ramped = f" after a {ramp:g} s ramp" if ramp else ""
        out["bound"] = "rate"
        out["explanation"] = (f"bounded by the arrival rate: --rate {rate:g}/s{ramped}; in flight averaged "
                              f"{in_flight:.1f}" + (f" of {concurrency}" if concurrency else ""))
    elif concurrency and finished <= concurrency:
        out["bound"] = "fleet_size"
        out["explanation"] = (f"bounded by the fleet's size: {finished} devices, no more than --concurrency "
                              f"{concurrency}; the run lasts as long as its slowest device")
    else:
        out["explanation"] = (
            f"not bounded by concurrency: in flight averaged {in_flight:.1f}" + (f" of {concurrency}" if concurrency else "")
            + f"{waits}; devices could not be started faster (this machine's CPU or the token)")
    if throttled:
        out["explanation"] += f"; the service throttled {throttled} requests (429)"
    return out


@dataclass
class FleetReport:
    """The summary of a run.

    `stats` holds the streaming figures (what `run_fleet` returns: it keeps no device
    list, the records are in its `RunLog`); `devices` is for callers that hold a list
    (small, hand-made reports): without `stats` the summary is computed from it."""

    wall_s: float
    devices: list[DeviceResult] = field(default_factory=list)
    interrupted: bool = False
    settings: dict = field(default_factory=dict)
    stats: RunStats | None = None

    def summary(self) -> dict:
        stats = self.stats
        if stats is None:
            stats = RunStats()
            for device in self.devices:
                stats.add_result(device)
        return stats.summary(wall_s=self.wall_s, interrupted=self.interrupted,
                             concurrency=self.settings.get("concurrency"), rate=self.settings.get("rate"),
                             ramp=self.settings.get("ramp"))

    def to_dict(self) -> dict:
        return {
            "settings": self.settings,
            "summary": self.summary(),
            "devices": [d.to_dict() for d in self.devices],
        }


def render_text(summary: dict) -> str:
    """The human report printed at the end of `fleet run`."""
    lines = [
        f"devices {summary['devices']}, finished {summary['finished']}"
        + (" (interrupted)" if summary["interrupted"] else ""),
        f"wall time {summary['wall_s']:.1f} s, {summary['registrations_per_s']} registrations/s",
    ]
    by_outcome = summary.get("latency_ms_by_outcome") or {reg.ASSIGNED: summary["latency_ms"]}
    if reg.ASSIGNED not in by_outcome:
        by_outcome = {reg.ASSIGNED: summary["latency_ms"], **by_outcome}
    for status, phases in by_outcome.items():
        count = summary["outcomes"].get(status, 0)
        lines.append(f"latency ms, {status} ({count})".ljust(16)
                     + "  ".join(f"{k:>8}" for k in ("p50", "p90", "p99", "max")))
        for phase, stats in phases.items():
            cells = "  ".join(f"{_cell(stats.get(k)):>8}" for k in ("p50", "p90", "p99", "max"))
            lines.append(f"  {phase.removesuffix('_ms'):<13} {cells}")
    lines.append("outcomes: " + _pairs(summary["outcomes"]))
    if summary["errors"]:
        lines.append("errors: " + _pairs(summary["errors"]))
    by_cause = summary.get("retries_by_cause")
    lines.append(f"retries: {summary['retries']}" + (f" ({_pairs(by_cause)})" if by_cause else ""))
    if summary["hubs"]:
        lines.append("hubs: " + _pairs(summary["hubs"]))
    failed = summary.get("first_failed") or []
    if failed:
        total = summary["finished"] - summary["outcomes"].get(reg.ASSIGNED, 0)
        lines.append(f"failed devices ({len(failed)} of {total} shown):")
        lines.extend(f"  {f['registration_id']}  {f['status']}"
                     + (f" {f['error_code']}" if f.get("error_code") else "")
                     + (f": {f['error_message']}" if f.get("error_message") else "") for f in failed)
    throughput = summary.get("throughput") or {}
    if throughput.get("explanation"):
        lines.append("throughput: " + throughput["explanation"])
    if summary.get("workers"):
        lines.append("workers: " + _pairs(summary["workers"]))
    return "\n".join(lines)


def _cell(value) -> str:
    return "-" if value is None else f"{value:.1f}"


def _pairs(counts: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in counts.items()) or "-"

"""What a fleet run measured: one record per device, and the summary a user acts on.

Pure data and arithmetic; the runner fills records, the CLI prints and saves them.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, field

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

    def to_dict(self) -> dict:
        return asdict(self)


def percentile(sorted_values: list[float], pct: float) -> float:
    """Nearest-rank percentile of an ascending list (no interpolation: a real sample)."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(pct / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def phase_stats(values: list[float]) -> dict:
    ordered = sorted(values)
    stats = {f"p{p}": _round(percentile(ordered, p)) for p in PERCENTILES}
    stats["max"] = _round(ordered[-1]) if ordered else None
    stats["count"] = len(ordered)
    return stats


def _round(value: float) -> float | None:
    return None if value is None or math.isnan(value) else round(value, 1)


@dataclass
class FleetReport:
    """The summary of a run; `devices` holds every record for --json."""

    wall_s: float
    devices: list[DeviceResult] = field(default_factory=list)
    interrupted: bool = False
    settings: dict = field(default_factory=dict)

    def summary(self) -> dict:
        done = [d for d in self.devices if d.status != CANCELLED]
        assigned = [d for d in done if d.status == reg.ASSIGNED]
        return {
            "devices": len(self.devices),
            "finished": len(done),
            "interrupted": self.interrupted,
            "wall_s": round(self.wall_s, 3),
            "registrations_per_s": round(len(assigned) / self.wall_s, 1) if self.wall_s > 0 else None,
            "latency_ms": {
                phase: phase_stats([getattr(d, phase) for d in assigned if getattr(d, phase) is not None])
                for phase in PHASES
            },
            "outcomes": dict(Counter(d.status for d in self.devices).most_common()),
            "errors": dict(Counter(d.error_code for d in done if d.error_code).most_common()),
            "retries": sum(d.retries for d in done),
            "retries_by_cause": retries_by_cause(done),
            "hubs": dict(Counter(d.assigned_hub for d in assigned if d.assigned_hub).most_common()),
        }

    def to_dict(self) -> dict:
        return {
            "settings": self.settings,
            "summary": self.summary(),
            "devices": [d.to_dict() for d in self.devices],
        }


def retries_by_cause(devices: list[DeviceResult]) -> dict:
    """Retries of every device summed per cause, most frequent first."""
    total: Counter = Counter()
    for device in devices:
        total.update(device.retries_by_cause)
    return dict(total.most_common())


def render_text(summary: dict) -> str:
    """The human report printed at the end of `fleet run`."""
    lines = [
        f"devices {summary['devices']}, finished {summary['finished']}"
        + (" (interrupted)" if summary["interrupted"] else ""),
        f"wall time {summary['wall_s']:.1f} s, {summary['registrations_per_s']} registrations/s",
        "latency ms      " + "  ".join(f"{k:>8}" for k in ("p50", "p90", "p99", "max")),
    ]
    for phase, stats in summary["latency_ms"].items():
        cells = "  ".join(f"{_cell(stats.get(k)):>8}" for k in ("p50", "p90", "p99", "max"))
        lines.append(f"  {phase.removesuffix('_ms'):<13} {cells}")
    lines.append("outcomes: " + _pairs(summary["outcomes"]))
    if summary["errors"]:
        lines.append("errors: " + _pairs(summary["errors"]))
    by_cause = summary.get("retries_by_cause")
    lines.append(f"retries: {summary['retries']}" + (f" ({_pairs(by_cause)})" if by_cause else ""))
    if summary["hubs"]:
        lines.append("hubs: " + _pairs(summary["hubs"]))
    return "\n".join(lines)


def _cell(value) -> str:
    return "-" if value is None else f"{value:.1f}"


def _pairs(counts: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in counts.items()) or "-"

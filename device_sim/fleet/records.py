"""A fleet run's per-device records on disk (JSON Lines) and the statistics fed from them.

Public API (docs/fleet.md, "Records file"), also for a coordinator that merges the
records of many runners (e.g. Dask workers streaming their `on_result` records back):

    log = RunLog(path)                 # path None: statistics only, nothing written
    log.add(record)                    # one dict per device: DeviceResult.to_dict(),
                                       # optionally with a "worker" key; written at once
    log.add_result(result, worker=None)
    log.close()                        # flushes; records() and failed() read the file back
    log.summary(wall_s=..., interrupted=False, concurrency=..., rate=..., ramp=...)
    log.records()                      # iterator over the file's dicts, one at a time
    log.failed()                       # iterator over the failed devices' report lines
    write_json_report(path, log, settings=..., summary=...)

Memory stays flat in the number of devices: a record is written when it arrives and only
`report.RunStats` (counters, histograms, the first few failures) stays in memory; every
list a report shows in full is read back from the file, one line at a time. `add` is
thread-safe.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Iterator

from device_sim.common.errors import UserError
from device_sim.common.files import atomic_writer
from device_sim.device import registration as reg
from device_sim.fleet.report import CANCELLED, DeviceResult, RunStats, failure_line


class RunLog:
    """Per-device records appended to a JSON Lines file, with the run's streaming statistics."""

    def __init__(self, path: Path | str | None = None):
        self.path = None if path is None else Path(path)
        self.stats = RunStats()
        self._lock = threading.Lock()
        self._file = None
        if self.path is not None:
            try:
                self._file = open(self.path, "w", encoding="utf-8")  # one run, one file
            except OSError as exc:
                raise UserError(f"cannot write the records file {self.path}: {exc.strerror}") from None

    def add(self, record: dict) -> None:
        line = json.dumps(record, separators=(",", ":")) + "\n" if self._file else None
        with self._lock:
            if line is not None:
                self._file.write(line)
            self.stats.add(record)

    def add_result(self, result: DeviceResult, worker=None) -> None:
        record = result.to_dict()
        if worker is not None:
            record["worker"] = worker
        self.add(record)

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None

    def flush(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.flush()

    def __enter__(self) -> "RunLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def summary(self, *, wall_s: float, interrupted: bool = False, concurrency: int | None = None,
                rate: float | None = None, ramp: float | None = None) -> dict:
        with self._lock:
            return self.stats.summary(wall_s=wall_s, interrupted=interrupted, concurrency=concurrency,
                                      rate=rate, ramp=ramp)

    def records(self) -> Iterator[dict]:
        """The records written so far, in the order they finished (flushes first)."""
        if self.path is None:
            return iter(())
        self.flush()
        return read_records(self.path)

    def failed(self) -> Iterator[dict]:
        """registration_id, status, error_code, error_message of every device not assigned
        (cancelled ones excluded: they never ran)."""
        return (failure_line(r) for r in self.records() if r["status"] not in (reg.ASSIGNED, CANCELLED))


def read_records(path: Path | str) -> Iterator[dict]:
    """The dicts of a records file, one line at a time."""
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                yield json.loads(line)


def write_json_report(path: Path | str, log: RunLog, *, settings: dict, summary: dict,
                      extra: dict | None = None) -> None:
    """The --json document, written in pieces from the records file (never held whole):
    {"settings", "summary", "records": path, ...extra, "failed": [...all...], "devices": [...all...]}."""
    with atomic_writer(path) as handle:
        head = {"settings": settings, "summary": summary,
                "records": None if log.path is None else str(log.path), **(extra or {})}
        handle.write(json.dumps(head, indent=1)[:-2].encode() + b',\n "failed": [')
        _write_items(handle, log.failed())
        handle.write(b'],\n "devices": [')
        _write_items(handle, log.records())
        handle.write(b"]\n}\n")


def _write_items(handle, items) -> None:
    for n, item in enumerate(items):
        handle.write((",\n  " if n else "\n  ").encode() + json.dumps(item, separators=(",", ":")).encode())

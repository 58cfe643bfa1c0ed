"""DPS quotas, opt-in (`stub serve --quota-units N`, docs/emulator.md "Quotas").

The published limits per unit of a DPS instance: 1,000 device registrations per minute,
1,000 service operations per minute, and 5 operation-status polls per 10 seconds per
device. Past a limit the service answers 429 with Retry-After; `admit_*` returns None
when a request may pass, else the whole seconds to send as Retry-After.

Each limit is a sliding window of the times admitted requests arrived, so a burst is cut
exactly at the limit and Retry-After is the time until the oldest one leaves the window.

With `stub serve --workers N` each worker process keeps its own windows: the two
per-minute budgets are divided between the workers (each admits ceil(limit / N)), so
together they never admit more than the instance's limit (plus N - 1 at most, from the
rounding); a burst that the kernel spreads unevenly is cut a little before the limit. The
per-device poll window stays whole in each worker: a device keeps its connection, and
so its worker, from register to the last poll (docs/scaling.md).
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque

REGISTRATIONS_PER_MINUTE = 1000  # per unit
SERVICE_OPERATIONS_PER_MINUTE = 1000  # per unit
POLLS_PER_DEVICE = 5
POLL_WINDOW_S = 10.0


class SlidingWindow:
    def __init__(self, limit: int, seconds: float):
        self.limit = limit
        self.seconds = seconds
        self.times: deque[float] = deque()

    def admit(self, now: float) -> int | None:
        while self.times and self.times[0] <= now - self.seconds:
            self.times.popleft()
        if len(self.times) < self.limit:
            self.times.append(now)
            return None
        return max(1, math.ceil(self.times[0] + self.seconds - now))


def _share(limit: int, workers: int) -> int:
    """One worker's part of a budget the workers split."""
    return -(-limit // max(workers, 1))


class Quotas:
    """The counters of one emulator; `units` 0 turns them off. Thread-safe."""

    def __init__(self, units: int = 0, clock=time.monotonic, workers: int = 1):
        self.units = units
        self.clock = clock
        self._lock = threading.Lock()
        self._registrations = SlidingWindow(_share(REGISTRATIONS_PER_MINUTE * max(units, 1), workers), 60.0)
        self._service = SlidingWindow(_share(SERVICE_OPERATIONS_PER_MINUTE * max(units, 1), workers), 60.0)
        self._polls: dict[str, SlidingWindow] = {}

    def admit_registration(self) -> int | None:
        return self._admit(self._registrations)

    def admit_service_operation(self) -> int | None:
        return self._admit(self._service)

    def admit_poll(self, registration_id: str) -> int | None:
        if not self.units:
            return None
        with self._lock:
            now = self.clock()
            key = registration_id.lower()
            window = self._polls.get(key)
            if window is None:
                if len(self._polls) > 10_000:  # forget devices whose windows are over
                    self._polls = {k: w for k, w in self._polls.items()
                                   if w.times and w.times[-1] > now - POLL_WINDOW_S}
                window = self._polls[key] = SlidingWindow(POLLS_PER_DEVICE, POLL_WINDOW_S)
            return window.admit(now)

    def _admit(self, window: SlidingWindow) -> int | None:
        if not self.units:
            return None
        with self._lock:
            return window.admit(self.clock())

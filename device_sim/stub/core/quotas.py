"""DPS quotas, opt-in (`stub serve --quota-units N`, docs/emulator.md "Quotas").

The published limits per unit of a DPS instance: 1,000 device registrations per minute,
1,000 service operations per minute, and 5 operation-status polls per 10 seconds per
device. Past a limit the service answers 429 with Retry-After; `admit_*` returns None
when a request may pass, else the whole seconds to send as Retry-After.

Each limit is a sliding window of the times admitted requests arrived, so a burst is cut
exactly at the limit and Retry-After is the time until the oldest one leaves the window.

With `stub serve --workers N` (docs/scaling.md):
- device registrations: each worker keeps its own window with ceil(limit / N) of the
  budget, so together they never admit more than the instance's limit (plus N - 1 at
  most, from the rounding); a burst the kernel spreads unevenly is cut a little before
  the limit. Devices arrive on many connections, which the kernel spreads evenly, and a
  shared window would cost a second commit per registration on the hot path;
- service operations: one window shared through the store (`shared=`, a commit per
  operation): an admin client keeps one connection, so all its calls reach one worker,
  which a 1/N share would cut at 1/N of the budget;
- operation-status polls: the per-device window stays whole in each worker: a device
  keeps its connection, and so its worker, from register to the last poll.
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


class SharedWindow:
    """A SlidingWindow kept in the store, so that every worker process counts in it."""

    def __init__(self, store, kind: str, limit: int, seconds: float):
        self.store, self.kind, self.limit, self.seconds = store, kind, limit, seconds

    def admit(self, now: float) -> int | None:
        oldest = self.store.admit_window(self.kind, self.limit, self.seconds, now)
        return None if oldest is None else max(1, math.ceil(oldest + self.seconds - now))


def _share(limit: int, workers: int) -> int:
    """One worker's part of a budget the workers split."""
    return -(-limit // max(workers, 1))


class Quotas:
    """The counters of one emulator; `units` 0 turns them off. Thread-safe."""

    def __init__(self, units: int = 0, clock=time.monotonic, workers: int = 1, shared=None):
        """`shared`: the store (its `admit_window`) that holds the service window the
        workers share; None keeps it in this process."""
        self.units = units
        self.clock = clock
        self._lock = threading.Lock()
        self._registrations = SlidingWindow(_share(REGISTRATIONS_PER_MINUTE * max(units, 1), workers), 60.0)
        service_limit = SERVICE_OPERATIONS_PER_MINUTE * max(units, 1)
        self._service = (SlidingWindow(service_limit, 60.0) if shared is None
                         else SharedWindow(shared, "service", service_limit, 60.0))
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

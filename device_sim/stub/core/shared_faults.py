"""The live fault plan of one worker of `stub serve --workers N` (docs/scaling.md).

Every worker process has its own `Faults`; the plan they all apply lives in the store's
`shared` table. `set` (the service API's `PUT/DELETE /emulator/faults`, served by
whichever worker the admin connection reached) writes it there; every other worker
notices the new version before its next decision (`PRAGMA data_version` first, so a
request costs no table read while nothing changed) and starts the plan too.

Counters: each worker counts the matches and firings of its own requests, and its rule
draws come from its own seeded generators (so `first` and `probability` hold per worker:
a `first: 10` rule fires at most 10 times in each worker). The report of one worker sums
the counters the others published in `worker_reports` (at most a publishing period old,
`stub/workers.py`) with its own live ones.
"""

from __future__ import annotations

import time

from .faults import Faults, FaultPlan, parse_plan
from .store import Store

SHARED_KEY = "faults"


class SharedFaults(Faults):
    def __init__(self, store: Store, worker: int, plan: FaultPlan | None = None, clock=time.monotonic):
        self.store = store
        self.worker = worker
        self._version = 0
        self._shared = False  # Faults.__init__ calls set(None): local only
        super().__init__(None, clock)
        self._shared = True
        if worker == 0:
            self.set(plan)  # this run's plan; also drops one left in the file by an earlier run
        else:
            self._sync(force=True)

    def set(self, plan: FaultPlan | None) -> None:
        if not self._shared:
            super().set(plan)
            return
        with self._lock:
            version = self.store.put_shared(SHARED_KEY, None if plan is None else
                                            {"plan": plan.source, "setUtc": time.time()})
        self._start(plan, version, time.time())

    @property
    def plan(self) -> FaultPlan | None:
        self._sync()
        return self._plan

    def decide(self, transport, operation, registration_id=None, now=None):
        self._sync()
        return super().decide(transport, operation, registration_id, now)

    def on_connection(self, transport, now=None):
        self._sync()
        return super().on_connection(transport, now)

    def _sync(self, force: bool = False) -> None:
        if not (self.store.changed_elsewhere(SHARED_KEY) or force):
            return
        version, shared = self.store.get_shared(SHARED_KEY)
        if version != self._version:
            if shared is None:
                self._start(None, version, time.time())
            else:
                self._start(parse_plan(shared["plan"]), version, shared["setUtc"])

    def _start(self, plan: FaultPlan | None, version: int, set_utc: float) -> None:
        with self._lock:
            if version < self._version:
                return  # a newer plan arrived meanwhile
            self._version = version
        super().set(plan)
        # Windows count from when the plan was set, in every worker, not from when this
        # one noticed it.
        with self._lock:
            late = max(0.0, time.time() - set_utc)
            self._started -= late
            self._started_utc -= late

    # -- counters over all workers

    def counters(self) -> dict:
        """This worker's counters, as it publishes them."""
        with self._lock:
            return {"version": self._version,
                    "rules": [[state.matched, state.fired, dict(state.fired_by_operation)]
                              for state in self._states]}

    def report(self) -> dict | None:
        self._sync()
        report = super().report()
        if report is None:
            return None
        own = self.counters()
        counted = 1
        for index, published in self.store.worker_reports().items():
            theirs = published.get("faults") or {}
            if index == self.worker or theirs.get("version") != own["version"]:
                continue
            counted += 1
            for rule, (matched, fired, by_operation) in zip(report["rules"], theirs.get("rules", [])):
                rule["matched"] += matched
                rule["fired"] += fired
                for operation, n in by_operation.items():
                    rule["firedByOperation"][operation] = rule["firedByOperation"].get(operation, 0) + n
        report["workersCounted"] = counted
        return report

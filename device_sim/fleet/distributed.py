"""`device-sim fleet run --scheduler`: every Dask worker runs the fleet runner over the
devices of its own state directory; the coordinator merges the records (docs/fleet.md,
"Across machines").

Each worker's share runs in a child process (`python -m device_sim.fleet.distributed`,
started by device_sim/common/dask_shares.py): the runner needs a process where
python-pkcs11 is never loaded (runner.py), logs in once per token, and a killed worker
takes its child's stdin with it, so the child stops starting devices.

The order of a run:
1. each child reads its registry (the worker's $DEVICE_SIM_HOME), logs in once to each
   token, and says how many devices it will run and which (the coordinator writes the
   IDs to a temporary SQLite file, not to memory); a duplicate ID across workers or a
   worker that cannot start (no PIN, wrong PIN, no token) stops the run before any device;
2. the coordinator sends "go" to all at once (with each worker's part of --rate);
3. each record (DeviceResult.to_dict() + "worker") comes back while the run goes on;
4. the devices of a worker that left the cluster before sending their records are
   reported with status `lost`: planned, outcome unknown.
"""

from __future__ import annotations

import dataclasses
import os
import sqlite3
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Callable, Iterator

from device_sim.common import dask_shares
from device_sim.common.errors import UserError
from device_sim.common.process_exit import exit_now
from device_sim.device import registration as reg
from device_sim.device.target import Target
from device_sim.fleet.records import RunLog
from device_sim.fleet.report import CANCELLED, DeviceResult

LOST = "lost"  # planned on a worker that left the cluster before the device's record came
CHILD = "device_sim.fleet.distributed"
IDS_PER_MESSAGE = 1000


@dataclasses.dataclass
class WorkerTally:
    address: str
    devices: int = 0
    planned: bool = False  # said which devices it will run
    outcomes: Counter = dataclasses.field(default_factory=Counter)
    lost: bool = False

    def as_dict(self) -> dict:
        return {"address": self.address, "devices": self.devices,
                "outcomes": dict(self.outcomes.most_common()), "lost": self.lost}


@dataclasses.dataclass
class DistributedRun:
    log: RunLog                # every device's record, each with "worker" (on disk, not in memory)
    count: int                 # records merged
    wall_s: float
    workers: dict[str, WorkerTally]
    interrupted: bool = False

    def summary(self, **bounds) -> dict:
        """The merged summary (`RunLog.summary`; `bounds`: concurrency, rate, ramp)."""
        return self.log.summary(wall_s=self.wall_s, interrupted=self.interrupted, **bounds)

    def all_assigned(self, summary: dict) -> bool:
        """Every device assigned, and no worker lost (one lost before it said which devices
        it has leaves devices that are in no record)."""
        return not any(t.lost for t in self.workers.values()) and \
            summary["outcomes"].get(reg.ASSIGNED, 0) == self.count

    def unplanned(self) -> list[str]:
        """Workers lost before they said which devices they would run."""
        return [name for name, t in self.workers.items() if t.lost and not t.planned]


def child_job(*, prefix: str | None, settings: dict, target: Target, chain_to: str, token_batch: int = 0) -> dict:
    """What every worker's child needs (JSON): no path or secret of the coordinator's."""
    return {"prefix": prefix, "settings": settings, "chain_to": chain_to, "token_batch": token_batch,
            "target": {"host": target.host, "port": target.port, "id_scope": target.id_scope,
                       "transport": target.transport, "api_version": target.api_version,
                       "payload": target.payload,
                       "trust_pem": target.trust_pem.decode("ascii") if target.trust_pem else None}}


def run_distributed(scheduler: str, job: dict, log: RunLog, *, rate: float | None = None,
                    on_record: Callable[[dict, Counter], None] | None = None) -> DistributedRun:
    """Run `job` on every worker of `scheduler` and merge what comes back into `log`."""
    client = dask_shares.connect(scheduler)
    shares = None
    try:
        worker_list = dask_shares.workers(client)
        shares = dask_shares.Shares(client, worker_list)
        with tempfile.TemporaryDirectory(prefix="device-sim-dask-") as tmp:
            plan = _Plan(Path(tmp) / "plan.sqlite", [w.name for w in worker_list])
            shares.start(CHILD, [job] * len(worker_list))
            tallies = {w.name: WorkerTally(w.address) for w in worker_list}
            ready, lost = _collect_plans(shares, plan, tallies)
            total = sum(t.devices for t in tallies.values())
            for index in sorted(ready):
                count = tallies[worker_list[index].name].devices
                shares.send(index, {"kind": "go", "rate": rate * count / total if rate and total else None})
            return _collect_records(shares, plan, tallies, lost, on_record, log)
    finally:
        if shares is not None:
            shares.close()
        else:
            client.close()


def _collect_plans(shares, plan: "_Plan", tallies: dict[str, WorkerTally]) -> tuple[set[int], set[int]]:
    """Wait until every share said what it will run (or was lost); UserError if one cannot."""
    ready: set[int] = set()
    lost: set[int] = set()
    try:
        for index, kind, message in shares.events():
            name = shares.workers[index].name
            if kind == "plan":
                tallies[name].devices = message["count"]
            elif kind == "ids":
                plan.add(index, message["ids"])
            elif kind == "ready":
                ready.add(index)
                tallies[name].planned = True
            elif kind == "error":
                raise UserError(f"worker {name}: {message['message']}")
            elif kind == dask_shares.EXITED:
                raise UserError(f"worker {name}: its fleet process ended before the run started "
                                f"(code {message['code']}): {_last_line(message)}")
            elif kind == dask_shares.LOST:
                lost.add(index)
                tallies[name].lost = True
            if len(ready | lost) == len(shares.workers):
                return ready, lost
    except BaseException:
        shares.send_all({"kind": "stop"})
        raise
    return ready, lost


def _collect_records(shares, plan: "_Plan", tallies: dict[str, WorkerTally], lost: set[int],
                     on_record, log: RunLog) -> DistributedRun:
    counts: Counter = Counter()
    started = time.monotonic()
    interrupted = False

    def add(record: dict) -> None:
        log.add(record)
        counts[record["status"]] += 1
        tallies[record["worker"]].outcomes[record["status"]] += 1
        if on_record:
            on_record(record, counts)

    events = shares.events()
    while True:
        try:
            for index, kind, message in events:
                name = shares.workers[index].name
                if kind == "record":
                    plan.done(message["record"]["registration_id"])
                    add({**message["record"], "worker": name})
                elif kind == "done":
                    interrupted = interrupted or message.get("interrupted", False)
                elif kind == dask_shares.LOST:
                    lost.add(index)
                    tallies[name].lost = True
            break
        except KeyboardInterrupt:
            if interrupted:  # second Ctrl-C: report now, the unfinished devices as lost
                lost.update(shares.open)
                break
            interrupted = True  # first: every worker starts no more devices
            shares.send_all({"kind": "stop"})
            events = shares.events()
    wall = time.monotonic() - started
    for index in sorted(lost):
        name = shares.workers[index].name
        for registration_id in plan.undone(index):
            add({**DeviceResult(registration_id, LOST, error_message=(
                f"worker {name} left before this device's record came: its outcome is unknown")).to_dict(),
                "worker": name})
    return DistributedRun(log=log, count=sum(counts.values()), wall_s=wall, workers=tallies,
                          interrupted=interrupted)


def _last_line(message: dict) -> str:
    tail = message.get("stderr") or []
    return tail[-1] if tail else "no reason given"


class _Plan:
    """Which worker runs which device, and which records came: a temporary SQLite file,
    so the coordinator's memory does not grow with the IDs it waits for."""

    def __init__(self, path: Path, names: list[str]):
        self.names = names
        self.db = sqlite3.connect(path)
        self.db.execute("CREATE TABLE planned (registration_id TEXT PRIMARY KEY COLLATE NOCASE, "
                        "share INTEGER NOT NULL, done INTEGER NOT NULL DEFAULT 0)")

    def add(self, share: int, ids: list[str]) -> None:
        try:
            with self.db:
                self.db.executemany("INSERT INTO planned (registration_id, share) VALUES (?, ?)",
                                    [(i, share) for i in ids])
        except sqlite3.IntegrityError:
            self._duplicate(share, ids)

    def _duplicate(self, share: int, ids: list[str]) -> None:
        for registration_id in ids:
            row = self.db.execute("SELECT share FROM planned WHERE registration_id = ?",
                                  (registration_id,)).fetchone()
            if row is not None:
                raise UserError(f"device {registration_id!r} is in the state directories of workers "
                                f"{self.names[row[0]]} and {self.names[share]}: DPS would see one "
                                "registration ID twice; use other --prefix values per machine")

    def done(self, registration_id: str) -> None:
        with self.db:
            self.db.execute("UPDATE planned SET done = 1 WHERE registration_id = ?", (registration_id,))

    def undone(self, share: int):
        return [row[0] for row in self.db.execute(
            "SELECT registration_id FROM planned WHERE share = ? AND done = 0 ORDER BY registration_id",
            (share,))]


# --- the child: one worker's share ----------------------------------------------------------

def _run_share(parent: dask_shares.Parent) -> int:
    from device_sim.common.home import ensure_home
    from device_sim.fleet import identities
    from device_sim.fleet.runner import FleetSettings, run_fleet
    from hsm_setup import devices as registry
    from hsm_setup import module, pins

    job = parent.job
    home = ensure_home(None)  # the worker's own: $DEVICE_SIM_HOME of `dask worker`
    selection = None  # a worker without devices runs none
    if registry.tokens_of(home, prefix=job.get("prefix")):
        selection = identities.Selection(home, prefix=job.get("prefix"))
    devices = None
    if selection is not None:
        module_path = module.resolve_module(None, home)
        pin = dask_shares.worker_secret(pins.ENV_USER_PIN, "user PIN")
        devices = identities.stream_devices(selection, home=home, module_path=module_path, pin=pin, slots={},
                                            chain_to=job["chain_to"], batch=job.get("token_batch", 0))
    parent.send("plan", count=len(selection) if selection is not None else 0)
    for ids in _id_pages(selection):
        parent.send("ids", ids=ids)
    parent.send("ready")
    go = parent.receive()
    if go is None or go.get("kind") != "go":
        return 0
    target = _target(job["target"], home)
    settings = FleetSettings(**job["settings"], rate=go.get("rate"))
    stop = threading.Event()
    threading.Thread(target=lambda: (parent.receive(), stop.set()), daemon=True).start()
    received: set[str] = set()
    arrived = threading.Condition()

    def on_result(result, counts) -> None:
        with arrived:
            received.add(result.registration_id)
            arrived.notify_all()
        parent.send("record", record=result.to_dict())

    if devices is None:
        parent.send("done", wall_s=0.0, interrupted=False)
        return 0
    try:
        report = run_fleet(devices, target, settings, stop=stop, on_result=on_result)
    finally:
        devices.close()
    _send_never_started(parent, report, received, arrived, grace=1.0 if stop.is_set() else settings.timeout)
    parent.send("done", wall_s=report.wall_s, interrupted=report.interrupted)
    return 0


def _id_pages(selection) -> "Iterator[list[str]]":
    """The registration IDs of a selection, IDS_PER_MESSAGE at a time (one registry pass)."""
    page: list[str] = []
    for record in selection or ():
        page.append(record.registration_id)
        if len(page) == IDS_PER_MESSAGE:
            yield page
            page = []
    if page:
        yield page


def _send_never_started(parent, report, received: set[str], arrived: threading.Condition, *,
                        grace: float) -> None:
    """The records of devices the report calls cancelled that never came to on_result.

    The runner frees a device's slot just before it hands over the record, so the last
    device to finish may still be on its way when the run returns: it is waited for (a
    run that was not stopped has no device that never started). A runner that passes every
    record, cancelled ones included, to on_result leaves nothing to do here.
    """
    cancelled = [r for r in getattr(report, "devices", ()) if r.status == CANCELLED]
    deadline = time.monotonic() + grace
    with arrived:
        for result in cancelled:
            while result.registration_id not in received and (left := deadline - time.monotonic()) > 0:
                arrived.wait(left)
    for result in cancelled:
        if result.registration_id not in received:
            parent.send("record", record=result.to_dict())


def _target(spec: dict, home: Path) -> Target:
    """The coordinator's target, its trust certificates in a file of this machine."""
    trust_file = None
    if spec["trust_pem"]:
        trust_file = str(home / "dask-trust.pem")
        Path(trust_file).write_text(spec["trust_pem"], encoding="ascii")
        # As `fleet run` does: awscrt's default store becomes this small file (cli/fleet.py).
        os.environ["SSL_CERT_FILE"] = trust_file
        os.environ["SSL_CERT_DIR"] = str(home / ".no-cert-dir")
    return Target(spec["host"], spec["port"], spec["id_scope"], spec["transport"], trust_file,
                  spec["trust_pem"].encode("ascii") if spec["trust_pem"] else None,
                  spec["api_version"], spec["payload"])


if __name__ == "__main__":
    # No interpreter teardown, as `fleet run` (device_sim/common/process_exit.py): a child
    # hanging in SoftHSM at exit would keep its share open.
    exit_now(dask_shares.run_child(_run_share))

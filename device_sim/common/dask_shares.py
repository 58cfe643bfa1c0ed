"""A fleet spread over Dask workers: one share per worker, run in a child process there,
talking JSON lines with the coordinator (docs/fleet.md, "Across machines").

Why a child process per share: the child does its machine's token work (one PKCS#11
initialisation and one login per token for the whole share, and python-pkcs11 kept out of
the process where awscrt signs: device_sim/fleet/runner.py), the Dask worker process stays
as it started, and a lost worker is easy to reason about: the child's stdin is a pipe
from the worker, so the child sees end-of-file when its worker is gone and stops.

The wire: each line a child prints (one JSON object) goes to the coordinator on one Dask
queue, several lines per item; each message the coordinator sends to a share goes on
that share's queue and becomes one line on the child's stdin. Only what the children
print and the jobs the coordinator hands out cross machines. Both programs use this
module: `hsm-setup fleet create --scheduler` (hsm_setup/fleet_distributed.py) and
`device-sim fleet run --scheduler` (device_sim/fleet/distributed.py).
"""

from __future__ import annotations

import dataclasses
import json
import os
import queue
import subprocess
import sys
import threading
import time
import uuid
from typing import Callable, Iterator

from device_sim.common.errors import UserError

# How often a worker forwards what its child printed, and the coordinator checks that
# the workers of unfinished shares are still there.
FORWARD_SECONDS = 0.2
LIVENESS_SECONDS = 1.0
POLL_SECONDS = 0.05
CONNECT_TIMEOUT = 5.0

# What the coordinator's `events` yields besides a child's messages.
EXITED = "exited"  # the share's child ended; value {"code": int, "stderr": last lines}
LOST = "lost"      # the share's worker left the cluster before its child ended


def import_distributed():
    try:
        import distributed
    except ImportError:
        raise UserError("--scheduler needs Dask distributed: pip install 'device-sim[distributed]'") from None
    return distributed


@dataclasses.dataclass(frozen=True)
class WorkerInfo:
    address: str
    name: str


def connect(address: str):
    """A Dask client of the scheduler at `address`; UserError naming it when unreachable."""
    if "://" not in address:
        raise UserError(f"--scheduler {address!r}: expected tcp://HOST:PORT (the address 'dask scheduler' prints)")
    distributed = import_distributed()
    try:
        return distributed.Client(address, timeout=CONNECT_TIMEOUT, set_as_default=False)
    except (OSError, TimeoutError, ValueError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"cannot reach the Dask scheduler at {address} ({reason}): start it with "
                        "'dask scheduler' and check --scheduler") from None


def workers(client) -> list[WorkerInfo]:
    """The scheduler's workers, ordered by name (a rerun with the same workers splits alike)."""
    found = [WorkerInfo(address, str(info.get("name", address)))
             for address, info in client.scheduler_info(n_workers=-1)["workers"].items()]
    if not found:
        raise UserError("the Dask scheduler has no workers: start 'dask worker SCHEDULER' on each machine")
    return sorted(found, key=lambda w: (w.name, w.address))


def split(count: int, parts: int) -> list[tuple[int, int]]:
    """(start, stop) of `parts` contiguous shares of `count` items, sizes differing by one at most."""
    base, extra = divmod(count, parts)
    bounds, start = [], 0
    for n in range(parts):
        stop = start + base + (1 if n < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


class Shares:
    """The coordinator's side: one child per worker, messages both ways, lost workers noticed."""

    def __init__(self, client, worker_list: list[WorkerInfo]):
        self.client = client
        self.workers = worker_list
        self.run = f"device-sim-{uuid.uuid4().hex[:12]}"
        distributed = import_distributed()
        self._up = distributed.Queue(f"{self.run}-up", client=client)
        self._down = [distributed.Queue(f"{self.run}-down-{n}", client=client) for n in range(len(worker_list))]
        self._futures: list = []
        self._absent: dict[int, int] = {}  # share -> liveness checks in a row without its worker
        self.open: set[int] = set()

    def start(self, module: str, jobs: list[dict]) -> None:
        """`python -m module` on each worker, its job (a JSON object) as its first stdin line."""
        for index, (worker, job) in enumerate(zip(self.workers, jobs)):
            self._futures.append(self.client.submit(
                relay, module, job, self.run, index, key=f"{self.run}-share-{index}",
                workers=[worker.address], allow_other_workers=False, pure=False, retries=0))
            self.open.add(index)

    def send(self, index: int, message: dict) -> None:
        if index in self.open:
            self._down[index].put(message)

    def send_all(self, message: dict) -> None:
        for index in sorted(self.open):
            self.send(index, message)

    def events(self) -> Iterator[tuple[int, str, object]]:
        """(share, kind, value) until every share has exited or been lost; a child's message
        {"kind": ..., ...} comes as (share, kind, message)."""
        checked = time.monotonic()
        while self.open:
            for index, message in self._receive(timeout=0.5):
                yield index, message.get("kind", ""), message
                if message.get("kind") == EXITED:
                    self.open.discard(index)
            if time.monotonic() - checked >= LIVENESS_SECONDS:
                checked = time.monotonic()
                yield from self._lost_shares()

    def _receive(self, timeout: float) -> list[tuple[int, dict]]:
        items = _poll(self._up, timeout)
        return [(item["share"], message) for item in items for message in item["messages"]]

    def _lost_shares(self) -> Iterator[tuple[int, str, object]]:
        present = {w.address for w in workers_or_none(self.client)}
        for n in sorted(self.open):  # absent twice in a row: a glitch of one answer is no loss
            self._absent[n] = self._absent.get(n, 0) + 1 if self.workers[n].address not in present else 0
        gone = [n for n in sorted(self.open) if self._absent[n] >= 2 or self._futures[n].status == "error"]
        if not gone:
            return
        for index, message in self._receive(timeout=0.1):  # what they said before they went
            yield index, message.get("kind", ""), message
            if message.get("kind") == EXITED:
                self.open.discard(index)
        for index in gone:
            if index in self.open:
                self.open.discard(index)
                future = self._futures[index]
                reason = (f"its task failed: {future.exception()!r}" if future.status == "error"
                          else "it left the cluster")
                self.client.cancel(future)  # never rerun elsewhere or later
                yield index, LOST, {"kind": LOST, "worker": self.workers[index].address, "reason": reason}

    def close(self) -> None:
        for future in self._futures:
            future.release()
        self.client.close()


def workers_or_none(client) -> list[WorkerInfo]:
    try:
        return workers(client)
    except UserError:
        return []


def relay(module: str, job: dict, run: str, index: int) -> int:
    """The Dask task of one share, on its worker: start the child and pass lines both ways."""
    distributed = import_distributed()
    started = distributed.Event(f"{run}-started-{index}")
    if started.is_set():  # the scheduler gave this share a second go after a lost worker: never
        return -1
    started.set()
    up = distributed.Queue(f"{run}-up")
    down = distributed.Queue(f"{run}-down-{index}")
    child = subprocess.Popen([sys.executable, "-m", module], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONUNBUFFERED": "1"})
    stderr_tail: list[str] = []
    threading.Thread(target=_keep_tail, args=(child.stderr, stderr_tail), daemon=True).start()
    forwarder = threading.Thread(target=_forward, args=(child.stdout, up, index), daemon=True)
    forwarder.start()
    try:
        child.stdin.write(json.dumps(job) + "\n")
        child.stdin.flush()
        while child.poll() is None:
            for message in _poll(down):
                child.stdin.write(json.dumps(message) + "\n")
                child.stdin.flush()
    except (BrokenPipeError, OSError):
        pass  # the child ended; its exit code says how
    finally:
        code = child.wait()
        forwarder.join()
        up.put({"share": index, "messages": [{"kind": EXITED, "code": code, "stderr": stderr_tail[-5:]}]})
    return code


def _forward(stream, up, index: int) -> None:
    """The child's lines to the coordinator: what came within FORWARD_SECONDS as one item."""
    lines: queue.SimpleQueue = queue.SimpleQueue()
    threading.Thread(target=_read_lines, args=(stream, lines), daemon=True).start()
    ended = False
    while not ended:
        batch: list[dict] = []
        due = time.monotonic() + FORWARD_SECONDS
        while len(batch) < 500 and (left := due - time.monotonic()) > 0:
            try:
                line = lines.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                ended = True
                break
            try:
                batch.append(json.loads(line))
            except ValueError:
                continue  # a stray print of a library: not a message
        if batch:
            up.put({"share": index, "messages": batch})


def _read_lines(stream, lines: queue.SimpleQueue) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


def _poll(dask_queue, timeout: float = 0.5) -> list:
    """What is on a Dask queue, waiting up to `timeout` for something. (Short polls: a get
    with a timeout that expires logs a traceback in the scheduler's log every time.)"""
    deadline = time.monotonic() + timeout
    while True:
        items = dask_queue.get(batch=True)
        if items or time.monotonic() >= deadline:
            return items
        time.sleep(POLL_SECONDS)


def _keep_tail(stream, tail: list[str]) -> None:
    for line in stream:
        tail.append(line.rstrip())
        del tail[:-20]


# --- the child's side ---------------------------------------------------------------------

def worker_secret(env: str, what: str) -> str:
    """A PIN from the worker's environment: no prompt there, and never over the network."""
    value = os.environ.get(env)
    if not value:
        raise UserError(f"no {what} on this worker: set ${env} in the environment of its 'dask worker'")
    return value


class Parent:
    """What a share's child uses: its job, messages to the coordinator, messages from it.

    A thread reads stdin; end-of-file (the worker is gone, or the coordinator cancelled)
    sets `gone`, and `receive` then returns None.
    """

    def __init__(self, stdin=None, stdout=None):
        self._in = stdin or sys.stdin
        self._out = stdout or sys.stdout
        self.job = json.loads(self._in.readline() or "{}")
        self.gone = threading.Event()
        self._inbox: list[dict] = []
        self._ready = threading.Condition()
        self._write_lock = threading.Lock()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self._in:
            with self._ready:
                self._inbox.append(json.loads(line))
                self._ready.notify_all()
        with self._ready:
            self.gone.set()
            self._ready.notify_all()

    def send(self, kind: str, **fields) -> None:
        line = json.dumps({"kind": kind, **fields})
        with self._write_lock:
            try:
                self._out.write(line + "\n")
                self._out.flush()
            except (BrokenPipeError, ValueError):
                self.gone.set()

    def receive(self) -> dict | None:
        """The next message from the coordinator; None once the parent is gone."""
        with self._ready:
            while not self._inbox and not self.gone.is_set():
                self._ready.wait()
            return self._inbox.pop(0) if self._inbox else None


def run_child(share: Callable[["Parent"], int]) -> int:
    """A share's child process: run `share`; any failure goes to the coordinator as one
    "error" message (it waits for this share) and the child exits 2."""
    parent = Parent()
    try:
        return share(parent)
    except UserError as exc:
        parent.send("error", message=str(exc))
    except Exception as exc:  # say it to the coordinator: it waits for this share
        parent.send("error", message=f"{type(exc).__name__}: {exc}")
    return 2

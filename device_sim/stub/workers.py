"""`stub serve --workers N`: N emulator processes on the same ports and one store, so
registrations/s grows with cores (docs/scaling.md).

The supervisor (the `stub serve` process) forks the workers before it has any thread.
Worker 0 starts first: it makes the state directory's files (settings, TLS identity,
service key, issuing CA) and binds every listener with SO_REUSEPORT, port 0 becoming a
real port. The others then bind those same ports; Linux spreads new connections over the
workers' sockets by a hash of the connection's addresses. Binding in each worker (rather
than the supervisor binding and passing one socket) gives each worker its own accept
queue, which the kernel balances; one shared queue goes mostly to whichever process
waited last. The dashboard is served by worker 0 only.

What lives in process memory and how it is kept right across workers:
- the store (SQLite): shared as the file; `core/store.py` says how processes see each
  other's commits;
- the fault plan set live: `core/shared_faults.py` (in the store; counters summed);
- quotas: each worker keeps 1/N of the per-minute budgets (`core/quotas.py`);
- the throttle setting's per-device counts: per worker (a device that reconnects to
  another worker may be throttled again there);
- connections accepted, fault counters: each worker publishes them to the store every
  PUBLISH_PERIOD; `stub status` lists them per worker under `server.workers`.

The supervisor prints one ready line (worker 0's, with `pid` = the supervisor, `workers`
and `worker_pids`) and writes the endpoint file. SIGTERM or SIGINT to it stops every
worker. A worker that dies is reported in the log and the emulator stops with a failure:
a bench against an emulator missing a worker would measure something else than it says.
Workers die with the supervisor (PR_SET_PDEATHSIG), so a killed supervisor leaves none.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import threading
import time
from typing import TYPE_CHECKING, Callable

from device_sim.common.errors import UserError
from device_sim.common.files import write_atomic
from device_sim.stub.layout import StateLayout

if TYPE_CHECKING:
    from device_sim.stub.server import StubServer

PUBLISH_PERIOD = 0.5  # seconds between a worker's reports to the store
STOP_GRACE = 10.0  # seconds the workers have to stop before SIGKILL
PR_SET_PDEATHSIG = 1

# start(index, ports) -> a started StubServer; ports is None for worker 0, else the
# listener name -> port worker 0 bound. Raises UserError when the worker cannot start.
StartWorker = Callable[[int, "dict[str, int] | None"], "StubServer"]


class WorkerGone(UserError):
    """A worker failed to start, or died while serving."""


def worker_table(server: StubServer) -> list[dict]:
    """Every worker's report (this one's live), for `stub status`."""
    reports = server.app.store.worker_reports()
    reports[server.options.worker] = own_report(server)
    return [reports[index] for index in sorted(reports)]


def own_report(server: StubServer) -> dict:
    report = {
        "index": server.options.worker,
        "pid": os.getpid(),
        "connections": {listener.name: listener.accepted for listener in server.listeners
                        if hasattr(listener, "accepted")},
    }
    counters = getattr(server.app.device_api.faults, "counters", None)
    if counters is not None:
        report["faults"] = counters()
    return report


# --------------------------------------------------------------------------- supervisor


class Supervisor:
    """Starts `count` workers, then watches them until `stop` is set or one dies."""

    def __init__(self, count: int, start: StartWorker, log: Callable[[str], None]):
        self.count = count
        self.start_worker = start
        self.log = log
        self.pids: list[int] = []
        self.ready: dict = {}
        self._home = None

    def start(self) -> dict:
        """Start every worker; the merged ready info. WorkerGone (all stopped) when one fails."""
        try:
            first = self._fork(0, None)
            first_ready = self._wait_ready(0, first)
            ports = first_ready["ports"]
            pending = [(index, self._fork(index, ports)) for index in range(1, self.count)]
            for index, channel in pending:
                self._wait_ready(index, channel)
        except BaseException:
            self.stop_all()
            raise
        ready = dict(first_ready["ready"])
        ready.pop("worker", None)
        ready.update(pid=os.getpid(), workers=self.count, worker_pids=list(self.pids))
        self._home = ready["home"]
        endpoint = StateLayout.of(self._home).endpoint
        write_atomic(endpoint, json.dumps(ready, indent=2) + "\n", private=True)
        self.ready = ready
        return ready

    def serve_until(self, stop: threading.Event) -> int:
        """Block until `stop` (0) or a worker's death (1); every worker is stopped after."""
        try:
            while not stop.wait(0.2):
                gone = self._first_gone()
                if gone is not None:
                    index, how = gone
                    self.log(f"worker {index} (pid {self.pids[index]}) {how}; stopping the emulator")
                    return 1
            return 0
        finally:
            self.stop_all()

    def stop_all(self) -> None:
        for pid in self.pids:
            _signal(pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE
        for pid in self.pids:
            while not _reaped(pid):
                if time.monotonic() >= deadline:
                    self.log(f"worker pid {pid} did not stop within {STOP_GRACE:g} s; killing it")
                    _signal(pid, signal.SIGKILL)
                    _reaped(pid, block=True)
                    break
                time.sleep(0.05)
        self._remove_endpoint_file()

    def _first_gone(self) -> tuple[int, str] | None:
        for index, pid in enumerate(self.pids):
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                return index, "is gone"
            if done:
                return index, _ended(status)
        return None

    def _remove_endpoint_file(self) -> None:
        if self._home is None:
            return
        path = StateLayout.of(self._home).endpoint
        try:
            if json.loads(path.read_text()).get("pid") == os.getpid():
                path.unlink()
        except (OSError, ValueError):
            pass

    def _fork(self, index: int, ports: dict | None) -> int:
        """Fork worker `index`; the read end of the pipe its ready message comes on."""
        read_fd, write_fd = os.pipe()
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:  # the worker: never returns into the caller's code
            code = 1
            try:
                os.close(read_fd)
                code = _run_worker(index, ports, self.start_worker, write_fd, parent)
            finally:
                os._exit(code)
        os.close(write_fd)
        self.pids.append(pid)
        return read_fd

    def _wait_ready(self, index: int, read_fd: int) -> dict:
        with os.fdopen(read_fd, "rb") as channel:
            line = channel.readline()
        try:
            message = json.loads(line)
        except ValueError:
            message = None
        if not isinstance(message, dict):
            pid = self.pids[index]
            _reaped(pid, block=True)
            raise WorkerGone(f"worker {index} (pid {pid}) ended before it was ready; see the log above")
        if "error" in message:
            raise WorkerGone(message["error"] if index == 0 else f"worker {index}: {message['error']}")
        return message


# --------------------------------------------------------------------------- worker


def _run_worker(index: int, ports: dict | None, start: StartWorker, write_fd: int, parent: int) -> int:
    _die_with(parent)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    # Ctrl-C reaches the whole process group; the supervisor alone decides, then SIGTERMs.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with os.fdopen(write_fd, "w") as channel:
        try:
            server = start(index, ports)
        except UserError as exc:
            channel.write(json.dumps({"error": str(exc)}) + "\n")
            return 2
        except Exception as exc:  # a bug: say what, not a traceback
            channel.write(json.dumps({"error": f"{type(exc).__name__}: {exc}"}) + "\n")
            return 1
        ports = {listener.name: listener.port for listener in server.listeners if hasattr(listener, "port")}
        channel.write(json.dumps({"ready": server.ready, "ports": ports}) + "\n")
    publisher = threading.Thread(target=_publish, args=(server, stop), name="worker-report", daemon=True)
    publisher.start()
    server.serve_until(stop)
    return 0


def _publish(server: StubServer, stop: threading.Event) -> None:
    """Report this worker to the store until it stops (`stub status`, summed fault counters)."""
    while True:
        app = server.app
        if app is None:
            return
        try:
            app.store.publish_worker(server.options.worker, own_report(server))
        except Exception as exc:  # a busy or closing store: the next round tries again
            server.log(f"worker report not stored: {type(exc).__name__}: {exc}")
        if stop.wait(PUBLISH_PERIOD):
            return


def _die_with(parent: int) -> None:
    """SIGTERM this worker when the supervisor dies, however it dies (Linux)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # the supervisor died before the call above
        os.kill(os.getpid(), signal.SIGTERM)


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def _reaped(pid: int, block: bool = False) -> bool:
    try:
        done, _ = os.waitpid(pid, 0 if block else os.WNOHANG)
    except ChildProcessError:
        return True  # reaped already
    return bool(done)


def _ended(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"was killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exited with code {os.waitstatus_to_exitcode(status)}"

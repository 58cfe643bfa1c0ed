"""Run many device registrations at once: bounded concurrency, optional arrival rate
(constant, or ramping linearly up to it: `arrival_s`).

Memory is O(concurrency), not O(devices) (docs/fleet.md, "Memory"): devices are read
from any iterable one at a time as slots free up, each finished device's record goes to
a `records.RunLog` (a JSON Lines file and streaming statistics) and to `on_result`, and
the runner itself keeps only what is in flight.

Each device gets its own awscrt TLS context on its own token key (the key never leaves
the token) and runs the same sans-IO flow as `device-sim register`. Workers are threads:
awscrt does the TLS and I/O on its own event-loop threads and a worker only waits on
futures, so the GIL is not what bounds a run.

Why the token access stays flat as the fleet grows (docs/fleet.md: a label search on a
SoftHSM token with 2,000 objects manages ~19/s):
- identities come from the state directory's registry (no token enumeration, no
  certificate search per device); the issuing chain is built once per CA;
- tokens are addressed by slot id, resolved once per run (a label lookup costs ~10 ms
  among 100 tokens, a slot id ~2 ms);
- `hsm-setup fleet create` spreads devices over small shard tokens, so awscrt's one
  key-label search per device scans a few dozen objects, not thousands.
- python-pkcs11 is never loaded in this process: it initialises SoftHSM without locking
  arguments, which turns SoftHSM's mutexes off; awscrt alone initialises it with OS
  locking, so several event-loop threads may sign at once.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import signal
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterable

from device_sim.common.errors import UserError
from device_sim.device import registration as reg
from device_sim.device.driver import run_registration
from device_sim.device.target import Target
from device_sim.device.transport_https import CrtRuntime, TlsIdentity, client_tls_context
from device_sim.fleet.records import RunLog
from device_sim.fleet.report import CANCELLED, ERROR, SETUP_ERROR, DeviceResult, FleetReport


@dataclass(frozen=True)
class FleetDevice:
    registration_id: str
    tls: TlsIdentity


@dataclass(frozen=True)
class TokenSwitch:
    """An item of a device stream between two token batches (fleet/identities.py): the
    runner lets every started device finish, initialises the module again with the
    environment `prepare()` returns (a SoftHSM token view: fleet/token_views.py), and holds
    logins for `token_counts` (token_key -> devices of the batch). A stopped run skips it."""

    module_path: str
    prepare: Callable[[], dict[str, str]]
    token_counts: Counter


@dataclass
class FleetSettings:
    concurrency: int = 64
    timeout: float = 60.0  # per device: token, TLS, retries and polls included
    rate: float | None = None  # arrivals per second; None = as fast as concurrency allows
    ramp: float | None = None  # seconds over which arrivals grow linearly from 0 to `rate`
    event_loop_threads: int = field(default_factory=lambda: max(1, os.cpu_count() or 1))

    def __post_init__(self):
        if self.concurrency < 1:
            raise UserError("--concurrency must be at least 1")
        if self.timeout <= 0:
            raise UserError("--timeout must be a positive number of seconds")
        if self.rate is not None and self.rate <= 0:
            raise UserError("--rate must be a positive number of devices per second")
        if self.ramp is not None and self.ramp <= 0:
            raise UserError("--ramp must be a positive number of seconds")
        if self.ramp is not None and self.rate is None:
            raise UserError("--ramp needs --rate: the arrival rate it ramps up to (e.g. --rate 100 --ramp 30)")
        if self.event_loop_threads < 1:
            raise UserError("--event-loop-threads must be at least 1")


class _TimedTransport:
    """Passes every call through and notes how long the first register round trip took."""

    def __init__(self, inner):
        self.inner = inner
        self.register_ms: float | None = None

    def connect(self, timeout):
        self.inner.connect(timeout)

    def send_register(self, body, timeout):
        started = time.monotonic()
        response = self.inner.send_register(body, timeout)
        if self.register_ms is None:
            self.register_ms = (time.monotonic() - started) * 1000
        return response

    def send_poll(self, operation_id, timeout):
        return self.inner.send_poll(operation_id, timeout)

    def close(self):
        self.inner.close()


class TokenLogins:
    """Keeps each token logged in while the run still has devices on it.

    PKCS#11 login state belongs to the application and ends when the token's last session
    closes; every awscrt TLS context opens a session and logs in. Holding the first context
    made on a token until that token's last device is done turns the others' C_Login into
    "already logged in": measured on SoftHSM, 2.5 ms -> 0.7 ms per context (10 devices per
    token), the PIN-derived key being what a login costs.

    `counts` says how many devices each token has in the run (`token_key` -> n); without
    it nothing is held (each device logs in itself: slower, never wrong).
    """

    def __init__(self, counts: Counter | None):
        self._left = Counter(counts or {})
        self._held: dict = {}
        self._lock = threading.Lock()

    @classmethod
    def for_devices(cls, devices) -> "TokenLogins":
        """From a list's devices, or the `token_counts` of a stream (identities.DeviceStream)."""
        counts = getattr(devices, "token_counts", None)
        if counts is None and isinstance(devices, (list, tuple)):
            counts = Counter(token_key(d) for d in devices)
        return cls(counts)

    def hold(self, device: "FleetDevice", context) -> None:
        key = token_key(device)
        with self._lock:
            if self._left.get(key, 0) > 0:
                self._held.setdefault(key, context)

    def done(self, device: "FleetDevice") -> None:
        key = token_key(device)
        with self._lock:
            self._left[key] -= 1
            if self._left[key] <= 0:
                del self._left[key]
                self._held.pop(key, None)

    def release_all(self) -> None:
        with self._lock:
            self._held.clear()


def token_key(device: "FleetDevice"):
    """Which token a device's key is on, as TokenLogins counts them."""
    return (device.tls.module_path, device.tls.slot_id, device.tls.token_label)


class _PollWaits(reg.RegistrationFlow):
    """The flow, noting the waits the service asked for before each status poll (its
    Retry-After, else the default poll interval): what the throughput explanation weighs."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.polls = 0
        self.poll_wait_s = 0.0
        self._planned: float | None = None

    def receive(self, response):
        action = super().receive(response)
        self._planned = None
        if isinstance(action, reg.Send) and action.kind == reg.POLL and not action.retry:
            self.polls += 1
            self.poll_wait_s += action.delay
            self._planned = action.delay
        return action

    def expire(self, reason):
        if self._planned is not None:  # the deadline came first: that wait never happened
            self.polls -= 1
            self.poll_wait_s -= self._planned
            self._planned = None
        return super().expire(reason)


def register_one(device: FleetDevice, target: Target, timeout: float, runtime: CrtRuntime,
                 run_started: float, *, logins: TokenLogins | None = None, clock=time.monotonic) -> DeviceResult:
    """One device's whole registration; never raises for a device-level failure."""
    started = clock()
    result = DeviceResult(device.registration_id, SETUP_ERROR, started_s=round(started - run_started, 4))
    try:
        context = client_tls_context(device.tls, target.trust_pem, runtime)
    except UserError as exc:
        result.error_message = str(exc)
        result.total_ms = (clock() - started) * 1000
        return result
    if logins is not None:
        logins.hold(device, context)
    context_ms = (clock() - started) * 1000
    transport = _TimedTransport(target.new_transport(device.registration_id, context, runtime))
    flow = _PollWaits(device.registration_id, target.payload)
    budget = max(0.001, timeout - context_ms / 1000)
    outcome, timings = run_registration(flow, transport, budget)
    result.status = outcome.status
    result.total_ms = (clock() - started) * 1000
    if timings.connect_ms is not None:
        result.tls_ms = context_ms + timings.connect_ms
    result.register_ms = transport.register_ms
    if timings.register_ms is not None and transport.register_ms is not None:
        result.wait_ms = max(0.0, timings.register_ms - transport.register_ms)
    result.retries = timings.retries
    result.retries_by_cause = dict(timings.retries_by_cause)
    result.polls, result.poll_wait_ms = flow.polls, round(flow.poll_wait_s * 1000, 1)
    result.assigned_hub = outcome.assigned_hub
    result.device_id = outcome.device_id
    result.substatus = outcome.substatus
    if outcome.status != reg.ASSIGNED:
        result.error_code = None if outcome.error_code is None else str(outcome.error_code)
        result.error_message = outcome.error_message
    return result


def run_fleet(devices: Iterable[FleetDevice], target: Target, settings: FleetSettings, *,
              stop: threading.Event | None = None,
              on_result: Callable[[DeviceResult, Counter], None] | None = None,
              log: RunLog | None = None) -> FleetReport:
    """Register `devices` (any iterable, read one device at a time as slots free up);
    returns when all finished or, after `stop` is set, when the devices already started
    have finished (the rest are reported as cancelled).

    Every device's record goes to `log` (a statistics-only RunLog when None) and to
    `on_result(result, counts)` as it finishes, cancelled ones included; the process
    keeps no per-device list: what is in flight, and the log's statistics.
    """
    stop = stop or threading.Event()
    log = log if log is not None else RunLog(None)
    runtime = CrtRuntime(event_loop_threads=settings.event_loop_threads)
    slots = threading.BoundedSemaphore(settings.concurrency)
    counts: Counter = Counter()
    lock = threading.Lock()
    in_flight: dict[int, FleetDevice] = {}  # at most --concurrency entries
    closed = False
    logins = TokenLogins.for_devices(devices)
    run_started = time.monotonic()

    def finish(result: DeviceResult) -> None:  # with `lock` held: one record at a time
        counts[result.status] += 1
        log.add_result(result)
        if on_result:
            on_result(result, counts)

    def work(seq: int, device: FleetDevice, logins: TokenLogins) -> None:
        try:
            result = register_one(device, target, settings.timeout, runtime, run_started, logins=logins)
        except Exception as exc:  # a bug must cost one device, not the run
            result = DeviceResult(device.registration_id, ERROR, error_message=f"{type(exc).__name__}: {exc}")
        finally:
            logins.done(device)
        try:
            with lock:
                if in_flight.pop(seq, None) is not None and not closed:  # else: reported already
                    finish(result)
        finally:
            slots.release()  # after the record: an idle run has every record

    pool = ThreadPoolExecutor(max_workers=settings.concurrency, thread_name_prefix="device")
    devices = iter(devices)
    unstarted: FleetDevice | None = None
    switches = _Switches(runtime, slots, settings.concurrency, stop)
    seq = 0
    with _ctrl_c(stop):
        try:
            for device in devices:
                if isinstance(device, TokenSwitch):
                    logins.release_all()
                    if not switches.switch(device):
                        break
                    logins = TokenLogins(device.token_counts)
                    continue
                unstarted = device
                if not _wait_for_turn(arrival_s(seq, settings.rate, settings.ramp), run_started, slots, stop):
                    break
                with lock:
                    in_flight[seq] = device
                unstarted = None
                pool.submit(work, seq, device, logins)
                seq += 1
        except KeyboardInterrupt:
            stop.set()  # first Ctrl-C: start no more devices, let the started ones finish
        pool.shutdown(wait=False)
        try:
            _wait_idle(slots, settings.concurrency)
        except KeyboardInterrupt:
            pass  # second Ctrl-C: report now; unfinished devices count as cancelled
    wall = time.monotonic() - run_started
    logins.release_all()
    runtime.release_modules()
    with lock:
        closed = True  # a late finisher must not change the report being written
        left = [*in_flight.values(), *([unstarted] if unstarted is not None else [])]
        in_flight.clear()
        for device in itertools.chain(left, devices):
            if isinstance(device, TokenSwitch):
                continue
            if switches.error:  # the module could not be initialised for these devices' tokens
                finish(DeviceResult(device.registration_id, SETUP_ERROR, error_message=switches.error))
            else:
                finish(DeviceResult(device.registration_id, CANCELLED))
    return FleetReport(wall_s=wall, interrupted=stop.is_set() and not switches.error, stats=log.stats,
                       settings={"concurrency": settings.concurrency, "rate": settings.rate, "ramp": settings.ramp,
                                 **switches.settings()})


class _Switches:
    """The dispatcher's token-batch switches (TokenSwitch): wait until no device is in
    flight, then initialise the module again for the next batch's tokens."""

    def __init__(self, runtime: CrtRuntime, slots: threading.BoundedSemaphore, concurrency: int,
                 stop: threading.Event):
        self.runtime, self.slots, self.concurrency, self.stop = runtime, slots, concurrency, stop
        self.count = 0
        self.drain_s = 0.0  # waiting for the last devices of a batch
        self.load_s = 0.0   # making the view and initialising the module over it
        self.error: str | None = None

    def switch(self, item: TokenSwitch) -> bool:
        """False when the run must stop (stopped while waiting, or the module failed)."""
        started = time.monotonic()
        _wait_idle(self.slots, self.concurrency)
        drained = time.monotonic()
        if self.stop.is_set():
            return False
        try:
            self.runtime.reinitialise(item.module_path, item.prepare())
        except UserError as exc:
            self.error = str(exc)
            self.stop.set()
            return False
        self.count += 1
        self.drain_s += drained - started
        self.load_s += time.monotonic() - drained
        return True

    def settings(self) -> dict:
        if not self.count:
            return {}
        return {"token_batches": self.count, "token_switch_s": round(self.drain_s + self.load_s, 3),
                "token_drain_s": round(self.drain_s, 3), "token_load_s": round(self.load_s, 3)}


def arrival_s(index: int, rate: float | None, ramp: float | None = None) -> float:
    """When device `index` (from 0) may start, in seconds after the run started.

    Constant arrivals at `rate`; with `ramp`, the rate grows linearly from 0 to `rate`
    over `ramp` seconds (rate * ramp / 2 devices start during it), then stays."""
    if not rate:
        return 0.0
    if not ramp:
        return index / rate
    during_ramp = rate * ramp / 2
    if index <= during_ramp:
        return math.sqrt(2 * ramp * index / rate)
    return ramp + (index - during_ramp) / rate


@contextlib.contextmanager
def _ctrl_c(stop: threading.Event):
    """The first Ctrl-C sets `stop`, a later one raises KeyboardInterrupt (stop waiting).

    A handler instead of the default KeyboardInterrupt: the dispatcher may be inside the
    device iterator (a registry read) when Ctrl-C comes, and an exception raised there
    would end the iterator, losing the devices still to be reported as cancelled.
    Signals reach the main thread only; elsewhere (a Dask worker) the caller sets `stop`."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_sigint(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _wait_idle(slots: threading.BoundedSemaphore, concurrency: int) -> None:
    """Wait until every started device has released its slot (short waits: Ctrl-C stays live)."""
    taken = 0
    try:
        while taken < concurrency:
            if slots.acquire(timeout=0.2):
                taken += 1
    finally:
        for _ in range(taken):
            slots.release()


def _wait_for_turn(arrival: float, run_started: float, slots: threading.BoundedSemaphore,
                   stop: threading.Event) -> bool:
    """Block until a device may start (its arrival time, a free slot); False if stopped."""
    due = run_started + arrival
    while (left := due - time.monotonic()) > 0:
        if stop.wait(min(left, 0.2)):
            return False
    while not slots.acquire(timeout=0.2):
        if stop.is_set():
            return False
    if stop.is_set():
        slots.release()
        return False
    return True

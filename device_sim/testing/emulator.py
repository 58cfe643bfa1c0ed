"""A running DPS emulator for tests: `stub serve` as a subprocess, or the same assembly in
this process, both with the same attributes and the same `admin` client.

    >>> from device_sim.testing import Emulator, TestCA
    >>> with Emulator.spawn(tmp_path / "emu", "--retry-after", "0") as emu:   # doctest: +SKIP
    ...     root = TestCA("root")
    ...     emu.admin.upload_ca("root", root.cert_pem, verified=True)
    ...     emu.admin.create_group("everyone", ca_ref="root")
    ...     print(emu.device_url, emu.id_scope)
    https://localhost:40321 0ne00A1B2C3

`Emulator.in_process(home)` starts `device_sim.stub.server.StubServer` in a thread of this
process instead (faster; its core objects are at `.app`). The ready line is described in
docs/emulator.md; `.ready` holds it as a dict.
"""

from __future__ import annotations

import json
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path

from device_sim.testing.admin import EmulatorAdmin

READY_DEADLINE = 30.0  # seconds a starting emulator may take to print its ready line


class EmulatorFailed(RuntimeError):
    """The emulator did not start: the message carries its exit status and its log."""


class Emulator:
    """One emulator with its state directory `home`; use as a context manager or call stop()."""

    def __init__(self, home: Path, ready: dict, *, process: subprocess.Popen | None = None,
                 server=None, log: Path | None = None):
        self.home = Path(home)
        self.ready = ready
        self.process = process
        self.server = server
        self.log = log
        self.logged: list[str] = []  # in process: the emulator's log lines
        self._admin: EmulatorAdmin | None = None

    # -- starting

    @classmethod
    def spawn(cls, home: str | Path, *extra_args: str, env: dict | None = None,
              deadline: float = READY_DEADLINE) -> "Emulator":
        """`python -m device_sim.cli stub serve --home HOME [extra_args]`, every port free
        (0) unless `extra_args` name one; returns once the ready line was read."""
        home = Path(home)
        home.mkdir(parents=True, exist_ok=True)
        log = home / "serve.log"  # a file, not a pipe nobody drains
        argv = [sys.executable, "-m", "device_sim.cli", "stub", "serve", "--home", str(home)]
        for flag, off in (("--port", None), ("--service-port", None), ("--mqtt-port", "--no-mqtt"),
                          ("--amqp-port", "--no-amqp")):
            if flag not in extra_args and off not in extra_args:
                argv += [flag, "0"]
        with open(log, "ab") as log_file:
            process = subprocess.Popen([*argv, *map(str, extra_args)], stdout=subprocess.PIPE, stderr=log_file,
                                       text=True, env=env)
        try:
            ready = _read_ready_line(process, deadline, log)
        except BaseException:
            _end(process)
            raise
        return cls(home, ready, process=process, log=log)

    @classmethod
    def in_process(cls, home: str | Path, *, mqtt: bool = True, amqp: bool = False, dashboard: bool = False,
                   faults=None, **options) -> "Emulator":
        """The `stub serve` assembly in this process; `options` are
        `device_sim.stub.server.ServeOptions` fields (retry_after defaults to 0 here).

        `mqtt`, `amqp`, `dashboard`: serve that front end too, on a free port (`mqtt_url`,
        `amqp_url`, `dashboard_url`). `faults`: a fault plan (docs/emulator.md, 'Fault
        plans') as a file path, JSON text or the parsed object. The emulator's log lines
        are kept in `logged`."""
        from device_sim.stub import server
        from device_sim.stub.core.faults import FaultPlan, parse_plan
        from device_sim.stub.net import amqp as amqp_net
        from device_sim.stub.net import dashboard as dashboard_net
        from device_sim.stub.net import mqtt as mqtt_net

        options.setdefault("retry_after", 0)
        if isinstance(faults, Path):
            faults = faults.read_bytes()
        if faults is not None and not isinstance(faults, FaultPlan):
            faults = parse_plan(faults)
        serve = server.ServeOptions(home=Path(home), faults=faults, **options)
        wanted = ((mqtt, lambda: mqtt_net.listener_factory(0)), (amqp, lambda: amqp_net.listener_factory(0)),
                  (dashboard, lambda: dashboard_net.listener_factory(0)))
        logged: list[str] = []
        stub = server.StubServer(serve, [make() for on, make in wanted if on], log=logged.append)
        emulator = cls(Path(home), stub.start(), server=stub)
        emulator.logged = logged
        return emulator

    # -- what the ready line says (docs/emulator.md); a front end not served reads None

    device_url = property(lambda self: self.ready["device_url"])
    service_url = property(lambda self: self.ready["service_url"])
    id_scope = property(lambda self: self.ready["id_scope"])
    mqtt_url = property(lambda self: self.ready.get("mqtt_url"))
    amqp_url = property(lambda self: self.ready.get("amqp_url"))
    dashboard_url = property(lambda self: self.ready.get("dashboard_url"), doc="The dashboard page with its token.")
    device_port = property(lambda self: _port(self.device_url))
    mqtt_port = property(lambda self: _port(self.mqtt_url))
    amqp_port = property(lambda self: _port(self.amqp_url))

    @property
    def ca_cert(self) -> Path:
        """The CA file a client trusts for this emulator's TLS ports."""
        return Path(self.ready["ca_cert"])

    @property
    def app(self):
        """The in-process emulator's `StubApp` (core objects); None for a subprocess."""
        return self.server.app if self.server is not None else None

    @property
    def admin(self) -> EmulatorAdmin:
        """The service API client (CAs, enrollments, registrations) of this emulator."""
        if self._admin is None:
            self._admin = EmulatorAdmin(self.home)
        return self._admin

    # -- stopping

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        """Stop the emulator; a subprocess's exit status (None in process)."""
        if self._admin is not None:
            self._admin.close()
            self._admin = None
        if self.server is not None:
            self.server.close()
            self.server = None
            return None
        if self.process is None:
            return None
        process, self.process = self.process, None
        return _end(process, sig)

    def __enter__(self) -> "Emulator":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _read_ready_line(process: subprocess.Popen, deadline: float, log: Path) -> dict:
    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ)
    ends = time.monotonic() + deadline
    try:
        while not selector.select(max(0.0, ends - time.monotonic())):
            if time.monotonic() >= ends:
                raise EmulatorFailed(f"stub serve printed no ready line within {deadline:g} s: {_tail(log)}")
    finally:
        selector.close()
    line = process.stdout.readline()
    if not line:
        code = process.wait(timeout=15)
        raise EmulatorFailed(f"stub serve exited with {code} before it was ready: {_tail(log)}")
    return json.loads(line)


def _end(process: subprocess.Popen, sig: int = signal.SIGTERM) -> int:
    if process.poll() is None:
        process.send_signal(sig)
    try:
        code = process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        code = process.wait(timeout=15)
    if process.stdout is not None:
        process.stdout.close()
    return code


def _tail(log: Path, limit: int = 2000) -> str:
    try:
        return log.read_text(errors="replace")[-limit:].strip() or "(empty log)"
    except OSError:
        return "(no log)"


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1].split("/")[0])


"""A state directory driven through the real CLIs, each command a subprocess as a user runs
it, and the usual fleet set-up on top: a CA chain, `hsm-setup fleet create`, an emulator
that trusts the root (docs/testing.md; the fleet itself: docs/fleet.md).

    >>> from device_sim.testing import StateDir, fleet_emulator, fleet_world
    >>> state = StateDir(tmp_path / "home")                        # doctest: +SKIP
    >>> state.hsm_setup("device", "show", "dev-1", check=False).returncode   # no state yet
    2
    >>> made = fleet_world(state, 10, "fl-", cas=("root", "int"), per_token=4)
    >>> made["tokens"]                                             # `fleet create --json`
    ['fleet-001', 'fleet-002', 'fleet-003']
    >>> emulator = fleet_emulator(state, "--retry-after", "0")     # root verified, group "all"
    >>> done = state.device_sim("fleet", "run", "--emulator", "--no-progress", "--prefix", "fl-")
    >>> "assigned 10" in done.stdout
    True
    >>> emulator.stop()

`StateDir(home)` holds the environment of those subprocesses: this process's, without the
variables whose names start with one of `without` (default `SOFTHSM2_CONF`: each state
directory configures its own SoftHSM), with `DEVICE_SIM_HOME`, `PKCS11_PIN` and
`PKCS11_SO_PIN` set (`pin=None` leaves the user PIN out) and `extra_env` on top (e.g. a
`SoftwareTpm`'s `env` and `PKCS11_MODULE`).
`state.env` is that dict, for a `subprocess.Popen` or a Dask worker of one's own.

`python_peak_rss(*args)` also returns the command's own peak RSS (MiB).
`python(*args)`, `hsm_setup(*args)` and `device_sim(*args)` return the
`subprocess.CompletedProcess` (text output). With `check=True` (the default) a non-zero
exit raises AssertionError naming the command, its exit code, stdout and stderr;
`timeout=` (default the StateDir's, 120 s) bounds each command.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from device_sim.testing.emulator import Emulator
from device_sim.testing.token import TEST_PIN, TEST_SO_PIN

TIMEOUT = 120.0  # seconds a command may take unless the StateDir or the call says otherwise


class StateDir:
    """One state directory (DEVICE_SIM_HOME) and the environment its commands run in."""

    def __init__(self, home: str | Path, *, pin: str | None = TEST_PIN, so_pin: str = TEST_SO_PIN,
                 without: tuple[str, ...] = ("SOFTHSM2_CONF",), extra_env: dict | None = None,
                 cwd: str | Path | None = None, timeout: float = TIMEOUT):
        self.home = Path(home)
        self.cwd = cwd
        self.timeout = timeout
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(without)}
        self.env.update(DEVICE_SIM_HOME=str(self.home), PKCS11_SO_PIN=so_pin)
        if pin is not None:
            self.env["PKCS11_PIN"] = pin
        self.env.update(extra_env or {})

    def ca_cert(self, name: str = "root") -> Path:
        """The certificate file `hsm-setup ca create NAME` wrote."""
        return self.home / "pki" / "ca" / name / "cert.pem"

    def python(self, *args, check: bool = True, timeout: float | None = None) -> subprocess.CompletedProcess:
        """`python ARGS` (this interpreter) in this state directory's environment."""
        argv = [sys.executable, *map(str, args)]
        done = subprocess.run(argv, capture_output=True, text=True, cwd=self.cwd, env=self.env,
                              timeout=self.timeout if timeout is None else timeout)
        if check and done.returncode != 0:
            raise AssertionError(f"python {' '.join(argv[1:])}: exit {done.returncode}\n"
                                 f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}")
        return done

    def python_peak_rss(self, *args, check: bool = True,
                        timeout: float | None = None) -> tuple[subprocess.CompletedProcess, float]:
        """`python(*args)` and the peak RSS in MiB of that process alone (its VmHWM, read
        from /proc while it runs; Linux). Not wait4's ru_maxrss: a child started by
        vfork/posix_spawn is charged the parent's peak up to its exec, so a large test
        process would hide what the command itself used."""
        with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
            argv = [sys.executable, *map(str, args)]
            process = subprocess.Popen(argv, stdout=out, stderr=err, text=True, cwd=self.cwd, env=self.env)
            peak, deadline = 0.0, time.monotonic() + (self.timeout if timeout is None else timeout)
            while process.poll() is None:
                peak = max(peak, _vm_hwm_mib(process.pid))
                if time.monotonic() > deadline:
                    process.kill()
                    process.wait()
                    raise AssertionError(f"python {' '.join(argv[1:])}: still running after its timeout")
                time.sleep(0.02)
            out.seek(0)
            err.seek(0)
            done = subprocess.CompletedProcess(argv, process.returncode, out.read(), err.read())
        if check and done.returncode != 0:
            raise AssertionError(f"python {' '.join(argv[1:])}: exit {done.returncode}\n"
                                 f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}")
        return done, peak

    def hsm_setup(self, *args, **kw) -> subprocess.CompletedProcess:
        return self.python("-m", "device_sim.cli.hsm_setup", *args, **kw)

    def device_sim(self, *args, **kw) -> subprocess.CompletedProcess:
        return self.python("-m", "device_sim.cli", *args, **kw)

    def fleet_create(self, count: int, prefix: str, ca: str = "root", *extra, per_token: int | None = None) -> dict:
        """`hsm-setup fleet create` of PREFIX0001... certified by `ca`; its `--json` summary."""
        shards = () if per_token is None else ("--per-token", per_token)
        done = self.hsm_setup("fleet", "create", "--count", count, "--prefix", prefix, "--ca", ca, *shards,
                              "--no-progress", "--json", *extra)
        return json.loads(done.stdout)


def _vm_hwm_mib(pid: int) -> float:
    """VmHWM of a running process in MiB; 0 once it has ended (a zombie has none)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    return 0.0


def fleet_world(state: StateDir, count: int, prefix: str, *, cas: tuple[str, ...] = ("root",),
                ca_token: str | None = "ca", ca_args: tuple = (), per_token: int | None = None,
                extra: tuple = ()) -> dict:
    """`token init CA_TOKEN` (None: the token exists), `ca create` of each of `cas` under the
    one before it (with `ca_args`), then `state.fleet_create` under the last with `extra`."""
    if ca_token is not None:
        state.hsm_setup("token", "init", ca_token)
    parent: tuple = ()
    for name in cas:
        state.hsm_setup("ca", "create", name, *parent, *ca_args)
        parent = ("--parent", name)
    return state.fleet_create(count, prefix, cas[-1], *extra, per_token=per_token)


def fleet_emulator(state: StateDir, *serve_args, ca: str = "root", group: str = "all",
                   home: str | Path | None = None, env: dict | None = None) -> Emulator:
    """`Emulator.spawn(home, *serve_args, env=env)` (home: the state directory's, where
    `--emulator` finds it) that trusts the state directory's CA `ca` (uploaded verified)
    through an enrollment group `group` on it; stopped again if that set-up fails."""
    emulator = Emulator.spawn(state.home if home is None else home, *serve_args, env=env)
    try:
        emulator.admin.upload_ca(ca, state.ca_cert(ca).read_bytes(), verified=True)
        emulator.admin.create_group(group, ca_ref=ca)
    except BaseException:
        emulator.stop()
        raise
    return emulator

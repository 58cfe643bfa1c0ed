"""A throw-away software TPM 2.0 that PKCS#11 code can use as a token, for tests.

It runs, inside one work directory and on the loopback interface only:

- a private session D-Bus (``dbus-daemon --session``),
- the TPM emulator (``swtpm socket --tpm2``) on two consecutive TCP ports,
- the resource manager (``tpm2-abrmd --session``) on that bus, talking to swtpm,

and then makes one tpm2-pkcs11 token in its own store (``tpm2_ptool init`` and
``tpm2_ptool addtoken``). Nothing outside the work directory is touched, except the
bus socket that dbus-daemon puts in /tmp and removes on exit.

Example::

    import os, pkcs11
    from device_sim.testing.tpm import SoftwareTpm

    with SoftwareTpm.start(tmp_path, label="tpm", user_pin="1234", so_pin="87654321") as tpm:
        tpm.apply_env()                         # BEFORE the module's C_Initialize
        lib = pkcs11.lib(tpm.module_path)       # python-pkcs11 calls C_Initialize here
        token = lib.get_token(token_label=tpm.token_label)
        with token.open(rw=True, user_pin=tpm.user_pin) as session:
            ...
        # a subprocess: subprocess.run([...], env={**os.environ, **tpm.env})

The environment matters: tpm2-pkcs11 reads ``TPM2_PKCS11_TCTI`` and
``TPM2_PKCS11_STORE`` (and the D-Bus address, through the tabrmd TCTI) in
C_Initialize only. A process that initialised the module before `apply_env` keeps
talking to whatever it found then; call ``lib.reinitialize()`` after changing them.
Without a reachable TPM, C_Initialize itself fails with CKR_GENERAL_ERROR.

`kill_tpm()` kills the emulator alone, to simulate a token that disappears in the
middle of a run; `stop()` (or leaving the ``with`` block) ends every process this
object started, each in its own process group, also when start-up failed half way.

Requires the Debian 12 packages swtpm, tpm2-abrmd, libtss2-tcti-tabrmd0,
libtpm2-pkcs11-1, libtpm2-pkcs11-tools and dbus; a missing one is named in the
`TpmStartError`. Start-up takes about 1.2 s on an idle 2-core machine and up to ~4 s
when the machine is busy, most of it the two tpm2_ptool runs; stopping takes ~10 ms
(`startup_seconds` holds the measured time).

This module imports only the standard library.
"""

from __future__ import annotations

import contextlib
import ctypes.util
import os
import random
import re
import select
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

__all__ = ["SoftwareTpm", "TpmStartError", "find_module"]

MODULE_NAME = "libtpm2_pkcs11.so"
MODULE_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/pkcs11/libtpm2_pkcs11.so",
    "/usr/lib/aarch64-linux-gnu/pkcs11/libtpm2_pkcs11.so",
    "/usr/lib/arm-linux-gnueabihf/pkcs11/libtpm2_pkcs11.so",
    "/usr/lib/i386-linux-gnu/pkcs11/libtpm2_pkcs11.so",
    "/usr/lib/x86_64-linux-gnu/libtpm2_pkcs11.so.1",
    "/usr/lib/aarch64-linux-gnu/libtpm2_pkcs11.so.1",
    "/usr/lib64/pkcs11/libtpm2_pkcs11.so",
    "/usr/lib/pkcs11/libtpm2_pkcs11.so",
    "/usr/local/lib/libtpm2_pkcs11.so",
)

# program -> the Debian package that ships it
PROGRAMS = {
    "dbus-daemon": "dbus",
    "dbus-send": "dbus",
    "swtpm": "swtpm",
    "tpm2-abrmd": "tpm2-abrmd",
    "tpm2_ptool": "libtpm2-pkcs11-tools",
}
# TCTI libraries the stack loads by name (library -> Debian package)
TCTI_LIBRARIES = {
    "tss2-tcti-tabrmd": "libtss2-tcti-tabrmd0",
    "tss2-tcti-swtpm": "libtss2-tcti-swtpm0",
}

TABRMD_BUS_NAME = "com.intel.tss2.Tabrmd"
TCTI_TO_ABRMD = "tabrmd:bus_type=session"
PORT_RANGE = (20000, 60000)
PORT_ATTEMPTS = 8
STOP_TIMEOUT = 5.0


class TpmStartError(RuntimeError):
    """One line: which program failed and why (its last stderr line, or the package to install)."""


def find_module() -> str | None:
    """The path of libtpm2_pkcs11.so on this machine, or None."""
    for path in MODULE_CANDIDATES:
        if Path(path).is_file():
            return path
    return None


def _find_program(name: str) -> str | None:
    # tpm2-abrmd lives in /usr/sbin, which a non-root PATH often lacks.
    extra = os.pathsep.join(("/usr/sbin", "/sbin", "/usr/local/sbin"))
    return shutil.which(name, path=os.environ.get("PATH", os.defpath) + os.pathsep + extra)


def _check_installed() -> dict[str, str]:
    """Program name -> path; TpmStartError naming the package of the first thing missing."""
    found = {}
    for program, package in PROGRAMS.items():
        path = _find_program(program)
        if path is None:
            raise TpmStartError(f"{program} not found: install the Debian package {package} "
                                f"(apt-get install {package})")
        found[program] = path
    for library, package in TCTI_LIBRARIES.items():
        if ctypes.util.find_library(library) is None:
            raise TpmStartError(f"lib{library}.so.0 not found: install the Debian package {package}")
    if find_module() is None:
        raise TpmStartError(f"{MODULE_NAME} not found: install the Debian package libtpm2-pkcs11-1")
    return found


def _last_line(path: Path) -> str:
    try:
        lines = [line.strip() for line in path.read_text(errors="replace").splitlines()]
    except OSError:
        return ""
    lines = [line for line in lines if line]
    return lines[-1][:300] if lines else ""


def _port_pair_free(port: int) -> bool:
    """True if `port` and `port + 1` can both be bound on 127.0.0.1 right now."""
    sockets = []
    try:
        for p in (port, port + 1):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sockets.append(s)
            s.bind(("127.0.0.1", p))
        return True
    except OSError:
        return False
    finally:
        for s in sockets:
            s.close()


def _pick_port_pair(rng: random.Random) -> int:
    # Not bind(0): Linux hands out ports of one parity there, and swtpm needs P and P+1.
    for _ in range(200):
        port = rng.randrange(PORT_RANGE[0], PORT_RANGE[1], 2)
        if _port_pair_free(port):
            return port
    raise TpmStartError("swtpm: found no two consecutive free TCP ports on 127.0.0.1")


class _Process:
    """A child in its own process group, its stderr in a file."""

    def __init__(self, name: str, argv: list[str], *, env: dict, cwd: Path, logdir: Path,
                 stdout=subprocess.DEVNULL):
        self.name = name
        self.stderr_path = logdir / f"{name}.stderr"
        with open(self.stderr_path, "wb") as err:
            self.popen = subprocess.Popen(argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL,
                                          stdout=stdout, stderr=err, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def last_error(self) -> str:
        return _last_line(self.stderr_path) or f"exit status {self.popen.poll()}"

    def signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.popen.pid, sig)  # start_new_session: pgid == pid
        except (ProcessLookupError, PermissionError):
            pass

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM the group, SIGKILL it after `timeout`; always reaps the child."""
        if self.alive():
            self.signal_group(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        # Whatever is left of the group (a child that ignored SIGTERM) goes too.
        self.signal_group(signal.SIGKILL)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        if self.popen.stdout is not None:
            self.popen.stdout.close()

    def kill(self) -> None:
        self.signal_group(signal.SIGKILL)
        try:
            self.popen.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            pass


class SoftwareTpm:
    """A running swtpm + tpm2-abrmd + tpm2-pkcs11 token. Make one with `start` or `launch`.

    Attributes: ``module_path``, ``token_label``, ``user_pin``, ``so_pin``, ``env`` (the
    variables a process needs to use the token), ``workdir``, ``store_dir``, ``port``
    (swtpm's command port; control is ``port + 1``), ``tcti`` (abrmd's TCTI string),
    ``primary_id`` (tpm2_ptool's primary object), ``startup_seconds``.
    """

    def __init__(self, workdir: Path, *, label: str, user_pin: str, so_pin: str,
                 max_transients: int | None = None):
        self.workdir = Path(workdir)
        if max_transients is not None and not 1 <= max_transients <= 100:
            raise ValueError("max_transients: tpm2-abrmd accepts 1..100")
        self.max_transients = max_transients
        self.token_label = label
        self.user_pin = user_pin
        self.so_pin = so_pin
        self.module_path = find_module() or MODULE_CANDIDATES[0]
        self.store_dir = self.workdir / "tpm2-pkcs11-store"
        self.state_dir = self.workdir / "swtpm-state"
        self.log_dir = self.workdir / "logs"
        self.port: int | None = None
        self.tcti: str | None = None
        self.primary_id: int | None = None
        self.bus_address: str | None = None
        self.env: dict[str, str] = {}
        self.startup_seconds: float | None = None
        self._processes: dict[str, _Process] = {}
        self._programs: dict[str, str] = {}

    # --- starting ----------------------------------------------------------------

    @classmethod
    @contextlib.contextmanager
    def start(cls, workdir, *, label: str = "tpm", user_pin: str = "1234",
              so_pin: str = "87654321", timeout: float = 30.0, max_transients: int | None = None):
        """Context manager: a started token, stopped (every process ended) on exit."""
        tpm = cls.launch(workdir, label=label, user_pin=user_pin, so_pin=so_pin, timeout=timeout,
                         max_transients=max_transients)
        try:
            yield tpm
        finally:
            tpm.stop()

    @classmethod
    def launch(cls, workdir, *, label: str = "tpm", user_pin: str = "1234",
               so_pin: str = "87654321", timeout: float = 30.0,
               max_transients: int | None = None) -> "SoftwareTpm":
        """Start everything and return the running token; the caller must call `stop()`.

        `max_transients`: tpm2-abrmd's limit of loaded TPM objects per client connection,
        1..100 (its default, 27, is what a real TPM host has too). tpm2-pkcs11 1.9 keeps
        two loaded per key pair it generated, and one per key it signed with, until
        C_Finalize: one process makes about 13 key pairs by default, about 50 with 100.

        On any failure every process started so far is ended before TpmStartError is raised.
        """
        tpm = cls(workdir, label=label, user_pin=user_pin, so_pin=so_pin,
                  max_transients=max_transients)
        began = time.monotonic()
        try:
            tpm._start(deadline=began + timeout)
        except BaseException:
            tpm.stop()
            raise
        tpm.startup_seconds = time.monotonic() - began
        return tpm

    def _start(self, *, deadline: float) -> None:
        self._programs = _check_installed()
        for folder in (self.workdir, self.store_dir, self.state_dir, self.log_dir):
            folder.mkdir(parents=True, exist_ok=True)
        base = {k: v for k, v in os.environ.items()
                if not k.startswith(("DBUS_", "TPM2_PKCS11_", "TPM2TOOLS_", "TSS2_"))}
        self.bus_address = self._start_dbus(base, deadline)
        base["DBUS_SESSION_BUS_ADDRESS"] = self.bus_address
        self._start_swtpm(base, deadline)
        self._start_abrmd(base, deadline)
        self.env = {
            "DBUS_SESSION_BUS_ADDRESS": self.bus_address,
            "TPM2_PKCS11_TCTI": TCTI_TO_ABRMD,     # the PKCS#11 module
            "TPM2TOOLS_TCTI": TCTI_TO_ABRMD,       # tpm2-tools, which tpm2_ptool runs
            "TPM2_PKCS11_STORE": str(self.store_dir),
            # The TSS libraries print every failed TPM command to stderr; tpm2-pkcs11's
            # own messages (TPM2_PKCS11_LOG_LEVEL, default: errors) still appear.
            "TSS2_LOG": "all+NONE",
        }
        self._make_token({**base, **self.env}, deadline)

    def _start_dbus(self, env: dict, deadline: float) -> str:
        proc = self._spawn("dbus-daemon", [self._programs["dbus-daemon"], "--session", "--nofork",
                                           "--print-address"], env, stdout=subprocess.PIPE)
        out = proc.popen.stdout
        line = b""
        while not line.endswith(b"\n"):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TpmStartError("dbus-daemon: printed no bus address in time")
            ready, _, _ = select.select([out], [], [], min(remaining, 0.2))
            if ready:
                chunk = os.read(out.fileno(), 4096)
                if not chunk:
                    raise TpmStartError(f"dbus-daemon failed: {proc.last_error()}")
                line += chunk
            elif not proc.alive():
                raise TpmStartError(f"dbus-daemon failed: {proc.last_error()}")
        address = line.decode().strip().splitlines()[0]
        if not address.startswith(("unix:", "tcp:")):
            raise TpmStartError(f"dbus-daemon: unexpected bus address {address!r}")
        return address

    def _start_swtpm(self, env: dict, deadline: float) -> None:
        rng = random.Random()
        for _ in range(PORT_ATTEMPTS):
            port = _pick_port_pair(rng)
            proc = self._spawn("swtpm", [
                self._programs["swtpm"], "socket", "--tpm2",
                "--tpmstate", f"dir={self.state_dir}",
                "--server", f"type=tcp,port={port},bindaddr=127.0.0.1",
                "--ctrl", f"type=tcp,port={port + 1},bindaddr=127.0.0.1",
                "--flags", "not-need-init,startup-clear",
            ], env)
            if self._wait_listening(proc, port + 1, deadline):
                self.port = port
                self.tcti = f"swtpm:host=127.0.0.1,port={port}"
                return
            error = proc.last_error()
            proc.stop()
            del self._processes["swtpm"]
            if "in use" not in error.lower():  # a port taken between the check and bind: retry
                raise TpmStartError(f"swtpm failed: {error}")
        raise TpmStartError(f"swtpm failed: no free port pair after {PORT_ATTEMPTS} attempts")

    @staticmethod
    def _wait_listening(proc: _Process, port: int, deadline: float) -> bool:
        """True once `port` accepts connections; False if the process exited."""
        while time.monotonic() < deadline:
            if not proc.alive():
                return False
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.settimeout(0.5)
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return True
            time.sleep(0.02)
        raise TpmStartError(f"{proc.name}: not listening on 127.0.0.1:{port} in time")

    def _start_abrmd(self, env: dict, deadline: float) -> None:
        argv = [self._programs["tpm2-abrmd"], "--session", "--logger=stdout", f"--tcti={self.tcti}"]
        if os.geteuid() == 0:
            argv.append("--allow-root")  # it refuses to run as root without it
        if self.max_transients is not None:
            argv.append(f"--max-transients={int(self.max_transients)}")
        proc = self._spawn("tpm2-abrmd", argv, env)
        query = [self._programs["dbus-send"], "--session", "--print-reply",
                 "--dest=org.freedesktop.DBus", "/org/freedesktop/DBus",
                 "org.freedesktop.DBus.NameHasOwner", f"string:{TABRMD_BUS_NAME}"]
        while time.monotonic() < deadline:
            if not proc.alive():
                raise TpmStartError(f"tpm2-abrmd failed: {proc.last_error()}")
            done = subprocess.run(query, env=env, capture_output=True, timeout=10)
            if done.returncode == 0 and b"boolean true" in done.stdout:
                return
            time.sleep(0.05)
        raise TpmStartError(f"tpm2-abrmd: did not appear on the session bus in time "
                            f"({proc.last_error()})")

    def _make_token(self, env: dict, deadline: float) -> None:
        out = self._ptool(env, deadline, "init")
        match = re.search(r"^id:\s*(\d+)", out, re.MULTILINE)
        if match is None:
            raise TpmStartError(f"tpm2_ptool init: no primary object id in its output {out!r}")
        self.primary_id = int(match.group(1))
        self._ptool(env, deadline, "addtoken", f"--pid={self.primary_id}",
                    f"--label={self.token_label}", f"--userpin={self.user_pin}",
                    f"--sopin={self.so_pin}")

    def _ptool(self, env: dict, deadline: float, *args: str) -> str:
        # PINs are on this argv: tpm2_ptool has no other way to take them. Test PINs only.
        remaining = max(deadline - time.monotonic(), 1.0)
        try:
            done = subprocess.run([self._programs["tpm2_ptool"], *args], env=env, cwd=self.workdir,
                                  capture_output=True, text=True, timeout=remaining,
                                  start_new_session=True)
        except subprocess.TimeoutExpired:
            raise TpmStartError(f"tpm2_ptool {args[0]}: no answer within {remaining:.0f} s") from None
        (self.log_dir / f"tpm2_ptool-{args[0]}.stderr").write_text(done.stderr)
        if done.returncode != 0:
            last = _last_line(self.log_dir / f"tpm2_ptool-{args[0]}.stderr")
            raise TpmStartError(f"tpm2_ptool {args[0]} failed: {last or f'exit status {done.returncode}'}")
        return done.stdout

    def _spawn(self, name: str, argv: list[str], env: dict, stdout=subprocess.DEVNULL) -> _Process:
        proc = _Process(name, argv, env=env, cwd=self.workdir, logdir=self.log_dir, stdout=stdout)
        self._processes[name] = proc
        return proc

    # --- using -------------------------------------------------------------------

    def apply_env(self, environ=None) -> None:
        """Put `env` into `environ` (default os.environ); do it before the module's C_Initialize."""
        (os.environ if environ is None else environ).update(self.env)

    def pids(self) -> dict[str, int]:
        """Program name -> pid of every process still running."""
        return {name: p.pid for name, p in self._processes.items() if p.alive()}

    def kill_tpm(self) -> None:
        """SIGKILL the emulator only: the token's next TPM command fails."""
        proc = self._processes.get("swtpm")
        if proc is not None:
            proc.kill()

    def stop(self) -> None:
        """End every process this object started (resource manager, emulator, bus). Idempotent."""
        for name in ("tpm2-abrmd", "swtpm", "dbus-daemon"):
            proc = self._processes.pop(name, None)
            if proc is not None:
                proc.stop()

    def __enter__(self) -> "SoftwareTpm":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        return (f"SoftwareTpm(token_label={self.token_label!r}, port={self.port}, "
                f"workdir={str(self.workdir)!r}, running={sorted(self.pids())})")

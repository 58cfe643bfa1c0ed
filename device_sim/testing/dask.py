"""A real Dask cluster on loopback for tests and benches: a `dask scheduler` and `dask worker`
processes, each worker with its own environment (its own state directory and SoftHSM
configuration, as a machine of its own would have). See docs/fleet.md, "Across machines".

    with DaskCluster(tmp_path) as cluster:
        cluster.add_worker("w1", env={**os.environ, "DEVICE_SIM_HOME": str(home1)})
        cluster.add_worker("w2", env={**os.environ, "DEVICE_SIM_HOME": str(home2)})
        subprocess.run(["device-sim", "fleet", "run", "--scheduler", cluster.address, ...])
        cluster.kill_worker("w2")   # SIGKILL: the worker is gone as a crashed machine is

With `transcript=PATH` the scheduler loads this module as a preload (`dask_setup`) and
appends every item put on a Dask queue to PATH as a JSON line: what crossed between the
coordinator and the workers, for a test to inspect (the fleet's messages all go that way,
device_sim/common/dask_shares.py).

Workers run without a nanny (`--no-nanny`), so a killed worker stays gone instead of being
restarted, and with one process and one thread each.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

START_TIMEOUT = 60.0
ENV_TRANSCRIPT = "DEVICE_SIM_DASK_TRANSCRIPT"


def _dask_command() -> list[str]:
    script = Path(sys.executable).with_name("dask")
    return [str(script)] if script.exists() else [sys.executable, "-m", "dask"]


class DaskCluster:
    def __init__(self, workdir: str | Path, *, transcript: str | Path | None = None):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.workers: dict[str, subprocess.Popen] = {}
        info = self.workdir / "scheduler.json"
        info.unlink(missing_ok=True)
        self._log = open(self.workdir / "scheduler.log", "wb")
        preload, env = [], dict(os.environ)
        if transcript is not None:
            preload, env[ENV_TRANSCRIPT] = ["--preload", __name__], str(transcript)
        self.scheduler = subprocess.Popen(
            [*_dask_command(), "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
             "--scheduler-file", str(info), *preload],
            stdout=self._log, stderr=subprocess.STDOUT, cwd=self.workdir, env=env)
        deadline = time.monotonic() + START_TIMEOUT
        while not info.exists() or not info.read_text().strip():
            if self.scheduler.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"dask scheduler did not start: {self._tail('scheduler.log')}")
            time.sleep(0.1)
        time.sleep(0.1)  # the file is written in one go, but give it a moment
        self.address = json.loads(info.read_text())["address"]

    def add_worker(self, name: str, *, env: dict[str, str] | None = None, wait: bool = True) -> None:
        """Start `dask worker --name NAME` in its own folder with `env`; wait until it joined."""
        folder = self.workdir / f"worker-{name}"
        folder.mkdir(exist_ok=True)
        log = open(folder / "worker.log", "wb")
        self.workers[name] = subprocess.Popen(
            [*_dask_command(), "worker", self.address, "--name", name, "--nworkers", "1",
             "--nthreads", "1", "--no-nanny", "--no-dashboard", "--host", "127.0.0.1",
             "--local-directory", str(folder), "--death-timeout", "60"],
            stdout=log, stderr=subprocess.STDOUT, cwd=folder, env=env or dict(os.environ))
        log.close()
        if wait:
            self.wait_for_workers(len(self.workers))

    def wait_for_workers(self, count: int) -> None:
        from distributed import Client

        with Client(self.address, timeout=START_TIMEOUT, set_as_default=False) as client:
            client.wait_for_workers(count, timeout=START_TIMEOUT)

    def kill_worker(self, name: str) -> None:
        process = self.workers[name]
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)

    def stop(self) -> None:
        for process in [*self.workers.values(), self.scheduler]:
            if process.poll() is None:
                process.terminate()
        for process in [*self.workers.values(), self.scheduler]:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self._log.close()

    def _tail(self, name: str) -> str:
        try:
            return (self.workdir / name).read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def __enter__(self) -> "DaskCluster":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def dask_setup(scheduler) -> None:
    """The scheduler preload of `DaskCluster(transcript=...)`: log every queue item."""
    path = os.environ[ENV_TRANSCRIPT]
    original = scheduler.handlers["queue_put"]

    async def put(*args, **kwargs):
        with open(path, "a", encoding="utf-8") as out:
            out.write(json.dumps(kwargs.get("data"), default=repr) + "\n")
        return await original(*args, **kwargs)

    scheduler.handlers["queue_put"] = put

"""`device-sim stub serve` as a real subprocess, and the CLI as tests run it."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

API = "2021-06-01"
REPO = Path(__file__).resolve().parents[2]


def cli(*args, check: bool = True, env: dict | None = None, program: str = "device_sim.cli"
        ) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", program, *map(str, args)],
                            capture_output=True, text=True, cwd=REPO, timeout=60, env=env)
    if check and result.returncode != 0:
        raise AssertionError(f"device-sim {' '.join(map(str, args))} failed: {result.stderr}")
    return result


class Emulator:
    def __init__(self, home: Path, *extra: str):
        self.home = home
        home.mkdir(parents=True, exist_ok=True)
        self.log = home / "serve.log"  # a file, not a pipe nobody drains
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "device_sim.cli", "stub", "serve", "--home", str(home),
                 "--retry-after", "0", "--mqtt-port", "0", "--amqp-port", "0", *extra],
                stdout=subprocess.PIPE, stderr=log, text=True, cwd=REPO,
            )
        line = self.process.stdout.readline()
        if not line:
            self.process.wait(timeout=15)
            raise AssertionError(f"serve did not start: {self.log.read_text()}")
        self.ready = json.loads(line)

    @property
    def device_url(self) -> str:
        return self.ready["device_url"]

    def admin(self, *args, check: bool = True):
        return cli("stub", *args, "--home", self.home, check=check)

    def stop(self, sig=signal.SIGTERM) -> int:
        self.process.send_signal(sig)
        code = self.process.wait(timeout=15)
        self.process.stdout.close()
        return code

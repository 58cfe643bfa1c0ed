"""The CLI as these tests run it, and the emulator's admin verbs against a running emulator
(`device_sim.testing.Emulator`)."""

from __future__ import annotations

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


def stub_admin(emulator, *args, check: bool = True) -> subprocess.CompletedProcess:
    """`device-sim stub ARGS --home <the emulator's home>`."""
    return cli("stub", *args, "--home", emulator.home, check=check)

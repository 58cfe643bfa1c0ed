"""The official Azure SDKs run from their own venv (`make venv` makes `.venv/sdk`:
azure-iot-device pins paho-mqtt < 2, which the test extras cannot share), and a lock for
the fixed ports those SDKs dial."""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from pathlib import Path

import pytest

from .emulator_proc import REPO

# Held by every test that binds the SDKs' fixed ports (443, 8883), so two test runs on one
# machine wait for each other instead of failing with "port in use".
PORT_LOCK = Path(tempfile.gettempdir()) / "device-sim-sdk-ports.lock"


def sdk_python() -> str:
    path = os.environ.get("DEVICE_SIM_SDK_PYTHON") or str(REPO / ".venv" / "sdk" / "bin" / "python")
    if not Path(path).is_file():
        pytest.fail(f"no azure-iot-device venv at {path}: run 'make venv' (or set DEVICE_SIM_SDK_PYTHON)")
    return path


@contextlib.contextmanager
def fixed_ports():
    with open(PORT_LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)

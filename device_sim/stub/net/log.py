"""The emulator's one log sink: a line on stderr (stdout carries only the ready line)."""

from __future__ import annotations

import sys


def log_stderr(message: str) -> None:
    print(f"device-sim stub: {message}", file=sys.stderr, flush=True)

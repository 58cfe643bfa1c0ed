"""Ending a program without the interpreter's teardown.

For programs that loaded a PKCS#11 module through awscrt: a `fleet run` that had written
its whole report hung at exit, its main thread in SoftHSM waiting on a mutex awscrt had
handed SoftHSM at C_Initialize (docs/fleet.md, "Memory"). Whatever the program wrote must
be closed by then; only stdout and stderr are flushed here.
"""

from __future__ import annotations

import contextlib
import os
import sys


def exit_now(code: int) -> None:
    """Flush stdout and stderr, then end the process with `code` (no atexit, no teardown)."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)

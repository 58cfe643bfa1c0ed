"""Stopping at a safe point: SIGINT / SIGTERM become a flag that long loops check.

Creating an identity is several token writes plus a registry row; a signal acted on in
the middle would leave a key without its certificate or a row without its key. So
signals only ask to stop, and the work stops before it starts the next identity.
"""

from __future__ import annotations

import signal
import threading


class Interrupted(Exception):
    """Ctrl-C / SIGTERM seen: the run stopped between two identities."""


class StopRequest:
    """Context manager: while active, SIGINT and SIGTERM only set `requested`.

    A second signal raises KeyboardInterrupt at once. Only the main thread may install
    signal handlers; elsewhere it is a plain flag.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested = False
        self._previous = {}

    def _handler(self, signum, frame):
        if self.requested:  # asked twice: the user means it (e.g. a module that hangs)
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handler)
                # Restart system calls the signal lands in: an EINTR inside the PKCS#11
                # module (a file lock or read in SoftHSM) surfaces as CKR_GENERAL_ERROR.
                signal.siginterrupt(sig, False)
        return self

    def __exit__(self, *exc):
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        return False

"""The HTTP client of custom allocation webhooks: the core's `WebhookCaller`, a few worker
threads owned by the server, `requests` underneath (docs/emulator.md, "Custom allocation
webhooks").

Each call is a POST of the AllocationRequest with a deadline: connecting, sending and
each wait for the answer's head get the timeout, and the whole answer must be in by the
deadline, so a webhook that trickles its body byte by byte is a timeout too. The URL is never logged or put in an error text: its query
usually carries the function key.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import requests

from device_sim.stub.core.webhook import WebhookAnswer, WebhookCall

DEFAULT_TIMEOUT = 10.0
DEFAULT_WORKERS = 4
MAX_ANSWER = 1024 * 1024  # an AllocationResponse is small; more is refused, not buffered


class WebhookClient:
    def __init__(self, trust: Path | None = None, timeout: float = DEFAULT_TIMEOUT,
                 workers: int = DEFAULT_WORKERS, log: Callable[[str], None] = lambda _: None):
        """`trust`: CA certificates (PEM) for https webhooks; None = the system's."""
        self.trust = trust
        self.timeout = timeout
        self.log = log
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="webhook")
        self._local = threading.local()  # a Session per worker: Sessions are not thread-safe
        self._closed = False

    def submit(self, call: WebhookCall, done: Callable[[WebhookAnswer], None]) -> None:
        self._pool.submit(self._run, call, done)

    def close(self) -> None:
        """Stop taking calls; one in progress ends at its deadline (its outcome may be lost,
        which the core reports on the device's next poll after a restart)."""
        self._closed = True
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _run(self, call: WebhookCall, done: Callable[[WebhookAnswer], None]) -> None:
        answer = self.post(call)
        if self._closed:  # the server, its store included, is gone: nobody to tell
            return
        if answer.error:
            self.log(f"custom allocation webhook at {_where(call.url)}: {answer.error}")
        done(answer)

    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
        return session

    def post(self, call: WebhookCall) -> WebhookAnswer:
        """One POST, its answer or why there is none (never raises)."""
        deadline = time.monotonic() + self.timeout
        try:
            with self._session().post(
                    call.url, json=call.document, timeout=self.timeout, stream=True,
                    allow_redirects=False, headers={"Accept": "application/json"},
                    # Per request: requests lets $REQUESTS_CA_BUNDLE override a session's.
                    verify=str(self.trust) if self.trust else True) as response:
                body = self._read(response, deadline)
                if body is None:
                    return WebhookAnswer(error=self._late())
                if len(body) > MAX_ANSWER:
                    return WebhookAnswer(error=f"the webhook's answer is larger than {MAX_ANSWER} bytes")
                return WebhookAnswer(response.status_code, body)
        except requests.exceptions.Timeout:
            return WebhookAnswer(error=self._late())
        except requests.exceptions.SSLError:
            return WebhookAnswer(error=f"TLS to {_where(call.url)} failed (the emulator must trust its "
                                       "certificate: stub serve --webhook-trust FILE)")
        except requests.exceptions.RequestException as exc:
            return WebhookAnswer(error=f"the webhook at {_where(call.url)} could not be reached "
                                       f"({type(exc).__name__})")

    @staticmethod
    def _read(response: requests.Response, deadline: float) -> bytes | None:
        """The body, at most MAX_ANSWER + 1 bytes of it; None past the deadline. Reads
        what has arrived (`read1`), so a body trickled byte by byte meets the deadline
        too instead of filling a fixed-size read."""
        raw = response.raw
        read = getattr(raw, "read1", None) or raw.read  # read1: urllib3 2
        chunks, size = [], 0
        while size <= MAX_ANSWER:
            if time.monotonic() > deadline:
                return None
            chunk = read(64 * 1024, decode_content=True)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        return b"".join(chunks) if time.monotonic() <= deadline else None

    def _late(self) -> str:
        return f"the webhook did not answer within {self.timeout:g} s"


def _where(url: str) -> str:
    """scheme://host:port of the URL, without path or query (which may hold a key)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"

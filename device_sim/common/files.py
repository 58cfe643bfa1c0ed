"""Writing files so a reader never sees half of one: write beside, then rename over."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def write_atomic(path: str | os.PathLike, data: bytes | str, *, private: bool = False) -> Path:
    """Replace `path` with `data` in one rename; `private=True` makes it owner-only (0600)
    from the first byte, for secrets. Returns the path."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    with atomic_writer(path, private=private) as handle:
        handle.write(raw)
    return Path(path)


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike, *, private: bool = False):
    """A binary file handle whose content replaces `path` in one rename when the block
    ends without an exception (a document written in pieces, never held whole)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise

"""'did you mean X?' for a mistyped name, over the names that exist."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """' (did you mean 'X'?)' for the closest known name (compared case-insensitively), else ''."""
    lowered = {k.lower(): k for k in known if k}
    close = difflib.get_close_matches((name or "").lower(), list(lowered), n=1, cutoff=0.6)
    return f" (did you mean {lowered[close[0]]!r}?)" if close else ""

"""The state directory: everything a run creates lives below it, nothing outside."""

from __future__ import annotations

import os
from pathlib import Path

ENV_HOME = "DEVICE_SIM_HOME"
DEFAULT_HOME = ".device-sim"


def resolve_home(arg: str | os.PathLike | None = None) -> Path:
    """`--home DIR`, else $DEVICE_SIM_HOME, else ./.device-sim (absolute, not created)."""
    raw = arg if arg else os.environ.get(ENV_HOME) or DEFAULT_HOME
    return Path(raw).expanduser().resolve()


def ensure_home(arg: str | os.PathLike | None = None) -> Path:
    """Resolve the state directory and create it (private to the user)."""
    home = resolve_home(arg)
    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    return home

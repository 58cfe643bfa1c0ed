"""Options several verbs share; only the CLI package knows flag names."""

from __future__ import annotations

from pathlib import Path

from device_sim.common.errors import EXIT_USAGE, UserError
from device_sim.common.home import DEFAULT_HOME, ENV_HOME, resolve_home


def add_home_argument(parser) -> None:
    """The `--home` option every command that touches state takes."""
    parser.add_argument(
        "--home",
        metavar="DIR",
        default=None,
        help=f"state directory (default: ${ENV_HOME} or ./{DEFAULT_HOME})",
    )


def existing_home(arg, *, hint: str = "verbs that create state, e.g. `hsm-setup ca create`, make it",
                  exit_code: int = EXIT_USAGE) -> Path:
    """The state directory of a verb that only reads: a mistyped `--home` is an error, not a
    new empty directory (verbs that create state use `ensure_home`)."""
    home = resolve_home(arg)
    if not home.is_dir():
        raise UserError(f"no state directory at {home}: check --home or ${ENV_HOME} ({hint})",
                        exit_code=exit_code, code="no_home")
    return home

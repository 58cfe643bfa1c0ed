"""Options several verbs share; only the CLI package knows flag names."""

from __future__ import annotations

from device_sim.common.home import DEFAULT_HOME, ENV_HOME


def add_home_argument(parser) -> None:
    """The `--home` option every command that touches state takes."""
    parser.add_argument(
        "--home",
        metavar="DIR",
        default=None,
        help=f"state directory (default: ${ENV_HOME} or ./{DEFAULT_HOME})",
    )

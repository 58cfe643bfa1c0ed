"""The CLI runner shared by `hsm-setup` and `device-sim`: a failure the user can see
becomes one line on stderr and an exit code."""

import sys

from device_sim.common.errors import EXIT_INTERRUPTED, UserError


def run_cli(prog: str, parser, argv: list[str] | None) -> int:
    """Parse `argv`, run the chosen verb, and turn the failures a user can see into one line."""
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except UserError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stderr.close()
        return 1

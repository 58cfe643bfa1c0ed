"""The one error type every CLI turns into a one-line message and an exit code, and the
CLI runner that does it (shared by `hsm-setup` and `device-sim`)."""

import sys

# Exit codes shared by both CLIs for failures that are not a protocol outcome.
EXIT_USAGE = 2  # bad arguments, bad input, bad configuration


class UserError(Exception):
    """A failure the user can fix: the message names what is wrong and what to do.

    Never put a secret (PIN, SAS key) into the message.
    """

    def __init__(self, message: str, exit_code: int = EXIT_USAGE):
        super().__init__(message)
        self.exit_code = exit_code


EXIT_INTERRUPTED = 130


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

"""The one error type every CLI turns into a one-line message and an exit code.

Libraries raise `UserError`; only the CLI package (`device_sim/cli/`) prints it.
"""

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

"""The one error type every CLI turns into a one-line message, and the one table of exit codes.

Libraries raise `UserError`; only the CLI package (`device_sim/cli/`) prints it and picks the
exit code (docs/device.md, docs/fleet.md list them for users).
"""

# Both CLIs (device-sim, hsm-setup).
EXIT_OK = 0
EXIT_USAGE = 2  # bad arguments, bad input, bad configuration
EXIT_INTERRUPTED = 130  # Ctrl-C

# `device-sim register`: one code per way a registration ends.
EXIT_ASSIGNED = EXIT_OK
EXIT_DISABLED = 3
EXIT_UNAUTHORIZED = 4
EXIT_FAILED = 5
EXIT_TIMEOUT = 6  # timeout or unreachable: nothing (final) came back in time
EXIT_TLS = 7
EXIT_PROTOCOL = 8  # refused request (other 4xx) or an answer the device cannot parse

# `device-sim fleet run` and `device-sim chain lint`.
EXIT_SOME_NOT_ASSIGNED = 1
EXIT_LINT_FAILED = 1

EXIT_MEANINGS = {
    EXIT_ASSIGNED: "assigned to a hub",
    EXIT_USAGE: "usage or configuration error (arguments, PIN, token object, certificate checks)",
    EXIT_DISABLED: "the matching enrollment is disabled",
    EXIT_UNAUTHORIZED: "DPS refused the device: HTTP 401 (chain not verified, unknown certificate, ID mismatch)",
    EXIT_FAILED: "DPS accepted the device but the assignment failed (status 'failed')",
    EXIT_TIMEOUT: "timeout or endpoint unreachable",
    EXIT_TLS: "TLS handshake failed (server not trusted, client certificate refused)",
    EXIT_PROTOCOL: "request refused (other HTTP 4xx) or an answer that is not DPS protocol",
    EXIT_INTERRUPTED: "interrupted (Ctrl-C)",
}

# What `device-sim register --help` lists, in this order.
REGISTER_EXIT_CODES = (EXIT_ASSIGNED, EXIT_USAGE, EXIT_DISABLED, EXIT_UNAUTHORIZED, EXIT_FAILED,
                       EXIT_TIMEOUT, EXIT_TLS, EXIT_PROTOCOL)


# The `code` of `--json` errors when neither the raise nor the error class names one.
EXIT_SLUGS = {
    EXIT_USAGE: "usage",
    EXIT_DISABLED: "disabled",
    EXIT_UNAUTHORIZED: "unauthorized",
    EXIT_FAILED: "failed",
    EXIT_TIMEOUT: "timeout",
    EXIT_TLS: "tls",
    EXIT_PROTOCOL: "protocol",
    EXIT_INTERRUPTED: "interrupted",
}


class UserError(Exception):
    """A failure the user can fix: the message names what is wrong and what to do.

    `code` is a short stable slug scripts may match on (`--json` errors); a subclass may set
    it as a class attribute. Never put a secret (PIN, SAS key) into the message.
    """

    code: str | None = None

    def __init__(self, message: str, exit_code: int = EXIT_USAGE, code: str | None = None):
        super().__init__(message)
        self.exit_code = exit_code
        if code:
            self.code = code


class Notice(UserWarning):
    """Something the user should fix that does not stop the run (a PIN file others can
    read). Libraries `warnings.warn(text, Notice)`; the CLI prints each once as
    `PROG: warning: ...` after a verb that succeeded, so a failure stays one line."""

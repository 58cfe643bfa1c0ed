"""The CLI runner shared by `hsm-setup` and `device-sim`: a failure the user can see
becomes one line on stderr and an exit code, and with `--json` also one JSON object on
stdout (`{"error": {"code", "message", "exit_code"}}`, docs/device.md "Errors as JSON") so scripts
need not parse stderr."""

import contextlib
import io
import json
import re
import sys
import warnings

from device_sim.common.process_exit import exit_now
from device_sim.common.errors import EXIT_INTERRUPTED, EXIT_SLUGS, EXIT_USAGE, Notice, UserError


_skip_teardown = False


def skip_teardown() -> None:
    """Ask the program to end as soon as the verb is done, without the interpreter's
    teardown (`end_program`, device_sim/common/process_exit.py): for verbs that loaded a
    PKCS#11 module through awscrt."""
    global _skip_teardown
    _skip_teardown = True


def end_program(code: int) -> int:
    """Exit with `code` now if the verb asked to skip teardown; else return it for `sys.exit`."""
    if _skip_teardown:
        exit_now(code)
    return code


def run_cli(prog: str, parser, argv: list[str] | None) -> int:
    """Parse `argv`, run the chosen verb, and turn the failures a user can see into one line."""
    args = _parse(parser, argv)
    wants_json = bool(getattr(args, "json", False))
    try:
        return _run_with_notices(prog, args)
    except UserError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        if wants_json:
            print_json_error(error_code(exc), str(exc), exc.exit_code)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        if wants_json:
            print_json_error("interrupted", "interrupted", EXIT_INTERRUPTED)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stderr.close()
        return 1


def _run_with_notices(prog: str, args) -> int:
    """Run the verb; the `Notice` warnings it raised are printed once it succeeded (a failure
    stays one line), other warnings go where Python sends them."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default", Notice)
        code = args.func(args) or 0
    for item in caught:
        if issubclass(item.category, Notice):
            if code == 0:
                print(f"{prog}: warning: {item.message}", file=sys.stderr)
        else:
            warnings.showwarning(item.message, item.category, item.filename, item.lineno)
    return code


def _parse(parser, argv: list[str] | None):
    """argparse's usage errors exit on their own; with `--json` among the words the
    message it printed is repeated as a JSON error before that exit."""
    words = sys.argv[1:] if argv is None else argv
    if "--json" not in words:
        return parser.parse_args(argv)
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            return parser.parse_args(argv)
    except SystemExit as exc:
        text = captured.getvalue()
        sys.stderr.write(text)
        if exc.code not in (0, None):
            found = re.findall(r"error: (.*)", text)
            print_json_error("usage", found[-1] if found else text.strip(),
                             exc.code if isinstance(exc.code, int) else EXIT_USAGE)
        raise


def error_code(exc: UserError) -> str:
    """The raise's or class's `code`, else the error class's name as a slug
    (CertificateError -> certificate), else the exit code's slug."""
    if exc.code:
        return exc.code
    if type(exc) is not UserError:
        name = type(exc).__name__.removesuffix("Error")
        return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()
    return EXIT_SLUGS.get(exc.exit_code, "error")


def print_json_error(code: str, message: str, exit_code: int) -> None:
    print(json.dumps({"error": {"code": code, "message": message, "exit_code": exit_code}}))
    sys.stdout.flush()

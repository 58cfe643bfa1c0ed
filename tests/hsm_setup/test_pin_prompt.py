"""PINs typed at a terminal: prompted with echo off, never shown."""

import os
import pty
import select
import sys
import time
from pathlib import Path

from hsm_setup import module, tokens


def _run_on_terminal(argv, env, answers, timeout=60):
    """Run argv with a pseudo-terminal as its terminal; answer each prompt in turn."""
    pid, fd = pty.fork()
    if pid == 0:  # child
        os.execve(argv[0], argv, env)
    output, pending, deadline = b"", list(answers), time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # child closed the terminal
                break
            if not chunk:
                break
            output += chunk
            # answer each prompt once, when it appears (typing ahead would be echoed)
            prompts = output.count(b"PIN: ")
            while pending and prompts > len(answers) - len(pending):
                os.write(fd, pending.pop(0).encode() + b"\n")
    else:
        os.kill(pid, 9)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), output.decode(errors="replace")


def test_token_init_prompts_for_pins(softhsm_home):
    h = softhsm_home
    env = {k: v for k, v in os.environ.items() if k not in ("PKCS11_PIN", "PKCS11_SO_PIN")}
    env["SOFTHSM2_CONF"] = str(h.home / module.SOFTHSM_CONF_NAME)
    cli = str(Path(sys.executable).with_name("hsm-setup"))
    code, output = _run_on_terminal([cli, "token", "init", "typed"], env,
                                    ["typed-so-pin-42", "typed-user-pin-42"])
    assert code == 0, output
    assert "SO PIN:" in output and "user PIN:" in output
    assert "typed-so-pin-42" not in output and "typed-user-pin-42" not in output  # no echo
    lib = h.lib(fresh=True)
    assert tokens.session(lib, "typed", "typed-user-pin-42") is not None
